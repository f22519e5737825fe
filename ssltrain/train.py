"""The one training loop. It knows objectives only through the Objective protocol:
batch -> objective(batch) -> ObjectiveOutput(loss, metrics) -> backward -> clip -> step."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ssltrain.checkpoint import (
    NonFiniteState,
    checkpoint_name,
    checkpoint_problem,
    checkpoint_to_resume,
    clean_name,
    export_pretrained,
    full_state_dict,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    state_format,
)
from ssltrain.compile import compile_objective
from ssltrain.config import resolve_micro_batch_size, validate_config, world_size_from_env
from ssltrain.data.corpus import load_corpus
from ssltrain.data.images import image_processor
from ssltrain.data.loader import DataPosition, build_train_data, derived_seed
from ssltrain.data.streaming import is_streaming, prepare_streaming
from ssltrain.data.tokenizer import build_tokenizer
from ssltrain.errors import ConfigError, DataError, UserError
from ssltrain.evaluation.heldout import accumulate, evaluate, reduce_metrics
from ssltrain.faults import NonFiniteGuard, RunStopped, StopNow, StopSignals, peer_lost, peer_lost_stop
from ssltrain.objectives import build_objective, objective_class
from ssltrain.optim import build_optimizer, build_scheduler
from ssltrain.runlock import RunLock
from ssltrain.tracking import RunTracker

EXIT_DIVERGED = 3  # exit code when too many non-finite steps stop a run


def build_accelerator(hw: DictConfig, micro_batch_size: int = 1, grad_clip: float = 0.0):
    """An Accelerator for the hardware group. On CPU, cpu=True is what makes launcher-started
    processes join one gloo group instead of each believing it is alone. hardware=fsdp / deepspeed
    add Accelerate's plugin (ssltrain/sharding.py); DeepSpeed takes the micro-batch and clipping."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    from ssltrain.sharding import attach_fsdp_on_cpu, plugin_kwargs

    with contextlib.suppress(AttributeError):  # fresh precision settings when called twice in one process
        AcceleratorState._reset_state()
    if hw.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    launched = world_size_from_env()
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


def resolve_resume(resume: str | None, checkpoint_root: Path) -> Path | None:
    """The checkpoint trainer.resume names, verified against its manifest (None: start fresh)."""
    if resume is None:
        return None
    if resume == "auto":
        return checkpoint_to_resume(checkpoint_root)
    path = Path(resume).expanduser()
    problem = checkpoint_problem(path)
    if problem:
        raise UserError(f"trainer.resume={resume!r} is not a complete checkpoint: {problem}")
    return path


