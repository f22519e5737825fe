"""hardware.compile: torch.compile of each objective's blocks and heads, in place (ssltrain/compile.py).
Compiled training follows the eager loss curve, and checkpoints and the export keep plain names."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, config_error, read_metrics

from ssltrain.compile import compile_objective


def compiled(module: torch.nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]


def build(compose, overrides: list[str]):
    from ssltrain.data.corpus import load_corpus
    from ssltrain.data.tokenizer import build_tokenizer
    from ssltrain.objectives import objective_class

    cfg = compose([*TINY, *overrides])
    corpus, key = load_corpus(cfg.data, cfg.cache_dir)
    tokenizer = build_tokenizer(cfg, corpus, key)
    params = {k: v for k, v in cfg.objective.items() if k != "_target_"}
    return cfg, objective_class(cfg.objective)(model_cfg=cfg.model, tokenizer=tokenizer, hardware=cfg.hardware,
                                               **params)


@pytest.mark.parametrize("overrides,expected", [
    # every transformer layer, plus the embeddings and the MLM head (the loss code stays eager)
    (["objective=mlm"], ["model.bert.embeddings", "model.bert.encoder.layer.0", "model.bert.encoder.layer.1",
                         "model.cls"]),
    # GPT-2: the blocks, each embedding, the final norm and the (tied) LM head
    (["objective=ar", "model=gpt2-tiny"], ["model.transformer.wte", "model.transformer.wpe",
                                           "model.transformer.h.0", "model.transformer.h.1",
                                           "model.transformer.ln_f", "model.lm_head"]),
])
def test_compile_marks_each_block_and_head_in_place_and_keeps_parameter_names(compose, overrides, expected):
    cfg, objective = build(compose, overrides)
    names = list(objective.state_dict())
    params = dict(objective.named_parameters())
    assert compile_objective(objective, cfg.hardware) == 0 and compiled(objective) == []  # cpu default: off
    cfg.hardware.compile = True
    assert compile_objective(objective, cfg.hardware) == len(expected)
    assert compiled(objective) == expected
    assert list(objective.state_dict()) == names and not any("_orig_mod" in n for n in names)
    assert all(p is params[n] for n, p in objective.named_parameters())  # the optimizer's tensors, unchanged


def test_bad_compile_and_timeout_settings_fail_in_one_line(compose):
    assert "hardware.compile_mode='fast' is invalid; expected one of default, reduce-overhead" in config_error(
        compose, ["hardware.compile_mode=fast"])
    assert "hardware.compile='yes' is invalid; expected true or false" in config_error(
        compose, ["hardware.compile=yes"])
    assert "hardware.compile_loss='on' is invalid; expected true or false" in config_error(
        compose, ["hardware.compile_loss=on"])
    assert "hardware.collective_timeout_s=0 is invalid; expected an integer >= 1" in config_error(
        compose, ["hardware.collective_timeout_s=0"])


@pytest.mark.slow
def test_compiled_training_follows_the_eager_curve_and_saves_plain_names(compose, tmp_path):
    """Same 6 steps eager and compiled. Inductor draws dropout masks from its own generator;
    fallback_random makes it use eager's, so the two curves agree to float round-off."""
    from safetensors import safe_open
    from transformers import AutoModelForMaskedLM

    from ssltrain.train import train

    overrides = [*TINY, "trainer.max_steps=6", "trainer.log_every=1", "trainer.checkpoint_every=6",
                 "trainer.eval_batches=1"]
    runs = {}
    for flag in ("false", "true"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        # (config.patch, not monkeypatch: undoing a monkeypatch deletes the option from inductor's config)
        with torch._inductor.config.patch(fallback_random=True):
            result = train(compose([*overrides, f"hardware.compile={flag}"]), tmp_path / flag)
        runs[flag] = {"losses": [r["loss"] for r in read_metrics(result["run_dir"]) if r["kind"] == "train"],
                      "eval": result["eval"]["loss"], "dir": result["run_dir"],
                      "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}
    eager, fast = runs["false"], runs["true"]
    assert len(eager["losses"]) == 6 and eager["graphs"] == 0 and fast["graphs"] > 0  # the switch compiles
    assert fast["losses"] == pytest.approx(eager["losses"], rel=1e-4)
    assert fast["eval"] == pytest.approx(eager["eval"], rel=1e-4)
    assert eager["losses"][-1] < eager["losses"][0]  # it trains: the comparison is not of two flat lines

    def keys(path):
        with safe_open(str(path), framework="pt") as handle:
            return sorted(handle.keys())

    from ssltrain.checkpoint import checkpoint_name

    for file in ("final/model.safetensors", f"checkpoints/{checkpoint_name(6)}/model.safetensors"):
        assert keys(fast["dir"] / file) == keys(eager["dir"] / file)
        assert not any("_orig_mod" in k for k in keys(fast["dir"] / file))
    model, info = AutoModelForMaskedLM.from_pretrained(fast["dir"] / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.slow
def test_compiled_loss_follows_the_eager_curve(compose, tmp_path):
    """hardware.compile_loss (on by default) compiles the token cross-entropy only: no randomness in
    it, so the compiled run's training and held-out losses equal the eager run's to round-off."""
    from ssltrain.train import train

    overrides = [*TINY, "objective=ar", "model=gpt2-tiny", "trainer.max_steps=6", "trainer.log_every=1",
                 "trainer.eval_batches=2"]
    runs = {}
    for flag in ("false", "true"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        result = train(compose([*overrides, f"hardware.compile_loss={flag}"]), tmp_path / flag)
        runs[flag] = ([r["loss"] for r in read_metrics(result["run_dir"]) if r["kind"] == "train"],
                      result["eval"]["loss"], torch._dynamo.utils.counters["stats"]["unique_graphs"])
    (eager, eager_eval, eager_graphs), (fast, fast_eval, fast_graphs) = runs["false"], runs["true"]
    assert len(eager) == 6 and eager_graphs == 0 and fast_graphs > 0  # the switch compiles
    assert fast == pytest.approx(eager, rel=1e-5) and fast_eval == pytest.approx(eager_eval, rel=1e-5)


def test_compile_loss_without_a_cpp_compiler_warns_and_runs_eagerly(compose, monkeypatch):
    from ssltrain import compile as compile_module
    from ssltrain.objectives import functional

    cfg = compose([*TINY, "hardware.compile_loss=true"])
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.warns(UserWarning, match="compile_loss=true needs a C.. compiler on CPU"):
        compile_objective(torch.nn.Linear(2, 2), cfg.hardware)
    assert functional._compiled_loss is None
