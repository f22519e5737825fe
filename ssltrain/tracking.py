"""Run records: metrics.jsonl (one JSON object per line), TensorBoard events, and console output
(a rich progress bar on a terminal, plain lines otherwise). Main process only.

A run dir may see several attempts: a run killed or preempted is continued by rerunning its
command (trainer.resume=auto), from its newest checkpoint at step S, or from step 0 when it has
none. Each attempt begins at its "resume" record (or its "start" record when it resumes nothing)
and supersedes what earlier attempts wrote about the steps it redoes, so that metrics.jsonl and
TensorBoard hold each step once, with the newest attempt's values:

- step records (STEP_KINDS) of earlier attempts at steps after S are dropped when the attempt
  begins; one at step S itself (the final evaluation and end record of a rerun finished run, a
  non-finite skip right after the checkpoint) is dropped when this attempt writes its own;
- attempt records ("start", "resume") and records of later tools (ssltrain-probe's "probe",
  ssltrain-bleu's "downstream") are kept;
- TensorBoard drops the earlier attempts' events after step S by purge_step (a SessionLog START
  in the new event file); a record of step S itself that an attempt writes again shows twice
  there, with equal values.

metrics.jsonl is rewritten atomically (a temp file, fsync, os.replace), so a kill during the
rewrite leaves the previous file whole. read_records applies the same rule when reading, which
also covers run dirs whose attempts appended without superseding, and lines a kill cut short.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

METRICS = "metrics.jsonl"
# Records about the state of training at their step: a later attempt that redoes the step rewrites them.
STEP_KINDS = frozenset({"train", "eval", "nonfinite", "stopped", "end"})
# Records that open an attempt; kept, since they say when and from where the run went on.
ATTEMPT_KINDS = frozenset({"start", "resume"})


class RunTracker:
    def __init__(self, run_dir: Path, max_steps: int, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.metrics_file = None
        self.writer = None
        self.progress = None
        self.tensorboard = tensorboard
        self.begun = False  # whether this attempt's first "resume"/"start" record has been written
        self.earlier = set()  # (kind, step) of earlier attempts' step records a record of this one supersedes
        self.attempt_offset = 0  # bytes of metrics.jsonl before this attempt's first record
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.path = run_dir / METRICS
        self.metrics_file = open(self.path, "a", encoding="utf-8")
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), console=self.console, transient=False,
            )
            self.task = self.progress.add_task("train", total=max_steps, status="")
            self.progress.start()

    def record(self, kind: str, step: int, values: dict, echo: bool = True) -> None:
        """Append {"kind", "step", "time", **values} to metrics.jsonl and scalars to TensorBoard."""
        if not self.enabled:
            return
        if kind in ATTEMPT_KINDS and not self.begun:
            self._begin_attempt(step)
        elif kind in STEP_KINDS and (kind, step) in self.earlier:
            self._drop_earlier(kind, step)
        row = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self.metrics_file.write(json.dumps(row, default=_jsonable) + "\n")
        self.metrics_file.flush()
        if self.tensorboard and self.writer is None:
            self._open_writer(None)
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)
        if echo:
            text = "  ".join(f"{k}={_fmt(v)}" for k, v in values.items() if isinstance(v, (int, float)))
            if self.progress is not None and kind == "train":
                self.progress.update(self.task, completed=step, status=text)
            else:
                self.console.print(f"[{kind}] step {step}  {text}", highlight=False, markup=False)

    def _begin_attempt(self, step: int) -> None:
        """This attempt goes on from `step`: drop earlier attempts' step records after it (and lines
        a kill cut short) from metrics.jsonl, and their TensorBoard events after it."""
        self.begun = True
        data = self.path.read_bytes()
        lines = _parse_lines(data)
        kept = [(line, r) for line, r in lines if r is not None and not _after(r, step)]
        text = b"".join(line for line, _ in kept)
        if text != data:
            self._rewrite(text)
        self.attempt_offset = len(text)
        self.earlier = {(r["kind"], r.get("step")) for _, r in kept if r.get("kind") in STEP_KINDS}
        # From step 0 an attempt redoes everything, step 0's evaluation included; from a
        # checkpoint at S, the records of step S precede the checkpoint and stand. Events of later
        # tools (a probe's, at step = labelled examples) are purged only along with a redone step.
        purge_step = step + 1 if step > 0 else 0
        redone = any(_after(r, purge_step - 1) for _, r in lines if r is not None)
        if self.tensorboard and (redone or self.writer is None):
            self._open_writer(purge_step if redone else None)

    def _drop_earlier(self, kind: str, step: int) -> None:
        """Drop earlier attempts' (kind, step) records: this attempt is about to write its own."""
        self.earlier.discard((kind, step))
        data = self.path.read_bytes()
        before, ours = data[:self.attempt_offset], data[self.attempt_offset:]
        kept = b"".join(line for line, r in _parse_lines(before)
                        if r is not None and (r.get("kind"), r.get("step")) != (kind, step))
        self._rewrite(kept + ours)
        self.attempt_offset = len(kept)

    def _rewrite(self, data: bytes) -> None:
        self.metrics_file.close()
        replace_atomically(self.path, data)
        self.metrics_file = open(self.path, "a", encoding="utf-8")

    def _open_writer(self, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is not None:
            self.writer.close()
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge_step)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, markup=False)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()
        self.metrics_file.close()


