"""One run per run directory: the process that trains in it holds an advisory lock on <run>/.lock.

The lock is flock(2) on an open file: the kernel releases it when the process ends in any way
(kill -9 included), so it is never left stale; the file's text (pid and host of the holder) only
serves the message of a second run that finds the directory taken. A filesystem that cannot lock
(some NFS set-ups: ENOLCK) is warned about, and the run goes on unlocked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import warnings
from pathlib import Path

from ssltrain.errors import UserError

LOCK_NAME = ".lock"


class RunDirBusy(UserError):
    """Another process trains in this run directory. Its files are that run's: leave them alone."""


class RunLock:
    """Held from `acquire` to `release` (or the end of the process)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.handle = None

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.run_dir / LOCK_NAME, "a+", encoding="utf-8")
        if not _lock(handle, self.run_dir):
            return self
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_free(run_dir: str | os.PathLike) -> None:
    """Raise RunDirBusy when a process holds run_dir's lock now (the command line's check, before Hydra
    writes its own files into the directory)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.is_file():
        return
    with open(path, "a+", encoding="utf-8") as handle:
        if _lock(handle, Path(run_dir)):
            fcntl.flock(handle, fcntl.LOCK_UN)


def _lock(handle, run_dir: Path) -> bool:
    """Take the lock without waiting: True when taken, False when the filesystem cannot lock; RunDirBusy
    naming the holder when another process has it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirBusy(f"hydra.run.dir={run_dir} is in use: {holder} trains there; wait for it to end, "
                             f"stop it, or pick another hydra.run.dir") from None
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            warnings.warn(f"{run_dir}: this filesystem cannot lock files ({err.strerror}); a second run started on "
                          f"the same directory would not be stopped", stacklevel=3)
            handle.close()
            return False
        raise
