"""VICReg (Bardes, Ponce & LeCun 2022, arXiv:2105.04906): Variance-Invariance-Covariance
Regularization for self-supervised image representations, without negatives or a momentum encoder.

Each image gives two views through random augmentations (ssltrain/data/augment.py, drawn in the
collator from the batch's generator). Encoder -> pooled representation h -> expander (Linear-BN-ReLU,
Linear-BN-ReLU, Linear; the paper's is 8192 wide on a 2048-wide ResNet-50, here `expander_dim`)
-> embeddings Z, Z' of the N images' two views. The loss (paper Eq. 6) is

    lambda * s(Z, Z') + mu * (v(Z) + v(Z')) + nu * (c(Z) + c(Z'))

  s  invariance: the mean squared error between the two views' embeddings (as the paper's code,
     F.mse_loss: a mean over images and dimensions; the paper's Eq. 5 sums over dimensions),
  v  variance: the mean over dimensions of relu(gamma - sqrt(Var(z_j) + eps)), a hinge that keeps
     every dimension's standard deviation over the batch at gamma or above (Eq. 1),
  c  covariance: the sum of the squared off-diagonal entries of the batch covariance matrix,
     divided by the dimension D (Eq. 3-4), which decorrelates the dimensions.

Variance and covariance are summed over both branches as in Eq. 6 (the paper's code averages the
two variance terms instead: variance_coeff=12.5 reproduces it). Defaults lambda = mu = 25, nu = 1,
gamma = 1, eps = 1e-4 as in the paper.

Variance and covariance are statistics of the batch, so under data parallelism the embeddings of
every process are gathered with gradients (contrastive.gather_with_grad), as the paper's code does:
every process computes the loss of the global batch, the gather's backward sums the processes'
identical gradients for a row onto the process that computed it, and DDP's averaging leaves the
gradient of the global-batch loss. The export is the encoder (AutoModel); the expander is dropped,
as in the paper, whose linear evaluation uses the representation h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssltrain.objectives.base import ObjectiveOutput
from ssltrain.objectives.image import AUGMENT_SPEC, TwoViewObjective
from ssltrain.spec import Spec


def variance_term(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """v(Z) (paper Eq. 1): mean over the D dimensions of relu(gamma - sqrt(Var(z_j) + eps)),
    Var the unbiased variance over the N rows of z (N, D)."""
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(gamma - std).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """c(Z) (paper Eq. 3-4): the squared off-diagonal entries of the (D, D) covariance matrix of the
    N rows of z, C = (z - mean)^T (z - mean) / (N - 1), summed and divided by D."""
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    return off_diagonal.pow(2).sum() / d


def vicreg_terms(z_a: torch.Tensor, z_b: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4):
    """(invariance, variance, covariance) of the embeddings z_a, z_b (N, D) of N images' two views
    (row i of both from image i), as 0-dim float32 tensors: F.mse_loss(z_a, z_b),
    v(z_a) + v(z_b), c(z_a) + c(z_b). Computed in float32 with autocast off: the covariance of
    low-precision matmuls is too coarse for the off-diagonal penalty. N >= 2."""
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        z_a, z_b = z_a.float(), z_b.float()
        invariance = F.mse_loss(z_a, z_b)
        variance = variance_term(z_a, gamma, eps) + variance_term(z_b, gamma, eps)
        covariance = covariance_term(z_a) + covariance_term(z_b)
    return invariance, variance, covariance


class VICReg(TwoViewObjective):
    summary = "VICReg: invariance + variance + covariance terms on expanded embeddings of two views"
    metrics_per_example = False  # variance and covariance are statistics of the batch
    PARAMS = {
        "invariance_coeff": Spec(float, low=0.0),
        "variance_coeff": Spec(float, low=0.0),
        "covariance_coeff": Spec(float, low=0.0),
        "gamma": Spec(float, low=0.0, low_open=True),
        "eps": Spec(float, low=0.0, low_open=True),
        "expander_dim": Spec(int, low=1),
        "augment": AUGMENT_SPEC,
    }

    def __init__(self, *, model_cfg, tokenizer, hardware, invariance_coeff: float = 25.0,
                 variance_coeff: float = 25.0, covariance_coeff: float = 1.0, gamma: float = 1.0, eps: float = 1e-4,
                 expander_dim: int = 512, augment: dict | None = None):
        super().__init__()
        self.build_encoder(model_cfg, hardware)
        d = expander_dim
        # The paper's expander (its code: biases everywhere but the last layer).
        self.expander = torch.nn.Sequential(
            torch.nn.Linear(self.width, d), torch.nn.BatchNorm1d(d), torch.nn.ReLU(),
            torch.nn.Linear(d, d), torch.nn.BatchNorm1d(d), torch.nn.ReLU(),
            torch.nn.Linear(d, d, bias=False),
        )
        self.coeffs = (invariance_coeff, variance_coeff, covariance_coeff)
        self.gamma, self.eps = gamma, eps
        self.use_views(augment)

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        views, n = self.views_of(batch)  # (2B, C, H, W): B first views, then B second views
        z = self.expander(self.represent(views))  # (2B, D)
        z_a, z_b, _ = self.gathered_views(z, n)  # (P*B, D) each: every process's views
        invariance, variance, covariance = vicreg_terms(z_a, z_b, self.gamma, self.eps)
        lam, mu, nu = self.coeffs
        loss = lam * invariance + mu * variance + nu * covariance
        # Each term is one value of the global batch; weighting it by this process's images makes the
        # reduced (sum, count) mean over processes and batches the mean of the per-batch values.
        count = torch.tensor(n, device=views.device)
        metrics = {name: (value.detach() * count, count) for name, value in
                   (("loss", loss), ("invariance", invariance), ("variance", variance), ("covariance", covariance))}
        return ObjectiveOutput(loss=loss, metrics=metrics, num_tokens=torch.tensor(views.shape[0], device=views.device))
