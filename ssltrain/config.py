"""Validate a composed config before any data, model or file is touched.

Every check raises ConfigError with one line that names the key, the bad value and what
would be valid, so a mistake costs seconds, not a run.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from ssltrain.data.corpus import CORPUS_SOURCES
from ssltrain.data.streaming import check_streaming_source
from ssltrain.errors import ConfigError
from ssltrain.launch import world_size as launched_world_size
from ssltrain.models import build_model_config, max_positions
from ssltrain.objectives import objective_class
from ssltrain.paths import shipped_options
from ssltrain.sharding import check_scale_out, engine
from ssltrain.spec import NON_NEGATIVE, POSITIVE, Spec, select

TOP_LEVEL_SPECS: dict[str, Spec] = {
    "seed": NON_NEGATIVE,
    "cache_dir": Spec(str),
    "tokenizer.path": Spec(str, nullable=True),
    "tokenizer.type": Spec(choices=("wordpiece", "bpe"), nullable=True),  # null with image models (no tokenizer)
    "tokenizer.vocab_size": Spec(int, low=300, high=1_000_000),
    "tokenizer.lowercase": Spec(bool),
    "trainer.max_steps": POSITIVE,
    "trainer.batch_size": POSITIVE,
    # trainer.micro_batch_size: auto or a positive integer, checked by resolve_micro_batch_size
    "trainer.seq_len": Spec(int, low=8),
    "trainer.log_every": POSITIVE,
    "trainer.eval_every": NON_NEGATIVE,
    "trainer.eval_batches": Spec(int, low=1, nullable=True),
    "trainer.checkpoint_every": NON_NEGATIVE,
    "trainer.keep_checkpoints": POSITIVE,
    "trainer.resume": Spec(str, nullable=True),
    "trainer.export": Spec(bool),
    "trainer.max_nonfinite_in_row": POSITIVE,
    "optimizer.lr": Spec(float, low=0.0, high=1.0, low_open=True),
    "optimizer.weight_decay": Spec(float, low=0.0, high=1.0),
    "optimizer.eps": Spec(float, low=0.0, high=1.0, low_open=True),
    "optimizer.grad_clip": Spec(float, low=0.0),
    "optimizer.warmup_ratio": Spec(float, low=0.0, high=1.0),
    "hardware.device": Spec(choices=("cpu", "cuda")),
    "hardware.mixed_precision": Spec(choices=("no", "bf16", "fp16")),
    "hardware.attn_implementation": Spec(choices=("eager", "sdpa", "flash_attention_2")),
    "hardware.num_workers": NON_NEGATIVE,
    "hardware.pin_memory": Spec(bool),
    "hardware.fused_optimizer": Spec(bool),
    "hardware.tf32": Spec(bool),
    "hardware.compile": Spec(bool),  # torch.compile of the objective's blocks and heads (ssltrain/compile.py)
    "hardware.compile_loss": Spec(bool),  # torch.compile of the token cross-entropy (objectives/functional.py)
    "hardware.collective_timeout_s": POSITIVE,  # multi-process: how long a collective waits for the others
    "hardware.compile_mode": Spec(choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")),
    # hardware=fsdp / hardware=deepspeed (ssltrain/sharding.py); wrap_classes is checked there
    "hardware.fsdp.version": Spec(choices=(1, 2)),
    "hardware.fsdp.sharding_strategy": Spec(choices=("full_shard", "shard_grad_op", "hybrid_shard", "no_shard")),
    "hardware.fsdp.auto_wrap": Spec(choices=("transformer_layer", "none")),
    "hardware.fsdp.cpu_offload": Spec(bool),
    "hardware.fsdp.activation_checkpointing": Spec(bool),
    "hardware.fsdp.reduce_dtype": Spec(choices=("fp32", "bf16")),
    "hardware.fsdp.state_dict_type": Spec(choices=("full", "sharded")),
    "hardware.deepspeed.zero_stage": Spec(choices=(1, 2)),
    "model.name": Spec(str),
    "model.model_type": Spec(str),
    # bidirectional: encoders (BERT); causal: decoders (GPT-2); encoder-decoder: T5; none: CNNs
    "model.attention": Spec(choices=("bidirectional", "causal", "encoder-decoder", "none")),
    "model.tokenizer_type": Spec(choices=("wordpiece", "bpe"), nullable=True),  # null for image models
    "model.pretrained": Spec(str, nullable=True),
    "model.max_micro_batch_size": POSITIVE,  # the largest micro-batch trainer.micro_batch_size=auto picks
    "data.source": Spec(str),
    "data.modality": Spec(choices=("text", "image")),
    "data.validation_fraction": Spec(float, low=0.0, high=0.5, low_open=True),
    "data.min_doc_chars": NON_NEGATIVE,
    "data.max_docs": Spec(int, low=1, nullable=True),
    "data.num_proc": Spec(int, low=1, nullable=True),
    "data.label_fraction": Spec(float, low=0.0, high=1.0, low_open=True),  # labelled groups: share of train labels
    "data.streaming": Spec(bool),  # text_files / hf_dataset: read with datasets streaming (ssltrain/data/streaming.py)
    "data.shuffle_buffer": POSITIVE,
    "data.validation_docs": POSITIVE,
    "data.tokenizer_docs": POSITIVE,
}


# Keys only some data groups have (unlabelled text: no label_fraction; images: no min_doc_chars): checked when present.
OPTIONAL_KEYS = frozenset({"data.min_doc_chars", "data.max_docs", "data.num_proc", "data.label_fraction",
                           "data.streaming", "data.shuffle_buffer", "data.validation_docs", "data.tokenizer_docs",
                           "model.max_micro_batch_size"})
# Keys of the scale-out hardware groups (hardware=fsdp / deepspeed): checked when present.
OPTIONAL_KEYS |= {k for k in TOP_LEVEL_SPECS if k.startswith(("hardware.fsdp.", "hardware.deepspeed."))}
_ABSENT = object()


def check_specs(cfg: DictConfig, specs: dict[str, Spec], prefix: str = "") -> None:
    for key, spec in specs.items():
        if prefix + key in OPTIONAL_KEYS and OmegaConf.select(cfg, prefix + key, default=_ABSENT) is _ABSENT:
            continue
        spec.check(prefix + key, select(cfg, prefix + key))


def world_size_from_env() -> int:
    """Processes the launcher (torchrun, accelerate launch, mpirun, srun, submitit) started; 1 when run directly."""
    return launched_world_size()


AUTO = "auto"
DEFAULT_MAX_MICRO_BATCH = 32  # for a model group without max_micro_batch_size


def auto_micro_batch_size(batch_size: int, world_size: int, cap: int, accumulate: bool = True) -> int:
    """The micro-batch for trainer.micro_batch_size=auto: the largest divisor of the per-process batch
    (batch_size / world_size) not above cap, so that gradient accumulation makes up the rest. Without
    accumulation (DeepSpeed's engine steps at every backward) the whole per-process batch."""
    if batch_size % world_size:
        raise ConfigError(f"trainer.batch_size={batch_size} does not split evenly over {world_size} processes; "
                          f"pick a multiple of {world_size}")
    per_process = batch_size // world_size
    if not accumulate:
        return per_process
    return max(d for d in range(1, min(per_process, cap) + 1) if per_process % d == 0)


def resolve_micro_batch_size(cfg: DictConfig, world_size: int) -> int:
    """Replace trainer.micro_batch_size=auto by its value for world_size processes, in place, and check
    that the micro-batch x processes divides trainer.batch_size. Returns the micro-batch."""
    t = cfg.trainer
    micro = select(cfg, "trainer.micro_batch_size")
    if micro == AUTO:
        cap = OmegaConf.select(cfg, "model.max_micro_batch_size", default=DEFAULT_MAX_MICRO_BATCH)
        micro = auto_micro_batch_size(t.batch_size, world_size, cap, accumulate=engine(cfg.hardware) != "deepspeed")
        t.micro_batch_size = micro
        return micro
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
        raise ConfigError(f"trainer.micro_batch_size={micro!r} is invalid; expected auto or an integer >= 1")
    per_step = micro * world_size
    if t.batch_size % per_step:
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} is not divisible by trainer.micro_batch_size="
            f"{micro} x {world_size} process(es) = {per_step}; pick a multiple of {per_step}, or "
            f"trainer.micro_batch_size=auto"
        )
    return micro


