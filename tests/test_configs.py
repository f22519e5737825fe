"""Every shipped config composes and passes validation; objective/model fits are enforced."""

from __future__ import annotations

import pytest
from conftest import CONF
from omegaconf import OmegaConf

from ssltrain.config import TOP_LEVEL_SPECS, check_specs, validate_config
from ssltrain.errors import ConfigError

GROUPS = ["model", "objective", "data", "hardware"]
REQUIRED = {"text_files": [f"data.paths={CONF / 'train.yaml'}", "data.format=text"],
            "hf_dataset": ["data.name=wikitext"], "image_folder": [f"data.path={CONF}"],
            "hf_image_dataset": ["data.name=cifar10"]}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def fitting_overrides(group: str, option: str) -> list[str]:
    """Overrides that make `group=option` a valid combination with the other defaults."""
    extra = list(REQUIRED.get(option, []))
    config = OmegaConf.load(CONF / group / f"{option}.yaml")
    if (group == "data" and config.modality == "image") or (group == "model" and not config.tokenizer_type):
        extra.append("objective=simclr")  # image data and image models need an image objective
    attention = OmegaConf.load(CONF / "model" / f"{option}.yaml").attention if group == "model" else None
    if attention == "causal":
        extra.append("objective=ar")
    if attention == "encoder-decoder":
        extra.append("objective=span_corruption")
    return extra


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_composes_and_every_key_is_commented(compose, group, option):
    cfg = compose([f"{group}={option}", *fitting_overrides(group, option)])
    assert cfg[group] is not None
    if group == "hardware" and cfg.hardware.device == "cuda":
        # Validated without a GPU below (test_gpu_hardware_groups_*); the comment rule still applies.
        check_specs(cfg, TOP_LEVEL_SPECS)
    else:
        validate_config(cfg)
    # House rule: every YAML key carries a comment saying what it does.
    for line in (CONF / group / f"{option}.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "-")) and ":" in stripped and not stripped.endswith(":"):
            assert "#" in line, f"{group}/{option}.yaml: uncommented key: {line!r}"


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_composes_and_every_key_is_commented(compose, name):
    """Named recipes (`ssltrain +experiment=<name>`, `# @package _global_`) validate as shipped."""
    validate_config(compose([f"+experiment={name}"]))
    for line in (CONF / "experiment" / f"{name}.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "-")) and ":" in stripped and not stripped.endswith(":"):
            assert "#" in line, f"experiment/{name}.yaml: uncommented key: {line!r}"


def test_default_is_tiny_bert_mlm_on_embedded_docs_on_cpu(compose):
    cfg = compose()
    assert (cfg.model.name, cfg.data.source, cfg.hardware.device) == ("bert-tiny", "docs", "cpu")
    assert cfg.objective._target_.endswith("MaskedLM")
    validate_config(cfg)


def test_base_sizes_match_the_papers(compose):
    bert = compose(["model=bert-base"]).model.config
    assert (bert.hidden_size, bert.num_hidden_layers, bert.num_attention_heads, bert.intermediate_size) == (
        768, 12, 12, 3072)
    gpt2 = compose(["model=gpt2", "objective=ar"]).model.config
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.n_head, gpt2.n_positions) == (768, 12, 12, 1024)


def test_gpt2_has_124m_parameters_with_its_50k_vocab(compose):
    from transformers import AutoModelForCausalLM

    from ssltrain.models import build_model_config

    config = build_model_config(compose(["model=gpt2", "objective=ar"]).model, vocab_size=50257)
    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 124


@pytest.mark.parametrize("overrides,needle", [
    (["objective=ar", "model=bert-base"], "gpt2"),
    (["objective=mlm", "model=gpt2-tiny"], "bert-tiny"),
])
def test_mismatched_objective_and_model_names_what_fits(compose, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate_config(compose(overrides))


def test_a_config_built_before_the_tokenizer_claims_no_special_ids_outside_the_vocabulary(compose):
    """Validation builds the model config without a tokenizer: GPT-2's default bos/eos 50256 would lie
    outside a 2,000-token vocabulary (transformers warns); the tokenizer's ids fill them in later."""
    from ssltrain.models import build_model_config

    config = build_model_config(compose(["model=gpt2-tiny", "objective=ar"]).model, vocab_size=2000)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (None, None, None)


# ---------------------------------------------------------------- GPU hardware groups, checked without a GPU

GPU_GROUPS = ("gpu", "multi_gpu", "fsdp", "deepspeed")
# What hardware=gpu promises (conf/hardware/gpu.yaml) and the three scale-out groups inherit from it.
GPU_SETTINGS = {"device": "cuda", "mixed_precision": "bf16", "fused_optimizer": True, "tf32": True, "pin_memory": True}
# The shipped FSDP defaults (conf/hardware/fsdp.yaml), as sharding.py reads them.
FSDP_BLOCK = {"version": 2, "sharding_strategy": "full_shard", "auto_wrap": "transformer_layer", "wrap_classes": None,
              "cpu_offload": False, "activation_checkpointing": False, "reduce_dtype": "fp32",
              "state_dict_type": "full"}


def leaf_keys(node, prefix: str) -> set[str]:
    """Dotted names of the non-mapping values under a config node."""
    keys = set()
    for key, value in node.items():
        name = f"{prefix}.{key}"
        keys |= leaf_keys(value, name) if OmegaConf.is_dict(value) else {name}
    return keys


def test_gpu_hardware_groups_hold_what_they_promise(compose):
    """Catches: gpu.yaml losing cuda, bf16, fused AdamW, TF32 or workers; multi_gpu/fsdp/deepspeed no longer
    inheriting gpu's settings (a defaults list dropped or reordered, so cpu values win); a scale-out group
    without its engine block, or its block changed (FSDP version, strategy, wrapping, offload, reduce dtype,
    state dicts; DeepSpeed's ZeRO stage); and a key no spec validates (a typo such as `zero_stages` or
    `sharding_strategies` would otherwise compose and be ignored)."""
    from ssltrain.sharding import engine

    gpu = OmegaConf.to_container(compose(["hardware=gpu"]).hardware)
    assert {k: gpu[k] for k in GPU_SETTINGS} == GPU_SETTINGS
    assert gpu["num_workers"] > 0
    validated = {k for k in TOP_LEVEL_SPECS if k.startswith("hardware.")} | {"hardware.fsdp.wrap_classes"}
    for name in GPU_GROUPS:
        cfg = compose([f"hardware={name}"])
        hw = OmegaConf.to_container(cfg.hardware)
        assert {k: v for k, v in hw.items() if k not in ("fsdp", "deepspeed")} == gpu, f"hardware={name}"
        assert engine(cfg.hardware) == {"fsdp": "fsdp", "deepspeed": "deepspeed"}.get(name), name
        assert leaf_keys(cfg.hardware, "hardware") <= validated, f"hardware={name}: keys no spec checks"
        check_specs(cfg, TOP_LEVEL_SPECS)  # every value within its spec; needs no GPU
    assert OmegaConf.to_container(compose(["hardware=fsdp"]).hardware.fsdp) == FSDP_BLOCK
    assert OmegaConf.to_container(compose(["hardware=deepspeed"]).hardware.deepspeed) == {"zero_stage": 2}


@pytest.mark.parametrize("name", GPU_GROUPS)
def test_gpu_hardware_groups_validate_with_the_train_config(compose, monkeypatch, name):
    """The whole of validate_config (specs, micro-batch, the scale-out checks, objective and model fits) for
    each GPU group composed with the default train config, for 2 processes, with a GPU made visible (and
    the deepspeed package, not installed here): catches a group that composes but cannot start (e.g. an FSDP2
    strategy only FSDP1 has, fp16 with FSDP2, a DeepSpeed group that needs accumulation). Without the fakes,
    on a machine without CUDA, each fails at once with one line that says what to use instead."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        fixes = {"gpu": "use hardware=cpu", "multi_gpu": "use hardware=cpu", "fsdp": "hardware.device=cpu",
                 "deepspeed": "pip install deepspeed"}
        with pytest.raises(ConfigError, match=fixes[name]) as err:
            validate_config(compose([f"hardware={name}"]), world_size=2)
        assert "\n" not in str(err.value)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda module, *a, **k: object() if module == "deepspeed" else find_spec(module, *a, **k))
    cfg = compose([f"hardware={name}"])
    validate_config(cfg, world_size=2)
    assert cfg.trainer.micro_batch_size == 16  # batch 32 over 2 processes, no accumulation needed
    if name == "deepspeed":  # DeepSpeed's engine steps at every backward: accumulation is refused
        with pytest.raises(ConfigError, match="one micro-batch per process and step"):
            validate_config(compose(["hardware=deepspeed", "trainer.micro_batch_size=8"]), world_size=2)


def test_fsdp_group_validates_on_cpu_as_its_comment_says(compose):
    """conf/hardware/fsdp.yaml: `hardware.device=cpu hardware.mixed_precision=no` shards over CPU processes
    (gloo); catches a check that ties FSDP to CUDA."""
    validate_config(compose(["hardware=fsdp", "hardware.device=cpu", "hardware.mixed_precision=no"]), world_size=2)


def test_scale_out_groups_give_the_plugins_they_declare(compose):
    """The Accelerate plugins sharding.py builds from the shipped groups (dataclasses: built on CPU). Catches
    sharding.py reading a group wrong: the FSDP version, resharding after forward (full_shard), bf16
    parameters with fp32 gradient reduction, full state dicts, transformer-layer wrapping, no offload or
    activation checkpointing; DeepSpeed's ZeRO stage, one micro-batch per step, clipping by the engine."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from ssltrain.sharding import deepspeed_plugin, fsdp_plugin, plugin_kwargs

    fsdp = fsdp_plugin(compose(["hardware=fsdp"]).hardware)
    assert fsdp.fsdp_version == 2 and fsdp.reshard_after_forward is True
    policy = fsdp.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fsdp.state_dict_type.name == "FULL_STATE_DICT"
    assert fsdp.auto_wrap_policy is transformer_auto_wrap_policy and not fsdp.transformer_cls_names_to_wrap
    assert not isinstance(fsdp.cpu_offload, CPUOffloadPolicy) and not fsdp.activation_checkpointing
    assert plugin_kwargs(compose(["hardware=gpu"]).hardware) == {}
    assert plugin_kwargs(compose(["hardware=multi_gpu"]).hardware) == {}
    ds = deepspeed_plugin(compose(["hardware=deepspeed"]).hardware, micro_batch_size=16, grad_clip=1.0)
    config = ds.deepspeed_config
    assert config["zero_optimization"]["stage"] == 2
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["gradient_clipping"]) == (16, 1, 1.0)
