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

Sentences vary in length (padded to the batch's longest, most positions of a row are padding):
packed=true (default) puts several sentences in a row with a block-diagonal attention mask and
positions restarting at 0, so each sentence is encoded exactly as alone, with little padding left
(docs/benchmarks.md measures the padding and the step time). Dropout masks fall on other
positions, so curves agree in distribution, not draw for draw.

Held-out metrics are the training loss itself on validation sentences, with dropout switched on
and drawn from a seed the collator takes from the batch's generator, so successive evaluations
see the same views and are comparable (without dropout both views coincide and the task is
trivial); plus top-1 retrieval accuracy of the positive and alignment/uniformity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ssltrain.data.sentences import build_sentence_examples
from ssltrain.models import build_backbone
from ssltrain.objectives.base import Objective, ObjectiveOutput
from ssltrain.objectives.contrastive import alignment_uniformity, gather_with_grad, info_nce
from ssltrain.objectives.packing import can_pack, encode_packed, pack, pooled_first_tokens
from ssltrain.objectives.text import check_trained_tokenizer_has_cls_sep
from ssltrain.spec import POSITIVE, Spec

POOLERS = ("cls_mlp", "cls", "mean")


@dataclass
class SentenceCollator:
    """Stored sentences (padded to seq_len) -> input_ids/attention_mask (B, L) cut to the batch's
    longest, and dropout_seed: the seed of the dropout masks when evaluating.

    packed=True: no FLOPs on padding. Sentences share rows of up to seq_len tokens (first-fit
    decreasing), giving input_ids/attention_mask/position_ids/segments (R, W) with R rows filled to
    at most W tokens, positions restarting at 0 in each sentence, segments = the sentence's index in
    the batch (-1 on padding), and starts (B,): each sentence's first token in the flattened (R * W)
    layout, in batch order (objectives/packing.py). The encoder sees a block-diagonal mask, so each
    sentence attends to itself only: the same computation as padded rows, without the padding."""

    packed: bool = False

    def __call__(self, columns: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        lengths = torch.as_tensor(np.asarray(columns["length"]), dtype=torch.long)  # (B,)
        dropout_seed = torch.randint(0, 2**62, (), generator=generator)
        stored = np.asarray(columns["input_ids"])
        if self.packed:
            return {**pack({"input_ids": stored}, lengths.tolist()), "dropout_seed": dropout_seed}
        width = int(lengths.max())
        input_ids = torch.as_tensor(stored[:, :width], dtype=torch.long)
        attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return {"input_ids": input_ids, "attention_mask": attention_mask, "dropout_seed": dropout_seed}


class SimCSE(Objective):
    attention = "bidirectional"
    metrics_per_example = False  # InfoNCE over the batch: a smaller last batch has fewer negatives
    summary = "SimCSE: contrastive sentence embeddings, two dropout views per sentence, in-batch InfoNCE"
    PARAMS = {
        "temperature": Spec(float, low=0.0, high=10.0, low_open=True),
        "pooler": Spec(choices=POOLERS),
        "min_tokens": POSITIVE,
        "packed": Spec(bool),
    }

    @classmethod
    def check_compatible(cls, cfg) -> None:
        super().check_compatible(cfg)
        check_trained_tokenizer_has_cls_sep(cfg, "simcse")

    @classmethod
    def build_examples(cls, corpus, tokenizer, cfg, corpus_key: str, world_size: int = 1):
        return build_sentence_examples(
            corpus, tokenizer, seq_len=cfg.trainer.seq_len, min_tokens=cfg.objective.get("min_tokens", 5),
            seed=cfg.seed, cache_dir=cfg.cache_dir, corpus_key=corpus_key, num_proc=cfg.data.get("num_proc"),
        )

    def __init__(self, *, model_cfg, tokenizer, hardware, temperature: float = 0.05, pooler: str = "cls_mlp",
                 min_tokens: int = 5, packed: bool = True):
        super().__init__()
        from transformers import AutoModel

        self.encoder = build_backbone(model_cfg, tokenizer, AutoModel, hardware.attn_implementation)
        self.temperature = temperature
        self.pooler = pooler
        self.packed = packed and can_pack(self.encoder.config)  # else padded rows
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
        return SentenceCollator(packed=self.packed)

    def export_model(self):
        return self.encoder

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
              segments: torch.Tensor | None = None, starts: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) -> (B, H): the representation the loss is computed on. Packed rows (segments and
        starts given, see SentenceCollator): (R, W) -> (N, H) for the N sentences of `starts`."""
        if segments is None:
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
            if self.use_own_pooler:
                return out.pooler_output
            hidden = out.last_hidden_state  # (B, L, H)
            if self.pooler == "mean":
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            cls_state = hidden[:, 0]
        else:
            hidden = encode_packed(self.encoder, {"input_ids": input_ids, "position_ids": position_ids,
                                                  "segments": segments})  # (R, W, H)
            flat = hidden.reshape(-1, hidden.shape[-1])  # (R * W, H)
            if self.pooler == "mean":
                tokens = segments.reshape(-1) >= 0
                owner = segments.reshape(-1)[tokens]
                sums = flat.new_zeros(len(starts), flat.shape[-1]).index_add_(0, owner, flat[tokens])
                counts = torch.bincount(owner, minlength=len(starts)).clamp(min=1)
                return sums / counts.unsqueeze(-1).to(sums.dtype)
            if self.use_own_pooler:
                return pooled_first_tokens(self.encoder, hidden, starts)
            cls_state = flat[starts]  # (N, H)
        return self.mlp(cls_state) if self.mlp is not None else cls_state

    def _embed_with_seeded_dropout(self, views: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
        """Evaluation: dropout on, from `seed`, without touching the training RNG streams."""
        device = views["input_ids"].device
        cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if cuda else []):
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)
            self.encoder.train()
            try:
                return self.embed(**views)
            finally:
                self.encoder.eval()

    @staticmethod
    def two_views(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch twice over (one forward pass, two dropout masks): embed's inputs for 2B sentences,
        the second copy's after the first."""
        views = {k: torch.cat([batch[k], batch[k]]) for k in ("input_ids", "attention_mask")}
        if "segments" in batch:
            segments, starts = batch["segments"], batch["starts"]
            n = len(starts)
            views["position_ids"] = torch.cat([batch["position_ids"]] * 2)
            views["segments"] = torch.cat([segments, torch.where(segments >= 0, segments + n, segments)])
            views["starts"] = torch.cat([starts, starts + segments.numel()])
        return views

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        n = len(batch["starts"]) if "starts" in batch else batch["input_ids"].shape[0]  # sentences
        views = self.two_views(batch)
        if self.training:
            z = self.embed(**views)  # (2B, H): two dropout masks per sentence
        else:
            z = self._embed_with_seeded_dropout(views, int(batch["dropout_seed"]))
        z1, z2 = z[:n], z[n:]
        candidates, offset = gather_with_grad(z2)  # (world * B, H)
        loss_sum, count, n_correct = info_nce(z1, candidates, self.temperature, offset)
        alignment, uniformity = alignment_uniformity(z1.detach(), z2.detach())
        return ObjectiveOutput(
            loss=loss_sum / count,
            metrics={"loss": (loss_sum.detach(), count), "contrastive_acc": (n_correct, count),
                     "alignment": (alignment * count, count), "uniformity": (uniformity * count, count)},
            num_tokens=views["attention_mask"].sum(),
        )
