"""Faults a long run must survive: preemption signals and non-finite steps.

SIGTERM / SIGINT / SIGHUP / SIGUSR2 stop a run cleanly wherever they arrive. During training
(and the evaluations and export that follow it) they are deferred to the next step boundary,
where the loop saves a checkpoint and exits with 128 + signal number; before the first step
(start-up: data, tokenizer, model, compilation) the run stops at once with a message, nothing
having been trained since the last checkpoint. A second Ctrl-C exits at once. SIGTERM is what
SLURM, Kubernetes and most schedulers send on preemption; SIGHUP what a dropped ssh session sends
(left alone when the run was started under nohup, which ignores it); SIGUSR2 what submitit asks
SLURM to send before a time limit or preemption (`--signal=USR2@<seconds>`), and within a
submitit job the signal then goes on to submitit's own handler, which requeues the job. A step whose gradient norm
is not finite is skipped (counted in the records); too many in a row stop the run with the
last good checkpoint left intact. When another process of a multi-process run dies, the next
collective fails on the others (gloo: connection reset by peer) and they stop with exit code
EXIT_PEER_LOST, naming the checkpoint to resume from. A process that hangs instead of dying
(stopped, deadlocked, stuck on a dead filesystem) fails the others' next collective after
hardware.collective_timeout_s, with the same exit.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading

EXIT_PEER_LOST = 5  # exit code when another process of a multi-process run is gone
# What gloo says when the process at the other end of a collective has died, or has not answered
# within hardware.collective_timeout_s (hung); NCCL raises DistBackendError.
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out waiting")


class RunStopped(Exception):
    """The run ended early on purpose (preemption, divergence); not a config mistake.
    exit_code: what the CLI exits with."""

    def __init__(self, message: str, exit_code: int, signum: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.signum = signum  # the stop signal that ended the run, if one did


class StopNow(BaseException):
    """A stop signal arrived outside the deferred part of the run (start-up). A BaseException, as
    KeyboardInterrupt is, so that no library's `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Handles SIGTERM/SIGINT/SIGHUP/SIGUSR2 for the whole run. Use as a context manager; inside it a
    signal raises StopNow at once, except within `deferred()`, where it is recorded for `requested`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._deferring = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                    continue  # started under nohup: a dropped session is meant not to stop the run
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    @contextlib.contextmanager
    def deferred(self):
        """Signals wait for the next step boundary (`requested`) instead of interrupting."""
        before, self._deferring = self._deferring, True
        try:
            yield self
        finally:
            self._deferring = before

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and peer_lost(exc):
            # Another rank died and the launcher is about to SIGTERM this one: keep deferring signals so
            # that this process can still say how to resume (RunStopped, exit EXIT_PEER_LOST).
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: leave now
        self.signum = signum
        if not self._deferring:
            raise StopNow(signum)

    def requested(self, accelerator) -> bool:
        """True on every rank once any rank got a signal (so all ranks stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        import torch

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

    def stopped(self, step: int, last_checkpoint, exit_code: int) -> RunStopped:
        """The RunStopped for too many non-finite steps in a row, naming the checkpoint to go back to."""
        return RunStopped(f"stopped after step {step}: {self.in_row} steps in a row had a non-finite loss or "
                          f"gradient (trainer.max_nonfinite_in_row={self.limit}); last good checkpoint: "
                          f"{last_checkpoint or 'none'}; try a lower optimizer.lr", exit_code)


def peer_lost(err: BaseException) -> bool:
    """Whether err is a collective or rendezvous failure: in a multi-process run, a process gone."""
    from torch.distributed import DistError

    return isinstance(err, DistError) or (isinstance(err, RuntimeError) and any(s in str(err) for s in PEER_GONE))


def peer_lost_stop(err: BaseException, run_dir, last_checkpoint) -> RunStopped:
    """The RunStopped a surviving process ends with: what failed, the newest complete checkpoint
    (None: there is none), and how to resume."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip())  # gloo's "[.../pair.cc:537] " source prefix
    first = text.splitlines()[0].split(". ")[0][:300] if text else type(err).__name__
    return RunStopped(f"another process of this run is gone or not responding ({first}); newest complete checkpoint: "
                      f"{last_checkpoint or 'none'}; resume with the same launch command plus "
                      f"hydra.run.dir={run_dir}", EXIT_PEER_LOST)
