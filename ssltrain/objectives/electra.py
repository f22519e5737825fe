"""ELECTRA replaced-token detection (Clark et al. 2020, arXiv:2003.10555).

A small generator does MLM on the masked positions; each masked token is replaced by a sample
from the generator's softmax; the discriminator predicts, at every non-padding position, whether
its token differs from the original (a sample equal to the original counts as original).
loss = generator MLM loss + discriminator_weight * discriminator BCE (weight 50 in the paper).
Generator and discriminator share the token/position embeddings (paper, Sec. 3.2); the
generator is `generator_size` times the discriminator's width, FFN and heads (1/4 for Small).

Sampling uses uniform noise the collator draws from the batch's generator (inverse-CDF sampling,
one number per position), so a batch stays a pure function of (seed, epoch, batch, rank).
The export is the discriminator, an ElectraForPreTraining.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ssltrain.errors import ConfigError
from ssltrain.models import build_backbone
from ssltrain.objectives.base import Objective, ObjectiveOutput
from ssltrain.objectives.functional import IGNORE_INDEX, token_cross_entropy
from ssltrain.objectives.text import MASKING_PARAMS, MLMCollator, check_replacement_shares, masked_lm_head
from ssltrain.paths import shipped_options
from ssltrain.spec import Spec

# ---------------------------------------------------------------- pure functions


def sample_from_logits(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One categorical sample per row of softmax(logits), by inverse CDF.

    logits: (N, V) float; uniform: (N,) float in [0, 1). Returns (N,) long in [0, V).
    Token i is drawn iff cdf[i-1] <= u * total < cdf[i]: zero-probability tokens never are.
    """
    cdf = torch.softmax(logits.float(), dim=-1).cumsum(dim=-1)  # (N, V)
    target = uniform.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]  # (N, 1): scaled so rounding never overshoots
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # (N,)
    return index.clamp(max=logits.shape[-1] - 1)


