"""Data-parallel training on CPU: two launcher-started processes form one gloo group.

The real CLI is started by the two launchers users run (torchrun, and `accelerate launch
--multi_gpu`, which the README documents); GPUs are hidden so the runs are CPU runs on every
machine. A two-process run must show world_size 2, disjoint data per rank and the same final
weights on both ranks (different data + the same weights = gradients were all-reduced). And a
process that the launcher counts as one of 2 but that ends up alone must fail loudly (one
`ssltrain: error:` line, non-zero exit) instead of training by itself, and never hang.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, read_metrics

LAUNCH_TIMEOUT_S = 240  # a two-process TINY run takes ~25 s on 2 cores; a hang fails instead of blocking CI
ALONE = "the launcher started 2 processes (WORLD_SIZE) but this one joined a group of 1"
# Set by an outer launcher (pytest itself run under torchrun/SLURM): they would leak into the children.
DIST_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
            "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher(name: str, port: int) -> list[str]:
    """The argv prefix that starts 2 local processes of the module that follows."""
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
    # What the README documents: `accelerate launch --multi_gpu --num_processes 2 -m ssltrain ...`.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]


def child_env(tmp_path: Path, cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env.update(
        SSLTRAIN_CACHE=str(cache_dir),
        CUDA_VISIBLE_DEVICES="",  # CPU (gloo) even on a GPU machine
        HF_HOME=str(tmp_path / "hf-home"),  # no ~/.cache/huggingface/accelerate/default_config.yaml
        TMPDIR=str(tmp_path / "tmp"),  # where ranks > 0 put their scratch Hydra dirs
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def run_group(argv: list[str], cwd: Path, env: dict[str, str], timeout: int = LAUNCH_TIMEOUT_S):
    """Run a launcher in its own process group; on timeout kill that whole group (launcher and
    workers) and fail with the output so far."""
    proc = subprocess.Popen(argv, cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(argv)} hung for {timeout}s\n--- stdout\n{out[-3000:]}\n"
                    f"--- stderr\n{err[-6000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("launcher_name", ["accelerate", "torchrun"])
def test_two_cpu_processes_train_one_model_on_different_data(launcher_name, cache_dir, tmp_path):
    from transformers import AutoModelForMaskedLM

    cwd, run = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    argv = [*launcher(launcher_name, free_port()), "-m", "ssltrain", *TINY, "trainer.batch_size=32",
            "trainer.micro_batch_size=16", "trainer.max_steps=10", f"hydra.run.dir={run}"]
    proc = run_group(argv, cwd, child_env(tmp_path, cache_dir))
    assert proc.returncode == 0, proc.stderr[-6000:]

    records = read_metrics(run)
    starts = [r for r in records if r["kind"] == "start"]
    ends = [r for r in records if r["kind"] == "end"]
    assert len(starts) == 1 and len(ends) == 1, "only rank 0 writes records"
    start, end = starts[0], ends[0]
    assert start["world_size"] == 2 and end["world_size"] == 2
    assert start["grad_accum"] == 1  # 32 = 16 per micro-batch x 2 processes
    first = start["rank_first_examples"]
    assert len(first) == 2 and all(len(examples) == 4 for examples in first)
    assert not set(first[0]) & set(first[1]), f"ranks share examples: {first}"
    checksums = end["param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], f"replicas diverged: {checksums}"
    assert end["tokens_seen"] == 10 * 32 * 64  # both ranks' tokens are counted

    model = AutoModelForMaskedLM.from_pretrained(run / "final")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert Path(end["export"]) == run / "final"

    # Nothing outside the run dir: no outputs/ from any rank, no rank scratch dirs left over.
    assert list(cwd.iterdir()) == []
    assert list((tmp_path / "tmp").glob("ssltrain-rank*")) == []


DRIVER = """
import sys
from omegaconf import OmegaConf
from ssltrain.cli import fail
from ssltrain.errors import UserError
from ssltrain.engine import build_accelerator

hw = OmegaConf.create({"device": sys.argv[1], "mixed_precision": "no", "tf32": False})
try:
    accelerator = build_accelerator(hw)
except UserError as err:
    fail(str(err))
print(f"rank {accelerator.process_index} of {accelerator.num_processes}", flush=True)
"""


@pytest.mark.slow
def test_launched_ranks_that_do_not_see_each_other_fail_loudly(cache_dir, tmp_path):
    """torchrun starts 2 processes with a real rendezvous, but each builds its Accelerator with
    cpu=False and no GPU (hardware.device=cuda on a CPU-only box, the config check bypassed):
    accelerate then makes each rank a world of 1, which would train alone without a word.
    build_accelerator must stop both with one error line each and a non-zero exit. (The same
    driver with hardware.device=cpu joins one group of 2; the CLI runs above cover that.)"""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    argv = [*launcher("torchrun", free_port()), str(script), "cuda"]
    proc = run_group(argv, tmp_path, child_env(tmp_path, cache_dir), timeout=120)
    assert proc.returncode != 0
    # Two processes write to one pipe: their lines may interleave, so count the messages.
    assert proc.stderr.count("ssltrain: error:") == 2, proc.stderr[-4000:]
    assert proc.stderr.count(f"ssltrain: error: {ALONE}") == 2, proc.stderr[-4000:]
    assert "rank " not in proc.stdout


def test_world_size_without_a_launcher_is_a_one_line_error(run_cli, tmp_path, monkeypatch):
    """WORLD_SIZE=2 left in the shell, then `ssltrain` run directly: there is no rendezvous to
    join (no MASTER_ADDR). One error line, exit 2, no traceback, no run directory."""
    for key in DIST_ENV:
        monkeypatch.delenv(key, raising=False)
    run = tmp_path / "run"
    proc = run_cli(*TINY, "trainer.batch_size=32", f"hydra.run.dir={run}", timeout=180,
                   env={"WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr[-4000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("ssltrain: error: could not join a process group of 2 processes"), proc.stderr
    assert "MASTER_ADDR" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not run.exists()
