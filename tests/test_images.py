"""Image data and augmentations: plain-torch augmentations against their definitions (shapes,
ranges, determinism from the generator, identity at zero strength), the three image data groups
(digits, a PIL-built image_folder, a local hf_image_dataset) and clear errors for bad inputs."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssltrain.config import validate_config
from ssltrain.data.augment import (
    ImageAugment,
    color_jitter,
    gaussian_blur,
    horizontal_flip,
    random_resized_crop,
)
from ssltrain.data.corpus import load_corpus
from ssltrain.errors import ConfigError, DataError

# A tiny image run (digits, 8x8): seconds on 2 CPU cores. The text TINY list does not apply (no tokenizer).
IMAGE_TINY = [
    "trainer.batch_size=32",
    "trainer.micro_batch_size=32",
    "trainer.max_steps=30",
    "trainer.log_every=10",
    "trainer.eval_every=0",
    "trainer.eval_batches=4",
]


@contextlib.contextmanager
def one_thread():
    """Tiny 8x8 models gain nothing from a second thread, and when tests share the 2 cores two
    threads per process oversubscribe them (runs then take 10x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


STRONG = ImageAugment(crop_scale=(0.2, 1.0), crop_ratio=(0.75, 1.333), flip_prob=0.5, jitter_prob=0.8,
                      brightness=0.5, contrast=0.5, blur_prob=0.5, blur_sigma=(0.1, 1.5), blur_kernel_size=3)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 6, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=gen(seed))


# ------------------------------------------------------------------ augmentations

@pytest.mark.parametrize("shape", [(6, 1, 8, 8), (5, 3, 16, 16), (4, 3, 12, 20)])
def test_every_augmentation_keeps_shape_dtype_and_range(shape):
    x = torch.rand(*shape, generator=gen())
    for name, fn in [("crop", lambda x, g: random_resized_crop(x, g, (0.1, 1.0))),
                     ("flip", horizontal_flip),
                     ("jitter", lambda x, g: color_jitter(x, g, 0.9, 0.9, 1.0)),
                     ("blur", lambda x, g: gaussian_blur(x, g, (0.5, 2.0), 5, 1.0)),
                     ("pipeline", STRONG)]:
        out = fn(x, gen())
        assert out.shape == x.shape and out.dtype == x.dtype, name
        assert out.min() >= 0.0 and out.max() <= 1.0, name
        assert not torch.equal(out, x), f"{name} at full strength changed nothing"


def test_augmentations_are_a_function_of_the_generator_seed():
    x = images()
    assert torch.equal(STRONG(x, gen(1)), STRONG(x, gen(1)))
    assert not torch.equal(STRONG(x, gen(1)), STRONG(x, gen(2)))
    g = gen(3)
    assert not torch.equal(STRONG(x, g), STRONG(x, g)), "consecutive draws from one generator must differ"


def test_zero_strength_is_the_identity_exactly():
    x = images()
    assert torch.equal(random_resized_crop(x, gen(), (1.0, 1.0), (1.0, 1.0)), x)
    assert torch.equal(horizontal_flip(x, gen(), 0.0), x)
    assert torch.equal(color_jitter(x, gen(), 0.0, 0.0, 1.0), x)
    assert torch.equal(color_jitter(x, gen(), 0.9, 0.9, 0.0), x)
    assert torch.equal(gaussian_blur(x, gen(), (0.1, 2.0), 3, 0.0), x)
    assert torch.equal(ImageAugment()(x, gen()), x)


def test_flip_mirrors_the_chosen_images_left_right():
    x = images()
    assert torch.equal(horizontal_flip(x, gen(), 1.0), x.flip(-1))
    out = horizontal_flip(x, gen(5), 0.5)
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_crop_zooms_into_a_region_of_the_image():
    ramp = torch.linspace(0, 1, 16).expand(4, 1, 16, 16).contiguous()  # value = x position
    out = random_resized_crop(ramp, gen(), scale=(0.25, 0.25), ratio=(1.0, 1.0))  # half the side
    spans = out[:, 0, 0, -1] - out[:, 0, 0, 0]
    assert torch.all(spans < 0.6) and torch.all(spans > 0.35), spans  # about half the ramp, upsampled
    assert torch.allclose(out, out[:, :, :1].expand_as(out), atol=1e-6), "rows of a horizontal ramp stay equal"
    flat = torch.full((3, 3, 8, 8), 0.3)
    assert torch.allclose(random_resized_crop(flat, gen(), (0.1, 0.5)), flat)


def test_brightness_scales_and_contrast_keeps_the_mean_grey_level():
    x = 0.4 + 0.2 * images(c=1)  # mid-range: no clamping
    bright = color_jitter(x, gen(), brightness=0.3, contrast=0.0, prob=1.0)
    ratio = bright / x
    assert torch.allclose(ratio, ratio[:, :1, :1, :1].expand_as(ratio), atol=1e-5)  # one factor per image
    assert not torch.allclose(ratio[:, 0, 0, 0], torch.ones(6))
    contrast = color_jitter(x, gen(), brightness=0.0, contrast=0.5, prob=1.0)
    assert torch.allclose(contrast.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5)
    assert not torch.allclose(contrast.std(dim=(1, 2, 3)), x.std(dim=(1, 2, 3)))