def replace_tokens(original: torch.Tensor, selected: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """original (B, T) with the selected positions (B, T) bool set, in row-major order, to samples (N,)."""
    corrupted = original.clone()
    corrupted[selected] = samples.to(original.dtype)
    return corrupted


def replaced_token_labels(original: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
    """(B, T) float: 1 where the discriminator's input differs from the original token, else 0."""
    return (corrupted != original).float()


def discriminator_loss(logits: torch.Tensor, labels: torch.Tensor, scored: torch.Tensor) -> dict[str, torch.Tensor]:
    """Replaced-token detection statistics over the scored positions, as sums.

    logits, labels: (B, T) float (labels 0/1); scored: (B, T) bool (non-padding positions).
    Returns {"loss_sum" (float32 BCE-with-logits summed), "n", "correct", "true_pos", "pred_pos",
    "actual_pos"} as 0-dim tensors; a logit > 0 predicts "replaced".
    """
    logits, labels = logits[scored].float(), labels[scored].float()  # (N,)
    loss_sum = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
    predicted = logits > 0
    actual = labels > 0.5
    return {
        "loss_sum": loss_sum,
        "n": scored.sum(),
        "correct": (predicted == actual).sum(),
        "true_pos": (predicted & actual).sum(),
        "pred_pos": predicted.sum(),
        "actual_pos": actual.sum(),
    }


def generator_config(discriminator_config, size: float):
    """The generator's ElectraConfig: the discriminator's, with hidden size, FFN size and heads
    scaled by `size` (the paper's multiplier) and the same embedding size, so embeddings can be shared."""
    config = discriminator_config.__class__.from_dict(discriminator_config.to_dict())
    hidden = max(1, round(discriminator_config.hidden_size * size))
    heads = max(1, min(hidden, round(discriminator_config.num_attention_heads * size)))
    while hidden % heads:  # e.g. hidden 48 with 5 heads -> 4 heads
        heads -= 1
    config.hidden_size = hidden
    config.num_attention_heads = heads
    config.intermediate_size = max(1, round(discriminator_config.intermediate_size * size))
    return config


# ---------------------------------------------------------------- objective


@dataclass
class ElectraCollator:
    """BERT-style masking (the MLM collator) plus one uniform number per position for sampling
    the generator's replacement there. Picklable for workers."""

    mlm: MLMCollator

    def __call__(self, columns: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = self.mlm(columns, generator)  # {"input_ids": masked (B, T), "labels": (B, T)}
        batch["sample_noise"] = torch.rand(batch["input_ids"].shape, generator=generator)  # (B, T)
        return batch


class ELECTRA(Objective):
    streams = True  # trains on the default packed blocks
    attention = "bidirectional"
    summary = "replaced-token detection (ELECTRA): a small MLM generator corrupts, a discriminator spots replacements"
    PARAMS = {
        **MASKING_PARAMS,
        "generator_size": Spec(float, low=0.0, high=1.0, low_open=True),
        "discriminator_weight": Spec(float, low=0.0),
    }

    @classmethod
    def check_params(cls, objective_cfg) -> None:
        super().check_params(objective_cfg)
        check_replacement_shares(objective_cfg)

    @classmethod
    def check_compatible(cls, cfg) -> None:
        super().check_compatible(cfg)
        if cfg.model.model_type != "electra":
            raise ConfigError(
                f"objective ELECTRA trains an ElectraConfig generator/discriminator pair but model={cfg.model.name} "
                f"is model_type {cfg.model.model_type}; pick one of: {', '.join(electra_models())}"
            )

    def __init__(self, *, model_cfg, tokenizer, hardware, mask_prob: float = 0.15, replace_with_mask: float = 1.0,
                 replace_with_random: float = 0.0, generator_size: float = 0.25, discriminator_weight: float = 50.0):
        super().__init__()
        from transformers import AutoModelForMaskedLM, AutoModelForPreTraining

        masking = MLMCollator.from_tokenizer(
            tokenizer, "electra", mask_prob=mask_prob, replace_with_mask=replace_with_mask,
            replace_with_random=replace_with_random)
        self.discriminator = build_backbone(model_cfg, tokenizer, AutoModelForPreTraining, hardware.attn_implementation)
        gen_config = generator_config(self.discriminator.config, generator_size)
        self.generator = AutoModelForMaskedLM.from_config(gen_config, attn_implementation=hardware.attn_implementation)
        # Shared token + position (+ type) embeddings and the tied output projection (paper, Sec. 3.2).
        self.generator.electra.embeddings = self.discriminator.electra.embeddings
        self.generator.generator_lm_head.weight = self.discriminator.electra.embeddings.word_embeddings.weight
        self.generator_head = masked_lm_head(self.generator)
        self.vocab_size = len(tokenizer)
        self.pad_token_id = tokenizer.pad_token_id
        self.discriminator_weight = discriminator_weight
        self.collator = ElectraCollator(masking)

    def build_collator(self) -> ElectraCollator:
        return self.collator

    def export_model(self):
        return self.discriminator

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        input_ids, labels, noise = batch["input_ids"], batch["labels"], batch["sample_noise"]  # (B, T) each
        selected = labels != IGNORE_INDEX  # (B, T): positions the generator predicts
        original = torch.where(selected, labels, input_ids)  # (B, T): unselected positions are untouched

        # Generator: MLM at the selected positions only (its head is the bulk of its FLOPs).
        hidden = self.generator.electra(input_ids=input_ids).last_hidden_state  # (B, T, Hg)
        gen_logits = hidden[selected]  # (N, Hg)
        for module in self.generator_head:
            gen_logits = module(gen_logits)  # -> (N, V_padded)
        gen_logits = gen_logits[:, :self.vocab_size]  # vocabulary padding is never predicted nor sampled
        gen_sum, n_masked, gen_correct = token_cross_entropy(gen_logits, labels[selected])

        # Discriminator: every non-padding position, on the generator's samples (no gradient through sampling).
        with torch.no_grad():
            samples = sample_from_logits(gen_logits.detach(), noise[selected])  # (N,)
        corrupted = replace_tokens(original, selected, samples)  # (B, T)
        is_replaced = replaced_token_labels(original, corrupted)  # (B, T)
        scored = original != self.pad_token_id if self.pad_token_id is not None else torch.ones_like(selected)
        disc_logits = self.discriminator(input_ids=corrupted).logits  # (B, T)
        disc = discriminator_loss(disc_logits, is_replaced, scored)

        gen_loss = gen_sum / n_masked.clamp(min=1)
        disc_loss = disc["loss_sum"] / disc["n"].clamp(min=1)
        loss = gen_loss + self.discriminator_weight * disc_loss
        one = torch.ones((), device=loss.device)
        return ObjectiveOutput(
            loss=loss,
            metrics={
                "loss": (loss.detach(), one),  # a weighted sum of two means: averaged per micro-batch
                "gen_loss": (gen_sum.detach(), n_masked),
                "gen_acc": (gen_correct, n_masked),
                "disc_loss": (disc["loss_sum"].detach(), disc["n"]),
                "disc_acc": (disc["correct"], disc["n"]),
                "disc_precision": (disc["true_pos"], disc["pred_pos"]),
                "disc_recall": (disc["true_pos"], disc["actual_pos"]),
                "replaced_rate": (disc["actual_pos"], disc["n"]),
            },
            num_tokens=torch.tensor(input_ids.numel(), device=loss.device),
        )


def electra_models() -> list[str]:
    """Names of the shipped model configs with model_type electra."""
    return [name for name, model in shipped_options("model").items() if model.get("model_type") == "electra"]


__all__ = ["ELECTRA", "ElectraCollator", "discriminator_loss", "generator_config", "replace_tokens",
           "replaced_token_labels", "sample_from_logits"]
