"""T5 span corruption: lengths, noise statistics and the sentinel format against slow references,
config composition, incompatible pairs, and a tiny CPU run whose loss falls and whose export reloads."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY, read_metrics

from ssltrain.config import validate_config
from ssltrain.errors import ConfigError
from ssltrain.objectives.span_corruption import (
    compute_lengths,
    corrupted_lengths,
    random_segmentation,
    random_spans_noise_mask,
    sentinel_corrupt,
    shift_right,
)


def runs(row: list[bool]) -> list[tuple[bool, int]]:
    """Slow reference: (value, length) of each maximal run in a row."""
    out = []
    for value in row:
        if out and out[-1][0] == value:
            out[-1] = (value, out[-1][1] + 1)
        else:
            out.append((value, 1))
    return out


def test_lengths_match_t5_and_the_longest_block_that_fits():
    assert compute_lengths(512, 0.15, 3.0) == (568, 512, 114)  # the figures T5 / HF's run_t5_mlm_flax use
    for seq_len in range(8, 300, 7):
        for density, span in ((0.15, 3.0), (0.3, 2.0), (0.5, 8.0)):
            tokens, inputs, targets = compute_lengths(seq_len, density, span)
            assert inputs <= seq_len < corrupted_lengths(tokens + 1, density, span)[0]
            assert (inputs, targets) == corrupted_lengths(tokens, density, span)


@pytest.mark.parametrize("length,density,span", [(568, 0.15, 3.0), (70, 0.15, 3.0), (200, 0.3, 5.0)])
def test_noise_density_and_mean_span_length_over_many_samples(length, density, span):
    mask = random_spans_noise_mask(400, length, density, span, torch.Generator().manual_seed(0))
    noise_total, span_count, span_lengths = 0, 0, []
    for row in mask.tolist():
        row_runs = runs(row)
        assert row_runs[0][0] is False, "a block starts with a kept token"
        noise = [n for value, n in row_runs if value]
        noise_total += sum(noise)
        span_count += len(noise)
        span_lengths += noise
    # Counts are rounded to whole tokens and spans (as in T5): at most half a token / span off.
    assert noise_total / mask.numel() == pytest.approx(density, abs=0.5 / length + 1e-9)
    spans_wanted = density * length / span
    assert noise_total / span_count == pytest.approx(span, abs=span * 0.5 / (spans_wanted - 0.5) + 0.5 / spans_wanted)
    assert len(set(span_lengths)) > 3, "span lengths vary"
    # Noise is spread over the block, not bunched at the end as in T5's unrotated layout.
    rate = mask.float().mean(0)  # (length,)
    for quarter in (slice(length // 4, length // 2), slice(length // 2, 3 * length // 4),
                    slice(3 * length // 4, length)):
        assert abs(rate[quarter].mean().item() - density) < 0.03
    assert rate[-1] < 2 * density


def test_span_lengths_are_a_uniform_random_composition():
    """P(first part = k) for a uniform composition of n into s positive parts is
    C(n-k-1, s-2) / C(n-1, s-1); compare with 20k draws."""
    n, s, draws = 30, 10, 20_000
    parts = random_segmentation(draws, n, s, torch.Generator().manual_seed(1))
    assert (parts >= 1).all() and (parts.sum(1) == n).all()
    freq = torch.bincount(parts[:, 0], minlength=n + 1).double() / draws
    for k in range(1, n - s + 2):
        p = math.comb(n - k - 1, s - 2) / math.comb(n - 1, s - 1)
        assert abs(freq[k].item() - p) < 4 * math.sqrt(p * (1 - p) / draws) + 1e-9, k


SENTINELS = torch.arange(1000, 1100)
EOS = 1


def denoise(inputs: list[int], targets: list[int], first_sentinel: int = 1000, eos: int = EOS) -> list[int]:
    """Slow reference: put each target span back where its sentinel stands in the input."""
    spans, current = {}, None
    for token in targets[:-1]:
        if token >= first_sentinel:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    assert targets[-1] == eos and inputs[-1] == eos
    out = []
    for token in inputs[:-1]:
        out.extend(spans.pop(token) if token >= first_sentinel else [token])
    assert not spans, "every target span has its sentinel in the input"
    return out


def test_sentinel_inputs_and_targets_round_trip_to_the_original():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 900, (64, 70), generator=g)
    mask = random_spans_noise_mask(64, 70, 0.15, 3.0, g)
    inputs, targets = sentinel_corrupt(ids, mask, SENTINELS, EOS)
    _, input_len, target_len = compute_lengths(64, 0.15, 3.0)
    assert inputs.shape == (64, input_len) and targets.shape == (64, target_len)
    for row, (i, t, m) in enumerate(zip(inputs.tolist(), targets.tolist(), mask.tolist())):
        n_spans = sum(1 for value, _ in runs(m) if value)
        assert [x for x in t if x >= 1000] == list(range(1000, 1000 + n_spans)), "sentinels in order, one per span"
        assert [x for x in i if x >= 1000] == list(range(1000, 1000 + n_spans))
        assert t[0] == 1000, "targets open with the first sentinel"
        assert denoise(i, t) == ids[row].tolist()


def test_shift_right_starts_the_decoder_with_the_start_token():
    labels = torch.tensor([[7, 8, 9], [4, 5, 6]])
    assert shift_right(labels, 0).tolist() == [[0, 7, 8], [0, 4, 5]]


def test_objective_defaults_to_t5_tiny_and_a_model_override_still_wins(compose):
    cfg = compose(["objective=span_corruption"])
    assert cfg.model.name == "t5-tiny" and cfg.tokenizer.type == "bpe"
    assert (cfg.objective.noise_density, cfg.objective.mean_noise_span_length) == (0.15, 3.0)
    validate_config(cfg)
    small = compose(["objective=span_corruption", "model=t5-small"])
    assert small.model.name == "t5-small"
    c = small.model.config
    assert (c.d_model, c.d_ff, c.num_layers, c.num_decoder_layers, c.num_heads, c.d_kv) == (512, 2048, 6, 6, 8, 64)


@pytest.mark.parametrize("overrides,needle", [
    (["objective=span_corruption", "model=bert-tiny"], "t5-small, t5-tiny"),
    (["objective=mlm", "model=t5-tiny"], "bert-tiny"),
    (["objective=span_corruption", "objective.num_sentinels=10", "trainer.seq_len=512"],
     "num_sentinels=10; raise it to >= 28"),
    (["objective=span_corruption", "objective.noise_density=0.8"], "objective.noise_density"),
])
def test_incompatible_choices_fail_with_one_clear_line(compose, overrides, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        validate_config(compose(overrides))
    assert "\n" not in str(err.value)


@pytest.fixture
def objective_and_tokenizer(compose):
    from ssltrain.data.docs import pydoc_topic_documents
    from ssltrain.data.tokenizer import train_tokenizer
    from ssltrain.objectives import build_objective

    tokenizer = train_tokenizer([d["text"] for d in pydoc_topic_documents()[:30]], "bpe", 600)
    torch.manual_seed(0)
    return build_objective(compose(["objective=span_corruption", "trainer.seq_len=64"]), tokenizer), tokenizer


def test_sentinels_join_the_tokenizer_and_the_model_vocabulary_counts_them(objective_and_tokenizer):
    objective, tokenizer = objective_and_tokenizer
    assert len(tokenizer) == 600 + 100
    ids = tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"])
    assert ids == [600, 699] and set(ids) <= set(tokenizer.all_special_ids)
    assert tokenizer("a <extra_id_3> b").input_ids.count(603) == 1, "a sentinel is one token"
    assert objective.model.config.vocab_size == 704  # 700 padded to a multiple of 64
    assert objective.model.config.decoder_start_token_id == tokenizer.pad_token_id

    tokens_length = compute_lengths(64, 0.15, 3.0)[0]
    blocks = torch.randint(2, 600, (4, tokens_length), generator=torch.Generator().manual_seed(3))
    batch = objective.build_collator()({"input_ids": blocks.numpy()}, torch.Generator().manual_seed(4))
    again = objective.build_collator()({"input_ids": blocks.numpy()}, torch.Generator().manual_seed(4))
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert batch["input_ids"].shape == (4, 64) and batch["labels"].shape == (4, 14)
    assert (batch["labels"][:, -1] == tokenizer.eos_token_id).all()
    for i, t, b in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), blocks.tolist()):
        assert denoise(i, t, first_sentinel=600, eos=tokenizer.eos_token_id) == b
    out = objective(batch)
    assert out.metrics["loss"][1].item() == batch["labels"].numel()
    assert out.loss.item() == pytest.approx(out.metrics["loss"][0].item() / batch["labels"].numel(), rel=1e-6)


@pytest.mark.slow
def test_tiny_t5_run_learns_and_exports_a_seq2seq_model_with_its_sentinels(compose, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, T5ForConditionalGeneration

    from ssltrain.checkpoint import load_weights
    from ssltrain.train import train

    cfg = compose([*TINY, "objective=span_corruption", "trainer.checkpoint_every=30",
                   "optimizer.lr=3e-3"])
    result = train(cfg, tmp_path / "run")
    records = read_metrics(result["run_dir"])
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[-1]["loss"] < evals[0]["loss"] - 1.0, (evals[0], evals[-1])
    assert evals[-1]["perplexity"] < evals[0]["perplexity"] / 3

    final = result["export"]
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == len(tokenizer) - 100
    model = AutoModelForSeq2SeqLM.from_pretrained(final)
    assert isinstance(model, T5ForConditionalGeneration)
    assert T5ForConditionalGeneration.from_pretrained(final).config.vocab_size >= len(tokenizer)
    ckpt = load_weights(result["run_dir"] / "checkpoints" / "step-00000030" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt[f"model.{name}"]), name
    inputs = tokenizer("Return the <extra_id_0> of the list.", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated[0, 0].item() == model.config.decoder_start_token_id and generated.shape[1] > 1
