"""Where the shipped Hydra configs live.

- Wheel or `pip install .`: ssltrain/conf inside the installed package (pyproject.toml maps the
  ssltrain.conf package onto the repository's conf/ and ships its YAML files as package data).
- Source checkout or editable install (`pip install -e .`): the repository's conf/ beside the
  package, so an edited YAML file takes effect without reinstalling.

The packaged copy is looked for first: an installed ssltrain never reads a conf/ that another
distribution put at the top of site-packages. Code reads the configs through config_dir() and shipped_options(),
not `import ssltrain.conf` (an editable install does not make that importable); nothing else
globs conf/.
"""

from __future__ import annotations

import functools
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def config_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"ssltrain's conf/ directory is missing next to {here}")


@functools.lru_cache(maxsize=None)
def shipped_options(group: str) -> dict[str, DictConfig]:
    """{option name: its YAML} of a shipped config group (conf/<group>/*.yaml), read once per process:
    the fit checks name what fits in every message, and ssltrain-list runs them for every pair."""
    return {p.stem: OmegaConf.load(p) for p in sorted((config_dir() / group).glob("*.yaml"))}
