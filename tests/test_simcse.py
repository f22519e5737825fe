"""SimCSE: InfoNCE against a naive double loop, negatives gathered from all ranks (2 gloo
processes, gradients equal to one process holding the whole batch), sentence examples,
dropout-only views, configs, a real tiny run and the encoder export."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
from conftest import CONF, TINY, read_metrics

from ssltrain.config import validate_config
from ssltrain.errors import ConfigError
from ssltrain.objectives.contrastive import alignment_uniformity, gather_with_grad, info_nce, info_nce_loss


def naive_info_nce(z1, z2, temperature, offset=0):
    """Per anchor, per candidate, in plain Python: (mean loss, n_correct)."""
    def cos(u, v):
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    total, correct = 0.0, 0
    for i, anchor in enumerate(z1.tolist()):
        sims = [cos(anchor, cand) / temperature for cand in z2.tolist()]
        top = max(sims)
        total += top + math.log(sum(math.exp(s - top) for s in sims)) - sims[offset + i]
        correct += int(max(range(len(sims)), key=sims.__getitem__) == offset + i)
    return total / len(z1), correct


@pytest.mark.parametrize("n,m,offset,temperature", [(8, 8, 0, 0.05), (5, 15, 10, 0.5), (4, 12, 4, 1.0), (1, 3, 2, 0.1)])
def test_info_nce_matches_naive_double_loop(n, m, offset, temperature):
    g = torch.Generator().manual_seed(n * 100 + m)
    z2 = torch.randn(m, 16, generator=g)
    z1 = z2[offset:offset + n] + 0.7 * torch.randn(n, 16, generator=g)  # positives correlated, not equal
    ref_loss, ref_correct = naive_info_nce(z1, z2, temperature, offset)
    assert info_nce_loss(z1, z2, temperature, offset).item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-5)
    loss_sum, count, n_correct = info_nce(z1, z2, temperature, offset)
    assert count.item() == n and n_correct.item() == ref_correct
    assert loss_sum.item() == pytest.approx(ref_loss * n, rel=1e-5, abs=1e-5)


def test_info_nce_is_one_directional_scale_invariant_and_differentiable():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    assert info_nce_loss(z1, z2, 0.05) != pytest.approx(info_nce_loss(z2, z1, 0.05).item())  # anchors are z1
    assert info_nce_loss(3 * z1, 0.5 * z2, 0.05).item() == pytest.approx(info_nce_loss(z1, z2, 0.05).item(), rel=1e-5)
    # Identical views of orthogonal embeddings: every negative at cosine 0 -> log(1 + (N-1) e^{-1/t}).
    eye = torch.eye(4)
    assert info_nce_loss(eye, eye, 0.5).item() == pytest.approx(math.log(1 + 3 * math.exp(-2)), rel=1e-6)
    leaf = z1.clone().requires_grad_()
    info_nce_loss(leaf, z2.bfloat16(), 0.05).backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    assert gather_with_grad(z2) == (z2, 0)  # one process: nothing to gather


def test_alignment_and_uniformity_match_their_definitions():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    u, v = [torch.nn.functional.normalize(z, dim=-1) for z in (z1, z2)]
    alignment, uniformity = alignment_uniformity(z1, z2)
    assert alignment.item() == pytest.approx(sum(((u[i] - v[i]) ** 2).sum().item() for i in range(5)) / 5, rel=1e-5)
    pairs = [math.exp(-2 * ((u[i] - u[j]) ** 2).sum().item()) for i in range(5) for j in range(5) if i != j]
    assert uniformity.item() == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-5)


# --- negatives from all ranks ----------------------------------------------------------------

B, D, WORLD, TAU = 3, 8, 2, 0.1


def views():
    g = torch.Generator().manual_seed(42)
    return torch.randn(WORLD * B, D, generator=g), torch.randn(WORLD * B, D, generator=g)


def _gather_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        z1_all, z2_all = views()
        z1 = z1_all[rank * B:(rank + 1) * B].clone().requires_grad_()
        z2 = z2_all[rank * B:(rank + 1) * B].clone().requires_grad_()
        candidates, offset = gather_with_grad(z2)
        loss = info_nce_loss(z1, candidates, TAU, offset)
        loss.backward()
        torch.save({"loss": loss.detach(), "g1": z1.grad, "g2": z2.grad, "offset": offset,
                    "candidates": candidates.detach()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_negatives_give_the_gradient_of_the_whole_batch(tmp_path):
    """Two gloo processes with B rows each == one process with all 2B rows: the same loss (mean of
    the ranks' losses) and, once data-parallel averaging divides by the world size, the same
    gradient for every row, including the gradient a row gets as another rank's negative."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_gather_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    z1_all, z2_all = [z.clone().requires_grad_() for z in views()]
    loss = info_nce_loss(z1_all, z2_all, TAU)
    loss.backward()
    assert [r["offset"] for r in ranks] == [0, B]
    assert all(torch.equal(r["candidates"], z2_all.detach()) for r in ranks)
    assert sum(r["loss"] for r in ranks).item() / WORLD == pytest.approx(loss.item(), rel=1e-6)
    for rank, r in enumerate(ranks):
        rows = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(r["g1"] / WORLD, z1_all.grad[rows])
        torch.testing.assert_close(r["g2"] / WORLD, z2_all.grad[rows])


# --- sentences and the objective -------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(cache_dir):
    from hydra import compose, initialize_config_dir

    from ssltrain.data.corpus import load_corpus
    from ssltrain.data.tokenizer import build_tokenizer
    from ssltrain.objectives.simcse import SimCSE

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY, "objective=simcse", "data.validation_fraction=0.2"])
    corpus, key = load_corpus(cfg.data, cfg.cache_dir)
    tokenizer = build_tokenizer(cfg, corpus, key)
    return cfg, corpus, tokenizer, SimCSE.build_examples(corpus, tokenizer, cfg, key)


