"""Faults a long run must survive: preemption signals and non-finite steps.

SIGTERM / SIGINT ask the loop to stop at the next step boundary, where it saves a checkpoint
and exits with 128 + signal number; a second Ctrl-C exits at once. A step whose gradient norm
is not finite is skipped (counted in the records); too many in a row stop the run with the
last good checkpoint left intact.
"""

from __future__ import annotations

import signal
import threading

import torch


class RunStopped(Exception):
    """The run ended early on purpose (preemption, divergence); not a config mistake.
    exit_code: what the CLI exits with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """Records SIGTERM/SIGINT instead of dying mid-step. Use as a context manager."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: leave now
        self.signum = signum

    def requested(self, accelerator) -> bool:
        """True on every rank once any rank got a signal (so all ranks stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor(0 if self.signum is None else int(self.signum), device=accelerator.device)
        flag = accelerator.reduce(flag, reduction="sum")
        if self.signum is None and flag.item():
            self.signum = int(signal.SIGTERM)
        return bool(flag.item())


class NonFiniteGuard:
    """Counts non-finite steps; `too_many` once `limit` happen in a row."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_row = 0
        self.total = 0

    def update(self, finite: bool) -> bool:
        """Record one step; returns whether it was finite."""
        if finite:
            self.in_row = 0
        else:
            self.in_row += 1
            self.total += 1
        return finite

    @property
    def too_many(self) -> bool:
        return self.in_row >= self.limit
