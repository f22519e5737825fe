"""The one way ssltrain loads configs, tokenizers and weights with transformers: nothing from the
folder runs and nothing is unpickled.

Every `from_pretrained` in ssltrain goes through `load_config`, `load_tokenizer` or `load_model`
(tests/test_untrusted.py checks the source for any other). They pass `trust_remote_code=False`,
so transformers never asks "Do you wish to run the custom code?" nor imports a folder's .py
files, and `load_model` passes `use_safetensors=True`, so weights never come from a pickle.
Before that, `check_folder` refuses a local folder that asks for its own code (an `auto_map` in
config.json or tokenizer_config.json) or that holds pickled weights only, with one line saying
why, instead of transformers' multi-line errors.

A leaf module: it imports nothing from ssltrain but ssltrain.errors.
"""

from __future__ import annotations

import glob
import json
import os

from ssltrain.errors import ConfigError

# The files transformers reads an auto_map from when loading a config, a tokenizer or a model
# (a tokenizer load reads config.json too, for the tokenizer class).
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json")
SAFE_WEIGHTS = ("model*.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")


def _label(path: str, what: str | None) -> str:
    return f"{what}={path!r}" if what else repr(path)


def check_folder(path: str, what: str | None = None) -> None:
    """Refuse the local folder `path` (ConfigError, one line) when transformers would import its
    code (an auto_map) or unpickle its weights (pytorch_model.bin without model.safetensors).
    what: the setting that names it (model.pretrained, tokenizer.path), for the message. A path
    that is no folder (a hub name) passes: the loaders' flags guard it."""
    path = os.path.expanduser(str(path))
    if not os.path.isdir(path):
        return
    label = _label(path, what)
    for name in AUTO_MAP_FILES:
        entries = _auto_map(os.path.join(path, name))
        if entries:
            raise ConfigError(
                f"{label}: {name} has an auto_map ({entries}), which asks transformers to import Python code "
                f"from the folder; ssltrain never runs a model folder's code: use a folder of a model type "
                f"transformers ships (its config.json and tokenizer_config.json without auto_map)")
    pickled = _matching(path, PICKLED_WEIGHTS)
    if pickled and not _matching(path, SAFE_WEIGHTS):
        raise ConfigError(
            f"{label} holds pickled weights ({', '.join(pickled[:2])}) and no model.safetensors; ssltrain loads "
            f"safetensors only (unpickling can run code): convert it once where you trust the file, loading it "
            f"with its transformers class (e.g. AutoModelForMaskedLM.from_pretrained(folder)) and calling "
            f".save_pretrained(folder, safe_serialization=True)")


def _auto_map(config_file: str) -> str:
    """The auto_map entries of a JSON config as "AutoConfig=module.Class, ...", or "" if it has none."""
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return ""  # missing or unreadable: transformers' own loading error names it
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not auto_map:
        return ""
    if not isinstance(auto_map, dict):
        return repr(auto_map)[:200]
    # A tokenizer's entry is [slow class, fast class], either null.
    parts = [f"{key}={'/'.join(str(v) for v in value if v) if isinstance(value, list) else value}"
             for key, value in auto_map.items()]
    return ", ".join(parts)[:300]


def _matching(folder: str, patterns: tuple[str, ...]) -> list[str]:
    return sorted({os.path.basename(p) for pattern in patterns for p in glob.glob(os.path.join(folder, pattern))})


def load_config(path, what: str | None = None):
    """AutoConfig.from_pretrained(path) after check_folder; never runs the folder's code."""
    from transformers import AutoConfig

    check_folder(path, what)
    return AutoConfig.from_pretrained(os.path.expanduser(str(path)), trust_remote_code=False)


def load_tokenizer(path, what: str | None = None):
    """AutoTokenizer.from_pretrained(path) after check_folder; never runs the folder's code."""
    from transformers import AutoTokenizer

    check_folder(path, what)
    return AutoTokenizer.from_pretrained(os.path.expanduser(str(path)), trust_remote_code=False)


def load_model(auto_class, path, what: str | None = None, **kwargs):
    """auto_class.from_pretrained(path, **kwargs) after check_folder: built-in model classes only,
    weights from safetensors only."""
    check_folder(path, what)
    return auto_class.from_pretrained(os.path.expanduser(str(path)), trust_remote_code=False,
                                      use_safetensors=True, **kwargs)
