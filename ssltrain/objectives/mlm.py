"""Masked language modelling (BERT; Devlin et al. 2019, arXiv:1810.04805).

Select 15% of the non-special tokens; of those 80% become [MASK], 10% a random token and 10%
stay unchanged; cross-entropy only at the selected positions. Masking runs in the collator
with a per-batch seeded generator, so batches are reproducible and resumable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ssltrain.errors import ConfigError
from ssltrain.models import build_backbone, masked_lm_head
from ssltrain.objectives.base import Objective, ObjectiveOutput
from ssltrain.objectives.functional import gather_positions, mask_tokens, masked_positions, token_cross_entropy
from ssltrain.spec import PROBABILITY, Spec


@dataclass
class MLMCollator:
    """Packed blocks -> {"input_ids", "labels", "masked_positions"} with BERT masking: (B, T), (B, T)
    and the flat indices (N,) of the selected positions (functional.masked_positions). Picklable
    for workers."""

    mask_token_id: int
    vocab_size: int  # real tokenizer size: random replacements never hit vocabulary padding
    special_ids: tuple[int, ...]
    mask_prob: float
    replace_with_mask: float
    replace_with_random: float

    @classmethod
    def from_tokenizer(cls, tokenizer, objective: str, *, mask_prob: float, replace_with_mask: float,
                       replace_with_random: float):
        """A collator with the tokenizer's [MASK] and special ids; a one-line error without a mask token."""
        if tokenizer.mask_token_id is None:
            raise ConfigError(f"objective={objective} needs a tokenizer with a mask token; use "
                              f"tokenizer.type=wordpiece or a tokenizer.path that defines one")
        return cls(mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                   special_ids=tuple(sorted(set(tokenizer.all_special_ids))), mask_prob=mask_prob,
                   replace_with_mask=replace_with_mask, replace_with_random=replace_with_random)

    def mask(self, input_ids: torch.Tensor, generator: torch.Generator, never: torch.Tensor | None = None):
        """BERT masking of (B, T) ids; special tokens (and `never` positions) are never selected."""
        special = torch.isin(input_ids, torch.tensor(self.special_ids, dtype=torch.long))
        if never is not None:
            special |= never
        return mask_tokens(
            input_ids, special, mask_prob=self.mask_prob, replace_with_mask=self.replace_with_mask,
            replace_with_random=self.replace_with_random, mask_token_id=self.mask_token_id,
            vocab_size=self.vocab_size, generator=generator,
        )

    def __call__(self, columns: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        input_ids = torch.as_tensor(np.asarray(columns["input_ids"]), dtype=torch.long)
        masked, labels = self.mask(input_ids, generator)
        return {"input_ids": masked, "labels": labels, "masked_positions": masked_positions(labels)}


def check_replacement_shares(objective_cfg) -> None:
    """The [MASK] and random-token shares of the selected tokens may not exceed 1 together."""
    total = objective_cfg.replace_with_mask + objective_cfg.replace_with_random
    if total > 1.0 + 1e-9:
        raise ConfigError(f"objective.replace_with_mask + objective.replace_with_random = {total:g} exceeds 1")


# BERT's token selection and replacement, shared by every objective that masks (mlm, mlm_nsp, electra).
MASKING_PARAMS = {
    "mask_prob": Spec(float, low=0.0, high=1.0, low_open=True),
    "replace_with_mask": PROBABILITY,
    "replace_with_random": PROBABILITY,
}


class MaskedLM(Objective):
    attention = "bidirectional"
    reports_perplexity = True
    summary = "masked language modelling (BERT): predict 15% masked tokens from both sides"
    PARAMS = {
        **MASKING_PARAMS,
        "sparse_head": Spec(bool),
    }

    @classmethod
    def check_params(cls, objective_cfg) -> None:
        super().check_params(objective_cfg)
        check_replacement_shares(objective_cfg)

    def __init__(self, *, model_cfg, tokenizer, hardware, mask_prob: float = 0.15,
                 replace_with_mask: float = 0.8, replace_with_random: float = 0.1, sparse_head: bool = True):
        super().__init__()
        from transformers import AutoModelForMaskedLM

        self.collator = MLMCollator.from_tokenizer(
            tokenizer, "mlm", mask_prob=mask_prob, replace_with_mask=replace_with_mask,
            replace_with_random=replace_with_random)
        self.model = build_backbone(model_cfg, tokenizer, AutoModelForMaskedLM, hardware.attn_implementation)
        self.vocab_size = len(tokenizer)
        # The vocabulary projection dominates a small model's FLOPs; at masked positions only it
        # costs ~mask_prob of the dense one for the same loss.
        self.sparse_head = sparse_head and masked_lm_head(self.model) is not None

    def build_collator(self) -> MLMCollator:
        return self.collator

    def export_model(self):
        return self.model

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        input_ids, labels = batch["input_ids"], batch["labels"]  # (B, T) each
        if self.sparse_head:
            hidden = self.model.base_model(input_ids=input_ids).last_hidden_state  # (B, T, H)
            positions = batch.get("masked_positions")  # (N,): from the collator, so no device-to-host sync here
            if positions is None:
                positions = masked_positions(labels)
            logits = gather_positions(hidden, positions)  # (N, H): masked positions only
            for module in masked_lm_head(self.model):
                logits = module(logits)  # -> (N, V)
            labels = gather_positions(labels, positions)  # (N,)
        else:
            logits = self.model(input_ids=input_ids).logits  # (B, T, V)
        loss_sum, n_masked, n_correct = token_cross_entropy(logits, labels, self.vocab_size)
        n = n_masked.clamp(min=1)
        return ObjectiveOutput(
            loss=loss_sum / n,
            metrics={"loss": (loss_sum.detach(), n_masked), "masked_acc": (n_correct, n_masked)},
            num_tokens=torch.tensor(input_ids.numel(), device=logits.device),
        )
