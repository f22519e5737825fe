"""Run records after a resume: metrics.jsonl and TensorBoard hold each step once, with the values
of the attempt that finished it, however the earlier attempt ended (kill -9 after some logged
steps, a kill mid-write, a kill during the rewrite itself)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
from conftest import TINY, kill_9_after_train_records, read_metrics

pytestmark = pytest.mark.slow
# Evaluations at 0, 4, 8, 12, 16 and checkpoints at 6, 12, 16: a kill after train step 9 leaves
# train 7-9 and eval 8 written after the newest checkpoint (step 6), so the resume redoes them.
RUN = [*TINY, "trainer.max_steps=16", "trainer.log_every=1", "trainer.eval_every=4", "trainer.checkpoint_every=6",
       "trainer.keep_checkpoints=10", "trainer.export=false"]
KILL_AFTER = 9  # train records written before the kill

# `python -m ssltrain` whose os.replace of metrics.jsonl kills the process instead: the kill lands
# after the rewritten file is complete on disk and before it takes the old one's place.
DIE_IN_REWRITE = '''
import os
import signal

real_replace = os.replace


def replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == "metrics.jsonl":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)


os.replace = replace
from ssltrain.cli import main
main()
'''


def ssltrain(cache_dir: Path, *args: str, cwd: Path, script: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "ssltrain"]
    return subprocess.run([*command, *args], cwd=str(cwd), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SSLTRAIN_CACHE": str(cache_dir)})


def by_step(records: list[dict], kind: str) -> dict[int, dict]:
    rows = [r for r in records if r["kind"] == kind]
    steps = Counter(r["step"] for r in rows)
    assert all(n == 1 for n in steps.values()), f"{kind} steps written more than once: {steps}"
    return {r["step"]: r for r in rows}


def parse(text: str) -> list[dict]:
    """The JSON lines of text (one that a kill cut short is skipped)."""
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def tensorboard_steps(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={SCALARS: 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def killed(tmp_path_factory, cache_dir) -> dict:
    """An uninterrupted run, and the same run killed with SIGKILL after train step KILL_AFTER and
    resumed with the same command. {"ref", "run", "resumed_from", "interrupted": its metrics.jsonl at the kill}."""
    root = tmp_path_factory.mktemp("records")
    reference = ssltrain(cache_dir, *RUN, f"hydra.run.dir={root / 'ref'}", cwd=root)
    assert reference.returncode == 0, reference.stderr[-2000:]

    run_dir = root / "killed"
    kill_9_after_train_records(RUN, run_dir, KILL_AFTER, cwd=root, cache_dir=cache_dir)
    interrupted = (run_dir / "metrics.jsonl").read_text()

    resumed = ssltrain(cache_dir, *RUN, f"hydra.run.dir={run_dir}", cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    resumed_from = next(r["step"] for r in parse((run_dir / "metrics.jsonl").read_text()) if r["kind"] == "resume")
    written = [r["step"] for r in parse(interrupted) if r["kind"] == "train"]
    assert max(written) > resumed_from, "the kill came before any step after the checkpoint was logged"
    return {"ref": root / "ref", "run": run_dir, "resumed_from": resumed_from, "interrupted": interrupted}


def test_a_run_killed_after_a_checkpoint_and_resumed_holds_each_step_once_with_the_resumed_values(killed):
    """Catches the resumed attempt appending after the killed attempt's records of the steps it
    redoes: metrics.jsonl would hold train/eval records of those steps twice. Also that the
    records kept are the resumed attempt's (equal to an uninterrupted run's), that the "resume"
    record stays, and that the steps up to the checkpoint keep the first attempt's records."""
    records = read_metrics(killed["run"])
    reference = read_metrics(killed["ref"])
    s = killed["resumed_from"]
    train, evals = by_step(records, "train"), by_step(records, "eval")
    assert sorted(train) == list(range(1, 17)) and sorted(evals) == [0, 4, 8, 12, 16]
    ref_train, ref_evals = by_step(reference, "train"), by_step(reference, "eval")
    assert all(train[k]["loss"] == ref_train[k]["loss"] for k in train), "losses differ from the uninterrupted run's"
    assert all(evals[k]["loss"] == ref_evals[k]["loss"] for k in evals)

    resumes = [i for i, r in enumerate(records) if r["kind"] == "resume"]
    assert len(resumes) == 1 and records[resumes[0]]["step"] == s
    assert records[resumes[0]]["from"].endswith(f"step-{s:08d}")
    before, after = records[:resumes[0]], records[resumes[0]:]
    assert {r["step"] for r in after if r["kind"] == "train"} == set(range(s + 1, 17))
    assert {r["step"] for r in before if r["kind"] == "train"} == set(range(1, s + 1))
    assert before == [r for r in parse(killed["interrupted"]) if r["step"] <= s], "records up to the checkpoint changed"
    assert [r["kind"] for r in records].count("start") == 2 and records[-1]["kind"] == "end"


