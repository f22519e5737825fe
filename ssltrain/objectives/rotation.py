"""Rotation prediction (RotNet; Gidaris et al. 2018, arXiv:1803.07728).

Every image is shown at 0, 90, 180 and 270 degrees (all four per image, which the paper found
better than sampling one) and a 4-way linear classifier on the pooled encoder output predicts
the rotation: cross-entropy over the 4B rotated copies. Recognising an object's orientation
requires recognising the object. The export is the encoder (AutoModel); the head is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ssltrain.data.augment import ImageAugment
from ssltrain.objectives.base import ObjectiveOutput
from ssltrain.objectives.image import AUGMENT_SPEC, ImageObjective, pixels_of

N_ROTATIONS = 4  # multiples of 90 degrees


def rotate_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) square images -> ((4B, C, H, W) rotated copies, (4B,) labels k in 0..3): copy
    k * B + i is image i rotated by k * 90 degrees counter-clockwise."""
    rotated = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(N_ROTATIONS)])
    labels = torch.arange(N_ROTATIONS).repeat_interleave(images.shape[0])
    return rotated, labels


@dataclass
class RotationCollator:
    """Images -> {"pixels": (4B, C, H, W), "labels": (4B,)}; optional augmentations first, drawn
    from the batch's generator. Picklable for DataLoader workers."""

    augment: ImageAugment

    def __call__(self, columns: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        pixels, labels = rotate_batch(self.augment(pixels_of(columns), generator))
        return {"pixels": pixels, "labels": labels}


class RotationPrediction(ImageObjective):
    summary = "rotation prediction (RotNet): classify 0/90/180/270-degree rotations of each image"
    PARAMS = {"augment": AUGMENT_SPEC}

    def __init__(self, *, model_cfg, tokenizer, hardware, augment: dict | None = None):
        super().__init__()
        self.build_encoder(model_cfg, hardware)
        self.head = torch.nn.Linear(self.width, N_ROTATIONS)
        self.collator = RotationCollator(ImageAugment.from_config(augment))

    def build_collator(self) -> RotationCollator:
        return self.collator

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        pixels, labels = batch["pixels"], batch["labels"]  # (4B, C, H, W), (4B,)
        logits = self.head(self.represent(pixels)).float()  # (4B, 4)
        loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        count = torch.tensor(labels.numel(), device=labels.device)
        n_correct = (logits.argmax(dim=1) == labels).sum()
        return ObjectiveOutput(
            loss=loss_sum / count,
            metrics={"loss": (loss_sum.detach(), count), "rotation_acc": (n_correct, count)},
            num_tokens=count,
        )
