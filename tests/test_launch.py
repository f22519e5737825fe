"""Every way a user starts several processes works with the default batch settings, or stops with one line.

The default `trainer.micro_batch_size: auto` splits the global `trainer.batch_size` over whatever
number of processes the launcher started (torchrun, `accelerate launch` with flags or with the
config files `accelerate config` writes, mpirun through such a file, srun), so the README's
launch lines need no batch override. Launches run the real CLI in subprocesses, GPUs hidden.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from conftest import read_metrics
from omegaconf import OmegaConf
from test_multiprocess import child_env, free_port, launcher, run_group

from ssltrain.config import auto_micro_batch_size, validate_config
from ssltrain.errors import ConfigError

BIN = Path(sys.executable).parent
SHORT = ["trainer.max_steps=3", "trainer.eval_every=0", "trainer.eval_batches=2"]  # fewer steps, nothing else


@pytest.mark.parametrize("batch,world,cap,expected", [
    (32, 1, 256, 32),  # the default run: one micro-batch per step, as before `auto`
    (32, 2, 256, 16),  # README's 2-process CPU launch
    (32, 8, 64, 4),    # README's 8-GPU bert-base launch
    (256, 1, 64, 64),  # a GPU batch above the model's cap: 4 accumulation steps
    (96, 1, 64, 48),   # the largest divisor under the cap, not the cap
    (36, 1, 8, 6),
    (7, 1, 4, 1),      # a prime per-process batch: micro-batches of 1
])
def test_auto_micro_batch_is_the_largest_divisor_of_the_per_process_batch_under_the_cap(batch, world, cap, expected):
    """Catches a derivation that exceeds the cap, does not divide (the loop would drop examples), or
    ignores the process count."""
    micro = auto_micro_batch_size(batch, world, cap)
    assert micro == expected
    assert micro <= cap and (batch // world) % micro == 0
    # Independent reference: the brute-force maximum over every candidate.
    assert micro == max(m for m in range(1, batch + 1) if m <= cap and batch % (m * world) == 0)


def test_auto_micro_batch_without_accumulation_is_the_whole_per_process_batch():
    """hardware=deepspeed steps at every backward: auto must not pick a micro-batch that needs accumulation."""
    assert auto_micro_batch_size(256, 2, 64, accumulate=False) == 128


def test_a_batch_that_does_not_split_over_the_processes_names_both(compose):
    with pytest.raises(ConfigError, match=r"trainer.batch_size=32 does not split evenly over 3 processes; pick a "
                                          r"multiple of 3"):
        validate_config(compose(), world_size=3)


@pytest.mark.parametrize("overrides,world,micro", [
    ([], 1, 32), ([], 2, 16), (["model=bert-base", "trainer.batch_size=256"], 1, 64),
    (["hardware=deepspeed", "trainer.batch_size=256"], 2, 128),
])
def test_validation_resolves_auto_for_the_process_count(compose, overrides, world, micro):
    """Catches the loop reading 'auto' as a number (or the cap ignored) after validation."""
    cfg = compose(overrides)
    assert cfg.trainer.micro_batch_size == "auto"
    if "hardware=deepspeed" in overrides:
        from ssltrain.config import resolve_micro_batch_size

        resolve_micro_batch_size(cfg, world)  # validate_config would stop at the missing deepspeed package
    else:
        validate_config(cfg, world_size=world)
    assert cfg.trainer.micro_batch_size == micro


def _accelerate_config(path: Path, kind: str, **extra) -> Path:
    """A config file as `accelerate config` writes it: the same ClusterConfig and to_yaml_file."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import ComputeEnvironment, DistributedType

    common = dict(compute_environment=ComputeEnvironment.LOCAL_MACHINE, mixed_precision="no", debug=False)
    kinds = {
        "1 CPU": dict(distributed_type=DistributedType.NO, num_processes=1, use_cpu=True),
        "2 CPU processes": dict(distributed_type=DistributedType.MULTI_CPU, num_processes=2, use_cpu=True),
        "2 GPUs": dict(distributed_type=DistributedType.MULTI_GPU, num_processes=2, use_cpu=False, gpu_ids="all"),
    }
    ClusterConfig(**common, **kinds[kind], **extra).to_yaml_file(path)
    return path


