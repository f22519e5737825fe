"""Reliability around the loop: corrupt or tampered checkpoints, one run per run directory, real write
faults (a full filesystem, a file size limit, a folder without write permission) and stop signals
outside the training steps. Every case runs the real CLI in a subprocess, on real files; the faults
are made for real (truncated and bit-flipped files, tmpfs, RLIMIT_FSIZE, dropped capabilities,
signals), not by raising the exception the code expects.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, read_metrics

from ssltrain.checkpoint import checkpoint_problem, latest_checkpoint, list_checkpoints, write_manifest

pytestmark = pytest.mark.slow
RUN = [*TINY, "trainer.log_every=1", "trainer.export=false"]
SAVING = [*RUN, "trainer.checkpoint_every=2", "trainer.keep_checkpoints=10"]


def env_for(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "SSLTRAIN_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}


def ssltrain(*args: str, cache_dir: Path, cwd: Path, timeout: int = 300, prefix: tuple = (), **popen):
    return subprocess.run([*prefix, sys.executable, "-m", "ssltrain", *args], cwd=cwd, env=env_for(cache_dir),
                          capture_output=True, text=True, timeout=timeout, **popen)


def start(*args: str, cache_dir: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ssltrain", *args], cwd=cwd, env=env_for(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended before the moment the test waits for:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    pytest.fail("timed out waiting for the run")


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run) if r["kind"] == "train"] if (run / "metrics.jsonl").is_file() else []


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ssltrain: error:")]


@pytest.fixture(scope="module")
def checkpointed(cache_dir, tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 2, 4 and 6."""
    tmp = tmp_path_factory.mktemp("checkpointed")
    proc = ssltrain(*SAVING, "trainer.max_steps=6", f"hydra.run.dir={tmp / 'run'}", cache_dir=cache_dir, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(tmp / "run" / "checkpoints")] == [
        "step-00000002", "step-00000004", "step-00000006"]
    return tmp / "run"


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    return copy


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _link_to_older(path: Path) -> None:
    older = path.parent.parent / "step-00000004" / path.name
    path.unlink()
    path.symlink_to(older)


