"""BYOL (Grill et al. 2020, arXiv:2006.07733): Bootstrap Your Own Latent, self-supervised image
representations without negative pairs.

Each image gives two views through random augmentations (ssltrain/data/augment.py, drawn in the
collator from the batch's generator). The online network is encoder -> pooled representation h
-> projector (Linear-BN-ReLU-Linear) -> z -> predictor (same shape) -> p. The target network is
a momentum copy of encoder + projector: it starts as an exact copy, gets no gradient, and after
every applied optimizer step moves towards the online weights (after_step):

    target <- tau * target + (1 - tau) * online,   tau(k) = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2

with k the optimizer steps done (k = step + 1 for the step just applied) and K = trainer.max_steps,
so tau rises from tau_base to 1 over the run (paper Sec. 3.2). The loss is the paper's symmetric
normalised MSE (Sec. 3.1): for image i with views v, v',

    l_i = (2 - 2 cos(p(v), sg(z_target(v')))) + (2 - 2 cos(p(v'), sg(z_target(v))))

averaged over the batch. It has no negatives, so nothing is gathered across processes: each
process's loss is the mean over its own images, and DDP's gradient averaging gives the
global-batch gradient. The target weights are registered submodules (module `target`), so
checkpoints hold them and a resumed run continues the same moving average; their batch-norm
statistics follow their own forward passes, as in the paper's code. The export is the online
encoder (AutoModel); projector, predictor and target are dropped, as in the paper, whose linear
evaluation uses the online encoder's representation.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from ssltrain.objectives.base import ObjectiveOutput
from ssltrain.objectives.image import AUGMENT_SPEC, ImageObjective, TwoViewObjective
from ssltrain.spec import Spec


def target_momentum(k: int, max_steps: int, tau_base: float) -> float:
    """tau(k) = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 (paper Sec. 3.2): tau_base at k = 0,
    1 at k = K = max_steps."""
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * k / max_steps) + 1.0) / 2.0


def byol_loss(p_a: torch.Tensor, p_b: torch.Tensor, t_a: torch.Tensor, t_b: torch.Tensor):
    """Symmetric normalised MSE of BYOL (Grill et al. 2020, Sec. 3.1).

    p_a, p_b: (N, D) online predictions of the first and second views; t_a, t_b: (N, D) target
    projections of the same views (treated as constants). Image i scores
    (2 - 2 cos(p_a[i], t_b[i])) + (2 - 2 cos(p_b[i], t_a[i])): each view's prediction of the
    other view's target, 0 for perfect predictions, at most 8.
    Returns (loss_sum float32, n_images) as 0-dim tensors: summed over images; per image it does
    not depend on the other images, so sums over parts of a batch add up to the whole batch's.
    """

    def term(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cos = (F.normalize(p.float(), dim=-1) * F.normalize(t.detach().float(), dim=-1)).sum(-1)
        return 2.0 - 2.0 * cos  # = ||p/|p| - t/|t|||^2

    loss_sum = (term(p_a, t_b) + term(p_b, t_a)).sum()
    return loss_sum, torch.tensor(p_a.shape[0], device=p_a.device)


def _mlp(width: int, hidden: int, out: int) -> torch.nn.Sequential:
    """The paper's projector and predictor: Linear-BN-ReLU-Linear (bias dropped before the norm)."""
    return torch.nn.Sequential(
        torch.nn.Linear(width, hidden, bias=False), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, out),
    )


class _Target(torch.nn.Module):
    """The momentum network: its own copy of the encoder and projector; pools the encoder's output
    exactly as the online network does (ImageObjective.represent reads only self.encoder)."""

    represent = ImageObjective.represent

    def __init__(self, encoder: torch.nn.Module, projector: torch.nn.Module):
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projector(self.represent(pixels))


class BYOL(TwoViewObjective):
    summary = "BYOL: online network predicts a momentum target's projection of the other view; no negatives"
    # Held-out evaluation runs in eval mode, where every batch norm (encoder, projector, predictor, target)
    # uses its running statistics: an image's loss then depends on that image alone, so a smaller last
    # batch is as good as a full one. (In training mode batch norm uses the batch's statistics, which
    # couples the images of a batch, but evaluation is what this flag is about; tests/test_byol.py checks
    # that eval-mode losses of two half batches add up to the whole batch's.)
    metrics_per_example = True
    PARAMS = {
        "tau_base": Spec(float, low=0.0, high=1.0),
        "projection_dim": Spec(int, low=1),
        "projection_hidden": Spec(int, low=1),
        "predictor_hidden": Spec(int, low=1, nullable=True),
        "augment": AUGMENT_SPEC,
    }

    def __init__(self, *, model_cfg, tokenizer, hardware, tau_base: float = 0.996, projection_dim: int = 64,
                 projection_hidden: int = 512, predictor_hidden: int | None = None, augment: dict | None = None):
        super().__init__()
        self.build_encoder(model_cfg, hardware)
        self.projector = _mlp(self.width, projection_hidden, projection_dim)
        self.predictor = _mlp(projection_dim, predictor_hidden or projection_hidden, projection_dim)
        # An exact copy at construction (paper: the target starts from the online weights); trained only by
        # the moving average, so no gradient and no place in param_groups (the default lists trainable ones).
        self.target = _Target(copy.deepcopy(self.encoder), copy.deepcopy(self.projector))
        self.target.requires_grad_(False)
        self.tau_base = tau_base
        self.use_views(augment)

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        views, n = self.views_of(batch)  # (2B, C, H, W): B first views, then B second views
        p = self.predictor(self.projector(self.represent(views)))  # (2B, D)
        with torch.no_grad():
            t = self.target(views)  # (2B, D), a constant for the loss
        loss_sum, count = byol_loss(p[:n], p[n:], t[:n], t[n:])
        return ObjectiveOutput(
            loss=loss_sum / count,
            metrics={"loss": (loss_sum.detach(), count)},
            num_tokens=torch.tensor(views.shape[0], device=views.device),
        )

    def momentum(self, step: int, max_steps: int) -> float:
        """tau used after optimizer step `step` (0-based): tau(k) with k = step + 1 steps done."""
        return target_momentum(step + 1, max_steps, self.tau_base)

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        """The moving-average update of the target from the online encoder and projector (parameters
        only; batch-norm statistics are each network's own). Called once per applied optimizer step, so
        the target after step k depends on (initial weights, the online weights after each step) only."""
        tau = self.momentum(step, max_steps)
        online = [*self.encoder.parameters(), *self.projector.parameters()]
        target = [*self.target.encoder.parameters(), *self.target.projector.parameters()]
        torch._foreach_mul_(target, tau)
        torch._foreach_add_(target, online, alpha=1.0 - tau)
