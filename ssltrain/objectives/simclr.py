"""SimCLR (Chen et al. 2020, arXiv:2002.05709): contrastive learning of image representations.

Each image gives two views through random augmentations (crop, flip, brightness/contrast jitter,
blur: ssltrain/data/augment.py, drawn in the collator from the batch's generator). Encoder ->
pooled representation h -> projection MLP (Linear-ReLU-Linear) -> z; NT-Xent with temperature tau
over the 2N views of the global batch: each view's positive is the other view of its image, the
2N - 2 views of all other images are its negatives. Under data parallelism the projections of
every process are gathered with gradients (contrastive.gather_with_grad), so the negatives and
the gradient are those of the global batch. The export is the encoder (AutoModel); the projection
head is dropped, as in the paper, whose linear evaluation uses h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssltrain.objectives.base import ObjectiveOutput
from ssltrain.objectives.image import AUGMENT_SPEC, TwoViewObjective
from ssltrain.spec import Spec


def nt_xent_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, rows: torch.Tensor | None = None):
    """Normalised-temperature cross-entropy (NT-Xent) over the 2N views of N images.

    z_a, z_b: (N, D) projections of the two views; row i of both comes from image i.
    rows: (M,) long indices of the images whose two views are the anchors scored here (default all
    N); every view of all N images is a candidate. An anchor's positive is the other view of its
    image, its 2N - 2 negatives all other views; the anchor itself is excluded.
    Returns (loss_sum, n_anchors, n_correct) as 0-dim tensors: cross-entropy summed over the 2M
    anchors (float32), 2M, and the anchors whose positive has the highest similarity (top-1).
    Results over disjoint `rows` (one slice per process) add up to those of the whole batch.
    """
    n = z_a.shape[0]
    z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)  # (2N, D): cosine similarity = dot product
    if rows is None:
        rows = torch.arange(n, device=z.device)
    anchors = torch.cat([rows, rows + n])  # (2M,) indices into the 2N views
    positives = torch.cat([rows + n, rows])  # (2M,) the other view of the same image
    logits = z[anchors] @ z.T / temperature  # (2M, 2N)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(anchors.numel(), device=z.device), anchors] = True
    logits = logits.masked_fill(is_self, float("-inf"))
    loss_sum = F.cross_entropy(logits, positives, reduction="sum")
    n_correct = (logits.argmax(dim=1) == positives).sum()
    return loss_sum, torch.tensor(anchors.numel(), device=z.device), n_correct


class SimCLR(TwoViewObjective):
    summary = "SimCLR: two augmented views per image, projection MLP, NT-Xent over the global batch"
    metrics_per_example = False  # NT-Xent over the batch: a smaller last batch has fewer negatives
    PARAMS = {
        "temperature": Spec(float, low=0.0, high=10.0, low_open=True),
        "projection_dim": Spec(int, low=1),
        "projection_hidden": Spec(int, low=1, nullable=True),
        "augment": AUGMENT_SPEC,
    }

    def __init__(self, *, model_cfg, tokenizer, hardware, temperature: float = 0.5, projection_dim: int = 64,
                 projection_hidden: int | None = None, augment: dict | None = None):
        super().__init__()
        self.build_encoder(model_cfg, hardware)
        hidden = projection_hidden or self.width
        # The paper's head: batch norm on the hidden layer, which also removes the component every image
        # shares at initialisation (without it a ViT's projections start almost parallel and stay so).
        self.projector = torch.nn.Sequential(
            torch.nn.Linear(self.width, hidden, bias=False), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, projection_dim),
        )
        self.temperature = temperature
        self.use_views(augment)

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        views, n = self.views_of(batch)  # (2B, C, H, W): B first views, then B second views
        z = self.projector(self.represent(views))  # (2B, D)
        z_a, z_b, offset = self.gathered_views(z, n)  # (P*B, D) each: every process's views
        rows = torch.arange(offset, offset + n, device=z.device)  # this process's images
        loss_sum, count, n_correct = nt_xent_loss(z_a, z_b, self.temperature, rows)
        return ObjectiveOutput(
            loss=loss_sum / count,
            metrics={"loss": (loss_sum.detach(), count), "contrastive_acc": (n_correct, count)},
            num_tokens=torch.tensor(views.shape[0], device=views.device),
        )
