"""The one training loop. It knows objectives only through the Objective protocol:
batch -> objective(batch) -> ObjectiveOutput(loss, metrics) -> backward -> clip -> step."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ssltrain import engine
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
    answer = engine.broadcast(answer, accelerator)
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
        examples = objective_cls.build_examples(corpus, tokenizer, cfg, corpus_key,
                                                world_size=accelerator.num_processes)
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
    module = accelerator.unwrap_model(objective)
    if not state_format(accelerator).startswith("fsdp"):
        return engine.gather(parameter_checksum(module), accelerator)
    gathered = full_state_dict(accelerator, objective)
    return [engine.broadcast(parameter_checksum(module, gathered) if accelerator.is_main_process else None,
                             accelerator)]


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
    accelerator = engine.build_accelerator(cfg.hardware, cfg.trainer.micro_batch_size, cfg.optimizer.grad_clip)
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


class MetricsWindow:
    """The train records' cadence (trainer.log_every, and the last step) and what they report: the
    objective's metrics since the last record, accumulated as device tensors ({name: [sum, count]})
    with the input tokens, so that a step syncs with the device only once (engine.OptimizerStep);
    tokens/s over the window's wall time, which excludes evaluations and checkpoints (restart)."""

    def __init__(self, accelerator, log_every: int, max_steps: int, tokens_before: int = 0, hooks=None):
        self.accelerator, self.log_every, self.max_steps = accelerator, log_every, max_steps
        self.tokens_before = tokens_before  # every rank's tokens before this run (a resume's)
        self.hooks = hooks  # the Objective: derived_metrics, reports_perplexity
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        self.started, self.tokens_at_start = time.perf_counter(), tokens_before

    def add(self, metrics: dict, num_tokens: torch.Tensor) -> None:
        accumulate(self.sums, metrics)
        self.tokens += num_tokens.detach()

    def discard(self) -> None:
        """Forget the metrics of a skipped (non-finite) step."""
        self.sums = {}

    def total_tokens(self) -> int:
        """Every rank's tokens since the start of the run (collective)."""
        return self.tokens_before + int(self.accelerator.reduce(self.tokens.clone(), reduction="sum").item())

    def restart(self) -> None:
        self.started, self.tokens_at_start = time.perf_counter(), self.total_tokens()

    def should_log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.max_steps

    def values(self, result: StepResult, nonfinite_skipped: int) -> dict:
        """The train record's values (collective); starts the next window."""
        values = reduce_metrics(self.sums, self.accelerator, type(self.hooks).reports_perplexity)
        values = self.hooks.derived_metrics(values)
        seen = self.total_tokens()
        elapsed = time.perf_counter() - self.started
        values.update(lr=result.lr, tokens_per_s=(seen - self.tokens_at_start) / max(elapsed, 1e-9),
                      tokens_seen=seen, grad_norm=float(result.grad_norm), nonfinite_skipped=nonfinite_skipped)
        self.sums = {}
        self.started, self.tokens_at_start = time.perf_counter(), seen
        return values


class TrainStep:
    """One optimizer step of the loop: `accum` micro-batches forward and backward (gradients
    synchronised on the last), clipping, the optimizer step (skipped when the gradient norm is not
    finite: engine.OptimizerStep), the scheduler step and the objective's after_step hook.
    Metrics and tokens go to `window`. scripts/bench.py times this same object."""

    def __init__(self, training: Training, batches: Iterator[dict[str, torch.Tensor]], *, max_steps: int,
                 grad_clip: float, window: MetricsWindow | None = None):
        self.training, self.batches, self.max_steps = training, batches, max_steps
        self.max_norm = grad_clip if grad_clip > 0 else float("inf")
        self.hooks = training.accelerator.unwrap_model(training.objective)  # on_step / after_step: the Objective's
        self.window = window or MetricsWindow(training.accelerator, 1, max_steps, hooks=self.hooks)
        self.optimizer_step = engine.OptimizerStep(training.accelerator, training.optimizer)

    def __call__(self, step: int) -> StepResult:
        tr = self.training
        accelerator, objective = tr.accelerator, tr.objective
        self.hooks.on_step(step, self.max_steps)
        for micro in range(tr.accum):
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in next(self.batches).items()}
            sync = accelerator.no_sync(objective) if micro < tr.accum - 1 else contextlib.nullcontext()
            with sync:
                out = objective(batch)
                accelerator.backward(out.loss / tr.accum)
            self.window.add(out.metrics, out.num_tokens)
        grad_norm = accelerator.clip_grad_norm_(objective.parameters(), self.max_norm)
        lr = tr.scheduler.get_last_lr()[0]
        finite = self.optimizer_step(grad_norm)
        if finite:
            tr.scheduler.step()
            self.hooks.after_step(step, self.max_steps)
        tr.optimizer.zero_grad(set_to_none=True)
        return StepResult(finite, grad_norm, lr)


