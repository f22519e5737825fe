"""Faults of several processes, and the second Ctrl-C.

Killing one rank of a 2-process CPU run (SIGKILL, no chance to clean up) must end the whole run
within a bounded time, the launcher and the surviving rank with a non-zero exit, and leave only
complete step-N checkpoints for the resume; the same command then resumes both ranks exactly: the
uninterrupted 2-process run's losses step for step and its final weights bit for bit. The
launchers tear the group down: torchrun's agent (which `accelerate launch --multi_gpu` runs too)
sees the dead worker and sends the others SIGTERM; a survivor inside a collective gets gloo's
"connection reset by peer" at once; one writing a checkpoint removes its temporary folder.

A first Ctrl-C makes a run save at the next step boundary; a second one before that save is
done leaves at once (exit 130), without a half-written checkpoint for the resume to pick up.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, read_metrics
from test_multiprocess import child_env, free_port, launcher, run_group

from ssltrain.checkpoint import is_complete, latest_checkpoint, load_weights
from ssltrain.faults import EXIT_PEER_LOST

pytestmark = pytest.mark.slow

RUN = [*TINY, "trainer.max_steps=16", "trainer.log_every=1", "trainer.export=false", "trainer.checkpoint_every=3",
       "trainer.keep_checkpoints=10"]
TWO_RANKS = [*RUN, "trainer.batch_size=32", "trainer.micro_batch_size=16"]
END_BOUND_S = 120  # from the kill to the launcher's exit; torchrun SIGKILLs a survivor 30 s after its SIGTERM
START_TIMEOUT_S = 300  # start-up + a few steps of a 2-process run on a loaded 2-core machine


def start(argv: list[str], cwd: Path, env: dict[str, str], logs: Path) -> subprocess.Popen:
    """Start a launcher in its own session, output to logs.{out,err} (a pipe nobody reads could fill up)."""
    return subprocess.Popen(argv, cwd=str(cwd), env=env, stdout=open(f"{logs}.out", "w"),
                            stderr=open(f"{logs}.err", "w"), start_new_session=True)


def wait_until(condition, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.05)


def train_records(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return metrics.read_text().count('"kind": "train"') if metrics.is_file() else 0


def workers(launcher_proc: subprocess.Popen) -> dict:
    """rank -> psutil.Process of the launcher's worker processes (found by the RANK in their environment)."""
    import psutil

    found = {}
    for child in psutil.Process(launcher_proc.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None:
            found[int(rank)] = child
    assert sorted(found) == [0, 1], f"expected ranks 0 and 1 under the launcher, found {found}"
    return found


def kill_and_wait_for_the_end(proc: subprocess.Popen, ranks: dict, rank: int, logs: Path) -> dict[int, int]:
    """SIGKILL one rank; the launcher and the other rank must end, non-zero, within END_BOUND_S.
    Returns rank -> exit code, as the launcher's failure report gives them. A survivor that got
    to report the failure itself (exit EXIT_PEER_LOST; the launcher's SIGTERM may end it first)
    says how to resume."""
    import psutil

    ranks[rank].kill()
    killed_at = time.monotonic()
    try:
        proc.wait(timeout=END_BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the launcher was still running {END_BOUND_S} s after rank {rank} was killed:\n"
                    f"{Path(f'{logs}.err').read_text()[-4000:]}")
    _, alive = psutil.wait_procs(list(ranks.values()), timeout=max(1.0, END_BOUND_S - (time.monotonic() - killed_at)))
    assert not alive, f"ranks still running after the launcher ended: {alive}"
    assert proc.returncode != 0
    report = Path(f"{logs}.err").read_text()
    # torchrun's (and accelerate's) "ssltrain FAILED" report: one "rank : R (local_rank: R)" +
    # "exitcode : C" entry per failed worker.
    entry = r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)"
    codes = {int(r): int(c) for r, c in re.findall(entry, report)}
    assert set(codes) == {0, 1}, f"the launcher's report should name both ranks as failed:\n{report[-4000:]}"
    assert codes[rank] == -signal.SIGKILL and codes[1 - rank] in (EXIT_PEER_LOST, -signal.SIGTERM)
    if codes[1 - rank] == EXIT_PEER_LOST:
        assert "ssltrain: another process of this run is gone" in report and "hydra.run.dir=" in report
    print(f"rank {rank} killed: launcher exit {proc.returncode}, rank {1 - rank} exit {codes[1 - rank]}, "
          f"{time.monotonic() - killed_at:.1f} s after the kill")
    return codes


