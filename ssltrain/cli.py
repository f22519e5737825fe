"""Command-line entry point: `ssltrain [group=option ...] [key=value ...] [-m] [--cfg job]`.

Before Hydra creates a run directory, every job the command line describes is composed and
validated (`preflight`), so a mistake gives one line naming the bad value and the valid
choices, exit code 2, and nothing on disk. Errors that only data can reveal (an empty corpus)
are reported the same way and leave no run directory behind that looks like a finished run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path

from ssltrain import launch
from ssltrain.errors import UserError, debugging
from ssltrain.faults import RunStopped, StopNow, StopSignals
from ssltrain.paths import config_dir
from ssltrain.runlock import RunDirBusy, check_free

CONFIG_NAME = "train"
EXIT_USER_ERROR = 2
_INFO_FLAGS = ("help", "hydra_help", "info", "shell_completion", "cfg")
MAX_PREFLIGHT_JOBS = 256
# Hydra's override grammar refuses an unquoted ~, * or [ in a value (the shell's own quotes are gone by then).
PARSE_HINT = " (a value with ~ * [ ] or spaces needs quotes that reach ssltrain: key=\"'value'\"; or $HOME for ~)"


MAX_DIRNAME_BYTES = 240  # a path component may have 255 bytes on common filesystems


def sweep_subdir(num, override_dirname: str) -> str:
    """A sweep job's folder name, "<job number>_<its overrides>" (conf/train.yaml's hydra.sweep.subdir):
    a path in a value (model.pretrained=runs/mlm/final) written with "_" for "/", so that each job is one
    folder of the sweep, not a tree of them; cut to MAX_DIRNAME_BYTES with a digest of the whole name
    when the overrides would make it longer than a filesystem allows (Hydra would fail making the folder)."""
    import hashlib

    override_dirname = override_dirname.replace(os.sep, "_")
    name = f"{num}_{override_dirname}" if override_dirname else str(num)
    raw = name.encode()
    if len(raw) <= MAX_DIRNAME_BYTES:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:10]
    return f"{raw[:MAX_DIRNAME_BYTES - 12].decode(errors='ignore')}~{digest}"


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("ssltrain_sweep_subdir", sweep_subdir, replace=True)


def one_line(message: str) -> str:
    """Hydra's multi-line messages ('Could not find X\\n\\nAvailable options in Y:\\n\\ta\\n\\tb') -> one line."""
    text = message.split("Config search path")[0]
    text = re.sub(r":\s*\n\s*", ": ", text.strip())
    text = re.sub(r"\s*\n\s*", ", ", text)
    return re.sub(r"\s+", " ", text).strip(" ,")


