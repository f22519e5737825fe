"""Scale-out engines from the hardware group: FSDP (torch's fully sharded data parallel) and
DeepSpeed ZeRO, both through Accelerate's plugins. A hardware group with an `fsdp:` node
(conf/hardware/fsdp.yaml) shards; one with a `deepspeed:` node (conf/hardware/deepspeed.yaml)
hands the model to DeepSpeed; neither: plain DDP as before.

Checkpoints and the export under FSDP are in checkpoint.py (gathered or per-rank state dicts).
"""

from __future__ import annotations

import importlib.util

import torch
from omegaconf import DictConfig, OmegaConf

from ssltrain.errors import ConfigError

# conf names -> torch's ShardingStrategy names (FSDP1); FSDP2 expresses the first two as
# reshard_after_forward True / False and has no replicated variants on a 1-D mesh.
SHARDING = {"full_shard": "FULL_SHARD", "shard_grad_op": "SHARD_GRAD_OP", "hybrid_shard": "HYBRID_SHARD",
            "no_shard": "NO_SHARD"}
FSDP2_SHARDING = {"full_shard": True, "shard_grad_op": False}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
INSTALL_DEEPSPEED = "pip install deepspeed"


def engine(hw: DictConfig) -> str | None:
    """'fsdp', 'deepspeed' or None (DDP / one process) for a hardware group."""
    if OmegaConf.select(hw, "fsdp", default=None) is not None:
        return "fsdp"
    if OmegaConf.select(hw, "deepspeed", default=None) is not None:
        return "deepspeed"
    return None


def check_scale_out(cfg: DictConfig, world_size: int) -> None:
    """What the hardware specs cannot say alone; called by validate_config before the device check,
    so a missing engine is named before a missing GPU."""
    hw = cfg.hardware
    has_fsdp = OmegaConf.select(hw, "fsdp", default=None) is not None
    if has_fsdp and OmegaConf.select(hw, "deepspeed", default=None) is not None:
        raise ConfigError("hardware.fsdp and hardware.deepspeed are both set; pick one engine: hardware=fsdp or "
                          "hardware=deepspeed")
    kind = engine(hw)
    if kind == "fsdp":
        _check_fsdp(hw)
    elif kind == "deepspeed":
        _check_deepspeed(hw)
        t = cfg.trainer
        per_step = t.micro_batch_size * world_size
        if t.batch_size != per_step:
            # The loop accumulates with no_sync; DeepSpeed's engine steps at every backward.
            raise ConfigError(f"hardware=deepspeed takes one micro-batch per process and step: trainer.batch_size="
                              f"{t.batch_size} must equal trainer.micro_batch_size={t.micro_batch_size} x "
                              f"{world_size} process(es) = {per_step}")


def _check_fsdp(hw: DictConfig) -> None:
    fsdp = hw.fsdp
    if hw.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("hardware=fsdp shards over CUDA GPUs but none is visible; to shard over CPU processes "
                          "(gloo) add hardware.device=cpu hardware.mixed_precision=no")
    if fsdp.cpu_offload and hw.device == "cpu":
        raise ConfigError("hardware.fsdp.cpu_offload=true moves GPU shards to host memory; with "
                          "hardware.device=cpu they are there already: set it to false")
    if fsdp.version == 2 and fsdp.sharding_strategy not in FSDP2_SHARDING:
        raise ConfigError(f"hardware.fsdp.sharding_strategy={fsdp.sharding_strategy!r} needs hardware.fsdp.version=1; "
                          f"FSDP2 supports {', '.join(FSDP2_SHARDING)}")
    classes = fsdp.wrap_classes
    if classes is not None and not (OmegaConf.is_list(classes) and classes
                                    and all(isinstance(c, str) and c for c in classes)):
        shown = OmegaConf.to_container(classes) if OmegaConf.is_config(classes) else classes
        raise ConfigError(f"hardware.fsdp.wrap_classes={shown!r} is invalid; expected a list of module class names "
                          f"(e.g. [BertLayer]) or null")
    if hw.mixed_precision == "fp16" and fsdp.version == 2:
        raise ConfigError("hardware.mixed_precision=fp16 with hardware.fsdp.version=2 is not supported (no sharded "
                          "gradient scaler); use bf16")


def _check_deepspeed(hw: DictConfig) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"hardware=deepspeed needs the deepspeed package, which is not installed: "
                          f"{INSTALL_DEEPSPEED} (on a machine with CUDA), or use hardware=fsdp")
    if hw.device != "cuda":
        raise ConfigError(f"hardware=deepspeed needs hardware.device=cuda (got {hw.device!r}); on CPU use "
                          f"hardware=fsdp hardware.device=cpu")


