"""Image data as `datasets.DatasetDict({"train", "validation"})` of training examples:
"pixels" (float32, channels x size x size, values in [0, 1]) and "label" (int64 class id, -1 when
unlabelled; kept for linear probes, unused by the pretext objectives).

Sources (data.source), registered beside the text corpora in ssltrain.data.corpus:
  digits            scikit-learn's handwritten digits: 1,797 labelled 8x8 grey images shipped with
                    the install (the default image data; no download).
  image_folder      a local folder of images; first-level subfolders name the classes.
  hf_image_dataset  any `datasets.load_dataset` image dataset (cifar10, mnist, ...).

Every image is converted to data.channels (1: grey, 3: RGB), cropped to a centred square and
resized to data.image_size once; the result is cached under cache_dir/images/<hash>. Held-out
images are chosen by a stable hash of a per-image key (index or relative path), so the split
never changes between runs.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ssltrain.data.cache import cached_dir, dataset_fingerprint, fingerprint, hub_load_errors
from ssltrain.errors import ConfigError, DataError
from ssltrain.spec import Spec, select

IMAGES_VERSION = 1  # bump when the conversion below changes, to invalidate caches
UNLABELLED = -1
# 8-bit PIL modes that convert to L / RGB without losing their meaning; 16-bit and float modes
# ("I;16", "I", "F") have no fixed white level, so reading them as 8-bit would be a guess.
CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
IMAGE_SPECS = {  # keys every image data group has
    "image_size": Spec(int, low=1, high=4096),
    "channels": Spec(choices=(1, 3)),
    "max_images": Spec(int, low=2, nullable=True),
}
NUM_PROC = Spec(int, low=1, nullable=True)


# What PIL's openers and decoders raise for a file they cannot read: OSError (UnidentifiedImageError,
# "image file is truncated"), SyntaxError ("broken PNG file"), EOFError, ValueError, struct.error and
# zlib.error from inside the decoders.
IMAGE_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, struct.error, zlib.error)


def image_features(channels: int, size: int):
    import datasets

    return datasets.Features({
        "pixels": datasets.Array3D(shape=(channels, size, size), dtype="float32"),
        "label": datasets.Value("int64"),
    })


def resize_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
    """(N, C, H, W) float in [0, 1] -> (N, C, size, size): centre square crop, antialiased bilinear."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = pixels.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    pixels = pixels[:, :, top:top + side, left:left + side]
    if side == size:
        return np.ascontiguousarray(pixels, dtype=np.float32)
    out = F.interpolate(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)), size=(size, size),
                        mode="bilinear", antialias=True, align_corners=False)
    return out.clamp_(0.0, 1.0).numpy()


