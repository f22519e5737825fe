"""Resumable checkpoints and the final HF-format export, both written atomically.

A checkpoint is a folder `checkpoints/step-00000100/` holding
  model.safetensors     objective state (backbone + heads), tied weights stored once
  optimizer.pt          optimizer state_dict (tensors + plain types; loaded weights_only)
  scheduler.pt          LR scheduler state_dict (and scaler.pt for fp16)
  rng-rank<R>.pt        python / numpy / torch / CUDA RNG states of every rank
  trainer_state.json    step, data position (epoch, batch), tokens seen, state_format, ...
  config.yaml           the resolved run config
  manifest.json         written last: every other file's size and SHA-256
It is written under a temporary name, fsynced, then renamed: a folder named step-* is complete, and
a resume verifies it against its manifest first (a truncated, corrupted, replaced or missing file
makes the resume fall back to the newest checkpoint that verifies). A checkpoint is never written
when the weights or optimizer moments hold a NaN/inf. Pruning renames a checkpoint out of the
step-* names before deleting it.

How model and optimizer state are written depends on the engine (`state_format`):
  replicated     one process or DDP: rank 0 writes its copy (above)
  fsdp-full      FSDP, hardware.fsdp.state_dict_type=full: every rank joins a gather, rank 0 writes
                 the full weights (model.safetensors, as above) and the full optimizer state keyed by
                 parameter name (optimizer.pt); every rank reads both back and keeps its shard
  fsdp-sharded   FSDP, state_dict_type=sharded: sharded/ holds each rank's shard of weights and
                 optimizer state (torch.distributed.checkpoint); nothing is gathered
  deepspeed      DeepSpeed ZeRO: the engine's own checkpoint in deepspeed/ (every rank's optimizer
                 partition) plus the full weights in model.safetensors
A checkpoint resumes under the format that wrote it. The export in final/ is always the full model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ssltrain.data.tokenizer import save_tokenizer
from ssltrain.errors import UserError
from ssltrain.faults import RunStopped, peer_lost

PREFIX = "step-"
EXIT_CHECKPOINT_WRITE = 4  # exit code when a checkpoint cannot be written (disk full, ...)
MANIFEST = "manifest.json"
PRUNED, REPLACED = ".pruned-", ".old-"  # prefixes of checkpoints being deleted / replaced
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")
SHARDED_DIR = "sharded"  # fsdp-sharded: torch.distributed.checkpoint folder (complete once .metadata exists)
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"
# What else than REQUIRED_FILES each format's checkpoint must hold to be complete.
FORMAT_FILES = {"replicated": (), "fsdp-full": (), "fsdp-sharded": (f"{SHARDED_DIR}/.metadata",),
                "deepspeed": (f"{DEEPSPEED_DIR}/latest",)}
FORMAT_SKIPS = {"fsdp-sharded": ("model.safetensors", "optimizer.pt"), "deepspeed": ("optimizer.pt",)}


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


# ---------------------------------------------------------------- RNG state

def capture_rng_state() -> dict:
    """Every RNG this process draws from, as tensors and plain types (weights_only-loadable)."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- weights

def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file; tensors sharing storage (tied embeddings) are stored once and the
    other names recorded as aliases in the metadata."""
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = tensor.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    tensors = load_file(str(path))
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


# ---------------------------------------------------------------- engines

def state_format(accelerator) -> str:
    """How this run's model and optimizer state are gathered and written (see the module docstring)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import StateDictType

        full = accelerator.state.fsdp_plugin.state_dict_type == StateDictType.FULL_STATE_DICT
        return "fsdp-full" if full else "fsdp-sharded"
    return "replicated"


def full_state_dict(accelerator, objective) -> dict[str, torch.Tensor]:
    """The objective's whole state dict on rank 0, on CPU. Collective under FSDP (every rank calls
    it; on GPU ranks > 0 get an empty dict), a plain state_dict otherwise."""
    if not state_format(accelerator).startswith("fsdp"):
        return accelerator.get_state_dict(objective)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(objective, options=_gather_options(accelerator))


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps it


def _state_dict_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def _gather_options(accelerator):
    """Full state dicts gathered to rank 0's host memory on GPU. On CPU every rank keeps its gathered
    copy: offloading CPU-resident FSDP1 parameters "to CPU" is no copy and leaves tensors that alias
    freed storage (the process segfaults, torch 2.13)."""
    return _state_dict_options(full_state_dict=True, cpu_offload=accelerator.device.type != "cpu")