def resume_point(resume: str | None, checkpoint_root: Path, accelerator) -> Path | None:
    """resolve_resume on the main process (which alone renames, hashes and warns), its answer on every
    rank; a UserError there is raised on every rank, so that none waits for the others."""
    answer: list = [None, None]
    if accelerator.is_main_process:
        try:
            found = resolve_resume(resume, checkpoint_root)
            answer = [None if found is None else str(found), None]
        except UserError as err:
            answer = [None, str(err)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        answer = broadcast_object_list(answer, from_process=0)
    if answer[1] is not None:
        raise UserError(answer[1])
    return None if answer[0] is None else Path(answer[0])


def prepare_data(cfg: DictConfig, accelerator, objective_cls):
    """Corpus -> tokenizer (text objectives) -> the objective's training examples. The main
    process builds the caches first; the others then read them."""
    if is_streaming(cfg.data):
        return prepare_streaming(cfg, accelerator)
    with accelerator.main_process_first():
        corpus, corpus_key = load_corpus(cfg.data, cfg.cache_dir)
        tokenizer = None
        if cfg.data.modality == "text":  # the objective's check_compatible has accepted this modality
            tokenizer = build_tokenizer(cfg, corpus, corpus_key)
            tokenizer.model_max_length = cfg.trainer.seq_len
        examples = objective_cls.build_examples(corpus, tokenizer, cfg, corpus_key)
    # A split smaller than one global micro-batch (2% of a small task's labels) is repeated to fill
    # one (ssltrain/data/loader.py); only an empty one cannot train.
    if not len(examples["train"]):
        raise DataError(f"data={cfg.data.source} gives no training examples; add data"
                        f"{' or lower trainer.seq_len' if tokenizer is not None else ''}")
    if len(examples["validation"]) < accelerator.num_processes:
        raise DataError(f"the validation split gives {len(examples['validation'])} examples, fewer than one per "
                        f"process; raise data.validation_fraction or add data")
    return tokenizer, examples


def parameter_checksum(module: torch.nn.Module, state_dict: dict | None = None) -> float:
    """Order-sensitive float64 fingerprint of all parameters: equal on ranks that stayed in sync.
    With state_dict (a sharded model's gathered weights): the same sum over its tensors."""
    total = torch.zeros((), dtype=torch.float64)
    for i, (name, p) in enumerate(module.named_parameters()):
        tensor = p if state_dict is None else state_dict[clean_name(name)]
        total += (i + 1) * tensor.detach().double().sum().cpu()
    return total.item()


def replica_checksums(accelerator, objective) -> list[float]:
    """parameter_checksum of every rank's replica (collective). Under FSDP the ranks hold shards of
    one model, not replicas: one checksum of the gathered weights, computed on rank 0."""
    from accelerate.utils import broadcast_object_list, gather_object

    module = accelerator.unwrap_model(objective)
    if not state_format(accelerator).startswith("fsdp"):
        return gather_object([parameter_checksum(module)])
    gathered = full_state_dict(accelerator, objective)
    value = parameter_checksum(module, gathered) if accelerator.is_main_process else None
    return broadcast_object_list([value], from_process=0)


@dataclass
class Training:
    """What a run trains with, built as `ssltrain` builds it (scripts/bench.py builds the same)."""

    accelerator: Any
    objective: torch.nn.Module  # prepared: DDP / FSDP wrapped where the hardware group says so
    optimizer: Any
    scheduler: Any
    tokenizer: Any  # None for image data
    examples: Any  # DatasetDict(train, validation) of the objective's examples
    n_params: int
    accum: int  # micro-batches per optimizer step on each process


def build_training(cfg: DictConfig) -> Training:
    """Accelerator, data, objective (compiled per hardware.compile), optimizer and scheduler for cfg.
    Initial weights are the same on every rank; afterwards each rank has its own dropout stream."""
    resolve_micro_batch_size(cfg, world_size_from_env())  # trainer.micro_batch_size=auto -> a number
    accelerator = build_accelerator(cfg.hardware, cfg.trainer.micro_batch_size, cfg.optimizer.grad_clip)
    t = cfg.trainer
    accum = t.batch_size // (t.micro_batch_size * accelerator.num_processes)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    tokenizer, examples = prepare_data(cfg, accelerator, objective_class(cfg.objective))
    objective = build_objective(cfg, tokenizer, examples)
    compile_objective(objective, cfg.hardware)  # hardware.compile: in place, parameter names unchanged
    optimizer = build_optimizer(objective, cfg.optimizer, fused=cfg.hardware.fused_optimizer)
    scheduler = build_scheduler(optimizer, cfg.optimizer, t.max_steps)
    n_params = sum(p.numel() for p in objective.parameters())  # before prepare: FSDP leaves each rank a shard
    objective, optimizer = accelerator.prepare(objective, optimizer)
    torch.manual_seed(derived_seed(cfg.seed, accelerator.process_index))  # per-rank dropout streams
    return Training(accelerator, objective, optimizer, scheduler, tokenizer, examples, n_params, accum)


@dataclass
class StepResult:
    finite: bool  # False: the loss or gradient was NaN/inf and the update was skipped
    grad_norm: torch.Tensor | float  # before clipping
    lr: float  # the learning rate the step used


class TrainStep:
    """One optimizer step of the loop: `accum` micro-batches forward and backward (gradients
    synchronised on the last), clipping, and the optimizer and scheduler steps, skipped when the
    gradient norm is not finite. scripts/bench.py times this same object.

    Metrics accumulate as device tensors in `window` ({name: [sum, count]}, emptied by the caller)
    and input tokens in `tokens` (a device scalar), so that a step syncs with the device only once:
    on the finiteness of the gradient norm."""

    def __init__(self, training: Training, batches: Iterator[dict[str, torch.Tensor]], *, max_steps: int,
                 grad_clip: float):
        self.training, self.batches, self.max_steps = training, batches, max_steps
        self.max_norm = grad_clip if grad_clip > 0 else float("inf")
        self.hooks = training.accelerator.unwrap_model(training.objective)  # on_step: the Objective's own
        self.window: dict[str, list[torch.Tensor]] = {}
        device = training.accelerator.device
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.skipping_optimizer = optimizer_skipping_on_device(training.accelerator, training.optimizer)
        self.flag_copied = None  # on CUDA: recorded after the non-finite flag's copy to nonfinite_host
        if self.skipping_optimizer is not None and device.type == "cuda":
            self.nonfinite_host = torch.zeros((), pin_memory=True)
            self.flag_copied = torch.cuda.Event()

    def __call__(self, step: int) -> StepResult:
        tr = self.training
        accelerator, objective, optimizer = tr.accelerator, tr.objective, tr.optimizer
        self.hooks.on_step(step, self.max_steps)
        for micro in range(tr.accum):
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in next(self.batches).items()}
            sync = accelerator.no_sync(objective) if micro < tr.accum - 1 else contextlib.nullcontext()
            with sync:
                out = objective(batch)
                accelerator.backward(out.loss / tr.accum)
            accumulate(self.window, out.metrics)
            self.tokens += out.num_tokens.detach()
        grad_norm = accelerator.clip_grad_norm_(objective.parameters(), self.max_norm)
        lr = tr.scheduler.get_last_lr()[0]
        if accelerator.scaler is not None:
            optimizer.step()  # the fp16 scaler skips overflowing steps and lowers its scale itself
            finite = not optimizer.step_was_skipped
        elif self.skipping_optimizer is not None:
            finite = self._step_skipping_on_device(grad_norm)
        else:
            finite = bool(torch.isfinite(torch.as_tensor(grad_norm)))  # the one sync; DeepSpeed: a float
            if finite:
                optimizer.step()
        if finite:
            tr.scheduler.step()
            self.hooks.after_step(step, self.max_steps)
        optimizer.zero_grad(set_to_none=True)
        return StepResult(finite, grad_norm, lr)

    def _step_skipping_on_device(self, grad_norm: torch.Tensor) -> bool:
        """Queue the update before the host knows whether the norm is finite: the fused AdamW kernel
        itself leaves weights, moments and step counts alone when found_inf is 1 (the mechanism of
        torch's fp16 GradScaler). The host then waits only for the flag, not for the update, which
        runs on the device while the host prepares the next step. Same results as stepping only
        when finite."""
        nonfinite = (~torch.isfinite(grad_norm)).to(torch.float32)  # 0-d, on the device
        if self.flag_copied is None:  # CPU: nothing runs ahead
            self.skipping_optimizer.found_inf = nonfinite
            self.training.optimizer.step()
            return not bool(nonfinite)
        self.nonfinite_host.copy_(nonfinite, non_blocking=True)
        self.flag_copied.record()
        self.skipping_optimizer.found_inf = nonfinite
        self.training.optimizer.step()
        self.flag_copied.synchronize()  # the one sync, ahead of the update's kernels
        return not bool(self.nonfinite_host)