def test_sentences_are_real_deduplicated_segments_framed_as_cls_s_sep(setup):
    from ssltrain.data.sentences import tokenize_segments

    cfg, corpus, tok, examples = setup
    seq_len, min_tokens = cfg.trainer.seq_len, cfg.objective.min_tokens
    streams = [np.asarray([t for seg in doc for t in seg], dtype=np.int32).tobytes()
               for doc in tokenize_segments(corpus, tok)["validation"]["segments"]]
    for split in ("train", "validation"):
        rows = examples[split].with_format("numpy")[:]
        assert len(rows["length"]) > (1000 if split == "train" else 100)
        bodies = set()
        for ids, n in zip(rows["input_ids"], rows["length"]):
            assert ids[0] == tok.cls_token_id and ids[n - 1] == tok.sep_token_id and min_tokens + 2 <= n <= seq_len
            assert (ids[n:] == tok.pad_token_id).all()
            body = ids[1:n - 1]
            assert not np.isin(body, tok.all_special_ids).any()
            bodies.add(body.tobytes())
            if split == "validation":  # a verbatim piece of one held-out document
                assert any(body.astype(np.int32).tobytes() in s for s in streams)
        assert len(bodies) == len(rows["length"]), "no sentence twice in a split (false negatives)"


def test_collator_trims_masks_and_draws_the_dropout_seed_from_the_generator(setup):
    from ssltrain.objectives.simcse import SentenceCollator

    _, _, _, examples = setup
    rows = examples["validation"].with_format("numpy")[:16]
    batch = SentenceCollator()(rows, torch.Generator().manual_seed(3))
    again = SentenceCollator()(rows, torch.Generator().manual_seed(3))
    other = SentenceCollator()(rows, torch.Generator().manual_seed(4))
    assert all(torch.equal(batch[k], again[k]) for k in batch) and batch["dropout_seed"] != other["dropout_seed"]
    assert batch["input_ids"].shape[1] == rows["length"].max()
    assert batch["attention_mask"].sum(1).tolist() == rows["length"].tolist()


def test_pack_rows_is_first_fit_decreasing_within_capacity():
    from ssltrain.objectives.packing import pack_rows

    lengths = [30, 60, 10, 64, 5, 33, 31, 2]
    rows = pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(8))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert rows == [[3], [1, 7], [5, 6], [0, 2, 4]]  # 64 | 60+2 | 33+31 | 30+10+5
    assert pack_rows(lengths, 64) == rows