class Evaluator:
    """Held-out evaluation at step 0, every trainer.eval_every steps and after the last step."""

    def __init__(self, cfg: DictConfig, training: Training, collator):
        self.cfg, self.training, self.collator = cfg, training, collator
        self.examples = training.examples["validation"].with_format("numpy")
        self.hooks = training.accelerator.unwrap_model(training.objective)

    def should_eval(self, step: int) -> bool:
        every = self.cfg.trainer.eval_every
        return bool(every) and step % every == 0 and step < self.cfg.trainer.max_steps

    def __call__(self) -> dict:
        t = self.cfg.trainer
        values = evaluate(self.training.objective, self.examples, self.collator, micro_batch_size=t.micro_batch_size,
                          max_batches=t.eval_batches, seed=self.cfg.seed, accelerator=self.training.accelerator)
        return self.hooks.derived_metrics(values)


class Checkpointer:
    """Checkpoints of the run under <run>/checkpoints: the resume point, every trainer.checkpoint_every
    steps (the newest trainer.keep_checkpoints kept), and the step a stop signal or the end lands on."""

    def __init__(self, cfg: DictConfig, training: Training, run_dir: Path, config_yaml: str):
        self.cfg, self.training, self.config_yaml = cfg, training, config_yaml
        self.root = run_dir / "checkpoints"
        self.saved_step: int | None = None  # the step of the newest checkpoint this run has

    def resume(self, tracker: RunTracker) -> tuple[int, int, DataPosition]:
        """(step, tokens seen, this rank's data position) of trainer.resume's checkpoint, loaded into the
        objective, optimizer, scheduler and RNGs; (0, 0, start) for a fresh run."""
        tr = self.training
        path = resume_point(self.cfg.trainer.resume, self.root, tr.accelerator)
        if path is None:
            return 0, 0, DataPosition()
        state = load_checkpoint(path, tr.accelerator, tr.objective, tr.optimizer, tr.scheduler, self.cfg,
                                verified=True)
        position = DataPosition.from_state(state, tr.accelerator.process_index)
        tracker.record("resume", state["step"], {"from": str(path), "epoch": position.epoch, "batch": position.batch})
        self.saved_step = state["step"]
        return state["step"], state["tokens_seen"], position

    def should_save(self, step: int) -> bool:
        every = self.cfg.trainer.checkpoint_every
        return bool(every) and step % every == 0

    def save(self, step: int, position: DataPosition, tokens_seen: int) -> None:
        tr = self.training
        try:
            save_checkpoint(self.root, step, tr.accelerator, tr.objective, tr.optimizer, tr.scheduler,
                            {**position.to_state(lambda values: engine.gather(values[0], tr.accelerator)),
                             "tokens_seen": tokens_seen},
                            self.config_yaml, self.cfg.trainer.keep_checkpoints)
        except NonFiniteState as err:
            raise RunStopped(f"stopped at step {step}: {err}; last good checkpoint: "
                             f"{latest_checkpoint(self.root) or 'none'}; try a lower optimizer.lr",
                             EXIT_DIVERGED) from None
        self.saved_step = step


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


def _train(cfg: DictConfig, run_dir: str | Path, stop: StopSignals) -> dict:
    t = cfg.trainer
    training = build_training(cfg)
    accelerator, objective, main = training.accelerator, training.objective, training.accelerator.is_main_process
    run_dir = Path(engine.broadcast(str(Path(run_dir).resolve()), accelerator))
    lock = RunLock(run_dir).acquire() if main else None  # a second run on this directory stops here
    tracker = RunTracker(run_dir, t.max_steps, enabled=main)
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    if main:
        (run_dir / "config.yaml").write_text(config_yaml)
    try:
        checkpointer = Checkpointer(cfg, training, run_dir, config_yaml)
        step, tokens_seen, position = checkpointer.resume(tracker)
        hooks = accelerator.unwrap_model(objective)
        collator = hooks.build_collator()
        train_data = build_train_data(training.examples["train"], collator, t.micro_batch_size, seed=cfg.seed,
                                      rank=accelerator.process_index, world_size=accelerator.num_processes)
        window = MetricsWindow(accelerator, t.log_every, t.max_steps, tokens_seen, hooks)
        batches = train_data.batches(position, cfg.hardware.num_workers, cfg.hardware.pin_memory)
        run_step = TrainStep(training, batches, max_steps=t.max_steps, grad_clip=cfg.optimizer.grad_clip, window=window)
        evaluator = Evaluator(cfg, training, collator)
        tracker.record("start", step, start_record(cfg, training, train_data, position, len(evaluator.examples)))
        if step == 0:
            tracker.record("eval", 0, evaluator())
        guard = NonFiniteGuard(t.max_nonfinite_in_row)
        stopping = StopAt(stop, checkpointer, tracker, run_dir, window, position)
        objective.train()
        with stop.deferred():
            window.restart()
            while step < t.max_steps:
                result = run_step(step)
                if not guard.update(result.finite):
                    window.discard()
                    tracker.record("nonfinite", step, {"in_row": guard.in_row, "total": guard.total})
                    if guard.too_many:
                        raise guard.stopped(step, latest_checkpoint(checkpointer.root), EXIT_DIVERGED)
                    continue
                step += 1
                if window.should_log(step):
                    tracker.record("train", step, window.values(result, guard.total))
                if evaluator.should_eval(step):
                    tracker.record("eval", step, evaluator())
                    window.restart()
                if checkpointer.should_save(step):
                    checkpointer.save(step, position, window.total_tokens())
                    window.restart()
                # Several processes agree on a stop with a collective: at the logging and saving cadence only.
                if stopping.due(step, window.should_log(step) or checkpointer.should_save(step)):
                    stopping.stop(step)  # a signal during this step's regular save: that save stands
            final_eval = evaluator()
            tracker.record("eval", step, final_eval)
            if stopping.due(step, True):  # after the last step, before the export: resuming exports
                stopping.stop(step)
            if t.checkpoint_every and checkpointer.saved_step != step:
                checkpointer.save(step, position, window.total_tokens())
            export = finish(cfg, training, run_dir, tracker, window, stop, step)
    except RuntimeError as err:  # under torchrun / accelerate launch: another rank died mid-collective
        if accelerator.num_processes == 1 or not peer_lost(err):
            raise
        raise peer_lost_stop(err, run_dir, latest_checkpoint(run_dir / "checkpoints")) from None
    finally:
        tracker.close()
        if lock is not None:
            lock.release()
    return {"run_dir": run_dir, "step": step, "eval": final_eval, "export": export}


