"""Masked language modelling (BERT; Devlin et al. 2019, arXiv:1810.04805).

Select 15% of the non-special tokens; of those 80% become [MASK], 10% a random token and 10%
stay unchanged; cross-entropy only at the selected positions. Masking runs in the collator
with a per-batch seeded generator, so batches are reproducible and resumable.
"""

from __future__ import annotations

import torch

from ssltrain.models import build_backbone
from ssltrain.objectives.base import Objective, ObjectiveOutput
from ssltrain.objectives.functional import gather_positions, masked_positions, token_cross_entropy
from ssltrain.objectives.text import MASKING_PARAMS, MLMCollator, check_replacement_shares, masked_lm_head
from ssltrain.spec import Spec


class MaskedLM(Objective):
    streams = True  # trains on the default packed blocks
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
