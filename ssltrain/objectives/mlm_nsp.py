"""BERT's original pretraining recipe (Devlin et al. 2019): masked language modelling and next
sentence prediction, trained jointly on "[CLS] A [SEP] B [SEP]" pairs with a *ForPreTraining
model (BertForPreTraining: MLM head + binary head on the pooled [CLS]).

loss = mean MLM cross-entropy over masked tokens + mean NSP cross-entropy over pairs (the sum
BERT minimises). Masking is BERT's 15% / 80-10-10 (functional.mask_tokens) from the batch's
generator; pairs come from the cached pair examples (nsp.py). With pair_task=sop the pair head
learns ALBERT's sentence order instead. The export is the whole *ForPreTraining model, so it
loads with AutoModelForPreTraining, AutoModelForMaskedLM and AutoModel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ssltrain.errors import ConfigError
from ssltrain.models import build_backbone
from ssltrain.objectives.base import ObjectiveOutput
from ssltrain.objectives.functional import IGNORE_INDEX, token_cross_entropy
from ssltrain.objectives.packing import can_pack, encode_packed, pack, pooled_first_tokens
from ssltrain.objectives.text import (
    MASKING_PARAMS,
    PAIR_PARAMS,
    MLMCollator,
    SentencePairObjective,
    declare_token_types,
    pair_columns,
    pair_metrics,
)
from ssltrain.spec import Spec

# *ForPreTraining classes with an MLM head and a binary sentence-pair head: model type ->
# (MLM head module, pair head module) by attribute path, for the sparse MLM head.
PRETRAINING_HEADS = {
    "bert": ("cls.predictions", "cls.seq_relationship"),
    "ernie": ("cls.predictions", "cls.seq_relationship"),
    "megatron-bert": ("cls.predictions", "cls.seq_relationship"),
    "mobilebert": ("cls.predictions", "cls.seq_relationship"),
    "albert": ("predictions", "sop_classifier"),
}


def _module(model, path: str):
    for name in path.split("."):
        model = getattr(model, name, None)
        if model is None:
            return None
    return model


@dataclass
class MaskedPairCollator(MLMCollator):
    """Sentence pairs -> padded tensors + BERT masking ("labels": original ids at masked positions).
    packed=True: masked as padded rows (the same draws), then packed (objectives/packing.py)."""

    packed: bool = False

    def __call__(self, columns: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = pair_columns(columns)
        # Padding is never a prediction target.
        batch["input_ids"], batch["labels"] = self.mask(batch["input_ids"], generator,
                                                        never=batch["attention_mask"] == 0)
        if not self.packed:
            return batch
        lengths = batch["attention_mask"].sum(1).tolist()
        rows = {k: batch[k].numpy() for k in ("input_ids", "token_type_ids", "labels")}
        capacity = np.asarray(columns["input_ids"]).shape[1]  # the stored seq_len, not the batch's longest
        return {**pack(rows, lengths, fill={"labels": IGNORE_INDEX}, capacity=capacity),
                "next_sentence_label": batch["next_sentence_label"]}


class MaskedLMWithNSP(SentencePairObjective):
    reports_perplexity = False  # "loss" is MLM + NSP; mlm_loss is reported on its own
    summary = "BERT pretraining: masked language modelling + next sentence prediction (or SOP) on sentence pairs"
    name = "mlm_nsp"
    PARAMS = {
        **MASKING_PARAMS,
        "sparse_head": Spec(bool),
        **PAIR_PARAMS,
    }

    @classmethod
    def pair_model_types(cls) -> tuple[str, ...]:
        return tuple(sorted(PRETRAINING_HEADS))

    @classmethod
    def check_params(cls, objective_cfg) -> None:
        super().check_params(objective_cfg)
        total = objective_cfg.replace_with_mask + objective_cfg.replace_with_random
        if total > 1.0 + 1e-9:
            raise ConfigError(
                f"objective.replace_with_mask + objective.replace_with_random = {total:g} exceeds 1"
            )

    def __init__(self, *, model_cfg, tokenizer, hardware, mask_prob: float = 0.15, replace_with_mask: float = 0.8,
                 replace_with_random: float = 0.1, sparse_head: bool = True, pair_task: str = "nsp",
                 short_seq_prob: float = 0.1, dupe_factor: int = 5, packed: bool = True):
        super().__init__()
        from transformers import AutoModelForPreTraining

        self.collator = MaskedPairCollator.from_tokenizer(
            tokenizer, "mlm_nsp", mask_prob=mask_prob, replace_with_mask=replace_with_mask,
            replace_with_random=replace_with_random)
        self.model = build_backbone(model_cfg, tokenizer, AutoModelForPreTraining, hardware.attn_implementation)
        declare_token_types(tokenizer)
        self.vocab_size = len(tokenizer)
        self.pair_task = pair_task
        heads = PRETRAINING_HEADS.get(self.model.config.model_type, ())
        self.heads = tuple(_module(self.model, path) for path in heads)
        # The vocabulary projection at masked positions only: same loss, ~mask_prob of the compute.
        self.sparse_head = sparse_head and len(self.heads) == 2 and all(h is not None for h in self.heads)
        # Packed rows run the heads apart from the model, as the sparse head does.
        self.collator.packed = packed and self.sparse_head and can_pack(self.model.config)

    def build_collator(self) -> MaskedPairCollator:
        return self.collator

    def export_model(self):
        return self.model

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        labels = batch["labels"]  # (B, L), IGNORE_INDEX where not masked; packed: (R, W)
        inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}  # (B, L) each
        if "segments" in batch:  # packed rows: masked positions and each pair's first token
            base = self.model.base_model
            hidden = encode_packed(base, batch)  # (R, W, H)
            selected = labels != IGNORE_INDEX
            mlm_logits = self.heads[0](hidden[selected])  # (N, V)
            labels = labels[selected]
            pair_logits = self.heads[1](pooled_first_tokens(base, hidden, batch["starts"]))  # (B, 2)
        elif self.sparse_head:
            out = self.model.base_model(**inputs)
            selected = labels != IGNORE_INDEX  # (B, L)
            mlm_logits = self.heads[0](out.last_hidden_state[selected])  # (N, V): masked positions only
            labels = labels[selected]  # (N,)
            pair_logits = self.heads[1](out.pooler_output)  # (B, 2)
        else:
            out = self.model(**inputs)
            mlm_logits = out.prediction_logits  # (B, L, V)
            pair_logits = out.sop_logits if hasattr(out, "sop_logits") else out.seq_relationship_logits
        mlm_sum, n_masked, n_correct = token_cross_entropy(mlm_logits, labels, self.vocab_size)
        pair_sum, n_pairs, metrics = pair_metrics(pair_logits, batch["next_sentence_label"], self.pair_task)
        loss = mlm_sum / n_masked.clamp(min=1) + pair_sum / n_pairs.clamp(min=1)
        metrics.update({
            "loss": (loss.detach() * n_pairs, n_pairs),
            "mlm_loss": (mlm_sum.detach(), n_masked),
            "masked_acc": (n_correct, n_masked),
        })
        return ObjectiveOutput(loss=loss, metrics=metrics, num_tokens=batch["attention_mask"].sum())