def read_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records as the run's newest attempt sees them, in file order: each step's
    records once, from the last attempt that wrote them (the rule in this module's docstring, for
    files written with or without it); a line that is not JSON, such as the last one after a kill
    mid-write, is skipped (with a warning when it is not the last)."""
    path = Path(run_dir) / METRICS
    lines = _parse_lines(path.read_bytes()) if path.is_file() else []
    torn = [i for i, (_, r) in enumerate(lines) if r is None and i < len(lines) - 1]
    if torn:
        warnings.warn(f"{path}: line(s) {', '.join(str(i + 1) for i in torn)} are not JSON records "
                      f"(a write cut short by a kill); skipped", stacklevel=2)
    kept: list[tuple[int, dict]] = []  # (attempt, record)
    attempt, written_by = 0, {}  # written_by: (kind, step) -> the attempt that last wrote it
    for _, record in lines:
        if record is None:
            continue
        kind, step = record.get("kind"), record.get("step")
        if kind in ATTEMPT_KINDS and isinstance(step, int):
            attempt += 1
            kept = [(a, r) for a, r in kept if not _after(r, step)]
        elif kind in STEP_KINDS:
            if written_by.get((kind, step), attempt) != attempt:
                kept = [(a, r) for a, r in kept if (r.get("kind"), r.get("step")) != (kind, step)]
            written_by[(kind, step)] = attempt
        kept.append((attempt, record))
    return [r for _, r in kept]


def drop_torn_tail(path: Path) -> None:
    """End metrics.jsonl with a newline so that the next append starts a line of its own: a last
    line without one is cut when it holds no whole record (a write a kill cut short)."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    if _record(data[cut:]) is None:
        os.truncate(path, cut)
    else:
        with open(path, "ab") as f:
            f.write(b"\n")


def replace_atomically(path: Path, data: bytes) -> None:
    """path's content becomes data, all at once: a kill at any point leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    finally:
        os.close(fd)


def _parse_lines(data: bytes) -> list[tuple[bytes, dict | None]]:
    """(line ending in a newline, its record or None when it holds none) per non-blank line. A line
    that a kill cut short and a later append continued (`{"kind": "tr{"kind": "resume", ...}`)
    gives the record that follows the cut."""
    out = []
    for line in data.splitlines(keepends=True):
        if not line.strip():
            continue
        record = _record(line)
        cut = line.rfind(b'{"kind": ')
        if record is None and cut > 0:
            line = line[cut:]
            record = _record(line)
        out.append((line if line.endswith(b"\n") else line + b"\n", record))
    return out


def _record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _after(record: dict, step: int) -> bool:
    """Whether record is a step record of a step after `step`."""
    s = record.get("step")
    return record.get("kind") in STEP_KINDS and isinstance(s, int) and s > step


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _jsonable(value):
    return value.item() if hasattr(value, "item") else str(value)
