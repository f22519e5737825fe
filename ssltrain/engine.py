"""The engine under the loop: HF Accelerate's set-up for the hardware group (one process, DDP, FSDP,
DeepSpeed), the collectives the loop needs, and the optimizer step that skips a non-finite update on
the device. Every reach into accelerate's or torch's private API is here, each behind one named
function; tests/test_upstream.py fails loudly when an upstream release changes what it reaches for.
"""

from __future__ import annotations

from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, broadcast_object_list, gather_object
from omegaconf import DictConfig

from ssltrain.errors import UserError
from ssltrain.launch import world_size
from ssltrain.sharding import plugin_kwargs


def build_accelerator(hw: DictConfig, micro_batch_size: int = 1, grad_clip: float = 0.0) -> Accelerator:
    """An Accelerator for the hardware group. On CPU, cpu=True is what makes launcher-started
    processes join one gloo group instead of each believing it is alone. hardware=fsdp / deepspeed
    add Accelerate's plugin (ssltrain/sharding.py); DeepSpeed takes the micro-batch and clipping."""
    reset_accelerator_state()
    if hw.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    launched = world_size()
    plugins = plugin_kwargs(hw, micro_batch_size, grad_clip)
    # How long a collective waits for the other processes before it fails: a process that hangs
    # (rather than dies) stops the run after this long, with the checkpoint to resume from.
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=hw.get("collective_timeout_s", 1800)))
    try:
        accelerator = Accelerator(cpu=hw.device == "cpu", mixed_precision=hw.mixed_precision,
                                  step_scheduler_with_optimizer=False, kwargs_handlers=[timeout], **plugins)
    except (ValueError, torch.distributed.DistError) as err:
        # e.g. WORLD_SIZE set by hand without MASTER_ADDR, or the rendezvous timing out with no peer.
        raise UserError(
            f"could not join a process group of {launched} processes (WORLD_SIZE={launched}): {err}; "
            f"start every rank with torchrun or `accelerate launch`, or unset WORLD_SIZE for one process"
        ) from None
    if accelerator.num_processes != launched:
        raise UserError(
            f"the launcher started {launched} processes (WORLD_SIZE) but this one joined a group of "
            f"{accelerator.num_processes}: each rank would train alone; launch with torchrun or "
            f"`accelerate launch --multi_gpu` and hardware.device matching the machine"
        )
    if "fsdp_plugin" in plugins and hw.device == "cpu":
        attach_fsdp_on_cpu(accelerator, plugins["fsdp_plugin"])
    return accelerator


def reset_accelerator_state() -> None:
    """Forget the precision and plugin settings of an Accelerator built earlier in this process, so
    that the next one takes the hardware group's (a sweep runs several jobs in one process). The
    process group and device (PartialState) stay. Private: AcceleratorState._reset_state."""
    AcceleratorState._reset_state()


def attach_fsdp_on_cpu(accelerator: Accelerator, plugin) -> None:
    """Accelerate applies the FSDP plugin only to accelerator-device process groups (AcceleratorState
    keeps MULTI_CPU and drops the plugin when cpu=True), but torch's FSDP1 and FSDP2 both run on CPU
    over gloo. Mark the state as FSDP the way AcceleratorState does on a GPU, so prepare() shards, and
    multi-process FSDP runs on CPU. One process: nothing to shard. Private: the state's shared dicts."""
    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.fsdp_plugin = plugin
        # AcceleratorState copies PartialState's settings whenever it is constructed again: set both.
        # FSDP1 checks its device_id against torch.cpu.current_device(), "cpu" (MULTI_CPU gives "cpu:0").
        for shared in (state.__dict__, PartialState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
            shared["device"] = torch.device("cpu")


def broadcast(value, accelerator: Accelerator):
    """Rank 0's picklable value on every rank (one process: the value itself)."""
    if accelerator.num_processes == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]


def gather(value, accelerator: Accelerator) -> list:
    """Every rank's picklable value, in rank order, on every rank (collective)."""
    return gather_object([value]) if accelerator.num_processes > 1 else [value]


def optimizer_skipping_on_device(accelerator: Accelerator, optimizer):
    """The torch optimizer under Accelerate's wrapper when it can skip a non-finite step on the device
    (a fused AdamW on one process or under DDP; not with fp16's gradient scaler, which sets found_inf
    itself, nor under FSDP or DeepSpeed, which own the step), else None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    plain = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    fused = isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and inner.defaults.get("fused")
    return inner if plain and fused and accelerator.scaler is None else None


class OptimizerStep:
    """optimizer.step() for a gradient whose norm may not be finite; returns whether the update was
    applied. The host syncs with the device once, on that finiteness:

    - fp16 (a gradient scaler): the scaler skips overflowing steps and lowers its scale itself;
    - a fused AdamW (optimizer_skipping_on_device): the update is queued before the host knows the
      answer, with the kernel's found_inf flag (the mechanism of torch's fp16 GradScaler) set from the
      norm on the device, so weights, moments and step counts stay when it is 1; the host then waits
      for the flag only (copied to pinned memory behind a CUDA event), not for the update;
    - otherwise the host checks the norm and steps only when it is finite (DeepSpeed gives a float).
    All three give the results of stepping only when finite."""

    def __init__(self, accelerator: Accelerator, optimizer):
        self.accelerator, self.optimizer = accelerator, optimizer
        self.on_device = optimizer_skipping_on_device(accelerator, optimizer)
        self.flag_copied = None
        if self.on_device is not None and accelerator.device.type == "cuda":
            self.nonfinite_host = torch.zeros((), pin_memory=True)
            self.flag_copied = torch.cuda.Event()

    def __call__(self, grad_norm) -> bool:
        if self.accelerator.scaler is not None:
            self.optimizer.step()
            return not self.optimizer.step_was_skipped
        if self.on_device is None:
            finite = bool(torch.isfinite(torch.as_tensor(grad_norm)))
            if finite:
                self.optimizer.step()
            return finite
        nonfinite = (~torch.isfinite(grad_norm)).to(torch.float32)  # 0-d, on the device
        if self.flag_copied is None:  # CPU: nothing runs ahead
            set_found_inf(self.on_device, nonfinite)
            self.optimizer.step()
            return not bool(nonfinite)
        self.nonfinite_host.copy_(nonfinite, non_blocking=True)
        self.flag_copied.record()
        set_found_inf(self.on_device, nonfinite)
        self.optimizer.step()
        self.flag_copied.synchronize()  # the one sync, ahead of the update's kernels
        return not bool(self.nonfinite_host)


def set_found_inf(optimizer: torch.optim.Optimizer, flag: torch.Tensor) -> None:
    """Tell a fused Adam/AdamW whether to skip its next step (flag 1.0) on the device. Private: the
    `found_inf` attribute that torch's fused optimizers read in step() (torch.amp.GradScaler sets it)."""
    optimizer.found_inf = flag
