"""Autoregressive language modelling (GPT; Radford et al. 2018, 2019): each position predicts
the next token with a causal decoder; cross-entropy over every next-token pair."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ssltrain.models import build_backbone
from ssltrain.objectives.base import Objective, ObjectiveOutput
from ssltrain.objectives.functional import next_token_labels, token_cross_entropy


@dataclass
class CausalLMCollator:
    """Packed blocks -> {"input_ids"}; targets are the inputs shifted by one in the loss."""

    def __call__(self, columns: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.as_tensor(np.asarray(columns["input_ids"]), dtype=torch.long)}


class CausalLM(Objective):
    streams = True  # trains on the default packed blocks
    attention = "causal"
    reports_perplexity = True
    summary = "autoregressive language modelling (GPT): predict each next token"
    PARAMS = {}

    def __init__(self, *, model_cfg, tokenizer, hardware):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.model = build_backbone(model_cfg, tokenizer, AutoModelForCausalLM, hardware.attn_implementation)
        self.vocab_size = len(tokenizer)

    def build_collator(self) -> CausalLMCollator:
        return CausalLMCollator()

    def export_model(self):
        return self.model

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        input_ids = batch["input_ids"]  # (B, T)
        logits = self.model(input_ids=input_ids).logits  # (B, T, V)
        targets = next_token_labels(input_ids)  # (B, T): the last position predicts nothing
        loss_sum, n_targets, n_correct = token_cross_entropy(logits, targets, self.vocab_size)
        return ObjectiveOutput(
            loss=loss_sum / n_targets.clamp(min=1),
            metrics={"loss": (loss_sum.detach(), n_targets), "next_token_acc": (n_correct, n_targets)},
            num_tokens=torch.tensor(input_ids.numel(), device=logits.device),
        )
