"""Each reach into an upstream library's private API, through the one function that makes it, against
the installed release. When a new accelerate, torch, transformers, datasets or Hydra renames or
changes what is reached for, the test of that function fails and names it, instead of a run failing
somewhere inside the loop. Written against accelerate 1.16, torch 2.13, transformers 5.24,
datasets 5.2 and hydra-core 1.3.8 (the CUDA machine runs torch 2.11)."""

from __future__ import annotations

import datasets
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from transformers import BertConfig

from ssltrain import cli, engine
from ssltrain.data.cache import dataset_fingerprint, hub_load_errors
from ssltrain.models import attn_implementation, auto_model_types
from ssltrain.objectives.functional import mark_rows_dynamic


def test_reset_accelerator_state_lets_the_next_accelerator_take_new_settings():
    """accelerate: AcceleratorState._reset_state. Without it a second Accelerator in one process (a
    sweep's next job) keeps the first one's mixed precision."""
    Accelerator(cpu=True, mixed_precision="no")
    engine.reset_accelerator_state()
    assert AcceleratorState._shared_state == {}, "AcceleratorState._reset_state no longer clears the shared state"
    assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"
    engine.reset_accelerator_state()
    assert Accelerator(cpu=True, mixed_precision="no").mixed_precision == "no"


def test_the_state_fsdp_on_cpu_rewrites_is_where_it_was():
    """accelerate: PartialState._shared_state and the state's distributed_type / device entries, which
    engine.attach_fsdp_on_cpu sets so that prepare() shards on CPU (tests/test_fsdp.py runs it for real)."""
    accelerator = Accelerator(cpu=True)
    assert isinstance(PartialState._shared_state, dict)
    assert {"distributed_type", "device"} <= set(PartialState._shared_state)
    assert "distributed_type" in accelerator.state.__dict__
    assert DistributedType.FSDP.value == "FSDP"
    engine.reset_accelerator_state()


def _fused_adamw_step(flag: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    weight.grad = torch.full((4,), 0.5)
    engine.set_found_inf(optimizer, torch.tensor(flag))
    optimizer.step()
    return weight.detach(), optimizer.state[weight].get("exp_avg", torch.zeros(4)), optimizer.state[weight]


def test_found_inf_makes_a_fused_adamw_skip_its_step_on_the_device():
    """torch: the fused optimizers' found_inf attribute. 1.0 must leave weights and moments as they were
    (the device-side skip of a non-finite step); 0.0 must step as usual."""
    skipped, moment, _ = _fused_adamw_step(1.0)
    assert torch.equal(skipped, torch.ones(4)), "fused AdamW ignored found_inf=1: non-finite steps would apply"
    assert torch.equal(moment, torch.zeros(4))
    stepped, moment, _ = _fused_adamw_step(0.0)
    assert (stepped < 1).all() and (moment != 0).all(), "fused AdamW with found_inf=0 did not step"


def test_auto_model_types_lists_the_heads_objectives_use():
    """transformers: modeling_auto.*_MAPPING_NAMES. Classification and NSP pick their models from these."""
    assert {"bert", "electra", "gpt2"} <= auto_model_types("sequence-classification")
    assert {"vit", "resnet"} <= auto_model_types("image-classification")
    assert "bert" in auto_model_types("next-sentence-prediction")
    assert "gpt2" not in auto_model_types("next-sentence-prediction")


def test_attn_implementation_reads_the_resolved_kernel():
    """transformers: PretrainedConfig._attn_implementation, which sequence packing reads to build its mask."""
    from transformers import AutoModel

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    for kernel in ("eager", "sdpa"):
        model = AutoModel.from_config(config, attn_implementation=kernel)
        assert attn_implementation(model.config) == kernel


def test_dataset_fingerprint_follows_content_and_transforms():
    """datasets: Dataset._fingerprint, the key that cached example sets are derived from."""
    a = datasets.Dataset.from_dict({"x": [1, 2, 3]})
    b = datasets.Dataset.from_dict({"x": [1, 2, 4]})
    assert isinstance(dataset_fingerprint(a), str) and dataset_fingerprint(a)
    assert dataset_fingerprint(a) != dataset_fingerprint(b)
    assert dataset_fingerprint(a.map(lambda r: {"x": r["x"] + 1})) != dataset_fingerprint(a)


def test_a_missing_dataset_raises_one_of_the_errors_that_are_the_users():
    """datasets: what load_dataset raises for a data set that is not there (offline here). Catches a
    release that raises outside hub_load_errors, which would then surface as a traceback."""
    try:
        datasets.load_dataset("ssltrain-tests/certainly-not-a-dataset-7f3a")
    except hub_load_errors():
        pass


def test_mark_rows_dynamic_marks_dimension_zero():
    """torch: torch._dynamo.maybe_mark_dynamic, which keeps the compiled loss from recompiling per
    count of masked positions."""
    logits, labels = torch.zeros(5, 7), torch.zeros(5, dtype=torch.long)
    mark_rows_dynamic(logits, labels)
    assert 0 in logits._dynamo_weak_dynamic_indices and 0 in labels._dynamo_weak_dynamic_indices


def test_hydra_sweep_splitting_and_argument_parser():
    """hydra: BasicSweeper.split_arguments and hydra._internal.utils.get_args_parser, with which the CLI
    checks every job of a sweep before Hydra starts any."""
    assert cli.job_overrides(["objective=mlm,ar", "seed=0,1"]) == [
        ["objective=mlm", "seed=0"], ["objective=mlm", "seed=1"], ["objective=ar", "seed=0"],
        ["objective=ar", "seed=1"]]
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(["-m", "seed=0,1"])
    assert args.multirun and args.overrides == ["seed=0,1"]
