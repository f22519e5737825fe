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

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ssltrain.errors import ConfigError
from ssltrain.models import build_backbone
from ssltrain.objectives.base import Objective, ObjectiveOutput, compatible_models
from ssltrain.objectives.functional import token_cross_entropy
from ssltrain.objectives.packing import can_pack, encode_packed, pack, pooled_first_tokens
from ssltrain.spec import POSITIVE, PROBABILITY, Spec

PAIR_PARAMS = {
    "pair_task": Spec(choices=("nsp", "sop")),
    "short_seq_prob": PROBABILITY,
    "dupe_factor": POSITIVE,
    "packed": Spec(bool),
}


def pair_columns(columns: dict, packed: bool = False) -> dict[str, torch.Tensor]:
    """Stored pairs (padded to seq_len) -> tensors cut to the batch's longest pair, with an
    attention mask. input_ids/token_type_ids/attention_mask (B, L) long; next_sentence_label (B,).
    packed=True: pairs share rows instead (objectives/packing.py): (R, W) tensors plus position_ids,
    segments and starts."""
    lengths = torch.as_tensor(np.asarray(columns["length"]), dtype=torch.long)  # (B,)
    labels = torch.as_tensor(np.asarray(columns["pair_label"]), dtype=torch.long)
    if packed:
        stored = {k: np.asarray(columns[k]) for k in ("input_ids", "token_type_ids")}
        return {**pack(stored, lengths.tolist()), "next_sentence_label": labels}
    width = int(lengths.max())
    input_ids = torch.as_tensor(np.asarray(columns["input_ids"])[:, :width], dtype=torch.long)
    token_type_ids = torch.as_tensor(np.asarray(columns["token_type_ids"])[:, :width], dtype=torch.long)
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
            "next_sentence_label": labels}


@dataclass
class PairCollator:
    """Sentence pairs -> padded (or packed) tensors. Deterministic: the pairs were drawn when they were built."""

    packed: bool = False

    def __call__(self, columns: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return pair_columns(columns, self.packed)


class SentencePairObjective(Objective):
    """What NSP and MLM+NSP share: the pair examples, the model-type and tokenizer checks."""

    attention = "bidirectional"
    #: objective name in messages (the conf/objective/<name>.yaml stem).
    name: ClassVar[str] = ""

    @classmethod
    def pair_model_types(cls) -> tuple[str, ...]:
        """transformers model types whose model class for this objective has a sentence-pair head."""
        raise NotImplementedError

    @classmethod
    def check_compatible(cls, cfg) -> None:
        super().check_compatible(cfg)
        types = cls.pair_model_types()
        if cfg.model.model_type not in types:
            fits = [m for m in compatible_models(cls.attention) if _model_type(m) in types]
            raise ConfigError(
                f"objective={cls.name} needs a model with a sentence-pair head (model types: "
                f"{', '.join(types)}) but model={cfg.model.name} is {cfg.model.model_type}; "
                f"pick one of: {', '.join(fits)}"
            )
        check_trained_tokenizer_has_cls_sep(cfg, cls.name)

    @classmethod
    def build_examples(cls, corpus, tokenizer, cfg, corpus_key: str):
        from ssltrain.data.sentences import build_pair_examples

        obj = cfg.objective
        return build_pair_examples(
            corpus, tokenizer, seq_len=cfg.trainer.seq_len, pair_task=obj.get("pair_task", "nsp"),
            short_seq_prob=obj.get("short_seq_prob", 0.1), dupe_factor=obj.get("dupe_factor", 5), seed=cfg.seed,
            cache_dir=cfg.cache_dir, corpus_key=corpus_key, num_proc=cfg.data.get("num_proc"), objective=cls.name,
        )


def check_trained_tokenizer_has_cls_sep(cfg, objective: str) -> None:
    """A tokenizer trained for the run must be WordPiece: the BPE one has no [CLS]/[SEP]. (A given
    tokenizer.path is checked once loaded.) Configs without a tokenizer section (ssltrain-list
    asks with model + data only) pass."""
    tokenizer = cfg.get("tokenizer")
    if tokenizer is None or tokenizer.get("path") or cfg.model.get("pretrained"):
        return
    if tokenizer.get("type") not in (None, "wordpiece"):
        raise ConfigError(f"objective={objective} needs [CLS]/[SEP] tokens, which tokenizer.type="
                          f"{tokenizer.type} lacks; use tokenizer.type=wordpiece")


def _model_type(model_name: str) -> str | None:
    from omegaconf import OmegaConf

    from ssltrain.paths import config_dir

    return OmegaConf.load(config_dir() / "model" / f"{model_name}.yaml").get("model_type")


PAIR_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]


def declare_token_types(tokenizer) -> None:
    """Make the run's tokenizer return token_type_ids (saved with the export), so that
    tokenizer(a, b) feeds an exported pair model the segment ids it was trained with."""
    if tokenizer is not None and "token_type_ids" not in tokenizer.model_input_names:
        tokenizer.model_input_names = list(PAIR_INPUT_NAMES)
        tokenizer.init_kwargs["model_input_names"] = list(PAIR_INPUT_NAMES)


def pair_metrics(logits: torch.Tensor, labels: torch.Tensor, pair_task: str):
    """logits (B, 2), labels (B,) -> (loss_sum, n, {f"{pair_task}_loss", f"{pair_task}_acc"})."""
    loss_sum, n, correct = token_cross_entropy(logits, labels)
    return loss_sum, n, {f"{pair_task}_loss": (loss_sum.detach(), n), f"{pair_task}_acc": (correct, n)}


class NextSentencePrediction(SentencePairObjective):
    summary = "next sentence prediction (BERT) / sentence order prediction (ALBERT): is B the next segment of A?"
    name = "nsp"
    PARAMS = dict(PAIR_PARAMS)

    @classmethod
    def pair_model_types(cls) -> tuple[str, ...]:
        from transformers.models.auto.modeling_auto import MODEL_FOR_NEXT_SENTENCE_PREDICTION_MAPPING_NAMES

        return tuple(sorted(MODEL_FOR_NEXT_SENTENCE_PREDICTION_MAPPING_NAMES))

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
