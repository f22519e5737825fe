"""Content-addressed cache folders written atomically (temp dir + rename)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def fingerprint(*parts) -> str:
    """Stable short hash of JSON-serialisable parts (config values, versions, other fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_dir(root: str | os.PathLike, name: str, build: Callable[[Path], None]) -> Path:
    """`root/name`, built by `build(tmp_path)` into a temp dir and renamed into place once complete.

    Readers never see a half-written folder; two writers racing both succeed and one copy wins.
    """
    root = Path(os.path.expanduser(str(root)))
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # lost a race only if the winner's copy is there
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
