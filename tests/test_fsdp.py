"""Scale-out groups: hardware=fsdp (torch FSDP through Accelerate) and hardware=deepspeed.

The FSDP runs are real 2-process CPU runs (gloo) of the CLI, started as users start them
(`accelerate launch --multi_gpu --num_processes 2 -m ssltrain hardware=fsdp hardware.device=cpu
...`). The reference is an independent DDP run (hardware=cpu) of the same 2 processes: same
initial weights, same batches and masks per rank, so FSDP must give the same losses and, after
gathering its shards, the same weights (up to float rounding in the sharded grad-norm). DeepSpeed
is not installed here: its group must compose, and a run must stop at once with one line naming
`pip install deepspeed`.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import CONF, TINY, config_error, read_metrics
from test_multiprocess import child_env, free_port, launcher, run_group

from ssltrain.config import validate_config

FSDP_CPU = ["hardware=fsdp", "hardware.device=cpu", "hardware.mixed_precision=no", "hardware.num_workers=0",
            "hardware.pin_memory=false"]
# Two processes x 12 sequences; checkpoints at step 3 and 6 of 6. Evaluation over the whole held-out
# split (28 blocks): one global batch of 24, then 4 for rank 0 and a filler for rank 1, which under
# FSDP must still run its forward (parameters are gathered in each).
TWO_PROCESS_RUN = [*TINY, "trainer.batch_size=24", "trainer.micro_batch_size=12", "trainer.max_steps=6",
                   "trainer.log_every=1", "trainer.checkpoint_every=3", "trainer.eval_batches=null"]
WEIGHT_TOLERANCE = 1e-5  # FSDP vs DDP after 6 steps: measured max |difference| 1.2e-7
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def commented(path: Path) -> None:
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "-")) and ":" in stripped and not stripped.endswith(":"):
            assert "#" in line, f"{path.name}: uncommented key: {line!r}"


# ---------------------------------------------------------------- groups compose and validate

def test_fsdp_group_keeps_the_gpu_speed_keys_and_validates_on_cpu(compose):
    gpu = compose(["hardware=gpu"]).hardware
    cfg = compose([*FSDP_CPU, "trainer.batch_size=32", "trainer.micro_batch_size=16"])
    hw = cfg.hardware
    assert set(gpu) < set(hw) and set(hw) - set(gpu) == {"fsdp"}
    assert compose(["hardware=fsdp"]).hardware.mixed_precision == "bf16"  # the gpu group's default
    assert hw.fsdp.version == 2 and hw.fsdp.sharding_strategy == "full_shard"
    assert hw.fsdp.auto_wrap == "transformer_layer" and hw.fsdp.state_dict_type == "full"
    validate_config(cfg, world_size=2)
    commented(CONF / "hardware" / "fsdp.yaml")
    commented(CONF / "hardware" / "deepspeed.yaml")


@pytest.mark.parametrize("overrides,needle", [
    (["hardware.fsdp.version=3"], "hardware.fsdp.version=3 is invalid; expected one of 1, 2"),
    (["hardware.fsdp.state_dict_type=local"], "expected one of full, sharded"),
    (["hardware.fsdp.sharding_strategy=hybrid_shard"], "needs hardware.fsdp.version=1; FSDP2 supports full_shard"),
    (["hardware.fsdp.wrap_classes=BertLayer"], "wrap_classes='BertLayer' is invalid; expected a list"),
    (["hardware.fsdp.cpu_offload=true"], "with hardware.device=cpu they are there already"),
    (["hardware.mixed_precision=fp16"], "mixed_precision=fp16 with hardware.fsdp.version=2 is not supported"),
])
def test_bad_fsdp_settings_are_one_line_errors(compose, overrides, needle):
    assert needle in config_error(compose, [*FSDP_CPU, *overrides])


@pytest.mark.skipif(torch.cuda.is_available(), reason="names a missing GPU")
def test_fsdp_without_a_gpu_says_how_to_shard_over_cpu_processes(compose):
    message = config_error(compose, ["hardware=fsdp"])
    assert message.startswith("hardware=fsdp shards over CUDA GPUs but none is visible")
    assert "add hardware.device=cpu hardware.mixed_precision=no" in message


def test_fsdp_plugin_follows_the_hardware_keys(compose):
    from torch.distributed.fsdp import ShardingStrategy, StateDictType

    from ssltrain.sharding import fsdp_plugin

    v2 = fsdp_plugin(compose(["hardware=fsdp", "hardware.fsdp.sharding_strategy=shard_grad_op",
                              "hardware.fsdp.state_dict_type=sharded"]).hardware)
    assert v2.fsdp_version == 2 and v2.reshard_after_forward is False
    assert v2.state_dict_type == StateDictType.SHARDED_STATE_DICT
    policy = v2.mixed_precision_policy  # bf16 compute, fp32 gradient reduction
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)

    v1 = fsdp_plugin(compose([*FSDP_CPU, "hardware.fsdp.version=1", "hardware.fsdp.auto_wrap=none"]).hardware)
    assert v1.fsdp_version == 1 and v1.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert v1.auto_wrap_policy is None and v1.mixed_precision_policy is None
    assert v1.state_dict_type == StateDictType.FULL_STATE_DICT and v1.use_orig_params


def test_auto_wrap_shards_each_transformer_block_but_keeps_tied_embeddings_with_their_head(compose):
    """BERT declares BertEmbeddings and BertLayer as its blocks, but the word embeddings are tied to
    the MLM decoder: wrapping BertEmbeddings alone would put one tied weight in two FSDP units."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    from ssltrain.sharding import fsdp_plugin, layer_class_names

    class Objective(torch.nn.Module):  # an objective owns its transformers model as a submodule
        def __init__(self, model):
            super().__init__()
            self.model = model

    bert = Objective(BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=32)))
    assert bert.model.bert.embeddings.word_embeddings.weight is bert.model.cls.predictions.decoder.weight
    assert layer_class_names(bert) == ["BertLayer"]
    gpt2 = Objective(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2)))
    assert layer_class_names(gpt2) == ["GPT2Block"]
    plugin = fsdp_plugin(compose(FSDP_CPU).hardware)
    plugin.set_auto_wrap_policy(bert)  # what Accelerate calls when it prepares the objective
    assert plugin.transformer_cls_names_to_wrap == ["BertLayer"]
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {type(bert.model.bert.encoder.layer[0])}