def assert_only_complete_checkpoints(run: Path, allow_temp: bool) -> None:
    """Every step-N folder is complete. A temporary folder may be left only by a writer (rank 0) that
    was killed outright; the resume never picks it up and the next save removes it."""
    root = run / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    steps = [n for n in names if n.startswith("step-")]
    assert steps and all(is_complete(root / n) for n in steps), names
    others = [n for n in names if not n.startswith("step-")]
    assert all(n.startswith(".tmp-step-") for n in others) if allow_temp else not others, names


def assert_resumed_like_the_reference(run: Path, reference: Path, resumed_from: str) -> None:
    """After the last resume: every step's loss equals the uninterrupted run's; final weights and the
    per-rank checksums of the end record are identical."""
    records = read_metrics(run)
    resume_at = max(i for i, r in enumerate(records) if r["kind"] == "resume")
    assert Path(records[resume_at]["from"]).name == resumed_from
    after = {r["step"]: r["loss"] for r in records[resume_at:] if r["kind"] == "train"}
    expected = {r["step"]: r["loss"] for r in read_metrics(reference) if r["kind"] == "train"}
    first = int(resumed_from.removeprefix("step-")) + 1
    assert sorted(after) == list(range(first, 17))
    assert all(after[s] == expected[s] for s in after), \
        f"resumed losses differ: {[(s, after[s], expected[s]) for s in after if after[s] != expected[s]]}"
    checksums = [r for r in records if r["kind"] == "end"][-1]["param_checksums"]
    expected_checksums = next(r for r in read_metrics(reference) if r["kind"] == "end")["param_checksums"]
    assert len(checksums) == 2 and checksums == expected_checksums
    final_ref = load_weights(reference / "checkpoints" / "step-00000016" / "model.safetensors")
    final_run = load_weights(run / "checkpoints" / "step-00000016" / "model.safetensors")
    assert final_ref.keys() == final_run.keys()
    assert all(torch.equal(final_ref[k], final_run[k]) for k in final_ref)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert all(n.startswith("step-") for n in names), f"left over after the resume: {names}"


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory) -> Path:
    """The uninterrupted 2-process run (torchrun)."""
    root = tmp_path_factory.mktemp("reference")
    run = root / "run"
    argv = [*launcher("torchrun", free_port()), "-m", "ssltrain", *TWO_RANKS, f"hydra.run.dir={run}"]
    proc = run_group(argv, root, child_env(root, cache_dir))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


def resume(launcher_name: str, run: Path, tmp_path: Path, cache_dir: Path, script: list[str] | None = None) -> None:
    """The same command again (a fresh port: the killed group's may still be in TIME_WAIT)."""
    argv = [*launcher(launcher_name, free_port()), *(script or ["-m", "ssltrain"]), *TWO_RANKS, f"hydra.run.dir={run}"]
    proc = run_group(argv, tmp_path, child_env(tmp_path, cache_dir))
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize(("launcher_name", "killed_rank", "kill_seed"), [("torchrun", 1, 1), ("accelerate", 0, 2)])
def test_killing_one_rank_ends_the_run_and_the_same_command_resumes_both_exactly(
        launcher_name, killed_rank, kill_seed, reference, cache_dir, tmp_path):
    kill_after = random.Random(kill_seed).randint(4, 14)  # train records seen before the kill (first checkpoint: 3)
    run = tmp_path / "run"
    argv = [*launcher(launcher_name, free_port()), "-m", "ssltrain", *TWO_RANKS, f"hydra.run.dir={run}"]
    proc = start(argv, tmp_path, child_env(tmp_path, cache_dir), tmp_path / "killed")
    wait_until(lambda: train_records(run) >= kill_after, proc, START_TIMEOUT_S, f"{kill_after} train records")

    kill_and_wait_for_the_end(proc, workers(proc), killed_rank, tmp_path / "killed")
    assert not (run / "final").exists()
    assert_only_complete_checkpoints(run, allow_temp=killed_rank == 0)
    resumed_from = latest_checkpoint(run / "checkpoints").name

    resume(launcher_name, run, tmp_path, cache_dir)
    assert_resumed_like_the_reference(run, reference, resumed_from)


