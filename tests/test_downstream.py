"""Downstream evaluation: stratified seeded label fractions, the probes, BLEU against a hand
computation, and end to end on real tiny runs: ssltrain-probe on a SimCLR run (CSV with the
baselines, PNG, records) and ssltrain-compare on an MLM + span-corruption sweep directory."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from conftest import TINY, read_metrics
from test_images import IMAGE_TINY, one_thread

from ssltrain.errors import UserError
from ssltrain.evaluation.generation import bleu
from ssltrain.evaluation.probe import knn_probe, linear_probe, stratified_subset

# ------------------------------------------------------------------ label fractions


def imbalanced_labels() -> np.ndarray:
    return np.repeat(np.arange(5), [400, 200, 100, 50, 3])  # 753 examples, a rare class of 3


def test_label_subsets_are_seeded_and_nested():
    labels = imbalanced_labels()
    a, b = stratified_subset(labels, 0.1, seed=0), stratified_subset(labels, 0.1, seed=0)
    assert np.array_equal(a, b) and len(a) == round(0.1 * len(labels))
    assert not np.array_equal(a, stratified_subset(labels, 0.1, seed=1))
    small, large = stratified_subset(labels, 0.02, seed=3), stratified_subset(labels, 0.2, seed=3)
    assert set(small) <= set(large), "a seed's subsets grow with the fraction"
    assert np.array_equal(stratified_subset(labels, 1.0, seed=5), np.arange(len(labels)))
    assert len(set(a)) == len(a) and np.all(np.diff(a) > 0)


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.05, 0.1, 0.5])
def test_label_subsets_are_stratified_with_every_class_present(fraction):
    labels = imbalanced_labels()
    idx = stratified_subset(labels, fraction, seed=0)
    counts = np.bincount(labels[idx], minlength=5)
    assert (counts >= 1).all(), counts
    assert len(idx) == max(5, round(fraction * len(labels)))
    expected = len(idx) * np.bincount(labels) / len(labels)
    assert np.all(np.abs(counts - expected) <= np.maximum(1, expected)), (counts, expected)
    if fraction >= 0.05:  # no minimum in play: proportional up to rounding
        assert np.all(np.abs(counts - expected) < 1), (counts, expected)


def test_bad_fraction_is_a_user_error():
    with pytest.raises(UserError, match="not in"):
        stratified_subset(np.arange(10) % 2, 0.0, seed=0)


def test_probes_separate_separable_classes_and_report_f1():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 4
    y = np.repeat(np.arange(3), 40)
    x = centres[y] + rng.normal(size=(120, 8))
    for result in (linear_probe(x[::2], y[::2], x[1::2], y[1::2]), knn_probe(x[::2], y[::2], x[1::2], y[1::2])):
        assert result["accuracy"] > 0.95 and 0.95 < result["macro_f1"] <= 1.0
    one_each = linear_probe(x[[0, 40, 80]], y[[0, 40, 80]], x, y)  # one example per class: fixed C, no CV
    assert one_each["C"] == 1.0 and one_each["accuracy"] > 0.8


# ------------------------------------------------------------------ BLEU


def test_bleu_matches_a_hand_computation():
    ref = "the quick brown fox jumps over the lazy dog"
    # One word wrong in 9: n-gram precisions 8/9, 6/8, 4/7, 2/6, equal lengths (no brevity penalty).
    hand = 100 * (8 / 9 * 6 / 8 * 4 / 7 * 2 / 6) ** 0.25
    assert bleu(["the quick brown fox jumped over the lazy dog"], [ref]) == pytest.approx(hand, abs=1e-6)
    # Every n-gram right but 4 of 9 words: brevity penalty exp(1 - 9/4).
    assert bleu(["the quick brown fox"], [ref]) == pytest.approx(100 * math.exp(1 - 9 / 4), abs=1e-6)
    assert bleu([ref, ref], [ref, ref]) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        bleu(["a"], ["a", "b"])


def test_probe_command_names_a_path_that_is_not_a_model(tmp_path, capsys):
    from ssltrain.evaluation.probe import main

    assert main([str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_probe_on_a_tiny_simclr_run_writes_csv_png_and_records(compose, tmp_path):
    from ssltrain.evaluation.probe import main, read_csv
    from ssltrain.train import train

    with one_thread():
        run_dir = train(compose(["objective=simclr", *IMAGE_TINY]), tmp_path / "simclr")["run_dir"]
        assert main([str(run_dir), "--fractions", "0.05,1.0", "--seeds", "0", "1"]) == 0
    out = run_dir / "downstream"
    rows = read_csv(out / "probe.csv")
    inits = {r["init"] for r in rows}
    assert inits == {"pretrained", "random-init", "raw-pixels"}
    assert len(rows) == 3 * 2 * 2 * 2  # inits x probes x fractions x seeds
    assert {r["task"] for r in rows} == {"digits"} and {r["n_labelled"] for r in rows} == {81, 1617}
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0
    pretrained = [r["accuracy"] for r in rows if r["init"] == "pretrained" and r["probe"] == "linear"]
    assert min(pretrained) > 0.3, f"10 classes: chance is 0.1, got {pretrained}"
    png = (out / "probe.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    with open(out / "probe.csv") as f:
        assert next(csv.reader(f))[:4] == ["task", "init", "probe", "fraction"]
    records = [r for r in read_metrics(run_dir) if r["kind"] == "probe"]
    assert len(records) == 3 * 2 * 2 and {r["step"] for r in records} == {30}
    assert "pretrained" in (out / "probe.md").read_text()


@pytest.mark.slow
def test_compare_builds_the_table_from_real_runs(compose, tmp_path):
    from ssltrain.evaluation.compare import compare_runs
    from ssltrain.train import train

    sweep = tmp_path / "sweep"
    with one_thread():
        for i, objective in enumerate(("mlm", "span_corruption")):
            train(compose([f"objective={objective}", *TINY, "trainer.max_steps=20", "data.max_docs=60"]),
                  sweep / f"{i}_objective={objective}")
        result = compare_runs([sweep], fractions=(0.05, 1.0), seeds=(0,), log=lambda m: None)
    header, *rows = result["table"]
    by_objective = {row[1]: dict(zip(header, row)) for row in rows}
    mlm, t5 = by_objective["mlm"], by_objective["span_corruption"]
    assert mlm["model"] == "bert-tiny" and t5["model"] == "t5-tiny" and mlm["steps"] == "20"
    assert float(mlm["masked-token acc"]) >= 0 and float(mlm["perplexity"]) > 1
    assert mlm["probe task"] == "docs_topics" and mlm["linear probe @1"] != "-"
    assert 0 <= float(t5["BLEU"]) <= 100 and mlm["BLEU"] == "-"
    assert mlm["tokens seen"] != "-" and mlm["wall time"].endswith("s")
    assert any(row[0].startswith("*random-init") for row in rows) and any(row[0] == "*tf-idf*" for row in rows)
    md = (sweep / "comparison.md").read_text()
    assert "| 0_objective=mlm | mlm | bert-tiny |" in md and "span_corruption" in md
    assert (sweep / "comparison.png").read_bytes().startswith(b"\x89PNG")
    t5_records = read_metrics(sweep / "1_objective=span_corruption")
    assert any(r["kind"] == "downstream" and "bleu" in r for r in t5_records)
    assert (sweep / "0_objective=mlm" / "downstream" / "probe.csv").is_file()


def test_text_features_pool_tokens_and_layers_as_documented():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from ssltrain.evaluation.features import text_features

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "a", "b", "c", "d"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=6, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=16, max_position_embeddings=16)).eval()
    texts = ["a b c d", "b a"]
    with torch.no_grad():
        states = [encoder(input_ids=tokenizer(t, return_tensors="pt")["input_ids"], output_hidden_states=True)
                  for t in texts]  # one text at a time: no padding at all
    expected = {"mean": [s.last_hidden_state[0].mean(0) for s in states],
                "cls": [s.last_hidden_state[0, 0] for s in states],
                "layers-mean": [torch.stack(s.hidden_states)[:, 0].mean((0, 1)) for s in states]}
    for pooling, want in expected.items():
        got = text_features(encoder, tokenizer, texts, pooling=pooling)  # batched: "b a" is padded
        assert np.allclose(got, torch.stack(want).numpy(), atol=1e-5), pooling
