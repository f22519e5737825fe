"""Next sentence prediction (BERT; Devlin et al. 2019, arXiv:1810.04805) and sentence order
prediction (ALBERT; Lan et al. 2019, arXiv:1909.11942).

Examples are "[CLS] A [SEP] B [SEP]" pairs with token_type_ids 0 for [CLS] A [SEP] and 1 for
B [SEP], built once per corpus and cached (ssltrain/data/sentences.py, as BERT's
create_pretraining_data.py built them statically): half with B the true next segment of A's
document, half with B a random segment of another document (pair_task=nsp) or with the two
consecutive segments swapped (pair_task=sop). A binary head on the pooled [CLS] state
predicts which; the loss is cross-entropy over pairs. objective=mlm_nsp (mlm_nsp.py) adds MLM.
With packed=true (default) short pairs share rows under a block-diagonal mask (objectives/packing.py):
the same losses as padded rows, fewer positions.
"""

from __future__ import annotations

import torch

from ssltrain.models import auto_model_types, build_backbone
from ssltrain.objectives.base import ObjectiveOutput
from ssltrain.objectives.packing import can_pack, encode_packed, pooled_first_tokens
from ssltrain.objectives.text import PAIR_PARAMS, PairCollator, SentencePairObjective, declare_token_types, pair_metrics


class NextSentencePrediction(SentencePairObjective):
    summary = "next sentence prediction (BERT) / sentence order prediction (ALBERT): is B the next segment of A?"
    name = "nsp"
    PARAMS = dict(PAIR_PARAMS)

    @classmethod
    def pair_model_types(cls) -> tuple[str, ...]:
        return tuple(sorted(auto_model_types("next-sentence-prediction")))

    def __init__(self, *, model_cfg, tokenizer, hardware, pair_task: str = "nsp", short_seq_prob: float = 0.1,
                 dupe_factor: int = 5, packed: bool = True):
        super().__init__()
        from transformers import AutoModelForNextSentencePrediction

        self.model = build_backbone(model_cfg, tokenizer, AutoModelForNextSentencePrediction,
                                    hardware.attn_implementation)
        declare_token_types(tokenizer)
        self.pair_task = pair_task
        # Packed rows need the pair head apart from the model (BERT: cls, on the pooled first token).
        self.pair_head = getattr(self.model, "cls", None)
        self.packed = packed and self.pair_head is not None and can_pack(self.model.config)

    def build_collator(self) -> PairCollator:
        return PairCollator(packed=self.packed)

    def export_model(self):
        return self.model

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        if "segments" in batch:  # packed rows (R, W)
            encoder = self.model.base_model
            logits = self.pair_head(pooled_first_tokens(encoder, encode_packed(encoder, batch), batch["starts"]))
        else:
            logits = self.model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                                attention_mask=batch["attention_mask"]).logits  # (B, 2)
        loss_sum, n, metrics = pair_metrics(logits, batch["next_sentence_label"], self.pair_task)
        return ObjectiveOutput(
            loss=loss_sum / n.clamp(min=1),
            metrics={"loss": (loss_sum.detach(), n), f"{self.pair_task}_acc": metrics[f"{self.pair_task}_acc"]},
            num_tokens=batch["attention_mask"].sum(),
        )
