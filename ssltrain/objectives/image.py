"""What the image pretext objectives share: the data contract (examples are the image source's
"pixels"/"label" rows, no tokenizer), a check that model and data agree on image size and
channels, the encoder (any transformers vision backbone behind AutoModel, e.g. ViT or ResNet)
and its pooled representation, and the `augment:` block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from omegaconf import DictConfig

from ssltrain.data.augment import ImageAugment
from ssltrain.errors import ConfigError
from ssltrain.hub import load_config
from ssltrain.models import build_backbone, build_model_config
from ssltrain.objectives.base import Objective
from ssltrain.objectives.contrastive import gather_with_grad
from ssltrain.spec import Spec

AUGMENT_SPEC = Spec(dict)  # the augment: block; its keys are checked by ImageAugment.from_config


def pixels_of(columns: dict) -> torch.Tensor:
    """The collator's numpy "pixels" column -> (B, C, H, W) float32 tensor in [0, 1]."""
    return torch.as_tensor(np.asarray(columns["pixels"]), dtype=torch.float32)


def representation_width(config) -> int:
    """Width of the pooled representation: the last stage of CNNs (hidden_sizes), else hidden_size."""
    sizes = getattr(config, "hidden_sizes", None)
    return int(sizes[-1]) if sizes else int(config.hidden_size)


@dataclass
class TwoViewCollator:
    """Images -> {"views": (2B, C, H, W)}: B first views then B second views of the same images,
    each drawn independently from the batch's generator. Picklable for DataLoader workers."""

    augment: ImageAugment

    def __call__(self, columns: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        images = pixels_of(columns)  # (B, C, H, W)
        return {"views": torch.cat([self.augment(images, generator), self.augment(images, generator)])}


class ImageObjective(Objective):
    modality = "image"
    attention = None  # any image encoder: transformer (ViT) or convolutional (ResNet)
    PARAMS: ClassVar[dict[str, Spec]] = {"augment": AUGMENT_SPEC}

    @classmethod
    def check_params(cls, objective_cfg) -> None:
        super().check_params(objective_cfg)
        if "augment" in objective_cfg:
            ImageAugment.from_config(objective_cfg.augment)

    @classmethod
    def check_compatible(cls, cfg: DictConfig) -> None:
        super().check_compatible(cfg)
        check_image_shape(cfg)

    @classmethod
    def build_examples(cls, corpus, tokenizer, cfg: DictConfig, corpus_key: str, world_size: int = 1):
        """The image source's rows are the examples: "pixels" (C, H, W) and "label"."""
        return corpus

    def build_encoder(self, model_cfg, hardware) -> None:
        from transformers import AutoModel

        self.encoder = build_backbone(model_cfg, None, AutoModel, hardware.attn_implementation)
        self.width = representation_width(self.encoder.config)
        pooler = getattr(self.encoder, "pooler", None)
        if isinstance(pooler, torch.nn.Module) and any(True for _ in pooler.parameters()):
            # A transformer's learned pooler (ViT: dense + tanh on [CLS]) is not the representation here; it
            # stays in the export so the encoder reloads without missing weights, frozen so no replica
            # waits for its gradient.
            pooler.requires_grad_(False)

    def represent(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, width): transformers (ViT): the mean of the final token states
        ([CLS] and patches), which unlike [CLS] alone already differs between images at
        initialisation; CNNs (ResNet): their global average pool."""
        out = self.encoder(pixel_values=pixels)
        hidden = out.last_hidden_state
        if hidden.dim() == 3:  # (B, T, H) tokens
            return hidden.mean(dim=1)
        return out.pooler_output.flatten(1)  # (B, C, 1, 1) -> (B, C)

    def export_model(self):
        return self.encoder


def check_image_shape(cfg: DictConfig) -> None:
    """Model and data agree on channels and (for models with a fixed input size, like ViT) image
    size; patches tile the image. One-line ConfigError naming both sides otherwise."""
    if cfg.model.pretrained:
        try:
            config = load_config(cfg.model.pretrained, "model.pretrained")
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.pretrained={cfg.model.pretrained!r} has no readable config: "
                              f"{str(err).strip().splitlines()[0]}") from None
        where = f"model.pretrained={cfg.model.pretrained!r}"
    else:
        config = build_model_config(cfg.model, vocab_size=None)
        where = f"model={cfg.model.name}"
    size, channels = cfg.data.image_size, cfg.data.channels
    model_channels = getattr(config, "num_channels", None)
    if model_channels is not None and model_channels != channels:
        raise ConfigError(f"{where} takes {model_channels}-channel images but data={cfg.data.source} gives "
                          f"{channels}; set data.channels={model_channels} or model.config.num_channels={channels}")
    model_size = getattr(config, "image_size", None)
    if isinstance(model_size, (list, tuple)):
        model_size = model_size[0] if len(set(model_size)) == 1 else tuple(model_size)
    if model_size is not None and model_size != size:
        raise ConfigError(f"{where} takes {model_size}x{model_size} images but data={cfg.data.source} gives "
                          f"{size}x{size}; set data.image_size={model_size} or model.config.image_size={size}")
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, int) and size % patch:
        raise ConfigError(f"{where}: patch_size {patch} does not divide the image size {size}; pick a divisor of "
                          f"{size} for model.config.patch_size")


class TwoViewObjective(ImageObjective):
    """An image objective on two augmented views of each image (SimCLR, BYOL, VICReg): the collator
    gives {"views": (2B, C, H, W)}, the B first views then the B second views of the same images."""

    def use_views(self, augment: dict | None) -> None:
        """Draw the views with the objective's `augment:` block (ImageAugment.from_config)."""
        self.collator = TwoViewCollator(ImageAugment.from_config(augment))

    def build_collator(self) -> TwoViewCollator:
        return self.collator

    @staticmethod
    def views_of(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(the (2B, C, H, W) views, B)."""
        views = batch["views"]
        return views, views.shape[0] // 2

    @staticmethod
    def gathered_views(z: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(2B, D) embeddings of this process's views -> every process's first views (P*B, D), their
        second views (P*B, D), and where this process's B images start among them. Gathered with
        gradients (contrastive.gather_with_grad), so a loss over the global batch trains every rank."""
        z_a, offset = gather_with_grad(z[:n])
        z_b, _ = gather_with_grad(z[n:])
        return z_a, z_b, offset