CORRUPTIONS = {  # name: (file in step-6, what is done to it, what the warning names)
    "truncated weights": ("model.safetensors", _truncate, "model.safetensors has"),
    "garbage state": ("trainer_state.json", lambda p: p.write_text("{not json"), "trainer_state.json has"),
    "missing RNG file": ("rng-rank0.pt", Path.unlink, "rng-rank0.pt is missing"),
    "bit rot in the optimizer": ("optimizer.pt", _flip_a_byte, "optimizer.pt does not match its checksum"),
    "an older optimizer linked in": ("optimizer.pt", _link_to_older, "optimizer.pt is a link"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(
        name, checkpointed, cache_dir, tmp_path):
    """Catches a resume that trusts file presence: a damaged newest checkpoint used to fail every retry with
    a traceback (or, linked files, resume silently from mismatched state) while older good ones sat unused."""
    run = copy_run(checkpointed, tmp_path)
    file, damage, named = CORRUPTIONS[name]
    damage(run / "checkpoints" / "step-00000006" / file)
    proc = ssltrain(*SAVING, "trainer.max_steps=8", f"hydra.run.dir={run}", cache_dir=cache_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "skipping checkpoint" in line]
    assert len(warning) == 1 and "step-00000006" in warning[0] and named in warning[0], proc.stderr[-3000:]
    resumed = [r for r in read_metrics(run) if r["kind"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] == 4 and resumed[0]["from"].endswith("step-00000004")
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "end"][-1] == 8


def test_when_no_checkpoint_verifies_the_resume_stops_with_one_line(checkpointed, cache_dir, tmp_path):
    """Starting over would silently throw the run away; resuming a broken file gives a traceback."""
    run = copy_run(checkpointed, tmp_path)
    for checkpoint in list_checkpoints(run / "checkpoints"):
        _truncate(checkpoint / "model.safetensors")
    proc = ssltrain(*SAVING, "trainer.max_steps=8", f"hydra.run.dir={run}", cache_dir=cache_dir, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "no checkpoint in" in lines[0] and "verifies (3 found" in lines[0], proc.stderr
    assert "trainer.resume=null" in lines[0] and "Traceback" not in proc.stderr
    assert all(checkpoint_problem(c) for c in list_checkpoints(run / "checkpoints")), "nothing was deleted"


@pytest.mark.parametrize("step,needle", [(10**9, "beyond trainer.max_steps=8"), (-7, "step=-7")])
def test_a_tampered_step_is_refused_even_with_a_rewritten_manifest(step, needle, checkpointed, cache_dir, tmp_path):
    """A step of 10^9 used to "finish" at once and export, -7 to train on. Here the manifest is rewritten to
    match, as a deliberate edit would: the values themselves are checked."""
    run = copy_run(checkpointed, tmp_path)
    target = run / "checkpoints" / "step-00000006"
    state = json.loads((target / "trainer_state.json").read_text())
    (target / "trainer_state.json").write_text(json.dumps({**state, "step": step}))
    (target / "manifest.json").unlink()
    write_manifest(target)
    proc = ssltrain(*SAVING, "trainer.max_steps=8", f"trainer.resume={target}", f"hydra.run.dir={run}",
                    cache_dir=cache_dir, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and needle in lines[0] and "step-00000006" in lines[0], proc.stderr[-3000:]


def test_an_optimizer_eps_that_is_zero_in_float32_is_refused(run_cli, tmp_path):
    """optimizer.eps=1e-300 passed the `> 0` check but is 0 in float32: AdamW then divides by zero and the
    run's checkpoints filled with NaN weights."""
    proc = run_cli("optimizer.eps=1e-300", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [proc.stderr.strip()]
    assert "optimizer.eps=1e-300" in proc.stderr and "float32" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_weights_that_are_not_finite_are_never_checkpointed(compose, tmp_path, monkeypatch):
    """A NaN that reaches the weights or moments without a non-finite gradient (memory corruption, an optimizer
    setting that misbehaves) used to be saved, and the NaN guard then named that checkpoint the last good one.
    Here an optimizer moment is poisoned after step 3's update, in the process, as a bit flip would."""
    import torch

    import ssltrain.train as loop
    from ssltrain.faults import RunStopped
    from ssltrain.train import EXIT_DIVERGED, train

    real_call = loop.TrainStep.__call__

    def poisoned(self, step):
        result = real_call(self, step)
        if step == 2:  # the third step (0-based), the last before the step-4 checkpoint... and after step-2's
            optimizer = getattr(self.training.optimizer, "optimizer", self.training.optimizer)
            state = next(iter(optimizer.state.values()))
            state["exp_avg_sq"].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(loop.TrainStep, "__call__", poisoned)
    with pytest.raises(RunStopped) as stopped:
        train(compose([*SAVING, "trainer.max_steps=8"]), tmp_path / "run")
    assert stopped.value.exit_code == EXIT_DIVERGED
    message = str(stopped.value)
    assert "NaN/inf" in message and "step-00000004 was not written" in message
    assert "last good checkpoint" in message and message.rstrip(" ;").count("step-00000002") == 1
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002"]
    assert checkpoint_problem(root / "step-00000002") is None
    from ssltrain.checkpoint import load_weights

    assert all(torch.isfinite(t).all() for t in load_weights(root / "step-00000002" / "model.safetensors").values())


def test_a_second_run_on_a_busy_run_directory_stops_at_once_naming_the_holder(cache_dir, tmp_path):
    """Two runs on one hydra.run.dir used to race (a traceback, and once the newest checkpoint hidden as
    .old-step-*). The second now stops with one line naming the first's pid and host, before Hydra writes
    into the folder; after a kill -9 of the first, the lock is gone with it and the run resumes."""
    import socket

    run = tmp_path / "run"
    first = start(*SAVING, "trainer.max_steps=400", f"hydra.run.dir={run}", cache_dir=cache_dir, cwd=tmp_path)
    try:
        wait_for(lambda: len(train_steps(run)) >= 3, first)
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        second = ssltrain(*SAVING, "trainer.max_steps=400", "seed=3", f"hydra.run.dir={run}", cache_dir=cache_dir,
                          cwd=tmp_path, timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = error_lines(second.stderr)
        assert len(lines) == 1 and f"pid {first.pid} on {socket.gethostname()}" in lines[0], second.stderr
        assert (run / ".hydra" / "overrides.yaml").read_text() == overrides, "the first run's files were touched"
        assert first.poll() is None, "the first run goes on"
    finally:
        first.kill()
        first.wait(timeout=60)
    # The first run's pace depends on the machine's load: resume two steps past its newest checkpoint.
    reached = int(latest_checkpoint(run / "checkpoints").name.split("-")[1])
    resumed = ssltrain(*SAVING, f"trainer.max_steps={reached + 2}", f"hydra.run.dir={run}", cache_dir=cache_dir,
                       cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert any(r["kind"] == "resume" for r in read_metrics(run))


def _assert_write_failure(proc, run: Path, older: list[str]) -> None:
    assert proc.returncode == 4, proc.stderr[-3000:]
    lines = error_lines(proc.stderr) or [line for line in proc.stderr.splitlines() if "could not write" in line]
    assert len(lines) == 1 and "could not write checkpoint" in lines[0] and "nothing partial" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    root = run / "checkpoints"
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    assert names == older, f"a partial or temporary folder was left: {names}"
    assert all(checkpoint_problem(root / name) is None for name in older)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 14 MiB tmpfs: room for one checkpoint of the TINY model (~9 MB), not two."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=14m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()[:100]}); the RLIMIT_FSIZE cases remain")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_filesystem_stops_with_one_line_and_keeps_the_older_checkpoint(small_tmpfs, cache_dir, tmp_path):
    """The disk fills up while step 4's checkpoint is written (a real ENOSPC from a small tmpfs): exit 4 with one
    line, the temporary folder gone, step 2 intact. torch.save and safetensors raise their own types there,
    which the code did not catch (a traceback and exit 1)."""
    run = small_tmpfs / "run"
    proc = ssltrain(*SAVING, "trainer.max_steps=8", f"hydra.run.dir={run}", cache_dir=cache_dir, cwd=tmp_path)
    _assert_write_failure(proc, run, ["step-00000002"])
    assert "No space left on device" in proc.stderr or "MiB free on its filesystem" in proc.stderr


@pytest.mark.parametrize("limit_mb,failing", [(2, "safetensors"), (5, "torch.save")])
def test_a_file_size_limit_stops_with_one_line_and_nothing_partial(limit_mb, failing, checkpointed, cache_dir,
                                                                   tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes beyond the limit (EFBIG): at 2 MB model.safetensors fails
    (safetensors' SafetensorError), at 5 MB optimizer.pt (torch.save's RuntimeError), as a full disk would."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_mb << 20, limit_mb << 20))

    run = tmp_path / "run"
    proc = ssltrain(*SAVING, "trainer.max_steps=8", f"hydra.run.dir={run}", cache_dir=cache_dir, cwd=tmp_path,
                    preexec_fn=limit)
    _assert_write_failure(proc, run, [])
    assert "a file size limit of" in proc.stderr and "ulimit -f" in proc.stderr, failing
    assert ("model.safetensors:" if failing == "safetensors" else "optimizer.pt:") in proc.stderr


def _without_permission_override() -> tuple[str, ...]:
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be made to apply")
    drop = "-dac_override,-dac_read_search"
    return ("setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}")


def test_a_checkpoints_folder_without_write_permission_stops_with_one_line(cache_dir, tmp_path):
    """checkpoints/ not writable (root, too, once its override capability is dropped): exit 4, one line; the
    folder used to be created outside the error handling (a PermissionError traceback)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints").chmod(0o555)
    try:
        proc = ssltrain(*SAVING, "trainer.max_steps=8", f"hydra.run.dir={run}", cache_dir=cache_dir, cwd=tmp_path,
                        prefix=_without_permission_override())
    finally:
        (run / "checkpoints").chmod(0o755)
    _assert_write_failure(proc, run, [])
    assert "Permission denied" in proc.stderr


def test_sigterm_during_start_up_stops_cleanly(cache_dir, tmp_path):
    """Before the first step (here: as soon as Hydra has made the run folder, i.e. while data, tokenizer and
    model are being built) SIGTERM used to kill the process without a word."""
    run = tmp_path / "run"
    proc = start(*SAVING, "trainer.max_steps=8", f"hydra.run.dir={run}", cache_dir=cache_dir, cwd=tmp_path)
    wait_for(lambda: (run / ".hydra").is_dir(), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM received before the first training step" in stderr and "Traceback" not in stderr
    assert not train_steps(run) and not (run / "checkpoints").exists()


def test_sighup_in_training_saves_and_the_resume_matches_an_uninterrupted_run(cache_dir, tmp_path):
    """A dropped ssh session (SIGHUP) with the default checkpoint_every=0 used to lose the whole run."""
    reference = ssltrain(*RUN, "trainer.max_steps=12", f"hydra.run.dir={tmp_path / 'ref'}", cache_dir=cache_dir,
                         cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "run"
    proc = start(*RUN, "trainer.max_steps=12", f"hydra.run.dir={run}", cache_dir=cache_dir, cwd=tmp_path)
    wait_for(lambda: len(train_steps(run)) >= 3, proc)
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGHUP, stderr[-3000:]
    assert "SIGHUP received: saved checkpoint" in stderr
    stopped = next(r["step"] for r in read_metrics(run) if r["kind"] == "stopped")
    resumed = ssltrain(*RUN, "trainer.max_steps=12", f"hydra.run.dir={run}", cache_dir=cache_dir, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train" and r["step"] > stopped}
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref") if r["kind"] == "train"}
    assert sorted(losses) == list(range(stopped + 1, 13)) and all(losses[s] == expected[s] for s in losses)


def test_sigterm_after_the_last_step_saves_and_the_resume_exports(cache_dir, tmp_path):
    """SIGTERM during the final evaluation (the whole held-out split, after the last step) used to kill the
    run before its export: the trained steps were lost with checkpoint_every=0. Now that step is saved, and
    the resume evaluates and exports without training again; final/ is never half-written."""
    args = [*TINY, "trainer.max_steps=3", "trainer.log_every=1", "trainer.eval_batches=null",
            "data.validation_fraction=0.5", "data.max_docs=null"]
    run = tmp_path / "run"
    proc = start(*args, f"hydra.run.dir={run}", cache_dir=cache_dir, cwd=tmp_path)
    wait_for(lambda: 3 in train_steps(run), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert not (run / ".final-tmp").exists()
    if proc.returncode == 0:  # the signal came during the export, which finishes first
        assert "received during the export" in stderr and (run / "final" / "model.safetensors").is_file()
        return
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "saved checkpoint" in stderr and not (run / "final").exists()
    assert latest_checkpoint(run / "checkpoints").name == "step-00000003"
    resumed = ssltrain(*args, f"hydra.run.dir={run}", cache_dir=cache_dir, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "final" / "model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"].count(3) == 1, "step 3 ran twice"


def test_an_interrupted_prune_never_leaves_an_incomplete_step_folder(checkpointed, tmp_path, monkeypatch):
    """Pruning deleted step-* folders in place: a process killed half-way left a step-* folder with files
    missing (seen once). Here the deletion stops after its first file, as a kill would leave it."""
    import ssltrain.checkpoint as checkpoint

    run = copy_run(checkpointed, tmp_path)
    root = run / "checkpoints"
    real_rmtree = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith(checkpoint.PRUNED) and path.is_dir():
            next(p for p in path.iterdir() if p.is_file()).unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.prune_checkpoints(root, keep=1)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert all(checkpoint_problem(p) is None for p in list_checkpoints(root)), "a step-* folder is incomplete"
    checkpoint.prune_checkpoints(root, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000006"]


def test_ten_kill_9_at_random_moments_then_the_run_ends_as_if_never_killed(cache_dir, tmp_path):
    """Chaos: a checkpoint_every=1 run killed with SIGKILL at 10 random moments (start-up, a step, a checkpoint
    being written, renamed or pruned, the export), resumed each time with the same command. It must end with
    the uninterrupted run's per-step losses (each step once in the records) and final weights, and every
    checkpoint left must verify. Catches any window in which a kill leaves state that a resume misreads."""
    import random

    import torch

    from ssltrain.checkpoint import load_weights
    from ssltrain.tracking import read_records

    steps = 40
    args = [*TINY, f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.checkpoint_every=1",
            "trainer.keep_checkpoints=3"]
    began = time.time()
    reference = ssltrain(*args, f"hydra.run.dir={tmp_path / 'ref'}", cache_dir=cache_dir, cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    times = [r["time"] for r in read_metrics(tmp_path / "ref") if r["kind"] == "train"]
    start_up, per_step = times[0] - began, (times[-1] - times[0]) / (len(times) - 1)

    # Kill moments from the process start up to ~4 steps in: about half land in start-up, the rest in a
    # step, a checkpoint write, its rename or prune; 10 kills leave the run unfinished (~2 steps each).
    run, rng, killed = tmp_path / "run", random.Random(20261202), 0
    while killed < 10:
        proc = start(*args, f"hydra.run.dir={run}", cache_dir=cache_dir, cwd=tmp_path)
        try:
            proc.wait(timeout=rng.uniform(0.5, start_up + 4 * per_step))
        except subprocess.TimeoutExpired:
            proc.kill()
            killed += 1
        _, stderr = proc.communicate(timeout=60)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    final = ssltrain(*args, f"hydra.run.dir={run}", cache_dir=cache_dir, cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert killed == 10, f"only {killed} kills landed before the run finished"

    def losses(path: Path) -> dict[int, float]:
        train = [r for r in read_records(path) if r["kind"] == "train"]
        assert len({r["step"] for r in train}) == len(train), "a step appears twice in the records"
        return {r["step"]: r["loss"] for r in train}

    assert losses(run) == losses(tmp_path / "ref")
    remaining = list_checkpoints(run / "checkpoints")
    assert remaining and all(checkpoint_problem(c) is None for c in remaining), remaining
    ref_final = load_weights(tmp_path / "ref" / "checkpoints" / f"step-{steps:08d}" / "model.safetensors")
    res_final = load_weights(run / "checkpoints" / f"step-{steps:08d}" / "model.safetensors")
    assert ref_final.keys() == res_final.keys() and all(torch.equal(ref_final[k], res_final[k]) for k in ref_final)
    exported = load_weights(run / "final" / "model.safetensors")
    assert all(torch.equal(exported[k], t) for k, t in load_weights(
        tmp_path / "ref" / "final" / "model.safetensors").items())
