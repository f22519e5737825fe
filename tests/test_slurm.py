"""SLURM through hydra-submitit-launcher: the tasks of one job are one run, and preemption requeues it.

`hydra/launcher=submitit_local` runs the same submitit machinery as `submitit_slurm` (pickled job,
one process per task, submitit's signal handling and requeue) on this machine, so a 2-task job here
is what `hydra.launcher.tasks_per_node=2` does on a SLURM node, without a cluster. The preemption
signal is real: SIGUSR2, what submitit asks SLURM to send (`--signal=USR2@<s>`) before a time limit
or preemption, sent to the task processes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_metrics
from test_multiprocess import child_env

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the slurm extra (hydra-submitit-launcher)")

BIN = Path(sys.executable).parent
STEPS = ["trainer.max_steps=30", "trainer.eval_every=0", "trainer.eval_batches=2"]  # shorter, nothing else
JOB = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2"]
JOB_TIMEOUT_S = 420


def start_job(sweep: Path, cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "ssltrain"), *JOB, *STEPS, f"hydra.sweep.dir={sweep}"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        import os

        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the submitit job hung for {JOB_TIMEOUT_S}s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-6000:]
    return out


def run_dir(sweep: Path) -> Path:
    (job,) = [p for p in sweep.iterdir() if p.is_dir() and p.name.startswith("0_")]
    return job


@pytest.fixture(scope="module")
def uninterrupted(cache_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("submitit-job")
    finish(start_job(tmp / "sweep", tmp, child_env(tmp, cache_dir)))
    return run_dir(tmp / "sweep")


@pytest.mark.slow
def test_the_tasks_of_a_submitit_job_train_one_model(uninterrupted):
    """Two tasks of one job, the default batch settings: one process group (one start record, world 2,
    the batch split 16 + 16), identical replicas, one event file, one export. Catches tasks that do not
    read submitit's variables and train two independent runs into one directory."""
    records = read_metrics(uninterrupted)
    starts = [r for r in records if r["kind"] == "start"]
    ends = [r for r in records if r["kind"] == "end"]
    assert len(starts) == 1 and len(ends) == 1
    assert (starts[0]["world_size"], starts[0]["micro_batch_size"], starts[0]["grad_accum"]) == (2, 16, 1)
    assert not set(starts[0]["rank_first_examples"][0]) & set(starts[0]["rank_first_examples"][1])
    assert len(ends[0]["param_checksums"]) == 2 and len(set(ends[0]["param_checksums"])) == 1
    assert len(list((uninterrupted / "tb").glob("events.out.tfevents.*"))) == 1
    assert (uninterrupted / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_preempted_submitit_job_checkpoints_requeues_and_resumes_exactly(uninterrupted, cache_dir, tmp_path):
    """SIGUSR2 to both tasks mid-run: they stop at the same step boundary and save a checkpoint, submitit
    requeues the job, the requeued tasks resume from that checkpoint in the same run directory and end with
    the uninterrupted job's weights. Catches a preemption that loses the run (no checkpoint, exit without
    requeue) or a requeued job that starts over or in a new directory."""
    import psutil

    sweep = tmp_path / "sweep"
    proc = start_job(sweep, tmp_path, child_env(tmp_path, cache_dir))
    deadline = time.monotonic() + JOB_TIMEOUT_S
    signalled = []
    while not signalled and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        metrics = list(sweep.glob("0_*/metrics.jsonl"))
        if metrics and any(json.loads(line).get("kind") == "train" for line in metrics[0].read_text().splitlines()):
            tasks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                     if "submitit.core._submit" in " ".join(p.cmdline())]
            assert len(tasks) == 2, tasks
            for task in tasks:
                task.send_signal(signal.SIGUSR2)
            signalled = tasks
    assert signalled, "the job ended before it could be signalled"
    finish(proc)

    run = run_dir(sweep)
    records = read_metrics(run)
    kinds = [r["kind"] for r in records]
    assert kinds.count("stopped") == 1 and kinds.count("resume") == 1 and kinds.count("end") == 1, kinds
    stopped = next(r for r in records if r["kind"] == "stopped")
    resumed = next(r for r in records if r["kind"] == "resume")
    assert stopped["signal"] == "SIGUSR2" and 0 < stopped["step"] < 30
    assert Path(resumed["from"]).name == f"step-{stopped['step']:08d}" and resumed["step"] == stopped["step"]
    end = next(r for r in records if r["kind"] == "end")
    reference = next(r for r in read_metrics(uninterrupted) if r["kind"] == "end")
    assert end["step"] == 30 and end["param_checksums"] == reference["param_checksums"]
    assert end["tokens_seen"] == reference["tokens_seen"]


def test_a_batch_that_does_not_split_over_the_jobs_tasks_fails_before_submitting(run_cli, tmp_path):
    """The world size of a submitit job is tasks_per_node x nodes, known before anything is submitted: a batch
    of 32 over 3 tasks is the usual one-line error, exit 2, and no sweep directory or submitit folder."""
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=3", f"hydra.sweep.dir={sweep}",
                   timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("ssltrain: error: trainer.batch_size=32 does not split evenly "
                                                    "over 3 processes; pick a multiple of 3")
    assert not sweep.exists()
