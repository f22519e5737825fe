"""ELECTRA replaced-token detection: the maths against slow references, config composition, an
incompatible pair, and a tiny CPU run whose loss falls and whose discriminator export reloads."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY, read_metrics

from ssltrain.config import validate_config
from ssltrain.errors import ConfigError
from ssltrain.objectives.electra import (
    discriminator_loss,
    generator_config,
    replace_tokens,
    replaced_token_labels,
    sample_from_logits,
)


def test_replaced_token_labels_mark_exactly_the_tokens_that_differ_from_the_original():
    g = torch.Generator().manual_seed(0)
    original = torch.randint(5, 12, (6, 20), generator=g)  # a small vocabulary: samples often equal the original
    selected = torch.rand(6, 20, generator=g) < 0.3
    samples = torch.randint(5, 12, (int(selected.sum()),), generator=g)
    corrupted = replace_tokens(original, selected, samples)
    labels = replaced_token_labels(original, corrupted)
    # Slow reference: walk the selected positions in row-major order, label by comparison.
    k, hits_equal = 0, 0
    for b in range(6):
        for t in range(20):
            if selected[b, t]:
                expected_token = samples[k].item()
                k += 1
                hits_equal += expected_token == original[b, t].item()
            else:
                expected_token = original[b, t].item()
            assert corrupted[b, t].item() == expected_token
            assert labels[b, t].item() == float(expected_token != original[b, t].item())
    assert hits_equal > 0, "the case 'sample equals the original' must occur and count as original"
    assert labels.sum() == selected.sum() - hits_equal


def test_inverse_cdf_sampling_follows_the_softmax_and_never_draws_impossible_tokens():
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, float("-inf"), 0.0]])
    probs = torch.softmax(logits, -1)[0]
    n = 200_000
    uniform = torch.rand(n, generator=torch.Generator().manual_seed(1))
    draws = sample_from_logits(logits.expand(n, -1), uniform)
    freq = torch.bincount(draws, minlength=6).double() / n
    assert freq[4] == 0, "a zero-probability token is never drawn"
    for p, f in zip(probs.tolist(), freq.tolist()):
        assert abs(f - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9
    # Slow reference inverse CDF on a few rows, and the ends of [0, 1).
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(50, 9, generator=g) * 3
    u = torch.rand(50, generator=g)
    u[0], u[1] = 0.0, 1.0 - 1e-7
    got = sample_from_logits(rows, u)
    for row, value, index in zip(rows.tolist(), u.tolist(), got.tolist()):
        z = sum(math.exp(x) for x in row)
        cumulative, expected = 0.0, len(row) - 1
        for i, x in enumerate(row):
            cumulative += math.exp(x) / z
            if value < cumulative:
                expected = i
                break
        assert index == expected


def test_discriminator_loss_matches_a_slow_reference():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 10, generator=g) * 2
    labels = (torch.rand(4, 10, generator=g) < 0.2).float()
    scored = torch.rand(4, 10, generator=g) < 0.9
    out = discriminator_loss(logits, labels, scored)
    loss, n, correct, tp, pp, ap = 0.0, 0, 0, 0, 0, 0
    for x, y, s in zip(logits.flatten().tolist(), labels.flatten().tolist(), scored.flatten().tolist()):
        if not s:
            continue
        p = 1 / (1 + math.exp(-x))
        loss -= y * math.log(p) + (1 - y) * math.log(1 - p)
        n += 1
        pred = x > 0
        correct += pred == (y == 1)
        tp += pred and y == 1
        pp += pred
        ap += y == 1
    assert out["loss_sum"].item() == pytest.approx(loss, rel=1e-5)
    assert [out[k].item() for k in ("n", "correct", "true_pos", "pred_pos", "actual_pos")] == [n, correct, tp, pp, ap]


def test_generator_is_a_quarter_of_electra_small_with_the_same_embeddings(compose):
    from ssltrain.models import build_model_config

    disc = build_model_config(compose(["objective=electra", "model=electra-small"]).model, vocab_size=30522)
    assert (disc.hidden_size, disc.num_hidden_layers, disc.num_attention_heads, disc.intermediate_size,
            disc.embedding_size) == (256, 12, 4, 1024, 128)
    gen = generator_config(disc, 0.25)
    assert (gen.hidden_size, gen.num_attention_heads, gen.intermediate_size) == (64, 1, 256)
    assert (gen.num_hidden_layers, gen.embedding_size, gen.vocab_size) == (12, 128, disc.vocab_size)
    from transformers import AutoModelForPreTraining

    with torch.device("meta"):
        model = AutoModelForPreTraining.from_config(disc)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 13.5  # paper: 14 M


def test_objective_electra_defaults_to_electra_tiny_and_a_model_override_still_wins(compose):
    cfg = compose(["objective=electra"])
    assert cfg.model.name == "electra-tiny" and cfg.objective.discriminator_weight == 50.0
    validate_config(cfg)
    assert compose(["objective=electra", "model=electra-small"]).model.name == "electra-small"
    assert compose(["model=electra-small", "objective=electra"]).model.name == "electra-small"
    assert compose().model.name == "bert-tiny", "other objectives keep the default model"


@pytest.mark.parametrize("overrides,needle", [
    (["objective=electra", "model=bert-tiny"], "electra-small, electra-tiny"),
    (["objective=electra", "model=gpt2-tiny"], "electra-tiny"),
    (["objective=electra", "objective.generator_size=1.5"], "objective.generator_size"),
    (["objective=electra", "objective.replace_with_random=0.5"], "exceeds 1"),
])
def test_incompatible_choices_fail_with_one_clear_line(compose, overrides, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        validate_config(compose(overrides))
    assert "\n" not in str(err.value)


@pytest.fixture
def electra(compose):
    from ssltrain.data.docs import pydoc_topic_documents
    from ssltrain.data.tokenizer import train_tokenizer
    from ssltrain.objectives import build_objective

    tokenizer = train_tokenizer([d["text"] for d in pydoc_topic_documents()[:30]], "wordpiece", 600)
    torch.manual_seed(0)
    return build_objective(compose(["objective=electra"]), tokenizer), tokenizer


def test_generator_and_discriminator_share_embeddings_and_loss_is_gen_plus_lambda_disc(electra):
    objective, tokenizer = electra
    disc, gen = objective.discriminator, objective.generator
    assert gen.electra.embeddings is disc.electra.embeddings
    assert gen.generator_lm_head.weight is disc.electra.embeddings.word_embeddings.weight
    assert gen.config.hidden_size == disc.config.hidden_size // 4

    ids = torch.randint(5, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(4))
    collator = objective.build_collator()
    batch = collator({"input_ids": ids.numpy()}, torch.Generator().manual_seed(5))
    again = collator({"input_ids": ids.numpy()}, torch.Generator().manual_seed(5))
    assert all(torch.equal(batch[k], again[k]) for k in batch), "a batch is a pure function of its generator"
    objective.eval()
    out, out_again = objective(batch), objective(again)
    assert out.loss.item() == out_again.loss.item(), "sampling draws no global randomness"
    m = {k: s.item() / c.item() for k, (s, c) in out.metrics.items()}
    assert out.loss.item() == pytest.approx(m["gen_loss"] + 50.0 * m["disc_loss"], rel=1e-5)
    assert out.metrics["disc_loss"][1].item() == ids.numel(), "every non-padding position is scored"
    assert out.metrics["replaced_rate"][0] <= out.metrics["gen_loss"][1], "only masked positions are replaced"
    out.loss.backward()
    assert gen.electra.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert disc.electra.embeddings.word_embeddings.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_tiny_electra_run_learns_and_exports_the_discriminator(compose, tmp_path):
    from transformers import AutoModel, AutoTokenizer, ElectraForPreTraining

    from ssltrain.checkpoint import load_weights
    from ssltrain.objectives import build_objective
    from ssltrain.train import train

    cfg = compose([*TINY, "objective=electra", "trainer.checkpoint_every=30", "optimizer.lr=2e-3"])
    result = train(cfg, tmp_path / "run")
    records = read_metrics(result["run_dir"])
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[-1]["loss"] < evals[0]["loss"] - 10.0, (evals[0], evals[-1])
    assert evals[-1]["gen_loss"] < evals[0]["gen_loss"] - 1.0
    # A CPU-sized run gets the discriminator as far as the replacement rate (BCE below ln 2); spotting
    # individual replacements takes far longer (the paper trains ELECTRA-Small for 1 M steps).
    assert evals[-1]["disc_loss"] < 0.5 < evals[0]["disc_loss"]
    assert {"gen_loss", "disc_loss", "disc_acc", "disc_precision", "disc_recall"} <= set(
        next(r for r in records if r["kind"] == "train"))

    final = result["export"]
    disc = ElectraForPreTraining.from_pretrained(final)
    ckpt = load_weights(result["run_dir"] / "checkpoints" / "step-00000030" / "model.safetensors")
    state = disc.state_dict()
    assert len(state) == len([k for k in ckpt if k.startswith("discriminator.")])
    for name, tensor in state.items():
        assert torch.equal(tensor, ckpt[f"discriminator.{name}"]), name
    # The checkpoint stores the shared embeddings once; a fresh objective restores every key from it.
    fresh = build_objective(cfg, AutoTokenizer.from_pretrained(final))
    fresh.load_state_dict(ckpt, strict=True)
    assert fresh.generator.electra.embeddings is fresh.discriminator.electra.embeddings
    encoder = AutoModel.from_pretrained(final)
    assert type(encoder).__name__ == "ElectraModel"
    assert torch.equal(encoder.embeddings.word_embeddings.weight, state["electra.embeddings.word_embeddings.weight"])