def test_blur_matches_a_direct_2d_gaussian_convolution():
    x = images(b=3, c=2, h=9, w=9)
    sigma = 1.3
    out = gaussian_blur(x, gen(), (sigma, sigma), kernel_size=5, prob=1.0)
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    k1 = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    k2 = torch.outer(k1, k1) / torch.outer(k1, k1).sum()  # (5, 5)
    ref = F.conv2d(F.pad(x.reshape(6, 1, 9, 9), (2, 2, 2, 2), mode="reflect"), k2[None, None]).reshape_as(x)
    assert torch.allclose(out, ref, atol=1e-5)
    flat = torch.full((2, 1, 4, 4), 0.7)
    assert torch.allclose(gaussian_blur(flat, gen(), (0.5, 2.0), 9, 1.0), flat)  # kernel wider than the image


@pytest.mark.parametrize("settings,needle", [
    ({"flip_prob": 1.5}, "flip_prob=1.5"),
    ({"crop_scale": [0.0, 1.0]}, "crop_scale"),
    ({"crop_scale": [0.5]}, "crop_scale"),
    ({"blur_kernel_size": 4}, "blur_kernel_size=4"),
    ({"blur_sigma": [2.0, 1.0]}, "blur_sigma"),
    ({"rotate": 0.5}, "rotate is not an augmentation setting"),
])
def test_bad_augmentation_settings_name_the_key(settings, needle):
    with pytest.raises(ConfigError, match=needle):
        ImageAugment.from_config(settings)


# ------------------------------------------------------------------ data groups

def rows(dataset) -> dict[str, np.ndarray]:
    """Every row of a split as numpy columns."""
    return dataset.with_format("numpy")[:]


def load(compose, *overrides):
    cfg = compose(["objective=simclr", *overrides])
    validate_config(cfg)
    corpus, key = load_corpus(cfg.data, cfg.cache_dir)
    return corpus, key


def test_digits_gives_all_1797_labelled_images_with_a_stable_split(compose):
    corpus, key = load(compose)
    train, val = rows(corpus["train"]), rows(corpus["validation"])
    assert len(train["label"]) + len(val["label"]) == 1797 and len(val["label"]) == round(1797 * 0.1)
    pixels = train["pixels"]
    assert pixels.shape == (len(train["label"]), 1, 8, 8) and pixels.dtype == np.float32
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    assert sorted(set(train["label"].tolist())) == list(range(10))
    # Matches scikit-learn's own array (16 grey levels scaled to [0, 1]).
    from sklearn.datasets import load_digits

    digits = load_digits()
    matches = (np.abs(digits.images[None] / 16.0 - val["pixels"][:5, 0, None]).max(axis=(2, 3)) < 1e-6)
    assert matches.any(axis=1).all()
    again, again_key = load(compose)
    assert again_key == key and np.array_equal(rows(again["validation"])["label"], val["label"])


def test_digits_resize_and_channels_are_configurable(compose):
    corpus, _ = load(compose, "data.image_size=16", "data.channels=3", "data.max_images=100")
    pixels = rows(corpus["train"])["pixels"]
    assert pixels.shape[1:] == (3, 16, 16) and len(corpus["train"]) + len(corpus["validation"]) == 100
    assert np.array_equal(pixels[:, 0], pixels[:, 2]) and 0.0 <= pixels.min() and pixels.max() <= 1.0