def test_compare_and_probe_readers_see_each_step_once_also_in_a_run_dir_written_before_this(killed, tmp_path):
    """Catches ssltrain's own readers (ssltrain-compare's run summary, the step ssltrain-probe and
    ssltrain-bleu record at) reading metrics.jsonl line by line: in a run dir whose resumed attempt
    appended after the killed one's records (as every run dir written before this change is),
    they would count the redone steps twice and could take an earlier attempt's values."""
    from ssltrain.evaluation.compare import run_summary
    from ssltrain.evaluation.records import append_records, last_step
    from ssltrain.tracking import read_records

    reference = read_metrics(killed["ref"])
    # The same run as an appending tracker wrote it had the kill cut a line short: the killed
    # attempt's lines, half a line, then the resumed attempt's lines (the first continuing that half).
    old = tmp_path / "appended"
    shutil.copytree(killed["run"], old, ignore=shutil.ignore_patterns("checkpoints"))
    lines = (killed["run"] / "metrics.jsonl").read_text().splitlines(keepends=True)
    resume_at = next(i for i, line in enumerate(lines) if '"kind": "resume"' in line)
    (old / "metrics.jsonl").write_text(killed["interrupted"] + '{"kind": "train", "st' + "".join(lines[resume_at:]))
    assert sum(r["kind"] == "train" for r in parse((old / "metrics.jsonl").read_text())) > 16, "no step twice"

    for run_dir in (killed["run"], old):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the record after the cut is read whole: nothing is lost
            records = read_records(run_dir)
        assert [r["kind"] for r in records].count("resume") == 1
        train, evals = by_step(records, "train"), by_step(records, "eval")
        assert sorted(train) == list(range(1, 17)) and sorted(evals) == [0, 4, 8, 12, 16]
        assert [train[k]["loss"] for k in sorted(train)] == [r["loss"] for r in reference if r["kind"] == "train"]
        summary = run_summary(run_dir)
        assert summary["steps"] == 16 and summary["finished"]
        assert summary["loss"] == reference[-2]["loss"] and reference[-2]["kind"] == "eval"
        assert last_step(run_dir) == 16
    assert read_records(killed["run"]) == read_metrics(killed["run"]), "the file itself holds each step once"

    append_records(old, "probe", [{"task": "t", "accuracy": 0.5}])
    probe = [r for r in read_records(old) if r["kind"] == "probe"]
    assert len(probe) == 1 and probe[0]["step"] == 16


def test_tensorboard_shows_each_step_once_after_a_resume(killed):
    """Catches the resumed attempt's TensorBoard events adding to the killed attempt's for the
    steps it redoes (no purge_step): TensorBoard would plot those steps twice, once with the
    values of the attempt that was killed."""
    reference = read_metrics(killed["ref"])
    for tag, kind in (("train/loss", "train"), ("eval/loss", "eval")):
        steps = tensorboard_steps(killed["run"] / "tb", tag)
        expected = [(r["step"], r["loss"]) for r in reference if r["kind"] == kind]
        assert [s for s, _ in steps] == [s for s, _ in expected], tag
        assert all(abs(v - e) <= 1e-6 * abs(e) for (_, v), (_, e) in zip(steps, expected)), tag