def validate_config(cfg: DictConfig, world_size: int | None = None) -> None:
    """Fail fast on every mistake that can be seen without reading data. Writes nothing to disk;
    resolves trainer.micro_batch_size=auto in cfg for world_size processes (default: the launcher's)."""
    check_specs(cfg, TOP_LEVEL_SPECS)
    world_size = world_size or world_size_from_env()
    t = cfg.trainer
    resolve_micro_batch_size(cfg, world_size)
    _check_float32(cfg)
    betas = select(cfg, "optimizer.betas")
    if not (len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"optimizer.betas={list(betas)!r} is invalid; expected two numbers in [0, 1)")
    _check_scheduler(cfg.optimizer.scheduler)
    if cfg.data.source not in CORPUS_SOURCES:
        raise ConfigError(
            f"data.source={cfg.data.source!r} is unknown; valid: {', '.join(sorted(CORPUS_SOURCES))}"
        )
    CORPUS_SOURCES[cfg.data.source].check_config(cfg.data)
    check_scale_out(cfg, world_size)  # before the device check: a missing engine is named before a missing GPU
    _check_hardware(cfg.hardware)
    _check_paths(cfg)

    cls = objective_class(cfg.objective)
    cls.check_compatible(cfg)
    if OmegaConf.select(cfg, "data.streaming", default=False):
        _check_streaming(cfg, cls)
    if cfg.data.modality == "text" and cfg.tokenizer.type is None and not cfg.tokenizer.path:  # null: image models only
        raise ConfigError("tokenizer.type is null; expected wordpiece or bpe (or a tokenizer.path)")
    cls.check_params(cfg.objective)
    cls.check_launch(cfg, world_size)
    # The model config is cheap to build and catches unknown model types and bad shapes.
    model_config = build_model_config(cfg.model, vocab_size=cfg.tokenizer.vocab_size)
    positions = max_positions(model_config)
    needed = cls.positions_needed(t.seq_len)
    if positions is not None and needed > positions:
        raise ConfigError(
            f"trainer.seq_len={t.seq_len} needs {needed} positions but model={cfg.model.name} has "
            f"{positions}; use trainer.seq_len<={positions - (needed - t.seq_len)} or a larger "
            f"model.config position size"
        )