def test_packed_collator_keeps_every_sentence_once_with_its_own_positions(setup):
    from ssltrain.objectives.simcse import SentenceCollator

    _, _, tok, examples = setup
    rows = examples["validation"].with_format("numpy")[:16]
    packed = SentenceCollator(packed=True)(rows, torch.Generator().manual_seed(3))
    padded = SentenceCollator()(rows, torch.Generator().manual_seed(3))
    assert packed["dropout_seed"] == padded["dropout_seed"]
    assert packed["input_ids"].shape[0] < 16 and packed["attention_mask"].sum() == padded["attention_mask"].sum()
    flat = {k: packed[k].reshape(-1) for k in ("input_ids", "position_ids", "segments")}
    for i, (ids, n) in enumerate(zip(rows["input_ids"], rows["length"])):
        at = packed["starts"][i].item()
        assert flat["input_ids"][at].item() == tok.cls_token_id
        assert flat["input_ids"][at:at + n].tolist() == ids[:n].tolist()
        assert flat["position_ids"][at:at + n].tolist() == list(range(n))
        assert (flat["segments"][at:at + n] == i).all() and (flat["segments"] == i).sum() == n


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pooler", ["cls_mlp", "cls", "mean"])
def test_packed_rows_embed_each_sentence_as_its_own_padded_row(setup, attn, pooler):
    """Without dropout, packing changes nothing but the FLOPs: each sentence attends only to itself
    (block-diagonal mask) at positions from 0, so its embedding equals the padded one's."""
    from omegaconf import OmegaConf

    from ssltrain.objectives.simcse import SentenceCollator, SimCSE

    cfg, _, tok, examples = setup
    hardware = OmegaConf.merge(cfg.hardware, {"attn_implementation": attn})
    torch.manual_seed(0)
    objective = SimCSE(model_cfg=cfg.model, tokenizer=tok, hardware=hardware, pooler=pooler).eval()
    assert objective.packed and objective.build_collator().packed
    rows = examples["validation"].with_format("numpy")[:16]
    padded = SentenceCollator()(rows, torch.Generator().manual_seed(0))
    packed = SentenceCollator(packed=True)(rows, torch.Generator().manual_seed(0))
    assert (packed["segments"].max(1).values > packed["segments"].clamp(min=0).min(1).values).any(), \
        "some row holds several sentences"
    with torch.no_grad():
        reference = objective.embed(padded["input_ids"], padded["attention_mask"])
        views = {k: v for k, v in packed.items() if k != "dropout_seed"}
        torch.testing.assert_close(objective.embed(**views), reference, rtol=1e-5, atol=1e-5)
        if pooler != "mean":  # the mask matters: one block per row (sentences see each other) differs
            one_block = torch.where(packed["segments"] >= 0, 0, -1)
            mixed = objective.embed(**{**views, "segments": one_block})
            assert not torch.allclose(mixed, reference, atol=1e-3)
        first = objective(padded)
        second = objective(packed)  # held-out: the same seeded dropout, drawn over other positions
    assert set(first.metrics) == set(second.metrics) and first.num_tokens == second.num_tokens


def make(setup, **params):
    from ssltrain.objectives.simcse import SentenceCollator, SimCSE

    cfg, _, tok, examples = setup
    torch.manual_seed(0)
    objective = SimCSE(model_cfg=cfg.model, tokenizer=tok, hardware=cfg.hardware, **params)
    batch = SentenceCollator()(examples["validation"].with_format("numpy")[:16], torch.Generator().manual_seed(0))
    return objective, batch