def test_a_hung_rank_stops_the_run_after_the_collective_timeout_and_the_same_command_resumes(
        reference, cache_dir, tmp_path):
    """A rank that hangs instead of dying (SIGSTOP: alive, silent) fails the other's next collective
    after hardware.collective_timeout_s; that rank says how to resume (exit EXIT_PEER_LOST) and the
    launcher tears the group down. The same command (default timeout) resumes exactly."""
    import psutil

    timeout_s, stopped_rank = 10, 1
    run = tmp_path / "run"
    argv = [*launcher("torchrun", free_port()), "-m", "ssltrain", *TWO_RANKS,
            f"hardware.collective_timeout_s={timeout_s}", f"hydra.run.dir={run}"]
    proc = start(argv, tmp_path, child_env(tmp_path, cache_dir), tmp_path / "hung")
    wait_until(lambda: train_records(run) >= 5, proc, START_TIMEOUT_S, "5 train records")
    ranks = workers(proc)
    ranks[stopped_rank].suspend()
    stopped_at = time.monotonic()
    try:
        _, alive = psutil.wait_procs([ranks[1 - stopped_rank]], timeout=timeout_s + 50)
        waited = time.monotonic() - stopped_at
        assert not alive, f"the other rank still waits {waited:.0f} s after rank {stopped_rank} hung"
        proc.wait(timeout=END_BOUND_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(psutil.NoSuchProcess):
            ranks[stopped_rank].kill()
    assert timeout_s <= waited < timeout_s + 50 and proc.returncode != 0
    report = Path(f"{tmp_path / 'hung'}.err").read_text()
    line = next((x for x in report.splitlines() if x.startswith("ssltrain: another process")), None)
    assert line is not None, report[-4000:]
    assert "gone or not responding (Timed out waiting" in line and f"hydra.run.dir={run}" in line
    assert_only_complete_checkpoints(run, allow_temp=True)
    resumed_from = latest_checkpoint(run / "checkpoints").name
    assert resumed_from in line
    print(f"rank {stopped_rank} stopped: rank {1 - stopped_rank} ended {waited:.1f} s later")

    resume("torchrun", run, tmp_path, cache_dir)
    assert_resumed_like_the_reference(run, reference, resumed_from)


SLOW_CHECKPOINT = '''
"""ssltrain whose rank 0 takes PAUSE_S seconds to fsync the checkpoint of step SLOW_STEP, first
writing its temp folder's name to MARKER: a window in which the test kills the other rank."""
import os
import time
from pathlib import Path

import ssltrain.checkpoint as checkpoint
from ssltrain.cli import main

real_fsync_tree = checkpoint._fsync_tree


def slow_fsync_tree(folder):
    if folder.name == f".tmp-step-{int(os.environ['SLOW_STEP']):08d}":
        Path(os.environ["MARKER"]).write_text(folder.name)
        time.sleep(float(os.environ["PAUSE_S"]))
    real_fsync_tree(folder)


checkpoint._fsync_tree = slow_fsync_tree
main()
'''


def test_a_rank_killed_while_a_checkpoint_is_written_leaves_no_partial_checkpoint(reference, cache_dir, tmp_path):
    """Rank 1 dies while rank 0 writes step 6: rank 0 (SIGTERMed by torchrun, which it defers to the
    step boundary) fails at the next barrier and removes the temp folder; step 3 is what is left."""
    script = tmp_path / "slow_checkpoint.py"
    script.write_text(SLOW_CHECKPOINT)
    marker, run = tmp_path / "writing", tmp_path / "run"
    argv = [*launcher("torchrun", free_port()), str(script), *TWO_RANKS, f"hydra.run.dir={run}"]
    env = child_env(tmp_path, cache_dir, SLOW_STEP="6", MARKER=str(marker), PAUSE_S="5")
    proc = start(argv, tmp_path, env, tmp_path / "killed")
    wait_until(marker.is_file, proc, START_TIMEOUT_S, "checkpoint write of step 6")

    codes = kill_and_wait_for_the_end(proc, workers(proc), 1, tmp_path / "killed")
    assert codes[0] == EXIT_PEER_LOST  # the SIGTERM came during the write, deferred to the step boundary
    report = (tmp_path / "killed.err").read_text()
    assert f"newest complete checkpoint: {run / 'checkpoints' / 'step-00000003'}" in report
    assert f"hydra.run.dir={run}" in report
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003"]
    assert_only_complete_checkpoints(run, allow_temp=False)

    resume("torchrun", run, tmp_path, cache_dir)
    assert_resumed_like_the_reference(run, reference, "step-00000003")


SECOND_CTRL_C = '''
"""ssltrain that sends itself the first Ctrl-C (SIGINT) when it records step 5, which is no regular
checkpoint step, so the save that Ctrl-C asks for is the next one (a signal from outside could land
inside a regular save instead). Once a stop signal has arrived, a checkpoint write writes half the
weights file, writes the temp folder's name to MARKER and then waits (10 minutes): the test's second
Ctrl-C lands inside that save."""
import os
import signal
import time
from pathlib import Path

import ssltrain.checkpoint as checkpoint
import ssltrain.faults as faults
import ssltrain.tracking as tracking
from ssltrain.cli import main

real_save_weights, real_handle = checkpoint.save_weights, faults.StopSignals._handle
real_record = tracking.RunTracker.record
signals = []


def handle(self, signum, frame):
    signals.append(signum)
    real_handle(self, signum, frame)


def save_weights(state_dict, path):
    if signals:
        path.write_bytes(b"\\0" * 1000)
        Path(os.environ["MARKER"]).write_text(path.parent.name)
        time.sleep(600)
    real_save_weights(state_dict, path)


def record(self, kind, step, values, echo=True):
    real_record(self, kind, step, values, echo)
    if kind == "train" and step == 5:
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C


faults.StopSignals._handle, checkpoint.save_weights, tracking.RunTracker.record = handle, save_weights, record
main()
'''


def test_a_second_ctrl_c_during_the_save_exits_at_once_and_leaves_no_partial_checkpoint(run_cli, cache_dir,
                                                                                       tmp_path):
    one_rank = [*RUN, "trainer.checkpoint_every=2"]
    reference = run_cli(*one_rank, f"hydra.run.dir={tmp_path / 'ref'}")
    assert reference.returncode == 0, reference.stderr[-2000:]

    script = tmp_path / "second_ctrl_c.py"
    script.write_text(SECOND_CTRL_C)
    marker, run = tmp_path / "saving", tmp_path / "run"
    env = {**os.environ, "SSLTRAIN_CACHE": str(cache_dir), "MARKER": str(marker)}
    argv = [sys.executable, str(script), *one_rank, f"hydra.run.dir={run}"]
    proc = start(argv, tmp_path, env, tmp_path / "interrupted")
    # The first Ctrl-C comes from the process itself at step 5: save at that step boundary...
    wait_until(marker.is_file, proc, START_TIMEOUT_S, "the save the first Ctrl-C asked for")
    proc.send_signal(signal.SIGINT)  # ...and the second, while that save is under way
    second_at = time.monotonic()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("a second Ctrl-C during the save did not end the run")
    assert time.monotonic() - second_at < 60
    stderr = (tmp_path / "interrupted.err").read_text()
    assert proc.returncode == 130, stderr[-3000:]
    assert "ssltrain: interrupted" in stderr and "Traceback" not in stderr, stderr[-3000:]

    interrupted = marker.read_text().removeprefix(".tmp-")  # the step-N whose save was cut short
    assert interrupted == "step-00000005"
    assert_only_complete_checkpoints(run, allow_temp=False)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert interrupted not in names
    newest = latest_checkpoint(run / "checkpoints").name
    assert int(newest.removeprefix("step-")) < int(interrupted.removeprefix("step-"))
    assert not any(r["kind"] == "stopped" for r in read_metrics(run))

    resumed = run_cli(*one_rank, f"hydra.run.dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = read_metrics(run)
    resume_at = max(i for i, r in enumerate(records) if r["kind"] == "resume")
    assert Path(records[resume_at]["from"]).name == newest
    after = {r["step"]: r["loss"] for r in records[resume_at:] if r["kind"] == "train"}
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref") if r["kind"] == "train"}
    assert sorted(after) == list(range(int(newest.removeprefix("step-")) + 1, 17))
    assert all(after[s] == expected[s] for s in after), "resumed losses must equal the uninterrupted run's"