def array_to_pixels(array: np.ndarray, channels: int, size: int, origin: str) -> np.ndarray:
    """One image as an array, (H, W) or (H, W, C) with C in 1, 3, 4, integer levels in [0, 255] or
    floats in [0, 1] -> float32 (channels, size, size) in [0, 1]."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise DataError(f"{origin}: an image has shape {tuple(np.asarray(array).shape)}; expected (height, width) "
                        f"or (height, width, 1|3|4 channels)")
    if np.issubdtype(array.dtype, np.integer):  # 8-bit levels (lists from datasets arrive as int64)
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DataError(f"{origin}: an integer image has values in [{array.min()}, {array.max()}]; expected "
                            f"8-bit levels in [0, 255] (or floats in [0, 1])")
        array = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating) or array.dtype == np.bool_:
        array = array.astype(np.float32)
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise DataError(f"{origin}: a float image has values in [{array.min():g}, {array.max():g}]; "
                            f"expected [0, 1] (or 8-bit levels in [0, 255])")
    else:
        raise DataError(f"{origin}: an image has dtype {array.dtype}; expected 8-bit levels in [0, 255] or floats "
                        f"in [0, 1]")
    array = array[:, :, :3]  # drop alpha
    if channels == 1 and array.shape[2] == 3:
        array = array @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as PIL's "L"
        array = array[:, :, None]
    elif channels == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return resize_pixels(array.transpose(2, 0, 1)[None], size)[0]


def pil_to_pixels(image, channels: int, size: int, origin: str) -> np.ndarray:
    """A PIL image -> float32 (channels, size, size) in [0, 1]."""
    if image.mode not in CONVERTIBLE_MODES:
        raise DataError(f"{origin} has image mode {image.mode!r}; ssltrain reads 8-bit images (modes "
                        f"{', '.join(CONVERTIBLE_MODES)}); convert it to 8-bit grey or RGB")
    if image.mode in ("P", "PA"):  # palettes may carry transparency: go through RGBA first
        image = image.convert("RGBA")
    image = image.convert("L" if channels == 1 else "RGB")
    return array_to_pixels(np.asarray(image, dtype=np.uint8), channels, size, origin)


def image_processor(data_cfg: DictConfig):
    """The Hugging Face image processor that prepares an image as this data group prepared the
    training images (centre square crop, bilinear resize to data.image_size, values in [0, 1], no
    normalisation; RGB when data.channels=3), saved beside an image model's export so that
    pipeline("image-classification", model=<run>/final) needs nothing else. With data.channels=1
    it takes grey ("L") images. None for text data."""
    if data_cfg.get("modality") != "image":
        return None
    from transformers.image_utils import PILImageResampling

    try:  # transformers >= 5: the PIL backend by name (the default one wants torchvision)
        from transformers import BitImageProcessorPil as Processor
    except ImportError:
        from transformers import BitImageProcessor as Processor
    size = int(data_cfg.image_size)
    return Processor(do_resize=True, size={"shortest_edge": size}, resample=PILImageResampling.BILINEAR,
                     do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True,
                     rescale_factor=1 / 255, do_normalize=False, do_convert_rgb=int(data_cfg.channels) == 3)


def split_by_hash(keys: list[str], fraction: float, origin: str) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): the round(len * fraction) keys (at least 1) with the
    smallest stable hashes are held out, so a key's side does not depend on the run."""
    if len(keys) < 2:
        raise DataError(f"{origin} gives {len(keys)} image(s); need at least 2 (one to train on, one to hold out)")
    n_val = min(len(keys) - 1, max(1, round(len(keys) * fraction)))
    order = sorted(range(len(keys)), key=lambda i: hashlib.sha256(keys[i].encode()).hexdigest())
    validation = sorted(order[:n_val])
    held = set(validation)
    return [i for i in range(len(keys)) if i not in held], validation


def check_data_keys(data_cfg: DictConfig, specs: dict[str, Spec]) -> None:
    for key, spec in specs.items():
        spec.check(f"data.{key}", select(data_cfg, key))


def _load_cached(cache_dir: str, name: str, key: str, build):
    """(the DatasetDict build() returns, saved once under cache_dir/images/<name>-<key>, key)."""
    import datasets

    path = cached_dir(Path(cache_dir) / "images", f"{name}-{key}", lambda tmp: build().save_to_disk(str(tmp)))
    return datasets.load_from_disk(str(path)), key


