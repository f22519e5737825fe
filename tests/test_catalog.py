"""`ssltrain-list` shows every objective with what fits it, derived from the classes' own checks."""

from __future__ import annotations

import subprocess
import sys

from conftest import CONF

from ssltrain.catalog import catalog


def test_every_objective_is_listed_with_a_summary_and_something_that_fits():
    rows = {row["name"]: row for row in catalog()}
    assert set(rows) == {p.stem for p in (CONF / "objective").glob("*.yaml")}
    for name, row in rows.items():
        assert row["summary"] and not row["summary"].startswith("(broken"), name
        assert row["models"] and row["data"], f"objective {name} fits no model/data group"
    assert "bert-tiny" in rows["mlm"]["models"] and "gpt2-tiny" not in rows["mlm"]["models"]
    assert rows["ar"]["models"] == ["gpt2", "gpt2-tiny"]
    assert "docs" in rows["mlm"]["data"]


def test_ssltrain_list_command_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "ssltrain.catalog"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "mlm" in out.stdout and "bert-tiny" in out.stdout and "hardware groups: cpu" in out.stdout
