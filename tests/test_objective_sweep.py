"""One sweep across the text objectives, each with the model its YAML picks, then one comparison table.

`ssltrain -m objective=mlm,ar,electra,span_corruption,nsp,mlm_nsp,simcse` is how a user compares
objectives: no job may need a `model=` of its own (ar used to stop with "needs a causal model"),
and `ssltrain-compare` must put every job in the table (its probes, which README's own sweep
command runs, are left out here: --no-probe).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import read_metrics
from omegaconf import OmegaConf

BIN = Path(sys.executable).parent
OBJECTIVES = {"mlm": "bert-tiny", "ar": "gpt2-tiny", "electra": "electra-tiny", "span_corruption": "t5-tiny",
              "nsp": "bert-tiny", "mlm_nsp": "bert-tiny", "simcse": "bert-tiny"}


@pytest.mark.slow
def test_a_sweep_across_objectives_runs_each_with_its_model_and_compares_them(cache_dir, tmp_path):
    import os

    env = {**os.environ, "SSLTRAIN_CACHE": str(cache_dir)}
    sweep = tmp_path / "cmp"
    proc = subprocess.run([str(BIN / "ssltrain"), "-m", f"objective={','.join(OBJECTIVES)}", "trainer.max_steps=3",
                           f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.jsonl").is_file())
    assert len(jobs) == len(OBJECTIVES)
    for job, (objective, model) in zip(jobs, OBJECTIVES.items()):
        assert OmegaConf.load(job / "config.yaml").model.name == model, job.name
        assert job.name.startswith(f"{jobs.index(job)}_objective={objective},"), job.name
        assert [r["step"] for r in read_metrics(job) if r["kind"] == "end"] == [3], job.name
        assert (job / "final" / "config.json").is_file()

    compare = subprocess.run([str(BIN / "ssltrain-compare"), str(sweep), "--no-probe"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert compare.returncode == 0, compare.stderr[-4000:]
    table = (sweep / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "_objective=" in line]
    assert [row.split("|")[2].strip() for row in rows] == list(OBJECTIVES)
    assert [row.split("|")[3].strip() for row in rows] == list(OBJECTIVES.values())
