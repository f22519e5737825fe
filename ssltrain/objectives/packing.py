"""Several short examples per row, so no FLOPs go to padding (SimCSE's sentences, NSP's pairs).

A batch of B variable-length examples (stored padded, each with its length) becomes R <= B rows
of at most seq_len tokens, filled first-fit decreasing. Every position keeps the example it came
from (`segments`, -1 on padding) and its position within it (`position_ids`, from 0 at each
example's start), and `starts` gives each example's first token in the flattened (R * W) layout.
The encoder gets a block-diagonal attention mask (block_mask): a token attends only to the tokens
of its own example, at the positions it would have alone, so each example is encoded exactly as
in a padded row of its own, without the padding.

Encoders qualify when they take position_ids counted from 0 and a ready 4-d mask
(PACKABLE_MODEL_TYPES, with sdpa or eager attention); others keep padded rows.
"""

from __future__ import annotations

import numpy as np
import torch

from ssltrain.models import attn_implementation

# Model types whose encoders take position_ids counted from 0 and a ready (B, 1, L, L) attention
# mask (RoBERTa-style positions start after the padding id; flash_attention_2 takes no 4-d mask).
PACKABLE_MODEL_TYPES = ("bert", "electra")
PACKABLE_ATTENTION = ("sdpa", "eager")


def can_pack(config) -> bool:
    """Whether a model with this transformers config can encode packed rows."""
    return config.model_type in PACKABLE_MODEL_TYPES and attn_implementation(config) in PACKABLE_ATTENTION


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of the examples in each row, each row's lengths summing to at
    most `capacity`; deterministic (ties by index)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def pack(columns: dict[str, np.ndarray], lengths: list[int], fill: dict[str, int] | None = None,
         capacity: int | None = None) -> dict[str, torch.Tensor]:
    """(B, L) arrays of the same B examples (the first lengths[i] entries of row i are real) -> the
    same columns as (R, W) long tensors of rows of at most `capacity` tokens (default L: the stored
    sequence length), padding = fill[name] (default 0), plus position_ids, segments, starts (see
    the module docstring) and attention_mask (1 on real tokens)."""
    fill = fill or {}
    capacity = capacity or next(iter(columns.values())).shape[1]
    rows = pack_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    out = {name: np.full((len(rows), width), fill.get(name, 0), dtype=np.int64) for name in columns}
    position_ids = np.zeros((len(rows), width), dtype=np.int64)
    segments = np.full((len(rows), width), -1, dtype=np.int64)
    starts = np.zeros(len(lengths), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for i in sorted(row):  # batch order within a row
            n = lengths[i]
            for name, values in columns.items():
                out[name][r, at:at + n] = values[i, :n]
            position_ids[r, at:at + n] = np.arange(n)
            segments[r, at:at + n] = i
            starts[i] = r * width + at
            at += n
    packed = {name: torch.from_numpy(values) for name, values in out.items()}
    segments_t = torch.from_numpy(segments)
    packed.update(attention_mask=(segments_t >= 0).long(), position_ids=torch.from_numpy(position_ids),
                  segments=segments_t, starts=torch.from_numpy(starts))
    return packed


def block_mask(segments: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    """(R, W) segments -> the (R, 1, W, W) mask for transformers: a token attends to the tokens of
    its own example (padding to padding, so no row is empty). Boolean (keep) for sdpa; additive
    float for eager attention, which adds the mask to the scores."""
    block = (segments[:, :, None] == segments[:, None, :])[:, None]
    if attn_implementation == "eager":
        return torch.zeros(block.shape, device=block.device).masked_fill(~block, torch.finfo(torch.float32).min)
    return block


def encode_packed(encoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Packed rows through a transformers encoder (block-diagonal mask, positions from 0 in each
    example; token_type_ids when the batch has them): the last hidden states, (R, W, H)."""
    mask = block_mask(batch["segments"], attn_implementation(encoder.config))
    return encoder(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"), attention_mask=mask,
                   position_ids=batch["position_ids"]).last_hidden_state


def pooled_first_tokens(encoder, hidden: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """The encoder's own pooler (BERT: dense + tanh on the first token) applied to each example's
    first token of packed (R, W, H) states -> (N, H)."""
    first = hidden.reshape(-1, hidden.shape[-1])[starts]  # (N, H)
    return encoder.pooler(first.unsqueeze(1))  # the pooler reads position 0
