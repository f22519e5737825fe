"""Preemption, non-finite steps, partial checkpoints and resuming under a different config."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from conftest import TINY, kill_9_after_train_records, read_metrics

from ssltrain.checkpoint import latest_checkpoint
from ssltrain.errors import UserError
from ssltrain.faults import RunStopped
from ssltrain.objectives.mlm import MaskedLM
from ssltrain.train import EXIT_DIVERGED, train

pytestmark = pytest.mark.slow
RUN = [*TINY, "trainer.max_steps=16", "trainer.log_every=1", "trainer.export=false"]


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_matches_an_uninterrupted_one(run_cli, cache_dir, tmp_path):
    import os

    reference = run_cli(*RUN, f"hydra.run.dir={tmp_path / 'ref'}")
    assert reference.returncode == 0, reference.stderr[-2000:]

    run_dir = tmp_path / "preempted"
    env = {**os.environ, "SSLTRAIN_CACHE": str(cache_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "ssltrain", *RUN, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 180
    while time.time() < deadline:  # wait for a few training steps, then preempt
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and sum('"kind": "train"' in line for line in metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "SIGTERM received" in stderr and "hydra.run.dir=" in stderr and "Traceback" not in stderr
    stopped_at = next(r["step"] for r in read_metrics(run_dir) if r["kind"] == "stopped")
    assert stopped_at < 16 and latest_checkpoint(run_dir / "checkpoints").name == f"step-{stopped_at:08d}"

    resumed = run_cli(*RUN, f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = read_metrics(run_dir)
    resume_at = next(i for i, r in enumerate(records) if r["kind"] == "resume")
    after = {r["step"]: r["loss"] for r in records[resume_at:] if r["kind"] == "train"}
    assert sorted(after) == list(range(stopped_at + 1, 17))
    expected = train_losses(tmp_path / "ref")
    assert all(after[s] == expected[s] for s in after), "resumed losses must equal the uninterrupted run's"


def test_a_signal_during_a_regular_save_stops_after_it_without_saving_that_step_again(compose, tmp_path,
                                                                                     monkeypatch):
    """SIGTERM arriving while step 4's regular checkpoint is written: that checkpoint is the one the stop
    names, and the step is not written a second time."""
    import os

    import ssltrain.train as loop

    saved = []

    def save_checkpoint(root, step, *args, **kwargs):
        saved.append(step)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to StopSignals' handler mid-save
        return real_save(root, step, *args, **kwargs)

    real_save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", save_checkpoint)
    with pytest.raises(RunStopped, match="SIGTERM received") as stopped:
        train(compose([*RUN, "trainer.checkpoint_every=2"]), tmp_path / "run")
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert saved == [2, 4]
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000004"
    assert "step-00000004" in str(stopped.value)


def poison(monkeypatch, bad_calls):
    """Make MaskedLM.forward return a NaN loss on the given (0-based) training calls."""
    original = MaskedLM.forward
    calls = {"n": 0}

    def forward(self, batch):
        out = original(self, batch)
        if self.training:
            if calls["n"] in bad_calls:
                out.loss = out.loss * torch.tensor(math.nan)
            calls["n"] += 1
        return out

    monkeypatch.setattr(MaskedLM, "forward", forward)


def test_a_nan_step_is_skipped_and_counted(compose, tmp_path, monkeypatch):
    poison(monkeypatch, bad_calls={3})
    result = train(compose([*RUN, "trainer.max_steps=6"]), tmp_path / "run")
    records = read_metrics(result["run_dir"])
    assert [r["step"] for r in records if r["kind"] == "nonfinite"] == [3]
    assert [r for r in records if r["kind"] == "train"][-1]["nonfinite_skipped"] == 1
    assert result["step"] == 6 and math.isfinite(result["eval"]["loss"])


def test_a_fused_adamw_skips_a_nan_step_on_the_device_exactly_as_the_host_would(compose, tmp_path, monkeypatch):
    """hardware.fused_optimizer=true queues the update before the host knows whether the gradient norm is
    finite; the kernel skips it itself (found_inf). The run must end exactly as one that waits for the
    norm and does not step: the same losses, the same skipped step, the same final weights."""
    import ssltrain.engine as engine

    cfg = compose([*RUN, "trainer.max_steps=6", "hardware.fused_optimizer=true"])
    original_step = torch.optim.AdamW.step

    def run(name: str, on_device: bool):
        flags = []

        def step(self, *args, **kwargs):
            flags.append(float(getattr(self, "found_inf", -1)))  # -1: the host decided, no flag given
            return original_step(self, *args, **kwargs)

        with monkeypatch.context() as m:
            poison(m, bad_calls={3})
            m.setattr(torch.optim.AdamW, "step", step)
            if not on_device:
                m.setattr(engine, "optimizer_skipping_on_device", lambda *args: None)
            train(cfg, tmp_path / name)
        return read_metrics(tmp_path / name), flags

    device, device_flags = run("device", on_device=True)
    host, host_flags = run("host", on_device=False)
    assert device_flags == [0, 0, 0, 1, 0, 0, 0]  # every step queued; the NaN one told to skip
    assert host_flags == [-1] * 6  # the NaN step never called step()

    def summary(records):
        return ([(r["step"], r["loss"]) for r in records if r["kind"] == "train"],
                [r["step"] for r in records if r["kind"] == "nonfinite"],
                [r["param_checksums"] for r in records if r["kind"] == "end"])

    assert summary(device) == summary(host)
    assert summary(device)[1] == [3]


def test_too_many_nan_steps_stop_the_run_and_keep_the_last_good_checkpoint(compose, tmp_path, monkeypatch):
    poison(monkeypatch, bad_calls=set(range(4, 100)))
    cfg = compose([*RUN, "trainer.checkpoint_every=2", "trainer.max_nonfinite_in_row=3"])
    with pytest.raises(RunStopped, match="3 steps in a row") as stopped:
        train(cfg, tmp_path / "run")
    assert stopped.value.exit_code == EXIT_DIVERGED
    last = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert last.name == "step-00000004" and str(last) in str(stopped.value)
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 4


def test_partial_checkpoints_are_skipped_with_a_warning(compose, tmp_path):
    result = train(compose([*RUN, "trainer.max_steps=4", "trainer.checkpoint_every=2"]), tmp_path / "run")
    root = result["run_dir"] / "checkpoints"
    partial = root / "step-00000009"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    (root / ".tmp-step-00000010").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert latest_checkpoint(root).name == "step-00000004"
    assert any("step-00000009" in str(w.message) for w in caught)


def test_resuming_with_a_different_config_is_refused_naming_the_keys(compose, tmp_path):
    train(compose([*RUN, "trainer.max_steps=2", "trainer.checkpoint_every=2"]), tmp_path / "run")
    changed = compose([*RUN, "trainer.max_steps=4", "trainer.seq_len=32"])
    with pytest.raises(UserError, match=r"trainer\.seq_len \(64 -> 32\)"):
        train(changed, tmp_path / "run")
    # Longer training with otherwise equal settings is a legitimate resume.
    assert train(compose([*RUN, "trainer.max_steps=4"]), tmp_path / "run")["step"] == 4


@pytest.mark.parametrize("kill_seed", [1, 2])
def test_kill_9_at_a_random_step_then_resume_reproduces_the_uninterrupted_run(run_cli, cache_dir, tmp_path,
                                                                               kill_seed):
    """SIGKILL gives no chance to save: the run resumes from its last periodic checkpoint (any
    half-written one is ignored), and every later loss and the final weights are unchanged."""
    import random

    from ssltrain.checkpoint import load_weights

    run = [*RUN, "trainer.checkpoint_every=3", "trainer.keep_checkpoints=10"]
    reference = run_cli(*run, f"hydra.run.dir={tmp_path / 'ref'}")
    assert reference.returncode == 0, reference.stderr[-2000:]

    kill_after = random.Random(kill_seed).randint(4, 14)  # train records seen before the kill
    run_dir = tmp_path / "killed"
    kill_9_after_train_records(run, run_dir, kill_after, cwd=tmp_path, cache_dir=cache_dir)
    assert not (run_dir / "final").exists()

    resumed = run_cli(*run, f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = read_metrics(run_dir)
    resume_at = max(i for i, r in enumerate(records) if r["kind"] == "resume")
    after = {r["step"]: r["loss"] for r in records[resume_at:] if r["kind"] == "train"}
    expected = train_losses(tmp_path / "ref")
    assert after and max(after) == 16
    assert all(after[s] == expected[s] for s in after), "resumed losses must equal the uninterrupted run's"
    final_ref = load_weights(tmp_path / "ref" / "checkpoints" / "step-00000016" / "model.safetensors")
    final_res = load_weights(run_dir / "checkpoints" / "step-00000016" / "model.safetensors")
    assert all(torch.equal(final_ref[k], final_res[k]) for k in final_ref)