def _save_sharded(folder: Path, objective, optimizer) -> None:
    """Collective: each rank writes its shard of weights and optimizer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(objective, _torch_optimizer(optimizer))
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))


def _load_sharded(folder: Path, objective, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(objective, _torch_optimizer(optimizer))
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder))  # fills this rank's shards in place
    set_state_dict(objective, _torch_optimizer(optimizer), model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def _full_optimizer_state(accelerator, objective, optimizer) -> dict:
    """FSDP: the whole optimizer state keyed by parameter name, on rank 0 (collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(objective, _torch_optimizer(optimizer), options=_gather_options(accelerator))


def _load_full(path: Path, objective, optimizer) -> None:
    """FSDP: every rank reads the full weights and optimizer state and keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = _state_dict_options(full_state_dict=True)
    result = set_model_state_dict(objective, load_weights(path / "model.safetensors"), options=options)
    _check_keys(path, result.missing_keys, result.unexpected_keys)
    optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(objective, _torch_optimizer(optimizer), optim_state, options=options)


def _check_keys(path: Path, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        names = (missing or unexpected)[:3]
        raise UserError(f"checkpoint {path} does not match this model (mismatching keys: {', '.join(names)})")


# ---------------------------------------------------------------- save / find / load

def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _fsync_tree(path)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, accelerator, objective, optimizer, scheduler, trainer_state: dict,
                    config_yaml: str, keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if not finite_state(accelerator, objective, optimizer):  # collective
        raise NonFiniteState(f"the weights or optimizer moments at step {step} hold NaN/inf values; checkpoint "
                             f"{final.name} was not written")
    try:
        if accelerator.is_main_process:
            with _writing(tmp):
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
        accelerator.wait_for_everyone()
        fmt = state_format(accelerator)
        state_dict = None if fmt == "fsdp-sharded" else full_state_dict(accelerator, objective)  # collective
        optim_state = _full_optimizer_state(accelerator, objective, optimizer) if fmt == "fsdp-full" else None
        rng_file = tmp / f"rng-rank{accelerator.process_index}.pt"
        with _writing(rng_file):
            torch.save(capture_rng_state(), rng_file)
        if fmt == "fsdp-sharded":
            with _writing(tmp / SHARDED_DIR):
                _save_sharded(tmp / SHARDED_DIR, objective, optimizer)
        elif fmt == "deepspeed":  # the engine's own format: each rank's ZeRO optimizer partition
            with _writing(tmp / DEEPSPEED_DIR):
                objective.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
        accelerator.wait_for_everyone()  # every rank's part is written before rank 0 fsyncs the folder
        if accelerator.is_main_process:
            state = {**trainer_state, "step": step, "world_size": accelerator.num_processes, "state_format": fmt}
            files = {
                "model.safetensors": None if state_dict is None else lambda f: save_weights(state_dict, f),
                "optimizer.pt": None if fmt in ("deepspeed", "fsdp-sharded") else lambda f: torch.save(
                    optimizer.state_dict() if optim_state is None else optim_state, f),
                "scheduler.pt": lambda f: torch.save(scheduler.state_dict(), f),
                "scaler.pt": None if accelerator.scaler is None else lambda f: torch.save(
                    accelerator.scaler.state_dict(), f),
                "config.yaml": lambda f: f.write_text(config_yaml),
                "trainer_state.json": lambda f: f.write_text(json.dumps(state, indent=2)),
                MANIFEST: lambda f: write_manifest(tmp),  # last: a manifest that verifies means every file is whole
            }
            for name, write in files.items():
                if write is not None:
                    with _writing(tmp / name):
                        write(tmp / name)
            with _writing(tmp):
                _fsync_tree(tmp)
        accelerator.wait_for_everyone()  # no rank may fail between here and the rename
    except CheckpointWriteError as err:  # disk full, quota, permissions, a file size limit: say so, keep the rest
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        raise RunStopped(f"could not write checkpoint {final}: {err}; nothing partial was left and the last "
                         f"complete checkpoint is {previous or 'none'}", EXIT_CHECKPOINT_WRITE) from None
    except BaseException:  # a peer process died (collective error), a second Ctrl-C: leave no temp folder either
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        replaced = root / f"{REPLACED}{checkpoint_name(step)}"
        if final.exists():  # re-saving the same step (e.g. the end of a resumed run): swap, then delete
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(replaced, ignore_errors=True)
        prune_checkpoints(root, keep)
    accelerator.wait_for_everyone()
    return final


class NonFiniteState(RuntimeError):
    """save_checkpoint refused to write weights or optimizer moments that are not finite."""


def finite_state(accelerator, objective, optimizer) -> bool:
    """Whether every parameter and every floating-point optimizer state tensor (AdamW's moments) is finite
    on every rank (collective). Under FSDP each rank checks its shards."""
    local = all(bool(torch.isfinite(p.detach()).all()) for p in objective.parameters())
    if local:
        for state in _torch_optimizer(optimizer).state.values():
            tensors = [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                local = False
                break
    if accelerator.num_processes == 1:
        return local
    flag = torch.tensor(int(local), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


class CheckpointWriteError(Exception):
    """A checkpoint file could not be written; str() says which and why, in one line."""


@contextlib.contextmanager
def _writing(path: Path):
    """Turn a failure of the writes inside into CheckpointWriteError naming `path`. torch.save and safetensors
    do not raise OSError for a full disk or a file size limit (torch: "unexpected pos 576 vs 534", safetensors:
    SafetensorError), so what fails inside a write is taken as the write failing, except a peer process gone
    (a collective inside a sharded save) and an object that cannot be serialised (a bug, not the disk)."""
    import pickle

    try:
        yield
    except (pickle.PicklingError, TypeError):
        raise
    except Exception as err:
        if peer_lost(err):
            raise
        raise CheckpointWriteError(f"{path.name}: {_write_reason(err, path)}") from err


def _write_reason(err: BaseException, path: Path) -> str:
    """The OS's reason where there is one; else the writer's words, and what is short on the filesystem."""
    import resource

    reason = err.strerror if isinstance(err, OSError) and err.strerror else " ".join(str(err).split())[:200]
    hints = []
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None:
        free = shutil.disk_usage(existing).free
        if free < 64 << 20:
            hints.append(f"{free >> 20} MiB free on its filesystem")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        hints.append(f"a file size limit of {limit} bytes (ulimit -f)")
    return reason + (f" ({'; '.join(hints)})" if hints else "")


# ---------------------------------------------------------------- manifest

def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def write_manifest(folder: Path) -> None:
    """folder/manifest.json: {"files": {relative path: {"size", "sha256"}}} of every file in folder."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _digest(p)}
             for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1))


