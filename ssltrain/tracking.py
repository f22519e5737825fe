"""Run records: metrics.jsonl (one JSON object per line), TensorBoard events, and console output
(a rich progress bar on a terminal, plain lines otherwise). Main process only."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class RunTracker:
    def __init__(self, run_dir: Path, max_steps: int, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.metrics_file = None
        self.writer = None
        self.progress = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))
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
        row = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self.metrics_file.write(json.dumps(row, default=_jsonable) + "\n")
        self.metrics_file.flush()
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


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _jsonable(value):
    return value.item() if hasattr(value, "item") else str(value)
