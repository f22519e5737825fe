"""Contrastive loss maths shared by objectives (SimCSE; SimCLR reuses the gather): an all-gather
that keeps gradients, so negatives come from the global batch of every process, InfoNCE and the
alignment/uniformity diagnostics (Wang & Isola 2020, arXiv:2005.10242).

One-directional as in the SimCSE paper (Gao et al. 2021, Eq. 1) and its code: anchor i is
classified against every candidate, its positive at row offset + i; candidates are not also
used as anchors (SimCLR's NT-Xent, by contrast, is symmetric over the 2N views).

(Both contrastive objectives share this file: the gather is the SimCLR engineer's rebuild after a
same-name overwrite; info_nce_loss/info_nce/alignment_uniformity are SimCSE's, tested against a
naive double loop in tests/test_simcse.py.)

With P processes each holding n rows, every process gathers all P*n rows, scores its own
anchors against all of them and backpropagates into the gathered rows: the gather's backward
sums every rank's gradient for a row onto the rank that computed it. With DDP averaging
parameter gradients over ranks, the update is the gradient of the global-batch loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _AllGather(torch.autograd.Function):
    """(n, ...) on each rank -> (P*n, ...) on every rank, in rank order. Backward: the gradient of
    the rank's own slice summed over all ranks (all_reduce works on every backend, gloo included)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(every process's `tensor` concatenated in rank order, the row where this process's part
    starts). Shapes must match on all processes. Identity (offset 0) with one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    return _AllGather.apply(tensor), dist.get_rank() * tensor.shape[0]


def info_nce(anchors: torch.Tensor, candidates: torch.Tensor, temperature: float, offset: int = 0):
    """One-directional InfoNCE with cosine similarity.

    anchors: (B, D); candidates: (K, D) with anchor i's positive at row offset + i, every other
    row a negative. Returns (loss_sum float32, count, n_correct) as 0-dim tensors.
    """
    a = F.normalize(anchors.float(), dim=-1)
    c = F.normalize(candidates.float(), dim=-1)
    logits = a @ c.T / temperature  # (B, K)
    targets = torch.arange(a.shape[0], device=a.device) + offset
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    n_correct = (logits.argmax(dim=-1) == targets).sum()
    return loss_sum, torch.tensor(a.shape[0], device=a.device), n_correct


def info_nce_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float, positive_offset: int = 0) -> torch.Tensor:
    """Mean one-directional InfoNCE: z1 (N, D) anchors, z2 (M, D) candidates; z1[i] and
    z2[positive_offset + i] are positives, every other row of z2 is a negative:
    loss_i = -log(exp(cos(z1_i, z2_i+) / t) / sum_j exp(cos(z1_i, z2_j) / t))."""
    loss_sum, count, _ = info_nce(z1, z2, temperature, positive_offset)
    return loss_sum / count


def alignment_uniformity(z1: torch.Tensor, z2: torch.Tensor):
    """(alignment, uniformity) of normalised embeddings (Wang & Isola 2020): mean squared distance
    of positive pairs (alpha 2), and log of the mean Gaussian potential exp(-2 d^2) over distinct
    pairs of z1 (t 2). Lower is better for both. 0-dim float32 tensors."""
    a = F.normalize(z1.float(), dim=-1)
    b = F.normalize(z2.float(), dim=-1)
    alignment = (a - b).pow(2).sum(-1).mean()
    if a.shape[0] < 2:
        return alignment, torch.zeros((), device=a.device)
    sq_dist = torch.pdist(a, p=2).pow(2)
    uniformity = sq_dist.mul(-2).exp().mean().log()
    return alignment, uniformity