def checkpoint_problem(path: Path, checksums: bool = True) -> str | None:
    """What is wrong with the checkpoint folder `path` (None when it verifies): a missing manifest, a file
    the manifest lists that is missing, a link, of another size, or (checksums=True) of other content, or
    a file the manifest does not list."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and files
    except FileNotFoundError:
        return f"{MANIFEST} is missing (incomplete, or written before ssltrain wrote manifests)"
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{MANIFEST} is unreadable"
    for name, meta in files.items():
        file = path / name
        if file.is_symlink():
            return f"{name} is a link, not the file that was written"
        if not file.is_file():
            return f"{name} is missing"
        try:
            size, digest = int(meta["size"]), str(meta["sha256"])
        except (KeyError, TypeError, ValueError):
            return f"{MANIFEST} has no size and checksum for {name}"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
        if checksums and _digest(file) != digest:
            return f"{name} does not match its checksum (corrupted or replaced)"
    extra = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                   if (p.is_file() or p.is_symlink()) and p.name != MANIFEST
                   and p.relative_to(path).as_posix() not in files)
    if extra:
        return f"{extra[0]} was not written with the checkpoint"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def recover_checkpoints(root: Path) -> None:
    """A process killed between the two renames of a re-save leaves its step only as .old-step-N: name it
    step-N again. Main process only, before looking for the newest checkpoint."""
    root = Path(root)
    if not root.is_dir():
        return
    for old in root.glob(f"{REPLACED}{PREFIX}*"):
        final = root / old.name[len(REPLACED):]
        if not final.exists():
            os.rename(old, final)


def required_files(path: Path) -> list[str]:
    """The files a complete checkpoint in `path` holds, by the format its trainer_state.json names."""
    try:
        fmt = json.loads((path / "trainer_state.json").read_text()).get("state_format", "replicated")
    except (OSError, ValueError):
        fmt = "replicated"
    skipped = FORMAT_SKIPS.get(fmt, ())
    return [n for n in REQUIRED_FILES if n not in skipped] + list(FORMAT_FILES.get(fmt, ()))


def is_complete(path: Path) -> bool:
    """Every file of the checkpoint is there, whole (sizes as its manifest says; checksums not read)."""
    return checkpoint_problem(path, checksums=False) is None


def latest_checkpoint(root: Path, checksums: bool = False, warn: bool = True) -> Path | None:
    """Newest checkpoint that verifies (checksums=True: every file's content too, as a resume does); the
    newer ones that do not are skipped with a warning naming the folder and what is wrong."""
    for path in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(path, checksums=checksums)
        if problem is None:
            return path
        if warn:
            warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return None


def checkpoint_to_resume(root: Path) -> Path | None:
    """trainer.resume=auto: the newest checkpoint under root that verifies, None when there is none at all;
    a UserError when there are checkpoints but none verifies (starting over would silently lose the run)."""
    import sys

    recover_checkpoints(root)
    candidates = list_checkpoints(root)
    problems = {}
    for path in reversed(candidates):
        problems[path] = checkpoint_problem(path)
        if problems[path] is None:
            return path
        print(f"ssltrain: warning: skipping checkpoint {path}: {problems[path]}", file=sys.stderr)
    if candidates:
        newest = candidates[-1]
        raise UserError(f"no checkpoint in {root} verifies ({len(candidates)} found; newest {newest.name}: "
                        f"{problems[newest]}); start over with trainer.resume=null or a new hydra.run.dir")
    return None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, each first renamed out of the step-* names, so that
    a process killed while deleting never leaves a step-* folder with files missing."""
    root = Path(root)
    for path in list_checkpoints(root)[:-keep]:
        doomed = root / f"{PRUNED}{path.name}"
        shutil.rmtree(doomed, ignore_errors=True)
        os.rename(path, doomed)
    _fsync_dir(root)
    # Left by a writer or a pruner killed outright (SIGKILL), which could not remove them.
    for stale in [*root.glob(f".tmp-{PREFIX}*"), *root.glob(f"{PRUNED}{PREFIX}*")]:
        shutil.rmtree(stale, ignore_errors=True)


# Settings a checkpoint's run must share with the run resuming it: they decide the weights'
# shapes, the data and its order. Anything else (max_steps, cadences, hardware) may change.
RESUME_MUST_MATCH = ("seed", "model", "objective", "data", "tokenizer", "trainer.seq_len", "trainer.batch_size",
                     "trainer.micro_batch_size")
RESUME_MAY_DIFFER = ("data.num_proc",)


def _leaves(node, prefix: str) -> dict:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, dict)):
        items = node.items()
    elif isinstance(node, (ListConfig, list)):
        return {prefix: OmegaConf.to_container(node) if isinstance(node, ListConfig) else node}
    else:
        return {prefix: node}
    out = {}
    for key, value in items:
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_mismatches(saved, current) -> list[str]:
    """Dotted keys among RESUME_MUST_MATCH whose values differ between two resolved configs."""
    from omegaconf import OmegaConf

    differing = []
    for key in RESUME_MUST_MATCH:
        a = _leaves(OmegaConf.select(saved, key), key)
        b = _leaves(OmegaConf.select(current, key), key)
        differing += [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in RESUME_MAY_DIFFER]
    return differing