def save(image, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def make_folder(root, n_per_class: int = 4):
    """cat/ (RGB png of several sizes, a palette gif), dog/ (grey jpg, RGBA png) and one unlabelled image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n_per_class):
        save(Image.fromarray(rng.integers(0, 255, (10 + i, 14, 3), dtype=np.uint8)), root / "cat" / f"c{i}.png")
        save(Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)), root / "dog" / "sub" / f"d{i}.jpg")
    save(Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)).convert("P"), root / "cat" / "p.gif")
    save(Image.fromarray(rng.integers(0, 255, (8, 8, 4), dtype=np.uint8)), root / "dog" / "a.png")  # RGBA
    save(Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)), root / "loose.png")
    (root / "notes.txt").write_text("not an image")


def test_image_folder_labels_classes_by_subfolder_and_converts_every_mode(compose, tmp_path):
    make_folder(tmp_path / "imgs")
    corpus, _ = load(compose, "data=image_folder", f"data.path={tmp_path / 'imgs'}", "data.image_size=8",
                     "data.validation_fraction=0.2")
    splits = {s: rows(corpus[s]) for s in ("train", "validation")}
    labels = np.concatenate([splits[s]["label"] for s in splits])
    assert len(labels) == 11 and len(splits["validation"]["label"]) == 2
    assert sorted(labels.tolist()) == [-1] + [0] * 5 + [1] * 5  # cat = 0, dog = 1, loose image = -1
    pixels = np.concatenate([splits[s]["pixels"] for s in splits])
    assert pixels.shape == (11, 3, 8, 8) and pixels.min() >= 0 and pixels.max() <= 1
    grey, _ = load(compose, "data=image_folder", f"data.path={tmp_path / 'imgs'}", "data.channels=1",
                   "data.image_size=4")
    assert rows(grey["train"])["pixels"].shape[1:] == (1, 4, 4)


def fails(compose, error, match, *overrides):
    """Loading with these overrides raises `error` whose one-line message matches `match`."""
    with pytest.raises(error, match=match) as info:
        load(compose, *overrides)
    assert "\n" not in str(info.value)


def test_image_folder_bad_inputs_fail_with_one_clear_line(compose, tmp_path):
    from PIL import Image

    folder = "data=image_folder"
    fails(compose, ConfigError, "does not exist", folder, f"data.path={tmp_path / 'missing'}")
    (tmp_path / "file.png").write_bytes(b"")
    fails(compose, ConfigError, "is not a folder", folder, f"data.path={tmp_path / 'file.png'}")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("no images here")
    fails(compose, DataError, "holds no image files", folder, f"data.path={tmp_path / 'empty'}")
    make_folder(tmp_path / "broken", n_per_class=2)
    (tmp_path / "broken" / "cat" / "bad.png").write_text("this is text, not a PNG")
    fails(compose, DataError, r"bad\.png.* is not a readable image", folder, f"data.path={tmp_path / 'broken'}")
    make_folder(tmp_path / "deep", n_per_class=2)
    save(Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)), tmp_path / "deep" / "cat" / "16bit.png")
    fails(compose, DataError, r"16bit\.png.*mode 'I;16'.*8-bit", folder, f"data.path={tmp_path / 'deep'}")


def local_hf_dataset(root, column: str = "img", n: int = 12, images=None):
    """A dataset directory `datasets.load_dataset(root)` reads offline: parquet with an Image column."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(1)
    images = images or [Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)) for _ in range(n)]
    features = datasets.Features({column: datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    root.mkdir(parents=True)
    datasets.Dataset.from_dict({column: images, "label": [i % 3 for i in range(n)]},
                               features=features).to_parquet(str(root / "train.parquet"))
    return root


def test_hf_image_dataset_finds_the_image_column_and_keeps_labels(compose, tmp_path):
    path = local_hf_dataset(tmp_path / "ds")
    corpus, _ = load(compose, "data=hf_image_dataset", f"data.name={path}", "data.image_size=8",
                     "data.validation_fraction=0.25")
    train = rows(corpus["train"])
    assert len(train["label"]) == 9 and len(corpus["validation"]) == 3
    assert train["pixels"].shape == (9, 3, 8, 8) and set(train["label"].tolist()) <= {0, 1, 2}


def test_hf_image_dataset_bad_columns_and_shapes_are_data_errors(compose, tmp_path):
    import datasets

    hf = "data=hf_image_dataset"
    path = local_hf_dataset(tmp_path / "ds")
    fails(compose, DataError, "no column data.label_column='target'.*img, label", hf, f"data.name={path}",
          "data.label_column=target")
    fails(compose, DataError, "cannot be loaded", hf, f"data.name={tmp_path / 'nothing-here'}")
    arrays = tmp_path / "arrays"
    arrays.mkdir()
    datasets.Dataset.from_dict({"pixels": [np.zeros((2, 3, 4, 5), dtype=np.uint8).tolist()] * 4, "label": [0] * 4}) \
        .to_parquet(str(arrays / "train.parquet"))
    fails(compose, DataError, "has 0 image columns", hf, f"data.name={arrays}")
    fails(compose, DataError, r"an image has shape \(2, 3, 4, 5\)", hf, f"data.name={arrays}",
          "data.image_column=pixels")
    levels = tmp_path / "levels"
    levels.mkdir()
    datasets.Dataset.from_dict({"pixels": [[[300, 0], [0, 0]]] * 4, "label": [0] * 4}) \
        .to_parquet(str(levels / "train.parquet"))
    fails(compose, DataError, r"values in \[0, 300\]; expected 8-bit", hf, f"data.name={levels}",
          "data.image_column=pixels")


def test_hf_image_dataset_reads_arrays_of_grey_levels(compose, tmp_path):
    import datasets

    grey = tmp_path / "grey"
    grey.mkdir()
    image = [[0, 255, 0], [255, 0, 255], [0, 255, 0]]  # (H, W) levels, stored as lists of ints
    datasets.Dataset.from_dict({"pixels": [image] * 6, "label": list(range(6))}) \
        .to_parquet(str(grey / "train.parquet"))
    corpus, _ = load(compose, "data=hf_image_dataset", f"data.name={grey}", "data.image_column=pixels",
                     "data.channels=1", "data.image_size=3", "model=resnet-tiny")
    pixels = rows(corpus["train"])["pixels"]
    assert np.array_equal(pixels[0, 0], np.array(image, dtype=np.float32) / 255)
