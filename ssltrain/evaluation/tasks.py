"""Labelled downstream tasks for probes, and where a probe finds the model, its run and caches.

Tasks (train = the pool label fractions are drawn from, test = fixed):
  digits       scikit-learn's 1,797 digits, split as data=digits splits them (the run's own
               data settings when it trained on digits, so the test images are the ones its
               pretraining held out); resized to the model's image size and channels.
  run_data     an image run's own data group (image_folder, hf_image_dataset: cifar10, ...);
               train -> train, validation -> test; every image must have a label.
  docs_topics  which of 8 standard-library packages a documentation passage comes from
               (ssltrain.data.labelled; 1,001 train / 251 test passages). The default corpus
               contains these passages unlabelled (transductive, as pretraining on in-domain text).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ssltrain.data.corpus import load_corpus
from ssltrain.data.labelled import TOPIC_PACKAGES, docs_topic_task
from ssltrain.errors import UserError
from ssltrain.hub import load_config
from ssltrain.paths import shipped_options

TASKS = ("digits", "run_data", "docs_topics")


@dataclass
class ProbeTask:
    name: str
    modality: str  # "image" | "text"
    train_inputs: object  # images: (N, C, H, W) float32; text: list[str]
    train_labels: np.ndarray  # (N,) int64
    test_inputs: object
    test_labels: np.ndarray
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class ModelLocation:
    model_dir: Path  # holds config.json + weights (+ tokenizer for text)
    run_dir: Path | None  # the ssltrain run that exported it (metrics.jsonl, config.yaml), if any
    run_cfg: DictConfig | None  # the run's resolved config.yaml

    @property
    def name(self) -> str:
        return (self.run_dir or self.model_dir).name


def locate(path: str | Path) -> ModelLocation:
    """A run directory (with final/) or a model folder (a run's final/ or any HF checkpoint)."""
    path = Path(path).expanduser().resolve()
    if (path / "final" / "config.json").is_file():
        model_dir, run_dir = path / "final", path
    elif (path / "config.json").is_file():
        model_dir = path
        run_dir = path.parent if (path.parent / "config.yaml").is_file() else None
    elif (path / "metrics.jsonl").is_file():
        raise UserError(f"{path} is a run directory without an export (final/); rerun with trainer.export=true")
    else:
        raise UserError(f"{path} is neither a run directory with final/ nor a model folder with config.json")
    run_cfg = OmegaConf.load(run_dir / "config.yaml") if run_dir is not None else None
    return ModelLocation(model_dir, run_dir, run_cfg)


def cache_dir_for(run_cfg: DictConfig | None) -> str:
    """SSLTRAIN_CACHE, else the run's cache_dir, else ~/.cache/ssltrain (as conf/train.yaml)."""
    if os.environ.get("SSLTRAIN_CACHE"):
        return os.environ["SSLTRAIN_CACHE"]
    if run_cfg is not None and run_cfg.get("cache_dir"):
        return str(run_cfg.cache_dir)
    return str(Path(os.environ.get("HOME", ".")) / ".cache" / "ssltrain")


def model_modality(model_dir: Path) -> str:
    config = load_config(model_dir)
    return "text" if getattr(config, "vocab_size", None) else "image"


def default_task(location: ModelLocation) -> str:
    if model_modality(location.model_dir) == "text":
        return "docs_topics"
    cfg = location.run_cfg
    if cfg is not None and cfg.data.get("modality") == "image" and cfg.data.source != "digits":
        return "run_data"
    return "digits"


def load_task(name: str, location: ModelLocation) -> ProbeTask:
    if name not in TASKS:
        raise UserError(f"task={name!r} is not one of {', '.join(TASKS)}")
    cache_dir = cache_dir_for(location.run_cfg)
    if name == "docs_topics":
        splits = docs_topic_task(cache_dir)
        return ProbeTask(name, "text", list(splits["train"]["text"]), np.asarray(splits["train"]["label"]),
                         list(splits["test"]["text"]), np.asarray(splits["test"]["label"]), list(TOPIC_PACKAGES))
    return _image_task(name, location, cache_dir)


def _image_task(name: str, location: ModelLocation, cache_dir: str) -> ProbeTask:
    cfg = location.run_cfg
    run_images = cfg is not None and cfg.data.get("modality") == "image"
    if name == "run_data":
        if not run_images:
            raise UserError("task=run_data needs an image run directory (its config.yaml names the data); "
                            "use task=digits for a bare model folder")
        data_cfg = cfg.data
    elif run_images and cfg.data.source == "digits":
        data_cfg = cfg.data
    else:  # digits at the model's input shape
        data_cfg = copy.deepcopy(shipped_options("data")["digits"])  # the cached one stays as shipped
        model_config = load_config(location.model_dir)
        size = getattr(model_config, "image_size", None)
        data_cfg.image_size = int(size[0] if isinstance(size, (list, tuple)) else size or data_cfg.image_size)
        data_cfg.channels = int(getattr(model_config, "num_channels", data_cfg.channels))
    splits, _ = load_corpus(data_cfg, cache_dir)
    arrays = {split: splits[split].with_format("numpy") for split in ("train", "validation")}
    labels = {split: np.asarray(ds["label"], dtype=np.int64) for split, ds in arrays.items()}
    if any((y < 0).any() for y in labels.values()):
        raise UserError(f"task={name}: data={data_cfg.source} has unlabelled images (label -1); probes need a label "
                        f"for every image (data.label_column, or one subfolder per class)")
    n_classes = int(max(y.max() for y in labels.values())) + 1
    return ProbeTask(name, "image", np.asarray(arrays["train"]["pixels"], dtype=np.float32), labels["train"],
                     np.asarray(arrays["validation"]["pixels"], dtype=np.float32), labels["validation"],
                     [str(i) for i in range(n_classes)])
