"""Shared fixtures: compose the real configs with hydra.compose, a tiny run setting, and an
isolated cache so tests never touch ~/.cache or the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"

# Small enough for seconds on 2 CPU cores, real enough to learn: the embedded corpus with a
# 2k vocabulary, 64-token blocks and a 2-layer model.
TINY = [
    "tokenizer.vocab_size=2000",
    "trainer.seq_len=64",
    "trainer.batch_size=16",
    "trainer.micro_batch_size=16",
    "trainer.max_steps=30",
    "trainer.log_every=5",
    "trainer.eval_every=0",
    "trainer.eval_batches=4",
    "data.max_docs=150",
    "hardware.compile_loss=false",  # the eager loss, the reference; tests/test_compile.py runs the compiled one
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/corpus cache for the whole session (built once, reused by every run)."""
    path = tmp_path_factory.mktemp("ssltrain-cache")
    os.environ["SSLTRAIN_CACHE"] = str(path)
    os.environ["HF_DATASETS_CACHE"] = str(path / "hf-datasets")
    return path


@pytest.fixture
def compose(cache_dir):
    """compose(overrides) -> the DictConfig `ssltrain <overrides>` would run with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(overrides: list[str] | None = None, config_name: str = "train"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))

    return _compose


@pytest.fixture
def run_cli(cache_dir, tmp_path):
    """run_cli(*args) -> CompletedProcess of `python -m ssltrain *args` with the test cache."""

    def _run(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
        full_env = {**os.environ, "SSLTRAIN_CACHE": str(cache_dir), **(env or {})}
        return subprocess.run([sys.executable, "-m", "ssltrain", *args], cwd=str(cwd or tmp_path),
                              capture_output=True, text=True, timeout=timeout, env=full_env)

    return _run


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def config_error(compose, overrides: list[str]) -> str:
    """The one-line ConfigError message validate_config gives for the composed overrides."""
    from ssltrain.config import validate_config
    from ssltrain.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        validate_config(compose(overrides))
    message = str(info.value)
    assert "\n" not in message, message
    return message


def kill_9_after_train_records(args: list[str], run_dir: Path, records: int, *, cwd: Path, cache_dir: Path,
                               timeout: int = 300) -> None:
    """Run `python -m ssltrain *args hydra.run.dir=run_dir` and SIGKILL it once metrics.jsonl holds `records`
    train records (fails if the run ends first): a crash at a chosen point, with no chance to save."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "ssltrain", *args, f"hydra.run.dir={run_dir}"], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "SSLTRAIN_CACHE": str(cache_dir)})
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = Path(run_dir) / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().count('"kind": "train"') >= records:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (a process group's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_gloo(fn, args: tuple, nprocs: int, timeout: float = 120) -> None:
    """fn(rank, *args) in nprocs spawned processes (they form their own gloo group); fails the test
    when they do not all finish within timeout seconds, killing the rest."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {nprocs} gloo processes hung")