def fail(message: str, every_rank: bool = True, error: BaseException | None = None) -> None:
    """Print the one-line error and exit 2 (with SSLTRAIN_DEBUG=1: error's traceback first). every_rank=False:
    an error that the processes of a launch find alike (the command line) is printed by the first process of
    each machine only (once on one machine; a check of the local filesystem may fail on one machine and not
    on another)."""
    if every_rank or launch.local_rank() == 0:
        if error is not None and debugging():
            traceback.print_exception(error)
        print(f"ssltrain: error: {one_line(message)}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def job_overrides(overrides: list[str]) -> list[list[str]]:
    """Every job's override list: one for a plain run, the sweep's cartesian product for -m."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def check_output_dirs(overrides: list[str], multirun: bool) -> None:
    """The run (or sweep) directory must be creatable: its nearest existing ancestor has to be a
    writable directory. Checked before Hydra tries, which would fail with a traceback."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith(f"{key}=")]
    target = Path(os.path.expanduser(given[-1].split("${")[0])) if given else Path.cwd() / "outputs"
    ancestor = target if target.is_absolute() else Path.cwd() / target
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{key}={given[-1] if given else target} cannot be created: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{key}={given[-1] if given else target} cannot be created: {ancestor} is not writable")


def preflight(argv: list[str]) -> None:
    """Compose and validate each job of this command line; raise UserError on the first bad one."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from ssltrain.config import validate_config  # local: keeps `ssltrain --help` fast (torch, transformers)

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        raise UserError(f"cannot parse the command line {' '.join(argv)!r}; see ssltrain --help") from None
    if args.shell_completion or args.hydra_help:
        return
    # --cfg / --help / --info run nothing: their config must compose (a bad group option or key is
    # one line, as for a run), but values are only checked for a run.
    info_only = any(getattr(args, flag, None) for flag in _INFO_FLAGS)
    if not info_only:
        check_output_dirs(args.overrides, multirun=args.multirun)
        run_dirs = [o.split("=", 1)[1] for o in args.overrides if o.startswith("hydra.run.dir=")]
        if run_dirs and not args.multirun and "${" not in run_dirs[-1] and launch.rank() == 0:
            check_free(os.path.expanduser(run_dirs[-1]))  # before Hydra writes .hydra/ into another run's folder
    # Hydra's own keys (hydra.run.dir=...) are Hydra's to check; ours are everything else.
    overrides = [o for o in args.overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    conf_dir = os.path.abspath(args.config_dir) if args.config_dir else str(config_dir())
    try:
        jobs = job_overrides(overrides) if args.multirun else [overrides]
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3", job_name="ssltrain"):
            config_name = args.config_name or CONFIG_NAME
            world_size = _submitit_world_size(args.overrides, config_name) if args.multirun else None
            for job in jobs[:MAX_PREFLIGHT_JOBS]:
                try:
                    cfg = compose(config_name=config_name, overrides=job)
                except OverrideParseException as err:
                    raise UserError(f"{err}{PARSE_HINT}") from None
                except HydraException as err:
                    raise UserError(_unknown_key_message(err, config_name, job) or str(err)) from None
                if info_only:
                    continue
                try:
                    validate_config(cfg, world_size)
                except UserError as err:
                    where = f" (in job {' '.join(job)})" if args.multirun and job else ""
                    raise UserError(f"{err}{where}") from err
    except OverrideParseException as err:
        raise UserError(f"{err}{PARSE_HINT}") from None
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(str(err)) from None


def _submitit_world_size(overrides: list[str], config_name: str) -> int | None:
    """Processes of each job that `hydra/launcher=submitit_*` will start (tasks_per_node x nodes), so that
    the batch sizes are checked here for them, before anything is submitted; None for other launchers."""
    from hydra import compose

    hydra_overrides = [o for o in overrides if o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    if not any(o.startswith("hydra/launcher=submitit") for o in hydra_overrides):
        return None
    launcher = compose(config_name=config_name, overrides=hydra_overrides, return_hydra_config=True).hydra.launcher
    return int(launcher.get("tasks_per_node") or 1) * int(launcher.get("nodes") or 1)


def _unknown_key_message(err: Exception, config_name: str, job: list[str]) -> str | None:
    """'trainer.max_stepz=5' -> name the unknown key, the closest valid one and the keys there are
    (Hydra only suggests appending it with '+', which would make a typo silently do nothing)."""
    import difflib

    from hydra import compose
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = err.__cause__
    bad = re.match(r"Could not override '([^']+)'", str(err))
    if not (bad and isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key):
        return None
    parent, _, name = cause.full_key.rpartition(".")
    # The same group choices (model=..., data=...), without key=value overrides and the bad one.
    groups = [o for o in job
              if "." not in o.split("=")[0] and o.split("=")[0] != bad.group(1) and o[:1] not in "+~"]
    try:
        base = compose(config_name=config_name, overrides=groups)
        node = OmegaConf.select(base, parent) if parent else base
    except Exception:
        return None
    if not isinstance(node, DictConfig):
        return None
    keys = sorted(str(k) for k in node.keys())
    close = difflib.get_close_matches(name, keys, n=1)
    suggestion = f"did you mean {parent + '.' if parent else ''}{close[0]}? " if close else ""
    append = str(err).rsplit("use ", 1)[-1] if "use +" in str(err) else f"+{bad.group(1)}=..."
    return (f"{bad.group(1)} is not a config key; {suggestion}valid keys in {parent or 'the top level'}: "
            f"{', '.join(keys)} (to add a new key on purpose: {append})")


def _isolate_non_main_rank(argv: list[str]) -> str | None:
    """Ranks > 0 resolve ${now:...} themselves and could pick another run directory: give them
    a scratch one (the real one is broadcast from rank 0 in train())."""
    if launch.rank() == 0:
        return None
    scratch = tempfile.mkdtemp(prefix=f"ssltrain-rank{launch.rank()}-")
    argv.extend([f"hydra.run.dir={scratch}", "hydra.output_subdir=null"])
    return scratch


def _remove_unfinished_run(run_dir: Path, job_log: str = "ssltrain.log") -> None:
    """After a user error, drop the run directory if it holds nothing but Hydra's own files
    (job_log: Hydra's log file, <hydra.job.name>.log)."""
    if not run_dir.is_dir():
        return
    leftovers = {p.name for p in run_dir.iterdir()} - {".hydra", job_log, "config.yaml", "metrics.jsonl", "tb",
                                                        ".lock", ".metrics.jsonl.tmp"}
    if not leftovers:
        shutil.rmtree(run_dir, ignore_errors=True)


def _hydra_app():
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(config_path=str(config_dir()), config_name=CONFIG_NAME, version_base="1.3")
    def app(cfg) -> None:
        from ssltrain.train import train  # local: keeps `ssltrain --help` fast (torch, transformers)

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            launch.join_job()  # a task of a submitit job (hydra/launcher=submitit_*): one group of all its tasks
            train(cfg, run_dir)
        except UserError as err:
            if launch.rank() == 0 and not isinstance(err, RunDirBusy):  # a busy directory is another run's
                _remove_unfinished_run(run_dir, f"{HydraConfig.get().job.name}.log")
            fail(str(err), error=err)
        except RunStopped as stopped:
            print(f"ssltrain: {stopped}", file=sys.stderr)
            launch.pass_on_preemption(stopped.signum)
            sys.exit(stopped.exit_code)
        except KeyboardInterrupt:
            print("ssltrain: interrupted", file=sys.stderr)
            sys.exit(130)

    return app


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    register_resolvers()
    argv = sys.argv[1:]
    # A stop signal before train() handles them itself (the command line's checks, Hydra's set-up) ends
    # the process cleanly too: nothing has been trained.
    with StopSignals():
        try:
            launch.join_job()  # srun started several tasks: they form one process group
            launch.check_not_alone()
            preflight(argv)
        except UserError as err:
            fail(str(err), every_rank=False, error=err)
        except StopNow as now:
            _stopped_at_start(now.signum)
        scratch = _isolate_non_main_rank(sys.argv)
        try:
            _hydra_app()()
        except StopNow as now:
            _stopped_at_start(now.signum)
        finally:
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)


def _stopped_at_start(signum: int) -> None:
    print(f"ssltrain: {signal.Signals(signum).name} received before the first training step: nothing was trained, "
          f"nothing needed saving", file=sys.stderr)
    sys.exit(128 + signum)


if __name__ == "__main__":
    main()