def test_deepspeed_group_composes_as_zero2_bf16(compose):
    from ssltrain.sharding import deepspeed_plugin

    hw = compose(["hardware=deepspeed"]).hardware
    assert hw.deepspeed.zero_stage == 2 and hw.mixed_precision == "bf16" and hw.device == "cuda"
    plugin = deepspeed_plugin(hw, micro_batch_size=16, grad_clip=1.0)  # needs accelerate, not deepspeed
    config = plugin.deepspeed_config
    assert config["zero_optimization"]["stage"] == 2 and config["gradient_clipping"] == 1.0
    assert config["train_micro_batch_size_per_gpu"] == 16 and config["gradient_accumulation_steps"] == 1


@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed")
def test_deepspeed_missing_is_one_line_naming_pip_install(compose, run_cli, tmp_path):
    assert "pip install deepspeed" in config_error(compose, ["hardware=deepspeed"])
    run = tmp_path / "run"
    proc = run_cli("hardware=deepspeed", f"hydra.run.dir={run}", timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssltrain: error: hardware=deepspeed needs the deepspeed package")
    assert "pip install deepspeed" in lines[0] and "Traceback" not in proc.stderr
    assert not run.exists()


def test_deepspeed_refuses_gradient_accumulation(compose, monkeypatch):
    """The loop accumulates with no_sync, DeepSpeed's engine steps at every backward: one micro-batch
    per process and step, or a one-line error (checked as if deepspeed were installed)."""
    import ssltrain.sharding as sharding

    real = importlib.util.find_spec
    monkeypatch.setattr(sharding.importlib.util, "find_spec", lambda name, *a: name == "deepspeed" or real(name, *a))
    message = config_error(compose, ["hardware=deepspeed", "trainer.batch_size=64", "trainer.micro_batch_size=16"])
    assert "trainer.batch_size=64 must equal trainer.micro_batch_size=16 x 1 process(es) = 16" in message


# ---------------------------------------------------------------- 2-process CPU runs

def start(run: Path, cache_dir: Path, tmp_path: Path, *overrides: str):
    """`accelerate launch --multi_gpu --num_processes 2 -m ssltrain ...` into run: the finished process."""
    cwd = tmp_path / f"cwd-{run.name}"
    cwd.mkdir()
    argv = [*launcher("accelerate", free_port()), "-m", "ssltrain", *TWO_PROCESS_RUN, *overrides,
            f"hydra.run.dir={run}"]
    return run_group(argv, cwd, child_env(tmp_path, cache_dir))


def launch(run: Path, cache_dir: Path, tmp_path: Path, *overrides: str) -> list[dict]:
    """A 2-process run that must succeed: its records."""
    proc = start(run, cache_dir, tmp_path, *overrides)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return read_metrics(run)


def train_losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def weights(path: Path) -> dict[str, torch.Tensor]:
    from ssltrain.checkpoint import load_weights

    return load_weights(path)


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


STEP3, STEP6 = "checkpoints/step-00000003", "checkpoints/step-00000006"

def assert_resumed_exactly(first: Path, first_records: list[dict], resumed: Path, resumed_records: list[dict]) -> None:
    """A run resumed from its step-3 checkpoint repeats steps 4-6 of the first run: the same losses and
    bit-identical exported weights."""
    after, expected = train_losses(resumed_records), train_losses(first_records)
    assert sorted(after) == [4, 5, 6] and all(after[s] == expected[s] for s in after)
    a = weights(first / "final" / "model.safetensors")
    b = weights(resumed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def fsdp_and_ddp(cache_dir, tmp_path_factory):
    """One FSDP2 run and one DDP run of the same 6 steps on 2 CPU processes."""
    tmp = tmp_path_factory.mktemp("fsdp")
    fsdp = launch(tmp / "fsdp", cache_dir, tmp, *FSDP_CPU)
    ddp = launch(tmp / "ddp", cache_dir, tmp, "hardware=cpu")
    return tmp, fsdp, ddp


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_exports_the_gathered_model(fsdp_and_ddp):
    from transformers import AutoModelForMaskedLM

    tmp, fsdp, ddp = fsdp_and_ddp
    run = tmp / "fsdp"
    start = next(r for r in fsdp if r["kind"] == "start")
    end = next(r for r in fsdp if r["kind"] == "end")
    assert start["world_size"] == 2 and start["params"] == next(r for r in ddp if r["kind"] == "start")["params"]
    assert trainer_state(run / STEP3)["state_format"] == "fsdp-full"  # the processes ran as FSDP, not DDP
    assert trainer_state(tmp / "ddp" / STEP3)["state_format"] == "replicated"

    losses, reference = train_losses(fsdp), train_losses(ddp)
    assert sorted(losses) == list(range(1, 7)) and all(math.isfinite(v) for v in losses.values())
    assert all(math.isclose(losses[s], reference[s], rel_tol=1e-5) for s in reference), (losses, reference)
    assert losses[6] < losses[1]
    evals = [[r["loss"] for r in records if r["kind"] == "eval"] for records in (fsdp, ddp)]
    assert start["validation_examples"] == 28 and len(evals[0]) == 2  # step 0 and the end
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(*evals)), evals

    exported = weights(run / "final" / "model.safetensors")
    ddp_final = weights(tmp / "ddp" / "final" / "model.safetensors")
    ddp_step3 = weights(tmp / "ddp" / STEP3 / "model.safetensors")
    assert sorted(exported) == sorted(ddp_final), "the export holds the same tensors (tied ones once)"
    gap = max((exported[k] - ddp_final[k]).abs().max().item() for k in ddp_final)
    moved = max((ddp_final[k] - ddp_step3[f"model.{k}"]).abs().max().item() for k in ddp_final)
    assert gap < WEIGHT_TOLERANCE < moved / 100, (gap, moved)  # the tolerance is far below 3 steps' change
    # ...and it is what rank 0 gathered for the step-6 checkpoint, tensor for tensor.
    gathered = weights(run / STEP6 / "model.safetensors")
    assert all(torch.equal(exported[k], gathered[f"model.{k}"]) for k in exported)
    assert len(end["param_checksums"]) == 1  # one sharded model, not replicas
    model = AutoModelForMaskedLM.from_pretrained(run / "final")
    assert all(torch.equal(model.state_dict()[k], exported[k]) for k in exported)


@pytest.mark.slow
def test_fsdp_resume_from_a_checkpoint_is_exact(fsdp_and_ddp, cache_dir):
    tmp, fsdp, _ = fsdp_and_ddp
    resumed = launch(tmp / "resumed", cache_dir, tmp, *FSDP_CPU, f"trainer.resume={tmp / 'fsdp' / STEP3}")
    assert next(r for r in resumed if r["kind"] == "resume")["step"] == 3
    assert_resumed_exactly(tmp / "fsdp", fsdp, tmp / "resumed", resumed)


@pytest.mark.slow
def test_fsdp_checkpoint_resumed_under_ddp_is_a_one_line_error(fsdp_and_ddp, cache_dir):
    """FSDP's optimizer state is keyed by parameter name, DDP's by index: no silent mix-up."""
    tmp, _, _ = fsdp_and_ddp
    proc = start(tmp / "wrong", cache_dir, tmp, "hardware=cpu", f"trainer.resume={tmp / 'fsdp' / STEP3}")
    assert proc.returncode != 0
    message = f"ssltrain: error: checkpoint {tmp / 'fsdp' / STEP3} holds fsdp-full state but this run writes " \
              f"replicated state"
    assert proc.stderr.count(message) == 2, proc.stderr[-4000:]  # one line from each rank
    assert 'ssltrain/checkpoint.py", line' not in proc.stderr  # no traceback from the ranks


@pytest.mark.slow
def test_fsdp1_sharded_checkpoints_hold_one_shard_per_rank_and_resume_exactly(cache_dir, tmp_path):
    """FSDP1 with hardware.fsdp.state_dict_type=sharded: no gathered weights in the checkpoint, each
    rank writes about half of the state (torch.distributed.checkpoint), and resuming from it gives
    the uninterrupted run's losses and exported weights exactly."""
    settings = [*FSDP_CPU, "hardware.fsdp.version=1", "hardware.fsdp.state_dict_type=sharded"]
    first = launch(tmp_path / "first", cache_dir, tmp_path, *settings)
    checkpoint = tmp_path / "first" / STEP3
    assert trainer_state(checkpoint)["state_format"] == "fsdp-sharded"
    assert not (checkpoint / "model.safetensors").exists() and not (checkpoint / "optimizer.pt").exists()
    shards = sorted((checkpoint / "sharded").glob("*.distcp"))
    sizes = [p.stat().st_size for p in shards]
    assert len(shards) == 2 and all(0.3 < s / sum(sizes) < 0.7 for s in sizes), sizes

    resumed = launch(tmp_path / "resumed", cache_dir, tmp_path, *settings, f"trainer.resume={checkpoint}")
    assert_resumed_exactly(tmp_path / "first", first, tmp_path / "resumed", resumed)


@pytest.mark.slow
def test_fsdp2_bf16_mixed_precision_trains_and_keeps_fp32_master_weights(fsdp_and_ddp, cache_dir):
    """hardware=fsdp's own precision (bf16 compute, fp32 gradient reduction) on 2 CPU processes, the
    path a GPU run takes: the losses follow the fp32 DDP run within bf16 rounding, and the export and
    checkpoint hold the fp32 master weights, gathered."""
    tmp, _, ddp = fsdp_and_ddp
    settings = [s for s in FSDP_CPU if not s.startswith("hardware.mixed_precision")]
    records = launch(tmp / "bf16", cache_dir, tmp, *settings, "hardware.fused_optimizer=false")
    losses, reference = train_losses(records), train_losses(ddp)
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1]
    assert all(math.isclose(losses[s], reference[s], rel_tol=2e-2) for s in reference), (losses, reference)
    assert any(losses[s] != reference[s] for s in reference), "bf16 compute rounds differently from fp32"
    exported = weights(tmp / "bf16" / "final" / "model.safetensors")
    gathered = weights(tmp / "bf16" / STEP6 / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in exported.values())
    assert all(torch.equal(exported[k], gathered[f"model.{k}"]) for k in exported)
