"""What the text objectives share: BERT's token masking (mlm, mlm_nsp, electra), the masked-LM head
modules per model type (so that a head runs on the masked positions only), and the sentence-pair
examples, collator and checks (nsp, mlm_nsp, simcse). Objectives import these from here, never from
one another, as the image objectives do from objectives/image.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ssltrain.data.sentences import build_pair_examples
from ssltrain.errors import ConfigError
from ssltrain.objectives.base import Objective, compatible_models
from ssltrain.objectives.functional import mask_tokens, masked_positions, token_cross_entropy
from ssltrain.objectives.packing import pack
from ssltrain.paths import shipped_options
from ssltrain.spec import POSITIVE, PROBABILITY, Spec

# ---------------------------------------------------------------- masking

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


# Modules that map encoder hidden states to vocabulary logits, in order, per model type. With
# them an MLM head can run on the masked positions only (~15% of tokens); other types run dense.
MASKED_LM_HEADS = {
    "bert": ("cls",),
    "roberta": ("lm_head",),
    "xlm-roberta": ("lm_head",),
    "albert": ("predictions",),
    "deberta-v2": ("cls",),
    "electra": ("generator_predictions", "generator_lm_head"),
}


def masked_lm_head(model) -> list | None:
    """The head modules of a *ForMaskedLM model (hidden (N, H) -> logits (N, V)), or None if unknown."""
    names = MASKED_LM_HEADS.get(getattr(model.config, "model_type", None))
    if names is None or not all(hasattr(model, n) for n in names):
        return None
    return [getattr(model, n) for n in names]


# ---------------------------------------------------------------- sentence pairs

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
    def build_examples(cls, corpus, tokenizer, cfg, corpus_key: str, world_size: int = 1):
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
    return shipped_options("model")[model_name].get("model_type")


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
