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
    for run in ("ssltrain", "hf_baseline"):
        assert result[run]["tokens_per_s"] > 0 and result[run]["step_time_ms"] > 0
        assert 0 < result[run]["mfu"] < 1
    assert result["speedup_vs_hf"] == pytest.approx(
        result["ssltrain"]["tokens_per_s"] / result["hf_baseline"]["tokens_per_s"], rel=1e-2)
    # FLOPs per token by the formula: 6 x (non-embedding + vocab x hidden) + 12 x L x H x T.
    h, layers, t, vocab = 128, 2, 64, 2048  # bert-tiny, TINY seq_len, vocab 2000 padded to 64
    non_embedding = layers * (4 * h * h + 4 * h + 2 * h * 4 * h + 4 * h + h + 4 * h) + 2 * h  # blocks + emb LN
    non_embedding += h * h + h + 2 * h + vocab  # MLM head transform + LN + decoder bias
    assert result["flops_per_token"] == 6 * (non_embedding + vocab * h) + 12 * layers * h * t
    table = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert table.returncode == 0
    lines = table.stdout.strip().splitlines()
    assert lines[-6].split() == ["ssltrain", "hf_baseline"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[-5:]}
    assert set(rows) == {"tokens_per_s", "step_time_ms", "achieved_tflops", "mfu", "peak_memory_gib"}
    assert all(len(values) == 2 for values in rows.values())


@pytest.mark.slow
def test_bench_overhead_mode_times_the_real_loop_against_the_bare_step(cache_dir):
    import os

    env = {**os.environ, "SSLTRAIN_CACHE": str(cache_dir)}
    cmd = [sys.executable, str(REPO / "scripts" / "bench.py"), "--warmup", "1", "--steps", "1", "--no-baseline",
           "--overhead", "--overhead-rounds", "1", "--overhead-windows", "2", *TINY]
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "hf_baseline" not in result and result["compile"] is False
    overhead = result["loop_overhead"]
    assert overhead["windows"] == 2 and overhead["steps_per_window"] == 5  # TINY: trainer.log_every=5
    assert overhead["loop_tokens_per_s"] > 0 and overhead["bare_tokens_per_s"] > 0
    # overhead = (loop step time - bare step time) / bare step time, from the reported rates
    expected = 100 * (overhead["bare_tokens_per_s"] / overhead["loop_tokens_per_s"] - 1)
    assert overhead["overhead_pct"] == pytest.approx(expected, abs=0.02)
    assert -100 < overhead["overhead_pct_median"] < 1000 and len(overhead["load_avg_1min"]) == 2
    table = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert table.returncode == 0
    lines = table.stdout.strip().splitlines()
    assert lines[-8] == "loop overhead (real loop vs bare step)"
    assert [line.split()[0] for line in lines[-7:]] == list(overhead)


@pytest.mark.slow
def test_bench_loss_and_profile_modes_time_the_cross_entropy_and_the_step_by_operator(cache_dir, tmp_path):
    import os

    env = {**os.environ, "SSLTRAIN_CACHE": str(cache_dir)}
    trace = tmp_path / "trace.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench.py"), "--warmup", "1", "--steps", "1", "--no-baseline",
           "--loss", "--profile", "2", "--trace", str(trace), "--json", *TINY, "objective=ar", "model=gpt2-tiny"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    profile = result["profile"]
    assert profile["time"] == "cpu" and profile["steps"] == 2 and profile["total_ms_per_step"] > 0
    top = profile["top"]
    assert 0 < len(top) <= 15 and 0 < sum(row["share"] for row in top) <= 1.0001
    assert [row["ms_per_step"] for row in top] == sorted((row["ms_per_step"] for row in top), reverse=True)
    assert any(row["op"] in ("aten::mm", "aten::addmm") for row in top)  # a transformer's time is in matmuls
    assert json.loads(trace.read_text())["traceEvents"]
    loss = result["loss"]
    assert loss["shape"] == [16, 64, 2048] and loss["dtype"] == "float32"  # TINY micro-batch, seq_len, vocab
    assert all(loss[k] > 0 for k in ("eager_ms", "compiled_ms", "hf_ms"))
    images = subprocess.run([*cmd[:-len(TINY) - 2], "objective=simclr"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert images.returncode == 2 and "--loss times the token cross-entropy" in images.stderr


@pytest.mark.slow
def test_bench_variants_share_one_process_and_one_baseline(cache_dir, tmp_path):
    """--variant measures several configurations in one process (no start-up, data or baseline cost
    per configuration): one JSON line each, in order, all against the same HF baseline."""
    import os

    env = {**os.environ, "SSLTRAIN_CACHE": str(cache_dir)}
    cmd = [sys.executable, str(REPO / "scripts" / "bench.py"), "--warmup", "1", "--steps", "1", "--json", *TINY,
           "--variant", "", "--variant", "trainer.seq_len=32 trainer.micro_batch_size=8"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    first, second = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    assert first["variant"] == "" and second["variant"] == "trainer.seq_len=32 trainer.micro_batch_size=8"
    assert (first["seq_len"], first["micro_batch_size"]) == (64, 16)  # TINY's
    assert (second["seq_len"], second["micro_batch_size"]) == (32, 8)
    assert first["hf_baseline"]["tokens_per_s"] == second["hf_baseline"]["tokens_per_s"]
    # the baseline ran with the first variant's shape; a line whose shape differs says so
    assert "baseline_config" not in first and second["baseline_config"]["seq_len"] == 64
    for result in (first, second):
        assert result["speedup_vs_hf"] == pytest.approx(
            result["ssltrain"]["tokens_per_s"] / result["hf_baseline"]["tokens_per_s"], rel=1e-2)
    # scripts/bench_gpu.sh pipes these lines through bench_summary.py: one tagged record and one line each
    results, summary = tmp_path / "results.jsonl", tmp_path / "summary.txt"
    summarised = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_summary.py"), "bert", str(results),
                                 str(summary)], input=out.stdout + '{"variant": "x", "error": "OutOfMemoryError"}\n',
                                capture_output=True, text=True, timeout=60)
    assert summarised.returncode == 0, summarised.stderr
    lines = summary.read_text().splitlines()
    assert lines == summarised.stdout.splitlines() and len(lines) == 3
    assert lines[0].startswith("bert [as given] micro 16: ssltrain ") and "| ratio " in lines[0]
    assert lines[1].startswith("bert [trainer.seq_len=32 trainer.micro_batch_size=8] micro 8: ")
    assert lines[2] == "bert [x]: failed: OutOfMemoryError"
    assert [json.loads(line)["section"] for line in results.read_text().splitlines()] == ["bert"] * 3
    bad = subprocess.run([*cmd[:-1], "trainer.micro_batch_size=7"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode != 0 and not bad.stdout.strip()  # a bad variant stops before anything is measured
