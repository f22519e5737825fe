"""Content-addressed cache folders written atomically (temp dir + rename)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def hub_load_errors() -> tuple[type[BaseException], ...]:
    """What datasets.load_dataset raises for the user's data, not for a bug: the network or the hub
    (OSError, ConnectionError, huggingface_hub's HTTP errors), a data set, config or split that does not
    exist (datasets' own errors, ValueError, FileNotFoundError) and a loader needing a package that is
    not installed (ImportError)."""
    from datasets.exceptions import DatasetsError

    return (OSError, ValueError, ImportError, DatasetsError)


def dataset_fingerprint(dataset) -> str:
    """datasets' fingerprint of a Dataset's content and transforms, the key of its own cache. Private:
    Dataset._fingerprint (the public new_fingerprint= arguments take it)."""
    return dataset._fingerprint


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