def start_record(cfg: DictConfig, training: Training, train_data, position: DataPosition, n_validation: int) -> dict:
    """The start record: the run's shape and the first examples of each rank (collective)."""
    t, accelerator = cfg.trainer, training.accelerator
    return {
        "world_size": accelerator.num_processes, "batch_size": t.batch_size, "micro_batch_size": t.micro_batch_size,
        "grad_accum": training.accum, "params": training.n_params,
        "train_examples": train_data.num_examples, "validation_examples": n_validation,
        "vocab": len(training.tokenizer) if training.tokenizer is not None else None,
        "rank_first_examples": engine.gather(train_data.first_examples(position, 4), accelerator),
    }


class StopAt:
    """What the loop does when a stop signal has come: a checkpoint of this step (unless there is one),
    a "stopped" record, and RunStopped with the line to resume with."""

    def __init__(self, stop: StopSignals, checkpointer: Checkpointer, tracker: RunTracker, run_dir: Path,
                 window: MetricsWindow, position: DataPosition):
        self.signals, self.checkpointer, self.tracker, self.run_dir = stop, checkpointer, tracker, run_dir
        self.window, self.position = window, position
        self.accelerator = checkpointer.training.accelerator

    def due(self, step: int, at_cadence: bool) -> bool:
        """Whether any rank got a stop signal. One process asks every step (no sync); several only
        at_cadence, as asking is a collective that syncs the host with the device."""
        if self.accelerator.num_processes > 1 and not at_cadence:
            return False
        return self.signals.requested(self.accelerator)

    def stop(self, step: int) -> None:
        if self.checkpointer.saved_step != step:
            self.checkpointer.save(step, self.position, self.window.total_tokens())
        signum = self.signals.signum
        name = signal.Signals(signum).name
        self.tracker.record("stopped", step, {"signal": name})
        raise RunStopped(
            f"{name} received: saved checkpoint {self.checkpointer.root / checkpoint_name(step)} at step "
            f"{step}; resume with the same command plus hydra.run.dir={self.run_dir} "
            f"(trainer.resume=auto picks it up)", 128 + signum, signum=signum)


def finish(cfg: DictConfig, training: Training, run_dir: Path, tracker: RunTracker, window: MetricsWindow,
           stop: StopSignals, step: int) -> Path | None:
    """The export and the end record, after the last step; replicas that diverged fail the run. A signal
    from here on waits for the export (never left half-written) and the end of the run."""
    accelerator = training.accelerator
    export = (export_pretrained(run_dir, accelerator, training.objective, training.tokenizer,
                                image_processor(cfg.data)) if cfg.trainer.export else None)
    checksums = replica_checksums(accelerator, training.objective)
    tracker.record("end", step, {"world_size": accelerator.num_processes, "param_checksums": checksums,
                                 "tokens_seen": window.total_tokens(), "export": str(export) if export else None})
    if stop.signum is not None:
        tracker.message(f"{signal.Signals(stop.signum).name} received during the export: the run had "
                        f"finished, {export or 'its records'} complete")
    if len(set(checksums)) > 1:
        raise RuntimeError(f"replicas diverged: parameter checksums per rank {checksums}")
    return export


def _stopped_before_training(signum: int, run_dir: Path) -> RunStopped:
    name = signal.Signals(signum).name
    last = latest_checkpoint(run_dir.resolve() / "checkpoints", warn=False)
    then = (f"its newest checkpoint {last} stays; resume with the same command plus hydra.run.dir={run_dir.resolve()}"
            if last else "run the same command to start again")
    return RunStopped(f"{name} received before the first training step: nothing was trained, nothing needed "
                      f"saving; {then}", 128 + signum, signum=signum)


__all__ = ["ConfigError", "build_training", "train"]
