"""Append evaluation results to a finished run's records: metrics.jsonl lines (as RunTracker
writes them, with a "kind") and TensorBoard scalars in the run's tb/ folder."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ssltrain.tracking import _jsonable


def last_step(run_dir: Path) -> int:
    """The run's final optimizer step (its last record's), 0 when it has none."""
    path = Path(run_dir) / "metrics.jsonl"
    step = 0
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                step = json.loads(line).get("step", step)
    return int(step)


def append_records(run_dir: Path, kind: str, records: list[dict], scalars: list[tuple[str, float, int]] = ()) -> None:
    """records -> metrics.jsonl as {"kind", "step": the run's last step, "time", **record};
    scalars: (tag, value, step) written to <run>/tb."""
    run_dir = Path(run_dir)
    step, now = last_step(run_dir), round(time.time(), 3)
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps({"kind": kind, "step": step, "time": now, **record}, default=_jsonable) + "\n")
    finite = [(t, float(v), s) for t, v, s in scalars if isinstance(v, (int, float)) and math.isfinite(v)]
    if finite:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(run_dir / "tb")) as writer:
            for tag, value, at in finite:
                writer.add_scalar(tag, value, at)
