"""scripts/bench.py runs the real training step on CPU and reports well-formed figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, TINY


@pytest.mark.slow
def test_bench_reports_throughput_as_json_and_as_a_table(cache_dir):
    import os

    env = {**os.environ, "SSLTRAIN_CACHE": str(cache_dir)}
    cmd = [sys.executable, str(REPO / "scripts" / "bench.py"), "--warmup", "1", "--steps", "2", *TINY]
    out = subprocess.run([*cmd, "--json", "--peak-tflops", "1"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["model"] == "bert-tiny" and result["device"] == "cpu"
    assert result["tokens_per_s"] > 0 and result["step_time_ms"] > 0
    assert 0 < result["mfu"] < 1
    table = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert table.returncode == 0
    rows = dict(line.split(None, 1) for line in table.stdout.strip().splitlines()[-11:])
    assert {"tokens_per_s", "step_time_ms", "mfu", "peak_memory_gib"} <= set(rows)
