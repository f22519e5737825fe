"""Append evaluation results to a finished run's records: metrics.jsonl lines (as RunTracker
writes them, with a "kind") and TensorBoard scalars in the run's tb/ folder."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ssltrain.tracking import METRICS, _jsonable, drop_torn_tail, read_records


def last_step(run_dir: Path) -> int:
    """The run's final optimizer step (its last record's), 0 when it has none."""
    return int(next((r["step"] for r in reversed(read_records(run_dir)) if "step" in r), 0))


def append_records(run_dir: Path, kind: str, records: list[dict], scalars: list[tuple[str, float, int]] = ()) -> None:
    """records -> metrics.jsonl as {"kind", "step": the run's last step, "time", **record};
    scalars: (tag, value, step) written to <run>/tb."""
    run_dir = Path(run_dir)
    step, now = last_step(run_dir), round(time.time(), 3)
    drop_torn_tail(run_dir / METRICS)  # else the first record would continue a killed run's half line
    with open(run_dir / METRICS, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps({"kind": kind, "step": step, "time": now, **record}, default=_jsonable) + "\n")
    finite = [(t, float(v), s) for t, v, s in scalars if isinstance(v, (int, float)) and math.isfinite(v)]
    if finite:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(run_dir / "tb")) as writer:
            for tag, value, at in finite:
                writer.add_scalar(tag, value, at)