def test_a_kill_mid_write_of_the_last_record_then_a_probe_and_the_same_command_again(killed, cache_dir, tmp_path):
    """Catches a torn last line (a kill in the middle of writing the "end" record) breaking the
    readers (ssltrain-compare, the step ssltrain-probe records at), or the next writer (a probe's
    records, the rerun's first record) continuing that half line so that metrics.jsonl no longer
    parses; and the rerun of the finished command writing the final evaluation and end record of
    step 16 a second time."""
    from ssltrain.evaluation.compare import run_summary
    from ssltrain.evaluation.records import append_records, last_step
    from ssltrain.tracking import read_records

    run_dir = tmp_path / "torn"
    shutil.copytree(killed["ref"], run_dir)
    text = (run_dir / "metrics.jsonl").read_text()
    end_line = text.rstrip("\n").rsplit("\n", 1)[1]
    (run_dir / "metrics.jsonl").write_text(text[:len(text) - len(end_line) - 1] + end_line[:len(end_line) // 2])

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torn last line is what a kill leaves: no warning
        assert not run_summary(run_dir)["finished"] and last_step(run_dir) == 16
        assert read_records(run_dir) == read_metrics(killed["ref"])[:-1]
    append_records(run_dir, "probe", [{"task": "t", "accuracy": 0.5}])
    assert read_metrics(run_dir)[-1]["kind"] == "probe"  # raises on a line that is not JSON

    rerun = ssltrain(cache_dir, *RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    records = read_metrics(run_dir)
    assert [r["kind"] for r in records].count("resume") == 1 and [r["kind"] for r in records].count("probe") == 1
    evals, ends = by_step(records, "eval"), by_step(records, "end")
    assert sorted(evals) == [0, 4, 8, 12, 16] and sorted(ends) == [16]
    assert evals[16]["loss"] == by_step(read_metrics(killed["ref"]), "eval")[16]["loss"]
    assert run_summary(run_dir)["finished"]


def test_a_kill_during_the_rewrite_of_metrics_jsonl_loses_no_record(killed, cache_dir, tmp_path):
    """Catches a rewrite of metrics.jsonl in place (truncate, then write): a kill in the middle
    would lose the records of the steps the resume keeps. Here the resume from an older
    checkpoint (step 6 of a finished run) is killed just before its rewritten file replaces the
    old one: the old file must be intact, and the same command then completes with each step
    once, the records after step 6 (the end record included) being the new attempt's."""
    run_dir = tmp_path / "rewrite"
    shutil.copytree(killed["ref"], run_dir)
    before = (run_dir / "metrics.jsonl").read_bytes()
    command = [*RUN, f"hydra.run.dir={run_dir}", f"trainer.resume={run_dir / 'checkpoints' / 'step-00000006'}"]

    died = ssltrain(cache_dir, *command, cwd=tmp_path, script=DIE_IN_REWRITE)
    assert died.returncode == -signal.SIGKILL, f"no rewrite of metrics.jsonl: {died.stderr[-2000:]}"
    assert (run_dir / "metrics.jsonl").read_bytes() == before

    again = ssltrain(cache_dir, *command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    records = read_metrics(run_dir)
    reference = read_metrics(killed["ref"])
    train, ends = by_step(records, "train"), by_step(records, "end")
    assert sorted(train) == list(range(1, 17)) and sorted(ends) == [16]
    assert [train[k]["loss"] for k in sorted(train)] == [r["loss"] for r in reference if r["kind"] == "train"]
    resume_at = next(i for i, r in enumerate(records) if r["kind"] == "resume")
    assert records[resume_at]["step"] == 6
    assert all(r["step"] <= 6 for r in records[:resume_at]), "records after step 6 of the first attempt stayed"
    assert not (run_dir / ".metrics.jsonl.tmp").exists(), "the killed rewrite's temp file was left behind"
