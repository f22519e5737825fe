"""Pure loss and masking functions shared by objectives. Tested against slow references."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value that takes no part in the loss (the HF convention)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_limit: int | None = None):
    """Summed cross-entropy over labelled positions.

    logits: (..., V) float; labels: (...) long, IGNORE_INDEX where no target.
    vocab_limit: logits columns >= this (vocabulary padding rows) are excluded from the softmax.
    Returns (loss_sum, n_targets, n_correct) as 0-dim tensors; loss_sum is float32.

    Runs the torch.compile'd copy of the same code when hardware.compile_loss is on
    (use_compiled_loss): fused, it reads the logits about twice instead of copying them several times.
    """
    if _compiled_loss is not None:
        if logits.dim() == 2:  # rows at masked positions: their count changes every batch
            mark_rows_dynamic(logits, labels)
        return _compiled_loss(logits, labels, vocab_limit)
    return _token_cross_entropy(logits, labels, vocab_limit)


def _token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_limit: int | None):
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits[..., :vocab_limit]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    loss_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = labels != IGNORE_INDEX
    n_targets = valid.sum()
    n_correct = ((logits.argmax(-1) == labels) & valid).sum()
    return loss_sum, n_targets, n_correct


_compiled_loss = None  # torch.compile(_token_cross_entropy) while hardware.compile_loss is on


def use_compiled_loss(enabled: bool) -> None:
    """Route token_cross_entropy through torch.compile (True) or run it eagerly (False). Set by the
    training loop from hardware.compile_loss at the start of every run."""
    global _compiled_loss
    if not enabled:
        _compiled_loss = None
    elif _compiled_loss is None:
        _compiled_loss = torch.compile(_token_cross_entropy)


def mask_tokens(input_ids: torch.Tensor, special_mask: torch.Tensor, *, mask_prob: float, replace_with_mask: float,
                replace_with_random: float, mask_token_id: int, vocab_size: int, generator: torch.Generator):
    """BERT masking. Of the non-special positions, select each with probability mask_prob; of the
    selected, replace_with_mask -> [MASK], replace_with_random -> a uniform random token, the rest
    unchanged. Labels hold the original ids at selected positions and IGNORE_INDEX elsewhere.

    input_ids: (B, T) long; special_mask: (B, T) bool, True where the token must never be selected.
    Returns (masked_input_ids, labels), both (B, T) long.
    """
    shape = input_ids.shape
    selected = (torch.rand(shape, generator=generator) < mask_prob) & ~special_mask
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    # One uniform draw per position decides the replacement kind: [0, m) mask, [m, m + r) random.
    kind = torch.rand(shape, generator=generator)
    to_mask = selected & (kind < replace_with_mask)
    to_random = selected & (kind >= replace_with_mask) & (kind < replace_with_mask + replace_with_random)
    random_ids = torch.randint(vocab_size, shape, generator=generator, dtype=input_ids.dtype)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def masked_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (N,) of the labelled positions of (B, T) labels, in row-major order (the order
    of labels[labels != IGNORE_INDEX]). Collators compute them on the CPU, where they cost nothing:
    on a GPU, boolean indexing must copy N to the host first, a sync that stalls the step."""
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) at flat positions (N,) -> (N, ...); with masked_positions(labels), the same
    rows as x[labels != IGNORE_INDEX], without a device-to-host sync."""
    return x.flatten(0, 1).index_select(0, positions)


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Targets for next-token prediction, aligned with the unshifted logits: position t's target is
    token t+1 and the last position has none. Shifting the labels, not the (B, T, V) logits, spares
    a copy of the logits. input_ids: (B, T) -> (B, T), IGNORE_INDEX in the last column."""
    return F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX)


def mark_rows_dynamic(*tensors: torch.Tensor) -> None:
    """Tell torch.compile that dimension 0 of these tensors changes between calls, so that one graph
    serves every count of masked positions instead of a recompile per count. Private:
    torch._dynamo.maybe_mark_dynamic (no public torch.compiler equivalent)."""
    for tensor in tensors:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)