class DigitsImages:
    """scikit-learn's digits (UCI optical recognition of handwritten digits): 1,797 8x8 images with
    16 grey levels, labels 0-9, bundled with scikit-learn, so no download."""

    @staticmethod
    def check_config(data_cfg: DictConfig) -> None:
        check_data_keys(data_cfg, IMAGE_SPECS)

    @staticmethod
    def load(data_cfg: DictConfig, cache_dir: str):
        import datasets

        size, channels = data_cfg.image_size, data_cfg.channels
        key = fingerprint("digits", IMAGES_VERSION, size, channels, data_cfg.max_images, data_cfg.validation_fraction)

        def build():
            from sklearn.datasets import load_digits

            digits = load_digits()
            pixels = (digits.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8), 16 grey levels
            labels = digits.target.astype(np.int64)
            if data_cfg.max_images:
                pixels, labels = pixels[: data_cfg.max_images], labels[: data_cfg.max_images]
            pixels = resize_pixels(np.repeat(pixels, channels, axis=1), size)
            train, val = split_by_hash([f"digits:{i}" for i in range(len(labels))], data_cfg.validation_fraction,
                                       "data=digits")
            features = image_features(channels, size)
            return datasets.DatasetDict({
                split: datasets.Dataset.from_dict({"pixels": pixels[idx], "label": labels[idx]}, features=features)
                for split, idx in (("train", train), ("validation", val))
            })

        return _load_cached(cache_dir, "digits", key, build)


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def find_images(root: str) -> tuple[list[str], list[int], list[str]]:
    """(image paths, labels, class names) under root: each first-level subfolder is a class (its
    images found recursively); images directly in root are unlabelled (-1)."""
    extensions = _image_extensions()
    root_path = Path(root)
    classes = sorted(p.name for p in root_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for path in sorted(root_path.rglob("*")):
        rel = path.relative_to(root_path)
        if path.suffix.lower() not in extensions or any(part.startswith(".") for part in rel.parts) \
                or not path.is_file():
            continue
        paths.append(str(path))
        labels.append(classes.index(rel.parts[0]) if len(rel.parts) > 1 else UNLABELLED)
    return paths, labels, classes


def open_image(path: str, origin: str):
    """The decoded PIL image at `path`; a one-line DataError naming the file otherwise. An image
    whose header claims more than PIL's Image.MAX_IMAGE_PIXELS (a decompression bomb: a small file
    that decodes to gigabytes) is refused before it is decoded, at PIL's warning as at its error."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            try:
                image.load()
            except BaseException:
                image.close()
                raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{origin} is refused as a possible decompression bomb ({str(err).strip().rstrip('.')}); "
                        f"ssltrain reads images of at most Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} pixels, "
                        f"PIL's default limit: shrink the image or remove it") from None
    except IMAGE_DECODE_ERRORS as err:  # all the file's fault
        text = str(err).strip()
        raise DataError(f"{origin} is not a readable image ({text.splitlines()[0] if text else type(err).__name__})") \
            from None
    return image


def _folder_pixels(batch: dict, channels: int, size: int) -> dict:
    pixels = []
    for path in batch["path"]:
        origin = f"data.path: {path!r}"
        with open_image(path, origin) as image:
            pixels.append(pil_to_pixels(image, channels, size, origin))
    return {"pixels": pixels, "label": batch["label"]}


class ImageFolderImages:
    """A local folder of images (any format PIL reads): data.path/<class>/**/<image>."""

    @staticmethod
    def check_config(data_cfg: DictConfig) -> None:
        check_data_keys(data_cfg, {**IMAGE_SPECS, "num_proc": NUM_PROC})
        path = os.path.expanduser(str(select(data_cfg, "path")))
        if not os.path.exists(path):
            raise ConfigError(f"data.path={path!r} does not exist (expected a folder of images, one subfolder per "
                              f"class)")
        if not os.path.isdir(path):
            raise ConfigError(f"data.path={path!r} is not a folder (expected a folder of images, one subfolder per "
                              f"class)")

    @staticmethod
    def load(data_cfg: DictConfig, cache_dir: str):
        import datasets

        root = os.path.abspath(os.path.expanduser(data_cfg.path))
        paths, labels, classes = find_images(root)
        if not paths:
            raise DataError(f"data.path={root!r} holds no image files ({', '.join(sorted(_image_extensions())[:8])}"
                            f", ...)")
        if data_cfg.max_images:
            paths, labels = paths[: data_cfg.max_images], labels[: data_cfg.max_images]
        stats = [(os.path.relpath(p, root), os.path.getsize(p), os.path.getmtime(p)) for p in paths]
        size, channels = data_cfg.image_size, data_cfg.channels
        key = fingerprint("image_folder", IMAGES_VERSION, root, stats, classes, size, channels,
                          data_cfg.validation_fraction)

        def build():
            train, val = split_by_hash([s[0] for s in stats], data_cfg.validation_fraction, f"data.path={root!r}")
            files = datasets.Dataset.from_dict({"path": paths, "label": labels})
            dataset_dict = datasets.DatasetDict(train=files.select(train), validation=files.select(val))
            return dataset_dict.map(_folder_pixels, batched=True, batch_size=256, remove_columns=["path"],
                                    features=image_features(channels, size), num_proc=data_cfg.num_proc,
                                    fn_kwargs={"channels": channels, "size": size}, load_from_cache_file=False,
                                    desc="decoding images")

        return _load_cached(cache_dir, "image_folder", key, build)


def _hf_pixels(batch: dict, image_column: str, label_column: str | None, channels: int, size: int,
               origin: str) -> dict:
    pixels = []
    for image in batch[image_column]:
        if hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image (datasets' Image feature)
            pixels.append(pil_to_pixels(image, channels, size, origin))
        else:
            pixels.append(array_to_pixels(np.asarray(image), channels, size, origin))
    labels = batch[label_column] if label_column else [UNLABELLED] * len(pixels)
    return {"pixels": pixels, "label": [UNLABELLED if lab is None else int(lab) for lab in labels]}


class HFImageDataset:
    """Any `datasets.load_dataset(name)` with an image column (cifar10, mnist, a local dataset dir...)."""

    @staticmethod
    def check_config(data_cfg: DictConfig) -> None:
        select(data_cfg, "name")
        check_data_keys(data_cfg, {**IMAGE_SPECS, "num_proc": NUM_PROC, "image_column": Spec(str, nullable=True),
                                   "label_column": Spec(str, nullable=True)})

    @staticmethod
    def load(data_cfg: DictConfig, cache_dir: str):
        import datasets

        origin = f"data.name={data_cfg.name!r}"
        splits = {"train": data_cfg.train_split}
        if data_cfg.validation_split:
            splits["validation"] = data_cfg.validation_split
        try:
            raw = {ours: datasets.load_dataset(data_cfg.name, data_cfg.config_name, split=theirs,
                                               revision=data_cfg.revision)
                   for ours, theirs in splits.items()}
        except hub_load_errors() as err:  # network, missing dataset, bad split: all user-facing here
            text = str(err).strip()
            raise DataError(f"{origin} cannot be loaded: {text.splitlines()[0] if text else type(err).__name__}") \
                from None
        features = raw["train"].features
        image_column = data_cfg.image_column or _only_image_column(features, origin)
        for name, column in (("image_column", image_column), ("label_column", data_cfg.label_column)):
            if column is not None and column not in features:
                raise DataError(f"{origin} has no column data.{name}={column!r}; columns: {', '.join(features)}")
        size, channels = data_cfg.image_size, data_cfg.channels
        key = fingerprint("hf_image_dataset", IMAGES_VERSION, {k: dataset_fingerprint(v) for k, v in raw.items()},
                          image_column, data_cfg.label_column, size, channels, data_cfg.max_images,
                          data_cfg.validation_fraction)

        def build():
            train = raw["train"]
            if data_cfg.max_images:
                train = train.select(range(min(len(train), data_cfg.max_images)))
            if "validation" in raw:
                dataset_dict = datasets.DatasetDict(train=train, validation=raw["validation"])
            else:
                kept, held = split_by_hash([f"{data_cfg.name}:{i}" for i in range(len(train))],
                                           data_cfg.validation_fraction, origin)
                dataset_dict = datasets.DatasetDict(train=train.select(kept), validation=train.select(held))
            return dataset_dict.map(
                _hf_pixels, batched=True, batch_size=256, remove_columns=list(features),
                features=image_features(channels, size), num_proc=data_cfg.num_proc, load_from_cache_file=False,
                fn_kwargs={"image_column": image_column, "label_column": data_cfg.label_column, "channels": channels,
                           "size": size, "origin": origin}, desc="converting images")

        return _load_cached(cache_dir, "hf_image_dataset", key, build)


def _only_image_column(features, origin: str) -> str:
    import datasets

    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if len(images) != 1:
        raise DataError(f"{origin} has {len(images)} image columns ({', '.join(images) or 'none'}); name the one to "
                        f"use with data.image_column=... (columns: {', '.join(features)})")
    return images[0]


IMAGE_SOURCES = {"digits": DigitsImages, "image_folder": ImageFolderImages, "hf_image_dataset": HFImageDataset}