def optimizer_skipping_on_device(accelerator, optimizer):
    """The torch optimizer under Accelerate's wrapper when it can skip a non-finite step on the device
    (a fused AdamW on one process or under DDP; not with fp16's gradient scaler, which sets found_inf
    itself, nor under FSDP or DeepSpeed, which own the step), else None."""
    from accelerate.utils import DistributedType

    inner = getattr(optimizer, "optimizer", optimizer)
    plain = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    fused = isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and inner.defaults.get("fused")
    return inner if plain and fused and accelerator.scaler is None else None


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Pretrain as configured; write records, checkpoints and the export under run_dir.

    Returns {"run_dir", "step", "eval": final held-out metrics, "export": path or None}.
    A stop signal (faults.StopSignals) before the first step ends the run at once (RunStopped); from
    the first step on it waits for a step boundary, saves a checkpoint and ends the run (RunStopped).
    """
    validate_config(cfg)
    with StopSignals() as stop:
        try:
            return _train(cfg, run_dir, stop)
        except StopNow as now:
            raise _stopped_before_training(now.signum, Path(run_dir)) from None


def _stopped_before_training(signum: int, run_dir: Path) -> RunStopped:
    name = signal.Signals(signum).name
    last = latest_checkpoint(run_dir.resolve() / "checkpoints", warn=False)
    then = (f"its newest checkpoint {last} stays; resume with the same command plus hydra.run.dir={run_dir.resolve()}"
            if last else "run the same command to start again")
    return RunStopped(f"{name} received before the first training step: nothing was trained, nothing needed "
                      f"saving; {then}", 128 + signum, signum=signum)


def _train(cfg: DictConfig, run_dir: str | Path, stop: StopSignals) -> dict:
    training = build_training(cfg)
    accelerator, objective, optimizer, scheduler = (training.accelerator, training.objective, training.optimizer,
                                                    training.scheduler)
    tokenizer, examples = training.tokenizer, training.examples
    run_dir = Path(_broadcast(str(Path(run_dir).resolve()), accelerator))
    main = accelerator.is_main_process
    t = cfg.trainer
    rank, world = accelerator.process_index, accelerator.num_processes
    hooks = accelerator.unwrap_model(objective)  # derived_metrics: the Objective's own method
    reports_ppl = type(hooks).reports_perplexity

    lock = RunLock(run_dir).acquire() if main else None  # a second run on this directory stops here
    tracker = RunTracker(run_dir, t.max_steps, enabled=main)
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    if main:
        (run_dir / "config.yaml").write_text(config_yaml)

    try:
        step, tokens_seen, position = 0, 0, DataPosition()
        checkpoint_root = run_dir / "checkpoints"
        resume_from = resume_point(t.resume, checkpoint_root, accelerator)
        if resume_from is not None:
            state = load_checkpoint(resume_from, accelerator, objective, optimizer, scheduler, cfg, verified=True)
            step, tokens_seen = state["step"], state["tokens_seen"]
            position = DataPosition.from_state(state, rank)
            tracker.record("resume", step, {"from": str(resume_from), "epoch": position.epoch, "batch": position.batch})

        collator = accelerator.unwrap_model(objective).build_collator()
        train_data = build_train_data(examples["train"], collator, t.micro_batch_size, seed=cfg.seed, rank=rank,
                                      world_size=world)
        val_examples = examples["validation"].with_format("numpy")

        def run_eval() -> dict:
            values = evaluate(objective, val_examples, collator, micro_batch_size=t.micro_batch_size,
                              max_batches=t.eval_batches, seed=cfg.seed, accelerator=accelerator)
            return hooks.derived_metrics(values)

        batches = train_data.batches(position, cfg.hardware.num_workers, cfg.hardware.pin_memory)
        run_step = TrainStep(training, batches, max_steps=t.max_steps, grad_clip=cfg.optimizer.grad_clip)

        def total_tokens() -> int:  # every rank's tokens since the start of the run (collective)
            return tokens_seen + int(accelerator.reduce(run_step.tokens.clone(), reduction="sum").item())

        saved_step = step if resume_from is not None else None  # the step of the newest checkpoint this run has

        def checkpoint() -> None:
            nonlocal saved_step
            try:
                save_checkpoint(checkpoint_root, step, accelerator, objective, optimizer, scheduler,
                                {**position.to_state(gather_object), "tokens_seen": total_tokens()},
                                config_yaml, t.keep_checkpoints)
            except NonFiniteState as err:
                raise RunStopped(f"stopped at step {step}: {err}; last good checkpoint: "
                                 f"{latest_checkpoint(checkpoint_root) or 'none'}; try a lower optimizer.lr",
                                 EXIT_DIVERGED) from None
            saved_step = step

        def stop_run() -> None:
            """The stop a signal asked for: a checkpoint of this step (unless there is one), the resume line."""
            if saved_step != step:
                checkpoint()
            name = signal.Signals(stop.signum).name
            tracker.record("stopped", step, {"signal": name})
            raise RunStopped(
                f"{name} received: saved checkpoint {checkpoint_root / checkpoint_name(step)} at step "
                f"{step}; resume with the same command plus hydra.run.dir={run_dir} "
                f"(trainer.resume=auto picks it up)", 128 + stop.signum, signum=stop.signum)

        from accelerate.utils import gather_object

        first_examples = gather_object([train_data.first_examples(position, 4)])
        tracker.record("start", step, {
            "world_size": world, "batch_size": t.batch_size, "micro_batch_size": t.micro_batch_size,
            "grad_accum": training.accum, "params": training.n_params,
            "train_examples": train_data.num_examples, "validation_examples": len(val_examples),
            "vocab": len(tokenizer) if tokenizer is not None else None, "rank_first_examples": first_examples,
        })
        if step == 0:
            tracker.record("eval", 0, run_eval())

        window_start, window_tokens = time.perf_counter(), total_tokens()
        guard = NonFiniteGuard(t.max_nonfinite_in_row)
        objective.train()
        with stop.deferred():
            while step < t.max_steps:
                result = run_step(step)
                if not guard.update(result.finite):
                    run_step.window = {}
                    tracker.record("nonfinite", step, {"in_row": guard.in_row, "total": guard.total})
                    if guard.too_many:
                        last = latest_checkpoint(checkpoint_root)
                        raise RunStopped(
                            f"stopped after step {step}: {guard.in_row} steps in a row had a non-finite loss or "
                            f"gradient (trainer.max_nonfinite_in_row={t.max_nonfinite_in_row}); last good "
                            f"checkpoint: {last or 'none'}; try a lower optimizer.lr", EXIT_DIVERGED)
                    continue
                step += 1

                if step % t.log_every == 0 or step == t.max_steps:
                    values = hooks.derived_metrics(reduce_metrics(run_step.window, accelerator, reports_ppl))
                    seen = total_tokens()
                    elapsed = time.perf_counter() - window_start
                    values.update(lr=result.lr, tokens_per_s=(seen - window_tokens) / max(elapsed, 1e-9),
                                  tokens_seen=seen, grad_norm=float(result.grad_norm), nonfinite_skipped=guard.total)
                    tracker.record("train", step, values)
                    run_step.window = {}
                    window_start, window_tokens = time.perf_counter(), seen
                if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
                    tracker.record("eval", step, run_eval())
                    window_start, window_tokens = time.perf_counter(), total_tokens()
                if t.checkpoint_every and step % t.checkpoint_every == 0:
                    checkpoint()
                    window_start, window_tokens = time.perf_counter(), total_tokens()
                if stop.requested(accelerator):  # a signal during this step's regular save: that save stands
                    stop_run()

            final_eval = run_eval()
            tracker.record("eval", step, final_eval)
            if stop.requested(accelerator):  # after the last step, before the export: resuming exports
                stop_run()
            if t.checkpoint_every and saved_step != step:
                checkpoint()
            # A signal from here on waits for the export (never left half-written) and the end of the run.
            export = (export_pretrained(run_dir, accelerator, objective, tokenizer, image_processor(cfg.data))
                      if t.export else None)
            checksums = replica_checksums(accelerator, objective)
            tracker.record("end", step, {"world_size": world, "param_checksums": checksums,
                                         "tokens_seen": total_tokens(), "export": str(export) if export else None})
            if stop.signum is not None:
                tracker.message(f"{signal.Signals(stop.signum).name} received during the export: the run had "
                                f"finished, {export or 'its records'} complete")
    except RuntimeError as err:  # under torchrun / accelerate launch: another rank died mid-collective
        if world == 1 or not peer_lost(err):
            raise
        raise peer_lost_stop(err, run_dir, run_dir / "checkpoints") from None
    finally:
        tracker.close()
        if lock is not None:
            lock.release()
    if len(set(checksums)) > 1:
        raise RuntimeError(f"replicas diverged: parameter checksums per rank {checksums}")
    return {"run_dir": run_dir, "step": step, "eval": final_eval, "export": export}


def _broadcast(value: str, accelerator) -> str:
    """Rank 0's value on every rank (run directories resolved per rank can differ)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


__all__ = ["ConfigError", "build_accelerator", "train"]
