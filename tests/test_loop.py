"""What the training loop promises, through interfaces that outlive its internals: `ssltrain.train.train`
with a composed config, the CLI in a subprocess, `ssltrain.optim.build_optimizer` on a real objective.

- periodic held-out evaluation (trainer.eval_every) at the steps it names, once each;
- checkpoint pruning (trainer.checkpoint_every, trainer.keep_checkpoints) keeps the newest k, which verify;
- gradient accumulation (trainer.micro_batch_size < trainer.batch_size) trains as one large batch would;
- weight-decay groups: decay on matrices only, each trainable parameter once, frozen ones left out.
"""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY
from omegaconf import OmegaConf

from ssltrain.tracking import read_records

QUIET = ["trainer.export=false", "trainer.log_every=100"]  # log_every past max_steps: a train record at the end only


def run_train(compose, run_dir, *overrides):
    from ssltrain.train import train

    return train(compose([*TINY, *overrides]), run_dir)


# ---------------------------------------------------------------- periodic evaluation

@pytest.mark.slow
@pytest.mark.parametrize("max_steps,eval_every,steps", [(9, 4, [0, 4, 8, 9]), (8, 4, [0, 4, 8])])
def test_periodic_evaluation_records_at_each_multiple_plus_start_and_end(compose, tmp_path, max_steps, eval_every,
                                                                          steps):
    """trainer.eval_every=k: eval records at step 0, at every multiple of k and at the last step, each once
    (max_steps a multiple of k: the final evaluation is that multiple's, not a second record), with the same
    finite metrics each time, and values that move as the model trains.

    Catches: eval_every ignored (only 0 and the end), an off-by-one (evaluating at 3, 7 or before the step's
    update, so step 4's loss equals step 3's model), a missing step-0 or final evaluation, a duplicate record
    at the last step, and an evaluation that does not see the current weights (values frozen at step 0's)."""
    result = run_train(compose, tmp_path / "run", f"trainer.max_steps={max_steps}",
                       f"trainer.eval_every={eval_every}", "optimizer.lr=2e-3", *QUIET)
    evals = [r for r in read_records(result["run_dir"]) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == steps
    keys = {k for k, v in evals[0].items() if isinstance(v, float) and k != "time"}
    assert {"loss", "masked_acc", "perplexity"} <= keys
    for record in evals:
        assert all(math.isfinite(record[k]) for k in keys), record
        assert {k for k, v in record.items() if isinstance(v, float) and k != "time"} == keys
    losses = [r["loss"] for r in evals]
    assert len(set(losses)) == len(losses), f"every evaluation sees new weights: {losses}"
    assert losses[-1] < losses[0] - 0.3, f"held-out loss must fall over the run: {losses}"
    assert result["eval"]["loss"] == losses[-1], "train() returns the final evaluation it recorded"


# ---------------------------------------------------------------- checkpoint pruning

def ssltrain_cli(*args, cwd, cache_dir, timeout=600):
    env = {**os.environ, "SSLTRAIN_CACHE": str(cache_dir)}
    return subprocess.run([sys.executable, "-m", "ssltrain", *args], cwd=str(cwd), capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_only_the_newest_checkpoints_remain_and_they_verify(cache_dir, tmp_path):
    """`ssltrain trainer.max_steps=11 trainer.checkpoint_every=3 trainer.keep_checkpoints=3`: saves at 3, 6, 9
    and the final step 11 (not a multiple, saved at the end); steps 6, 9 and 11 remain, nothing else is left
    in checkpoints/ (no temporary or pruned folders), each verifies against its manifest with checksums,
    holds the step it is named for, and holds weights of its own step.

    Catches: pruning that keeps the oldest (or all, or k-1, or k+1), deletes before the new save lands or
    leaves renamed leftovers; a final step not saved; a checkpoint whose manifest does not match its files;
    trainer_state that names another step; the same weights written under every name."""
    from ssltrain.checkpoint import checkpoint_problem, latest_checkpoint, list_checkpoints, load_weights

    run = tmp_path / "run"
    out = ssltrain_cli(*TINY, *QUIET, "trainer.max_steps=11", "trainer.checkpoint_every=3",
                       "trainer.keep_checkpoints=3", f"hydra.run.dir={run}", cwd=tmp_path, cache_dir=cache_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    root = run / "checkpoints"
    kept = list_checkpoints(root)
    assert [p.name for p in kept] == ["step-00000006", "step-00000009", "step-00000011"]
    assert sorted(p.name for p in root.iterdir()) == [p.name for p in kept], "no leftovers beside them"
    for path in kept:
        assert checkpoint_problem(path, checksums=True) is None, path
        assert json.loads((path / "trainer_state.json").read_text())["step"] == int(path.name.split("-")[1])
    assert latest_checkpoint(root, checksums=True) == kept[-1]
    weights = [load_weights(path / "model.safetensors") for path in kept]
    for older, newer in zip(weights, weights[1:]):
        assert older.keys() == newer.keys()
        assert any(not torch.equal(older[k], newer[k]) for k in older), "each checkpoint holds its own step"


# ---------------------------------------------------------------- gradient accumulation

# Causal LM on gpt2-tiny with every dropout off: nothing in a step is random. The collator draws nothing
# (CausalLMCollator ignores its generator), and the example order is one permutation per epoch whatever the
# micro-batch, so micro-batches 2k and 2k+1 of 16 are exactly batch k of 32. (MLM would not do: its masks
# come from a generator seeded per micro-batch index, so a 16/16 split masks other tokens than one batch of
# 32.) Every packed block has seq_len tokens, so the mean of the two halves' mean losses is the batch mean.
DETERMINISTIC_AR = ["objective=ar", "model=gpt2-tiny", "model.config.resid_pdrop=0", "model.config.embd_pdrop=0",
                    "model.config.attn_pdrop=0", "trainer.batch_size=32", "trainer.max_steps=6",
                    "trainer.log_every=1", "trainer.eval_batches=null", "optimizer.lr=2e-3"]


@pytest.mark.slow
def test_gradient_accumulation_trains_like_one_large_batch(compose, tmp_path):
    """trainer.batch_size=32 with trainer.micro_batch_size=16 (2 micro-batches accumulated per step) gives, step
    for step, the loss, the pre-clipping gradient norm and the learning rate of micro_batch_size=32, the same
    held-out loss at the end (eval_batches=null: every validation example in both runs) and the same weights,
    within float32 summation-order tolerance (the setup is deterministic: see DETERMINISTIC_AR).

    Catches: the loss not divided by the accumulation count (grad_norm doubles), gradients zeroed between
    micro-batches or only the last micro-batch's used (losses drift from step 2), the optimizer or scheduler
    stepped per micro-batch (lr and losses move twice as fast), train records that average only one
    micro-batch, and micro-batches that skip or repeat examples."""
    from ssltrain.checkpoint import load_weights

    runs = {}
    for micro in (16, 32):
        result = run_train(compose, tmp_path / f"micro{micro}", *DETERMINISTIC_AR, f"trainer.micro_batch_size={micro}")
        records = read_records(result["run_dir"])
        start = next(r for r in records if r["kind"] == "start")
        assert (start["micro_batch_size"], start["grad_accum"]) == (micro, 32 // micro)
        train = {r["step"]: r for r in records if r["kind"] == "train"}
        assert sorted(train) == list(range(1, 7))
        weights = load_weights(result["export"] / "model.safetensors")
        runs[micro] = train, result["eval"], weights
    (acc, acc_eval, acc_w), (big, big_eval, big_w) = runs[16], runs[32]
    for step in range(1, 7):
        for key in ("loss", "grad_norm", "lr", "next_token_acc"):
            assert acc[step][key] == pytest.approx(big[step][key], rel=1e-4, abs=1e-6), (step, key)
        assert acc[step]["tokens_seen"] == big[step]["tokens_seen"]
    assert acc[1]["loss"] - acc[6]["loss"] > 0.1, "the runs train (else equal losses prove little)"
    assert acc_eval["loss"] == pytest.approx(big_eval["loss"], rel=1e-4)
    assert acc_w.keys() == big_w.keys()
    for name in acc_w:
        torch.testing.assert_close(acc_w[name], big_w[name], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------- weight-decay groups

@pytest.fixture(scope="module")
def tiny_tokenizer():
    from pydoc_data.topics import topics

    from ssltrain.data.tokenizer import train_tokenizer

    return train_tokenizer(list(topics.values())[:40], "wordpiece", 400)


def mlm_objective(compose, tokenizer):
    from ssltrain.objectives.mlm import MaskedLM

    cfg = compose(["objective=mlm", "optimizer.lr=0.1", "optimizer.weight_decay=0.5"])
    params = {k: v for k, v in OmegaConf.to_container(cfg.objective).items() if k != "_target_"}
    return cfg, MaskedLM(model_cfg=cfg.model, tokenizer=tokenizer, hardware=cfg.hardware, **params)


def decays_by_name(name: str) -> bool:
    """BERT's rule, by name (independent of the optimizer's own test on shapes): no decay on biases and
    LayerNorm scales/shifts, decay on every other weight (linear layers, embeddings)."""
    return not (name.endswith("bias") or "LayerNorm" in name)


@pytest.mark.parametrize("fused", [False, True])
def test_weight_decay_on_matrices_only_each_trainable_parameter_once(compose, tiny_tokenizer, fused):
    """build_optimizer on the MLM objective (bert-tiny), with the position embeddings frozen: the groups with
    weight_decay=optimizer.weight_decay hold exactly the weights BERT decays (by name: not biases, not
    LayerNorm), the groups with 0 the biases and LayerNorm parameters; every trainable parameter is in exactly
    one group (the MLM decoder tied to the word embeddings counts once), the frozen one in none; all at
    optimizer.lr. Then one AdamW step on zero gradients does only the decoupled decay: decayed weights are
    scaled by exactly 1 - lr x weight_decay, the others do not move.

    Catches: decay on biases/LayerNorm or none on matrices (a 1-D / 2-D test inverted, or decay in every
    group), a group missing or duplicated (e.g. named_parameters(remove_duplicate=False)), frozen parameters
    handed to the optimizer, the weight_decay or lr setting not reaching the groups, and L2 added to the
    gradient instead of decoupled decay (Adam would normalise it away: the scale would not be exact)."""
    from ssltrain.optim import build_optimizer

    cfg, objective = mlm_objective(compose, tiny_tokenizer)
    frozen = objective.model.bert.embeddings.position_embeddings.weight
    frozen.requires_grad_(False)
    named = dict(objective.named_parameters())  # deduplicated: the tied decoder weight appears once
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    assert len(trainable) == len(named) - 1

    optimizer = build_optimizer(objective, cfg.optimizer, fused=fused)
    owners = collections.Counter(id(p) for g in optimizer.param_groups for p in g["params"])
    assert set(owners) == {id(p) for p in trainable.values()} and set(owners.values()) == {1}
    assert id(frozen) not in owners
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.5 for p in g["params"]}
    plain = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.5, 0.0}
    assert decayed == {id(p) for n, p in trainable.items() if decays_by_name(n)}
    assert plain == {id(p) for n, p in trainable.items() if not decays_by_name(n)}
    assert any("LayerNorm" in n for n, p in trainable.items() if id(p) in plain)
    assert all(g["lr"] == 0.1 for g in optimizer.param_groups)

    before = {n: p.detach().clone() for n, p in named.items()}
    for p in trainable.values():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for n, p in named.items():
        factor = 1 - 0.1 * 0.5 if n in trainable and decays_by_name(n) else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, rtol=1e-6, atol=0, msg=n)


def test_lr_scale_of_each_objective_group_reaches_both_of_its_decay_groups(compose, tiny_tokenizer):
    """An Objective's param_groups() with lr_scale and names (the protocol fine-tuning uses): each spec becomes
    a decay and a no-decay group at optimizer.lr x its lr_scale (default 1) under its name, each parameter
    once; a zero-gradient step decays each group's matrices by 1 - lr x lr_scale x weight_decay.

    Catches: lr_scale ignored or applied to only one of the two groups, names lost, a spec's parameters
    leaking into another spec's groups."""
    from ssltrain.optim import build_optimizer

    cfg, objective = mlm_objective(compose, tiny_tokenizer)
    encoder = [p for n, p in objective.named_parameters() if ".encoder." in n]
    rest = [p for n, p in objective.named_parameters() if ".encoder." not in n]
    objective.param_groups = lambda: [{"params": encoder, "lr_scale": 0.25, "name": "encoder"},
                                      {"params": rest, "name": "rest"}]
    optimizer = build_optimizer(objective, cfg.optimizer)
    by_name = collections.defaultdict(list)
    for group in optimizer.param_groups:
        by_name[group["name"]].append(group)
    assert sorted(by_name) == ["encoder", "rest"]
    scales = {"encoder": 0.25, "rest": 1.0}
    for name, groups in by_name.items():
        assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.5]
        assert all(g["lr"] == pytest.approx(0.1 * scales[name]) for g in groups)
    members = {name: {id(p) for g in groups for p in g["params"]} for name, groups in by_name.items()}
    assert members == {"encoder": {id(p) for p in encoder}, "rest": {id(p) for p in rest}}

    matrices = [(p, p.detach().clone(), 0.25 if any(p is q for q in encoder) else 1.0) for p in objective.parameters()
                if p.ndim >= 2]
    for p in objective.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p, old, scale in matrices:
        torch.testing.assert_close(p.detach(), old * (1 - 0.1 * scale * 0.5), rtol=1e-6, atol=0)