# ---------------------------------------------------------------- plugins

def layer_class_names(model: torch.nn.Module) -> list[str]:
    """The model's repeated blocks, the units FSDP shards one at a time: the `_no_split_modules` its
    transformers models declare (BertLayer, GPT2Block, T5Block), else the class of every ModuleList
    whose members share one class. A class holding a parameter tied to one outside it (BERT's word
    embeddings = its MLM decoder) is left to the enclosing unit: a tied pair must shard together."""
    declared = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or [])}
    names = {type(module).__name__ for module in model.modules()} & declared
    if not names:
        for module in model.modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
                names.add(type(module[0]).__name__)
    holders: dict[int, set[str]] = {}  # parameter id -> every dotted name it is reachable under
    for name, param in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(param), set()).add(name)
    for prefix, module in model.named_modules():
        if type(module).__name__ in names and any(
                not n.startswith(prefix + ".") for p in module.parameters() for n in holders[id(p)]):
            names.discard(type(module).__name__)
    return sorted(names)


def fsdp_plugin(hw: DictConfig):
    """Accelerate's FSDP plugin for hardware.fsdp. The layer classes to wrap are found on the model
    itself when Accelerate prepares it (wrap_classes: null)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    class LayerWrapPlugin(FullyShardedDataParallelPlugin):
        def set_auto_wrap_policy(self, model):
            # Objectives are not transformers models: Accelerate's default (the model's own
            # _no_split_modules) finds nothing on them, so name the layers from the submodules.
            from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

            if self.auto_wrap_policy is transformer_auto_wrap_policy and not self.transformer_cls_names_to_wrap:
                self.transformer_cls_names_to_wrap = layer_class_names(model)
            super().set_auto_wrap_policy(model)

    fsdp = hw.fsdp
    version = int(fsdp.version)
    kwargs = {}
    if hw.mixed_precision == "bf16":
        reduce_dtype = DTYPES[fsdp.reduce_dtype]
        kwargs["mixed_precision_policy"] = {"param_dtype": torch.bfloat16, "reduce_dtype": reduce_dtype,
                                            "buffer_dtype" if version == 1 else "output_dtype": torch.bfloat16}
    if version == 1:
        kwargs.update(sharding_strategy=SHARDING[fsdp.sharding_strategy], use_orig_params=True,
                      sync_module_states=False, forward_prefetch=False, backward_prefetch="BACKWARD_PRE")
    else:
        kwargs["reshard_after_forward"] = FSDP2_SHARDING[fsdp.sharding_strategy]
    wrap = fsdp.auto_wrap == "transformer_layer"
    classes = list(fsdp.wrap_classes) if wrap and fsdp.wrap_classes is not None else None
    return LayerWrapPlugin(
        fsdp_version=version,
        auto_wrap_policy="transformer_based_wrap" if wrap else "no_wrap",
        transformer_cls_names_to_wrap=classes,
        cpu_offload=bool(fsdp.cpu_offload),
        state_dict_type="FULL_STATE_DICT" if fsdp.state_dict_type == "full" else "SHARDED_STATE_DICT",
        activation_checkpointing=bool(fsdp.activation_checkpointing),
        **kwargs,
    )


def deepspeed_plugin(hw: DictConfig, micro_batch_size: int, grad_clip: float):
    """Accelerate's DeepSpeed plugin for hardware.deepspeed: the ZeRO stage, gradient clipping done by
    the engine (the loop's clip call then only reads the norm)."""
    from accelerate.utils import DeepSpeedPlugin

    ds = hw.deepspeed
    plugin = DeepSpeedPlugin(zero_stage=int(ds.zero_stage), gradient_accumulation_steps=1,
                             gradient_clipping=grad_clip if grad_clip > 0 else None)
    # Accelerate reads the micro-batch from prepared DataLoaders; the loop loads its own batches.
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    return plugin


def plugin_kwargs(hw: DictConfig, micro_batch_size: int = 1, grad_clip: float = 0.0) -> dict:
    """Keyword arguments for Accelerator(...): fsdp_plugin / deepspeed_plugin, or none."""
    kind = engine(hw)
    if kind == "fsdp":
        return {"fsdp_plugin": fsdp_plugin(hw)}
    if kind == "deepspeed":
        _check_deepspeed(hw)
        return {"deepspeed_plugin": deepspeed_plugin(hw, micro_batch_size, grad_clip)}
    return {}