FLOAT32_TINY = 2.0 ** -126  # the smallest normal float32: AdamW's moments and updates are float32


def _check_float32(cfg: DictConfig) -> None:
    """Optimizer values that are positive as typed but 0 (or denormal) in float32, where the optimizer uses
    them: eps=1e-300 is 0 there, and AdamW divides by sqrt(v) + eps = 0 for a parameter with no gradient yet."""
    for key in ("optimizer.eps", "optimizer.lr"):
        value = select(cfg, key)
        if 0 < value < FLOAT32_TINY:
            raise ConfigError(f"{key}={value!r} is below float32's smallest normal number ({FLOAT32_TINY:.3g}), the "
                              f"dtype the optimizer computes in, where it is 0 or loses precision; use a value >= "
                              f"{FLOAT32_TINY:.3g} (AdamW's usual eps: 1e-8 to 1e-6)")


def _check_streaming(cfg: DictConfig, cls) -> None:
    check_streaming_source(cfg.data)
    if not cls.streams:
        streamable = [name for name, option in shipped_options("objective").items()
                      if objective_class(option).streams]
        raise ConfigError(f"objective {cls.__name__} builds whole examples from random access to documents and "
                          f"cannot stream; data.streaming=true works with objective={', '.join(streamable)}")


def _check_scheduler(name: str) -> None:
    from transformers import SchedulerType

    valid = [s.value for s in SchedulerType]
    if name not in valid:
        raise ConfigError(f"optimizer.scheduler={name!r} is unknown; valid: {', '.join(valid)}")


def _check_hardware(hw: DictConfig) -> None:
    import torch

    if hw.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("hardware.device=cuda but no CUDA GPU is visible; use hardware=cpu")
    if hw.mixed_precision == "fp16" and hw.device == "cpu":
        raise ConfigError("hardware.mixed_precision=fp16 needs a GPU; on CPU use 'no' or 'bf16'")


def _check_paths(cfg: DictConfig) -> None:
    for key in ("model.pretrained", "tokenizer.path"):
        path = select(cfg, key)
        if path and _looks_local(path) and not os.path.exists(os.path.expanduser(path)):
            raise ConfigError(f"{key}={path!r} does not exist")
    pretrained = cfg.model.pretrained
    if pretrained and os.path.isdir(pretrained) and not os.path.isfile(os.path.join(pretrained, "config.json")):
        raise ConfigError(f"model.pretrained={pretrained!r} is not a HF checkpoint (no config.json in it)")
    resume = cfg.trainer.resume
    if resume not in (None, "auto") and not os.path.isdir(os.path.expanduser(resume)):
        raise ConfigError(f"trainer.resume={resume!r} is not a checkpoint directory; valid: auto, null or a path")


def _looks_local(path: str) -> bool:
    """Hub names look like 'org/name'; anything with a leading ./ ~ / or more slashes is a path."""
    return path.startswith((".", "/", "~")) or path.count("/") != 1 or os.path.exists(path)
