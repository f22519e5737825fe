"""Unsupervised SimCSE (Gao et al. 2021, arXiv:2104.08821): contrastive learning of sentence
embeddings with dropout as the only augmentation; the text variant of the contrastive objective.

Each sentence goes through the encoder twice in one forward pass (the batch is duplicated), so
two independent dropout masks give two views z1, z2. InfoNCE (contrastive.info_nce, one-
directional as in the paper) with temperature 0.05 pulls z1[i] to z2[i] and pushes it from
every other sentence's z2 in the batch, and from those of all other processes when training
data-parallel (gathered with gradients). Sentences are the corpus's segments (data/sentences.py),
deduplicated within a split, cut to trainer.seq_len.

pooler: cls_mlp (the paper's unsupervised setting: [CLS] through an MLP during training; for a
BERT encoder that MLP is its own pooler, dense + tanh, so it is exported with the encoder), cls
([CLS] state) or mean (mean over real tokens). The export is the encoder (AutoModel); the paper
embeds sentences at test time with the [CLS] state before the MLP (last_hidden_state[:, 0]).

Held-out metrics are the training loss itself on validation sentences, with dropout switched on
and drawn from a seed the collator takes from the batch's generator, so successive evaluations
see the same views and are comparable (without dropout both views coincide and the task is
trivial); plus top-1 retrieval accuracy of the positive and alignment/uniformity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ssltrain.config import POSITIVE, Spec
from ssltrain.models import build_backbone
from ssltrain.objectives.base import Objective, ObjectiveOutput
from ssltrain.objectives.contrastive import alignment_uniformity, gather_with_grad, info_nce
from ssltrain.objectives.nsp import check_trained_tokenizer_has_cls_sep

POOLERS = ("cls_mlp", "cls", "mean")


@dataclass
class SentenceCollator:
    """Stored sentences (padded to seq_len) -> input_ids/attention_mask (B, L) cut to the batch's
    longest, and dropout_seed: the seed of the dropout masks when evaluating."""

    def __call__(self, columns: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        lengths = torch.as_tensor(np.asarray(columns["length"]), dtype=torch.long)  # (B,)
        width = int(lengths.max())
        input_ids = torch.as_tensor(np.asarray(columns["input_ids"])[:, :width], dtype=torch.long)
        attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        dropout_seed = torch.randint(0, 2**62, (), generator=generator)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "dropout_seed": dropout_seed}


class SimCSE(Objective):
    attention = "bidirectional"
    metrics_per_example = False  # InfoNCE over the batch: a smaller last batch has fewer negatives
    summary = "SimCSE: contrastive sentence embeddings, two dropout views per sentence, in-batch InfoNCE"
    PARAMS = {
        "temperature": Spec(float, low=0.0, high=10.0, low_open=True),
        "pooler": Spec(choices=POOLERS),
        "min_tokens": POSITIVE,
    }

    @classmethod
    def check_compatible(cls, cfg) -> None:
        super().check_compatible(cfg)
        check_trained_tokenizer_has_cls_sep(cfg, "simcse")

    @classmethod
    def build_examples(cls, corpus, tokenizer, cfg, corpus_key: str):
        from ssltrain.data.sentences import build_sentence_examples

        return build_sentence_examples(
            corpus, tokenizer, seq_len=cfg.trainer.seq_len, min_tokens=cfg.objective.get("min_tokens", 5),
            seed=cfg.seed, cache_dir=cfg.cache_dir, corpus_key=corpus_key, num_proc=cfg.data.get("num_proc"),
        )

    def __init__(self, *, model_cfg, tokenizer, hardware, temperature: float = 0.05, pooler: str = "cls_mlp",
                 min_tokens: int = 5):
        super().__init__()
        from transformers import AutoModel

        self.encoder = build_backbone(model_cfg, tokenizer, AutoModel, hardware.attn_implementation)
        self.temperature = temperature
        self.pooler = pooler
        own_pooler = getattr(self.encoder, "pooler", None)
        self.use_own_pooler = pooler == "cls_mlp" and own_pooler is not None
        self.mlp = None
        if pooler == "cls_mlp" and own_pooler is None:  # encoders without a pooler: the paper's MLP, not exported
            hidden = self.encoder.config.hidden_size
            self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.Tanh())
        elif own_pooler is not None and not self.use_own_pooler:
            # Kept so the export reloads without missing weights, frozen so no replica waits for its gradient.
            own_pooler.requires_grad_(False)

    def build_collator(self) -> SentenceCollator:
        return SentenceCollator()

    def export_model(self):
        return self.encoder

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, H): the representation the loss is computed on."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        if self.use_own_pooler:
            return out.pooler_output
        hidden = out.last_hidden_state  # (B, L, H)
        if self.pooler == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        cls_state = hidden[:, 0]
        return self.mlp(cls_state) if self.mlp is not None else cls_state

    def _embed_with_seeded_dropout(self, input_ids, attention_mask, seed: int) -> torch.Tensor:
        """Evaluation: dropout on, from `seed`, without touching the training RNG streams."""
        cuda = input_ids.device.type == "cuda"
        with torch.random.fork_rng(devices=[input_ids.device] if cuda else []):
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)
            self.encoder.train()
            try:
                return self.embed(input_ids, attention_mask)
            finally:
                self.encoder.eval()

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # (B, L) each
        n = input_ids.shape[0]
        both_ids, both_mask = torch.cat([input_ids, input_ids]), torch.cat([attention_mask, attention_mask])
        if self.training:
            z = self.embed(both_ids, both_mask)  # (2B, H): two dropout masks per sentence
        else:
            z = self._embed_with_seeded_dropout(both_ids, both_mask, int(batch["dropout_seed"]))
        z1, z2 = z[:n], z[n:]
        candidates, offset = gather_with_grad(z2)  # (world * B, H)
        loss_sum, count, n_correct = info_nce(z1, candidates, self.temperature, offset)
        alignment, uniformity = alignment_uniformity(z1.detach(), z2.detach())
        return ObjectiveOutput(
            loss=loss_sum / count,
            metrics={"loss": (loss_sum.detach(), count), "contrastive_acc": (n_correct, count),
                     "alignment": (alignment * count, count), "uniformity": (uniformity * count, count)},
            num_tokens=both_mask.sum(),
        )