def load_checkpoint(path: Path, accelerator, objective, optimizer, scheduler, cfg=None, verified: bool = False) -> dict:
    """Restore everything save_checkpoint wrote, for this rank. Returns trainer_state.
    The folder is verified against its manifest first, unless `verified` (checkpoint_to_resume did).
    With cfg, refuse a checkpoint whose run differs in a setting of RESUME_MUST_MATCH."""
    from omegaconf import OmegaConf

    path = Path(path)
    problem = None if verified else checkpoint_problem(path)
    if problem:
        raise UserError(f"trainer.resume={str(path)!r} is not a complete checkpoint: {problem}")
    # Before the config: with trainer.micro_batch_size=auto another process count also changes the micro-batch.
    state = json.loads((path / "trainer_state.json").read_text())
    _check_state(path, state, None if cfg is None else cfg.trainer.max_steps)
    if state.get("world_size", 1) != accelerator.num_processes:
        raise UserError(f"checkpoint {path} was written by {state.get('world_size')} process(es) but this run has "
                        f"{accelerator.num_processes}; resume with the same process count")
    if cfg is not None and (path / "config.yaml").is_file():
        saved = OmegaConf.load(path / "config.yaml")
        current = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        differing = config_mismatches(saved, current)
        if differing:
            shown = ", ".join(f"{k} ({OmegaConf.select(saved, k)!r} -> {OmegaConf.select(current, k)!r})"
                              for k in differing[:4])
            raise UserError(f"checkpoint {path} was written by a different config: {shown}"
                            f"{' ...' if len(differing) > 4 else ''}; resume with the original settings or "
                            f"start fresh with trainer.resume=null")
    saved_format, fmt = state.get("state_format", "replicated"), state_format(accelerator)
    if saved_format != fmt:
        raise UserError(f"checkpoint {path} holds {saved_format} state but this run writes {fmt} state (the "
                        f"hardware group's engine or hardware.fsdp.state_dict_type changed); resume with the "
                        f"hardware settings that wrote it")
    if fmt == "fsdp-full":
        _load_full(path, objective, optimizer)
    elif fmt == "fsdp-sharded":
        _load_sharded(path / SHARDED_DIR, objective, optimizer)
    elif fmt == "deepspeed":
        objective.load_checkpoint(str(path / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                  load_lr_scheduler_states=False)
    else:
        model = accelerator.unwrap_model(objective)
        result = model.load_state_dict(load_weights(path / "model.safetensors"), strict=False)
        _check_keys(path, result.missing_keys, result.unexpected_keys)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if getattr(scheduler, "last_epoch", state["step"]) != state["step"]:  # the scheduler steps once per step
        raise UserError(f"checkpoint {path} is inconsistent: trainer_state.json says step {state['step']}, "
                        f"scheduler.pt says {scheduler.last_epoch}")
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng_file = path / f"rng-rank{accelerator.process_index}.pt"
    restore_rng_state(torch.load(rng_file, weights_only=True))
    return state


def _check_state(path: Path, state: dict, max_steps: int | None) -> None:
    """The trainer_state values a resume relies on are in range (a hand-edited or foreign file is refused)."""
    def count(key: str, value) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"checkpoint {path}: {key}={value!r} in trainer_state.json is not a count >= 0")
        return value

    step = count("step", state.get("step"))
    if max_steps is not None and step > max_steps:
        raise UserError(f"checkpoint {path} is at step {step}, beyond trainer.max_steps={max_steps}; resume with "
                        f"trainer.max_steps>={step}")
    count("epoch", state.get("epoch", 0))
    count("batch", state.get("batch", 0))


