"""T5 span corruption (Raffel et al. 2020, arXiv:1910.10683, Sec. 3.1.4 and 3.3.4).

Of each block, noise_density of the tokens (0.15) fall in random spans of mean length
mean_noise_span_length (3). The encoder input is the block with each noise span replaced by one
sentinel token (<extra_id_0>, <extra_id_1>, ... in order) plus end-of-sequence; the decoder target
is each sentinel followed by the span it replaced, plus end-of-sequence. Cross-entropy on the
targets (an encoder-decoder model, T5Config), so held-out perplexity is over target tokens.

Every block holds the same number of tokens, noise tokens and spans, so inputs and targets have
fixed lengths: blocks are cut to the raw length whose corrupted input fits trainer.seq_len.
The sentinels are added to the run's tokenizer (and so to the exported one) before the model is
built, and the vocabulary the model gets counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ssltrain.data.blocks import build_blocks
from ssltrain.errors import ConfigError
from ssltrain.models import build_backbone
from ssltrain.objectives.base import Objective, ObjectiveOutput
from ssltrain.objectives.functional import token_cross_entropy
from ssltrain.spec import Spec

# ---------------------------------------------------------------- pure functions


def span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) in a `length`-token block: at least one of each, at least one
    kept token, and at least one kept token between spans (each span needs its own sentinel slot)."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_noise_span_length), 1)
    if num_spans > length - num_noise:
        raise ConfigError(
            f"a {length}-token block cannot hold {num_spans} noise spans between {length - num_noise} kept tokens; "
            f"lower objective.noise_density or raise objective.mean_noise_span_length"
        )
    return num_noise, num_spans


def corrupted_lengths(tokens_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(input length, target length) of a corrupted `tokens_length`-token block, each with its
    end-of-sequence: kept tokens + one sentinel per span + eos; noise tokens + one sentinel per span + eos."""
    num_noise, num_spans = span_counts(tokens_length, noise_density, mean_noise_span_length)
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def compute_lengths(inputs_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int, int]:
    """(raw block length, input length, target length) for the longest raw block whose corrupted
    input has at most `inputs_length` tokens (cf. T5's / HF run_t5_mlm_flax's length arithmetic)."""
    tokens_length = inputs_length
    while corrupted_lengths(tokens_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        tokens_length += 1
    while corrupted_lengths(tokens_length, noise_density, mean_noise_span_length)[0] > inputs_length:
        tokens_length -= 1  # not reached for densities <= 0.5; kept so the contract holds for any input
    return (tokens_length, *corrupted_lengths(tokens_length, noise_density, mean_noise_span_length))


def random_segmentation(batch: int, num_items: int, num_segments: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, num_segments) long: num_items split into num_segments positive parts, each row a
    uniformly random composition (the num_segments - 1 cuts are a uniform subset of the gaps)."""
    if num_segments == 1:
        return torch.full((batch, 1), num_items, dtype=torch.long)
    keys = torch.rand(batch, num_items - 1, generator=generator)  # one key per gap between items
    cuts = keys.argsort(dim=1)[:, :num_segments - 1]  # (batch, S-1): a random subset of the gaps
    is_cut = torch.zeros(batch, num_items - 1, dtype=torch.bool).scatter_(1, cuts, True)
    segment = torch.cat([torch.zeros(batch, 1, dtype=torch.long), is_cut.long().cumsum(1)], dim=1)  # (batch, n)
    return torch.zeros(batch, num_segments, dtype=torch.long).scatter_add_(1, segment, torch.ones_like(segment))


def random_spans_noise_mask(batch: int, length: int, noise_density: float, mean_noise_span_length: float,
                            generator: torch.Generator) -> torch.Tensor:
    """(batch, length) bool, True at noise tokens: span_counts(...) noise tokens in that many
    spans of random lengths, with random kept runs between them (T5's random_spans_noise_mask).

    T5 lays runs out as kept, noise, ..., kept, noise, so the last token is always noise and
    short blocks are corrupted mostly at the end. Here each row is then rotated so that a uniformly
    chosen kept token comes first (cf. seqio's random_roll): noise is spread evenly over the block,
    and since the cut falls in a kept run, no span is split and the span count stays fixed.
    """
    num_noise, num_spans = span_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = random_segmentation(batch, num_noise, num_spans, generator)  # (batch, S)
    kept_lengths = random_segmentation(batch, length - num_noise, num_spans, generator)  # (batch, S)
    run_lengths = torch.stack([kept_lengths, noise_lengths], dim=2).reshape(batch, 2 * num_spans)
    run_ends = run_lengths.cumsum(dim=1)[:, :-1]  # (batch, 2S-1): where runs 1..2S-1 start
    starts = torch.zeros(batch, length, dtype=torch.long).scatter_(1, run_ends, 1)
    noise = starts.cumsum(dim=1) % 2 == 1  # (batch, length): odd runs are noise
    keys = torch.rand(batch, length, generator=generator).masked_fill(noise, -1.0)
    first = keys.argmax(dim=1, keepdim=True)  # (batch, 1): a uniformly random kept position
    return noise.gather(1, (torch.arange(length) + first) % length)


def _select_interleaved(first: torch.Tensor, keep_first: torch.Tensor, second: torch.Tensor,
                        keep_second: torch.Tensor) -> torch.Tensor:
    """Per position t, first[t] (if kept) then second[t] (if kept), row by row; every row must
    keep the same number. All (B, T) -> (B, kept)."""
    values = torch.stack([first, second], dim=2).reshape(first.shape[0], -1)  # (B, 2T)
    keep = torch.stack([keep_first, keep_second], dim=2).reshape(first.shape[0], -1)  # (B, 2T)
    kept = keep.sum(dim=1)
    if not bool((kept == kept[0]).all()):
        raise ValueError(f"rows keep different numbers of tokens: {kept.tolist()}")
    return values[keep].reshape(first.shape[0], -1)


def sentinel_corrupt(input_ids: torch.Tensor, noise_mask: torch.Tensor, sentinel_ids: torch.Tensor,
                     eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 inputs and targets from blocks and their noise masks.

    input_ids: (B, L) long; noise_mask: (B, L) bool with the same count of noise tokens and spans
    per row; sentinel_ids: (S,) long, sentinel_ids[k] marks the k-th span of a row (S >= spans).
    Returns inputs (B, kept + spans + 1): kept tokens with each span replaced by its sentinel, then
    eos; targets (B, noise + spans + 1): each span's sentinel followed by its tokens, then eos.
    """
    previous = F.pad(noise_mask[:, :-1], (1, 0), value=False)
    span_starts = noise_mask & ~previous  # (B, L)
    span_index = span_starts.long().cumsum(dim=1) - 1  # (B, L): which span a noise token belongs to
    if int(span_index.max()) >= len(sentinel_ids):
        raise ValueError(f"{int(span_index.max()) + 1} noise spans but only {len(sentinel_ids)} sentinel tokens")
    sentinels = sentinel_ids.to(input_ids.device)[span_index.clamp(min=0)]  # (B, L)
    inputs = _select_interleaved(sentinels, span_starts, input_ids, ~noise_mask)
    targets = _select_interleaved(sentinels, span_starts, input_ids, noise_mask)
    eos = torch.full((input_ids.shape[0], 1), eos_id, dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([inputs, eos], dim=1), torch.cat([targets, eos], dim=1)


def shift_right(labels: torch.Tensor, start_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: (B, T) labels -> (B, T) = [start, labels[:, :-1]]."""
    return F.pad(labels[:, :-1], (1, 0), value=start_id)


def sentinel_tokens(n: int) -> list[str]:
    """T5's sentinel names: <extra_id_0> marks the first span of a sequence, and so on."""
    return [f"<extra_id_{i}>" for i in range(n)]


def add_sentinels(tokenizer, n: int) -> list[int]:
    """Add the n sentinels to the tokenizer as special tokens (those it lacks); their ids, in order."""
    tokens = sentinel_tokens(n)
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        # Positional: the keep-the-existing-extras flag is named differently in transformers 4 and 5.
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, False)
    return tokenizer.convert_tokens_to_ids(tokens)


# ---------------------------------------------------------------- objective


@dataclass
class SpanCorruptionCollator:
    """Raw blocks (B, tokens_length) -> {"input_ids", "decoder_input_ids", "labels"}. Picklable."""

    noise_density: float
    mean_noise_span_length: float
    sentinel_ids: tuple[int, ...]
    eos_id: int
    decoder_start_id: int

    def __call__(self, columns: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(np.asarray(columns["input_ids"]), dtype=torch.long)  # (B, tokens_length)
        noise = random_spans_noise_mask(ids.shape[0], ids.shape[1], self.noise_density, self.mean_noise_span_length,
                                        generator)
        inputs, targets = sentinel_corrupt(ids, noise, torch.tensor(self.sentinel_ids, dtype=torch.long), self.eos_id)
        return {"input_ids": inputs, "decoder_input_ids": shift_right(targets, self.decoder_start_id),
                "labels": targets}


class SpanCorruption(Objective):
    attention = "encoder-decoder"
    reports_perplexity = True
    summary = "span corruption (T5): an encoder-decoder restores 15% of tokens dropped in spans behind sentinels"
    PARAMS = {
        "noise_density": Spec(float, low=0.0, high=0.5, low_open=True),
        "mean_noise_span_length": Spec(float, low=1.0),
        "num_sentinels": Spec(int, low=1),
    }

    @classmethod
    def check_compatible(cls, cfg) -> None:
        super().check_compatible(cfg)
        if cfg.get("trainer") is None or cfg.get("objective") is None:
            return  # listings check model + data alone
        cls.check_params(cfg.objective)
        obj = cfg.objective
        _, num_spans = span_counts(cls.block_length(cfg), obj.noise_density, obj.mean_noise_span_length)
        if num_spans > obj.num_sentinels:
            raise ConfigError(
                f"trainer.seq_len={cfg.trainer.seq_len} gives {num_spans} noise spans per sequence but "
                f"objective.num_sentinels={obj.num_sentinels}; raise it to >= {num_spans}"
            )

    @staticmethod
    def block_length(cfg) -> int:
        """Raw tokens per example: the most whose corrupted input fits trainer.seq_len."""
        obj = cfg.objective
        return compute_lengths(cfg.trainer.seq_len, obj.noise_density, obj.mean_noise_span_length)[0]

    @classmethod
    def build_examples(cls, corpus, tokenizer, cfg, corpus_key: str, world_size: int = 1):
        """Packed blocks of block_length(cfg) tokens (longer than trainer.seq_len: spans shrink to sentinels)."""
        return build_blocks(corpus, tokenizer, cls.block_length(cfg), cfg.cache_dir, corpus_key,
                            num_proc=cfg.data.get("num_proc"))

    def __init__(self, *, model_cfg, tokenizer, hardware, noise_density: float = 0.15,
                 mean_noise_span_length: float = 3.0, num_sentinels: int = 100):
        super().__init__()
        from transformers import AutoModelForSeq2SeqLM

        eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if eos_id is None or tokenizer.pad_token_id is None:
            raise ConfigError("objective=span_corruption needs a tokenizer with an end-of-sequence (or [SEP]) and a "
                              "padding token; use tokenizer.type=bpe or wordpiece")
        sentinel_ids = add_sentinels(tokenizer, num_sentinels)  # before the model: its vocabulary counts them
        # T5 starts decoding from the padding token.
        model_cfg = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True))
        model_cfg.config = {**(model_cfg.config or {}), "decoder_start_token_id": tokenizer.pad_token_id,
                            "eos_token_id": eos_id}
        self.model = build_backbone(model_cfg, tokenizer, AutoModelForSeq2SeqLM, hardware.attn_implementation)
        self.vocab_size = len(tokenizer)
        start_id = self.model.config.decoder_start_token_id
        self.collator = SpanCorruptionCollator(
            noise_density=noise_density, mean_noise_span_length=mean_noise_span_length,
            sentinel_ids=tuple(sentinel_ids), eos_id=eos_id,
            decoder_start_id=tokenizer.pad_token_id if start_id is None else start_id,
        )

    def build_collator(self) -> SpanCorruptionCollator:
        return self.collator

    def export_model(self):
        return self.model

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        input_ids, labels = batch["input_ids"], batch["labels"]  # (B, Li), (B, Lt)
        logits = self.model(input_ids=input_ids, decoder_input_ids=batch["decoder_input_ids"]).logits  # (B, Lt, V)
        loss_sum, n_targets, n_correct = token_cross_entropy(logits, labels, self.vocab_size)
        return ObjectiveOutput(
            loss=loss_sum / n_targets.clamp(min=1),
            metrics={"loss": (loss_sum.detach(), n_targets), "target_acc": (n_correct, n_targets)},
            num_tokens=torch.tensor(input_ids.numel() + labels.numel(), device=logits.device),  # encoder + decoder
        )


__all__ = ["SpanCorruption", "SpanCorruptionCollator", "add_sentinels", "compute_lengths", "corrupted_lengths",
           "random_segmentation", "random_spans_noise_mask", "sentinel_corrupt", "shift_right", "span_counts"]
