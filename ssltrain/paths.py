"""Where the shipped Hydra configs live: conf/ beside the package in a source checkout or
editable install, ssltrain/conf inside a built wheel."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"ssltrain's conf/ directory is missing next to {here}")