# ---------------------------------------------------------------- export

def submodule_state(root: torch.nn.Module, module: torch.nn.Module, state_dict: dict) -> dict:
    """The entries of root's (gathered) state_dict that belong to its submodule `module`, named as in
    module.state_dict() (wrapper names such as FSDP1's _fsdp_wrapped_module dropped). Names of one
    tied parameter map to one tensor, so save_pretrained stores it once, as it does unsharded."""
    prefix = next(clean_name(name) for name, m in root.named_modules() if m is module)
    prefix = f"{prefix}." if prefix else ""
    state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    first: dict[int, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        name = clean_name(name)
        if id(param) in first and name in state:
            state[name] = state[first[id(param)]]
        first.setdefault(id(param), name)
    return state


def clean_name(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name.removesuffix("._fsdp_wrapped_module").removesuffix("._checkpoint_wrapped_module")


def export_pretrained(run_dir: Path, accelerator, objective, tokenizer, processor=None) -> Path | None:
    """<run>/final: the objective's HF model (safetensors) + tokenizer (text) or image processor
    (images), loadable with AutoModel*.from_pretrained and pipeline(). Written to a temp folder,
    then renamed."""
    final = Path(run_dir) / "final"
    tmp = Path(run_dir) / ".final-tmp"
    accelerator.wait_for_everyone()
    # Under FSDP each rank holds a shard: gather the whole model (collective) and write that.
    gathered = full_state_dict(accelerator, objective) if state_format(accelerator).startswith("fsdp") else None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(objective)
        model = unwrapped.export_model()
        if gathered is None:
            model.save_pretrained(str(tmp))
        else:
            model.save_pretrained(str(tmp), state_dict=submodule_state(unwrapped, model, gathered))
        if tokenizer is not None:  # image objectives have none
            save_tokenizer(tokenizer, str(tmp))
        if processor is not None:
            processor.save_pretrained(str(tmp))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    accelerator.wait_for_everyone()
    return final
