"""Image augmentations in plain torch ops, batched, with all randomness from a torch.Generator.

Each function takes images (B, C, H, W) float in [0, 1] and returns the same shape and range;
parameters are drawn per image from `generator`, so a collated batch is a pure function of the
loader's (seed, epoch, batch, rank). At zero strength each one returns its input unchanged.
The SimCLR recipe (Chen et al. 2020, appendix A): random resized crop, horizontal flip, colour
jitter (here brightness and contrast) with probability 0.8, Gaussian blur with probability 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ssltrain.errors import ConfigError


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _bernoulli(n: int, prob: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) < prob


def random_resized_crop(images: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Crop a random region of each image, area share ~ U(scale) and aspect ratio (width/height)
    log-uniform in ratio, and resize it back to H x W (bilinear). scale=(1, 1), ratio=(1, 1): identity.
    A region wider or taller than the image is clamped to it (torchvision retries instead)."""
    b, _, h, w = images.shape
    area = _uniform(b, scale[0], scale[1], generator)
    aspect = torch.exp(_uniform(b, math.log(ratio[0]), math.log(ratio[1]), generator))
    crop_w = torch.sqrt(area * aspect * h / w).clamp(max=1.0)  # shares of the image width / height
    crop_h = torch.sqrt(area / aspect * w / h).clamp(max=1.0)
    left = (1.0 - crop_w) * torch.rand(b, generator=generator)
    top = (1.0 - crop_h) * torch.rand(b, generator=generator)
    if bool((crop_w == 1).all() and (crop_h == 1).all()):
        return images  # the whole image everywhere: skip resampling, exactly the input
    # affine_grid maps output coordinates in [-1, 1] to input coordinates: x_in = centre + share * x_out.
    theta = torch.zeros(b, 2, 3, dtype=images.dtype)
    theta[:, 0, 0] = crop_w
    theta[:, 0, 2] = 2 * left + crop_w - 1
    theta[:, 1, 1] = crop_h
    theta[:, 1, 2] = 2 * top + crop_h - 1
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)


def horizontal_flip(images: torch.Tensor, generator: torch.Generator, prob: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability prob."""
    flip = _bernoulli(images.shape[0], prob, generator).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def _grey(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W) luma (ITU-R 601 weights for RGB)."""
    if images.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
        return (images * weights[None, :, None, None]).sum(1, keepdim=True)
    return images.mean(1, keepdim=True)


def color_jitter(images: torch.Tensor, generator: torch.Generator, brightness: float = 0.4, contrast: float = 0.4,
                 prob: float = 0.8) -> torch.Tensor:
    """With probability prob per image: scale brightness by a factor ~ U[1 - b, 1 + b], then blend with
    the image's mean grey level by a contrast factor ~ U[1 - c, 1 + c] (torchvision's definitions)."""
    b = images.shape[0]
    apply = _bernoulli(b, prob, generator).to(images.device)
    bright = _uniform(b, max(0.0, 1 - brightness), 1 + brightness, generator).to(images)
    contr = _uniform(b, max(0.0, 1 - contrast), 1 + contrast, generator).to(images)
    out = (images * bright[:, None, None, None]).clamp(0.0, 1.0)
    mean = _grey(out).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    c = contr[:, None, None, None]
    out = (c * out + (1 - c) * mean).clamp(0.0, 1.0)
    return torch.where(apply[:, None, None, None], out, images)


def gaussian_blur(images: torch.Tensor, generator: torch.Generator, sigma: tuple[float, float] = (0.1, 2.0),
                  kernel_size: int = 3, prob: float = 0.5) -> torch.Tensor:
    """With probability prob per image: a separable Gaussian blur, sigma ~ U(sigma) pixels, over a
    kernel_size x kernel_size window (odd), reflecting at the borders."""
    b, c, h, w = images.shape
    apply = _bernoulli(b, prob, generator).to(images.device)
    sigmas = _uniform(b, sigma[0], sigma[1], generator).to(images)
    radius = kernel_size // 2
    if radius == 0 or not bool(apply.any()):
        return images
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigmas[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, k): one per channel
    # Reflect padding must stay inside the image; a kernel wider than a tiny image repeats its edge instead.
    mode = "reflect" if radius < min(h, w) else "replicate"
    x = F.pad(images.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode=mode)
    x = F.conv2d(x, kernel[:, None, None, :], groups=b * c)  # along width
    x = F.conv2d(x, kernel[:, None, :, None], groups=b * c)  # along height
    return torch.where(apply[:, None, None, None], x.reshape(b, c, h, w).clamp(0.0, 1.0), images)


@dataclass(frozen=True)
class ImageAugment:
    """The augmentation pipeline of an image objective (crop -> flip -> jitter -> blur), configured
    by its `augment:` block. The defaults are the identity. Picklable for DataLoader workers."""

    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    flip_prob: float = 0.0
    jitter_prob: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int = 3

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = random_resized_crop(images, generator, self.crop_scale, self.crop_ratio)
        images = horizontal_flip(images, generator, self.flip_prob)
        images = color_jitter(images, generator, self.brightness, self.contrast, self.jitter_prob)
        return gaussian_blur(images, generator, self.blur_sigma, self.blur_kernel_size, self.blur_prob)

    @classmethod
    def from_config(cls, settings: dict | None, key: str = "objective.augment") -> ImageAugment:
        """Validated ImageAugment from a YAML block; a bad value is a one-line ConfigError naming it."""
        from omegaconf import DictConfig, OmegaConf

        if isinstance(settings, DictConfig):
            settings = OmegaConf.to_container(settings, resolve=True)
        settings = dict(settings or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(valid))
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]} is not an augmentation setting; valid: {', '.join(valid)}")
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            if name in settings:
                settings[name] = _pair(f"{key}.{name}", settings[name])
        for name in ("flip_prob", "jitter_prob", "blur_prob", "brightness", "contrast"):
            value = settings.get(name, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}.{name}={value!r} is invalid; expected a number in [0, 1]")
        low, high = settings.get("crop_scale", (1.0, 1.0))
        if not 0.0 < low <= high <= 1.0:
            raise ConfigError(f"{key}.crop_scale=[{low}, {high}] is invalid; expected 0 < low <= high <= 1")
        low, high = settings.get("crop_ratio", (1.0, 1.0))
        if not 0.0 < low <= high:
            raise ConfigError(f"{key}.crop_ratio=[{low}, {high}] is invalid; expected 0 < low <= high")
        low, high = settings.get("blur_sigma", (0.1, 2.0))
        if not 0.0 < low <= high:
            raise ConfigError(f"{key}.blur_sigma=[{low}, {high}] is invalid; expected 0 < low <= high (pixels)")
        size = settings.get("blur_kernel_size", 3)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
            raise ConfigError(f"{key}.blur_kernel_size={size!r} is invalid; expected an odd integer >= 1")
        return cls(**settings)


def _pair(key: str, value) -> tuple[float, float]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"{key}={value!r} is invalid; expected [low, high]")
    return float(value[0]), float(value[1])