def _one_run(run: Path) -> tuple[dict, dict]:
    records = read_metrics(run)
    starts = [r for r in records if r["kind"] == "start"]
    ends = [r for r in records if r["kind"] == "end"]
    assert len(starts) == 1 and len(ends) == 1, "one run, records written by rank 0 only"
    return starts[0], ends[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind,world", [("1 CPU", 1), ("2 GPUs", 2)])
def test_accelerate_config_files_run_the_processes_they_name(kind, world, cache_dir, tmp_path):
    """`accelerate launch --config_file F -m ssltrain` with the default batch settings: a MULTI_GPU file
    (here with GPUs hidden, so the default hardware=cpu group joins the processes over gloo) starts 2
    processes that train one model; the 1-CPU file one process. Catches a default micro-batch that does
    not fit the file's process count, and a launch that trains fewer processes than the file names."""
    config = _accelerate_config(tmp_path / "accelerate.yaml", kind, main_process_port=free_port())
    run = tmp_path / "run"
    argv = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "-m", "ssltrain", *SHORT,
            f"hydra.run.dir={run}"]
    proc = run_group(argv, tmp_path, child_env(tmp_path, cache_dir))
    assert proc.returncode == 0, proc.stderr[-6000:]
    start, end = _one_run(run)
    assert (start["world_size"], start["batch_size"], start["micro_batch_size"], start["grad_accum"]) == (
        world, 32, 32 // world, 1)
    assert len(end["param_checksums"]) == world and len(set(end["param_checksums"])) == 1


@pytest.mark.slow
def test_a_multi_cpu_accelerate_config_without_mpirun_stops_with_one_line(cache_dir, tmp_path):
    """The MULTI_CPU file `accelerate config` writes when mpirun is declined: accelerate starts one process
    (it forms CPU groups only through mpirun). That process must not train alone as if it were the run."""
    config = _accelerate_config(tmp_path / "accelerate.yaml", "2 CPU processes")
    run = tmp_path / "run"
    argv = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "-m", "ssltrain", *SHORT,
            f"hydra.run.dir={run}"]
    proc = run_group(argv, tmp_path, child_env(tmp_path, cache_dir))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ssltrain: error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert "accelerate launch started 1 process of a multi-process CPU launch" in errors[0]
    assert "mpirun" in errors[0] and "--multi_gpu --num_processes N" in errors[0]
    assert not run.exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun", path=str(BIN)) is None, reason="needs mpirun (the dev extra's mpich)")
def test_a_multi_cpu_accelerate_config_with_mpirun_trains_one_model_on_its_processes(cache_dir, tmp_path):
    """The MULTI_CPU file with an mpirun hostfile: accelerate runs `mpirun -n 2`, whose ranks know themselves
    only from MPI's variables (PMI_RANK/PMI_SIZE). Catches reading the world size from WORLD_SIZE alone: every
    rank would take itself for rank 0 of 1 (wrong micro-batch, two run directories, or a refused group)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost:2\n")
    config = _accelerate_config(tmp_path / "accelerate.yaml", "2 CPU processes",
                                mpirun_config={"mpirun_hostfile": str(hostfile)})
    cwd, run = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    env = child_env(tmp_path, cache_dir, MASTER_PORT=str(free_port()))
    env["PATH"] = f"{BIN}:{env['PATH']}"  # mpirun from the venv's mpich
    argv = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "-m", "ssltrain", *SHORT,
            f"hydra.run.dir={run}"]
    proc = run_group(argv, cwd, env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    start, end = _one_run(run)
    assert (start["world_size"], start["micro_batch_size"]) == (2, 16)
    assert not set(start["rank_first_examples"][0]) & set(start["rank_first_examples"][1])
    assert len(end["param_checksums"]) == 2 and len(set(end["param_checksums"])) == 1
    assert list(cwd.iterdir()) == [], "rank 1 wrote a run directory of its own"


@pytest.mark.slow
@pytest.mark.parametrize("launcher_name", ["accelerate", "torchrun"])
def test_two_processes_with_the_default_batch_settings(launcher_name, cache_dir, tmp_path):
    """README's `accelerate launch --multi_gpu --num_processes 2 -m ssltrain hardware=cpu`, with no batch
    override: batch 32 = micro 16 x 2 processes, recorded in the start record."""
    run = tmp_path / "run"
    argv = [*launcher(launcher_name, free_port()), "-m", "ssltrain", "hardware=cpu", *SHORT, f"hydra.run.dir={run}"]
    proc = run_group(argv, tmp_path, child_env(tmp_path, cache_dir))
    assert proc.returncode == 0, proc.stderr[-6000:]
    start, end = _one_run(run)
    assert (start["world_size"], start["batch_size"], start["micro_batch_size"], start["grad_accum"]) == (2, 32, 16, 1)
    assert OmegaConf.load(run / "config.yaml").trainer.micro_batch_size == 16  # the resolved value is recorded
    assert end["tokens_seen"] == 3 * 32 * 128


@pytest.mark.slow
def test_an_explicit_micro_batch_that_does_not_divide_is_one_line_from_one_rank(cache_dir, tmp_path):
    """trainer.micro_batch_size=32 on 2 processes (batch 32): today's one-line error, printed once (not once
    per rank), before any process group or run directory exists."""
    run = tmp_path / "run"
    argv = [*launcher("torchrun", free_port()), "-m", "ssltrain", "trainer.micro_batch_size=32", *SHORT,
            f"hydra.run.dir={run}"]
    proc = run_group(argv, tmp_path, child_env(tmp_path, cache_dir), timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "ssltrain: error:" in line]
    assert errors == ["ssltrain: error: trainer.batch_size=32 is not divisible by trainer.micro_batch_size=32 x 2 "
                      "process(es) = 64; pick a multiple of 64, or trainer.micro_batch_size=auto"], proc.stderr[-4000:]
    assert not run.exists()


@pytest.mark.slow
def test_tasks_started_by_srun_form_one_process_group(cache_dir, tmp_path):
    """`srun --ntasks 2 ssltrain` (no torchrun): each task knows itself from SLURM's variables only. srun is
    not installed here, so two processes are started with the variables srun sets for a 2-task step on one
    node (srun(1), OUTPUT ENVIRONMENT VARIABLES); everything after that is the real code path. Catches
    tasks that ignore SLURM and train two independent copies into one run directory."""
    import subprocess

    pytest.importorskip("submitit")
    run = tmp_path / "run"
    port = free_port()
    assert 20000 <= port < 60000
    job_id = str(port - 20000)  # ssltrain derives MASTER_PORT 20000 + job id % 40000: here a free port
    slurm = dict(SLURM_JOB_ID=job_id, SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_NODEID="0",
                 SLURM_JOB_NUM_NODES="1", SLURM_STEP_NUM_NODES="1", SLURM_JOB_NODELIST="localhost")
    started = [subprocess.Popen([str(BIN / "ssltrain"), *SHORT, f"hydra.run.dir={run}"], cwd=tmp_path,
                                env=child_env(tmp_path, cache_dir, **slurm, SLURM_PROCID=str(task),
                                              SLURM_LOCALID=str(task)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for task in range(2)]
    outputs = [p.communicate(timeout=300) for p in started]
    for p, (_, err) in zip(started, outputs):
        assert p.returncode == 0, err[-4000:]
    start, end = _one_run(run)
    assert (start["world_size"], start["micro_batch_size"]) == (2, 16)
    assert len(end["param_checksums"]) == 2 and len(set(end["param_checksums"])) == 1