@pytest.mark.parametrize("pooler", ["cls_mlp", "cls", "mean"])
def test_dropout_makes_the_views_and_every_trainable_weight_gets_a_gradient(setup, pooler):
    objective, batch = make(setup, pooler=pooler)
    objective.train()
    z = objective.embed(torch.cat([batch["input_ids"]] * 2), torch.cat([batch["attention_mask"]] * 2))
    assert not torch.allclose(z[:16], z[16:]), "dropout gives two different views"
    objective.eval()
    with torch.no_grad():
        clean = objective.embed(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(clean, objective.embed(batch["input_ids"], batch["attention_mask"]).detach())
    objective.train()
    out = objective(batch)
    out.loss.backward()
    # Data-parallel training needs every trainable weight in the graph (or DDP stalls).
    missing = [n for n, p in objective.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    pooler_params = list(objective.encoder.pooler.parameters())
    assert all(p.requires_grad == (pooler == "cls_mlp") for p in pooler_params)
    assert set(out.metrics) == {"loss", "contrastive_acc", "alignment", "uniformity"}


def test_evaluation_uses_seeded_dropout_and_leaves_the_training_rng_alone(setup):
    objective, batch = make(setup)
    objective.eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        first, second = objective(batch), objective(batch)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.loss, second.loss), "held-out views are the same at every evaluation"
    assert first.metrics["alignment"][0] > 0, "held-out views differ (dropout on), else the task is trivial"
    assert not objective.encoder.training
    batch["dropout_seed"] = batch["dropout_seed"] + 1
    with torch.no_grad():
        assert not torch.equal(objective(batch).loss, first.loss)


# --- configs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [["objective=simcse"], ["objective=simcse", "objective.pooler=mean"],
                                       ["objective=simcse", "model=bert-base", "objective.temperature=0.1"]])
def test_simcse_composes_and_validates(compose, overrides):
    cfg = compose(overrides)
    validate_config(cfg)
    assert compose(["objective=simcse"]).objective.temperature == 0.05


@pytest.mark.parametrize("overrides,needle", [
    (["objective=simcse", "model=gpt2-tiny"], "needs a bidirectional model but model=gpt2-tiny is causal; pick one of"),
    (["objective=simcse", "objective.temperature=0"], "objective.temperature=0 is invalid"),
    (["objective=simcse", "objective.pooler=max"], "pooler='max' is invalid; expected one of cls_mlp, cls, mean"),
    (["objective=simcse", "tokenizer.type=bpe"], "needs [CLS]/[SEP] tokens"),
])
def test_bad_simcse_configs_fail_with_one_clear_line(compose, overrides, needle):
    with pytest.raises(ConfigError) as err:
        validate_config(compose(overrides))
    assert needle in str(err.value) and "\n" not in str(err.value)


# --- a real run ------------------------------------------------------------------------------

@pytest.mark.slow
def test_simcse_run_learns_and_exports_the_encoder(compose, tmp_path):
    """pooler=mean: from a random init, mean pooling carries the sentence's content from step 1;
    [CLS] (the paper's pooler, for a pretrained encoder) first collapses for ~40 steps at peak LR
    before it picks up content, longer than a test should run."""
    from transformers import AutoModel, AutoTokenizer

    from ssltrain.checkpoint import load_weights
    from ssltrain.objectives.simcse import SimCSE
    from ssltrain.train import train

    cfg = compose([*TINY, "objective=simcse", "objective.pooler=mean", "data.validation_fraction=0.2",
                   "trainer.checkpoint_every=30"])
    result = train(cfg, tmp_path / "run")
    evals = [r for r in read_metrics(result["run_dir"]) if r["kind"] == "eval"]
    assert evals[-1]["loss"] < evals[0]["loss"] / 4, "held-out InfoNCE (seeded dropout views) must fall"
    assert evals[-1]["contrastive_acc"] > 0.9 and evals[-1]["uniformity"] < evals[0]["uniformity"] - 0.5

    final = result["export"]
    encoder = AutoModel.from_pretrained(final).eval()
    trained = load_weights(result["run_dir"] / "checkpoints" / "step-00000030" / "model.safetensors")
    state = encoder.state_dict()
    assert len(state) == len(trained) and all(torch.equal(t, trained[f"encoder.{n}"]) for n, t in state.items())

    tok = AutoTokenizer.from_pretrained(final)
    sentences = ["Return the number of items in the container.", "The socket is closed when the object is deleted."]
    batch = tok(sentences, padding=True, return_tensors="pt")
    objective = SimCSE(model_cfg=cfg.model, tokenizer=tok, hardware=cfg.hardware, pooler="mean")
    objective.encoder = encoder
    with torch.no_grad():
        embeddings = objective.embed(batch["input_ids"], batch["attention_mask"])
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    torch.testing.assert_close(embeddings, (hidden * mask).sum(1) / mask.sum(1))
    assert torch.nn.functional.cosine_similarity(*embeddings, dim=0) < 0.9, "different sentences, different embeddings"
