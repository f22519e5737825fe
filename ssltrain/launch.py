"""Which process of how many this is, as the program that started ssltrain says.

- torchrun and `accelerate launch --multi_gpu` (its torch launcher) set RANK, WORLD_SIZE, LOCAL_RANK.
- mpirun (what `accelerate launch` runs for a MULTI_CPU config with an mpirun hostfile) sets its
  own variables (PMI_*, OMPI_COMM_WORLD_*, MV2_COMM_WORLD_*); Accelerate forms a CPU group from them.
- SLURM (`srun`) and submitit (`hydra/launcher=submitit_slurm|submitit_local`) start one task per
  process and set their own variables. `join_job` exports torch's env:// variables from them
  (MASTER_ADDR: the first host of the job; a MASTER_PORT derived from the job id), the way
  submitit's TorchDistributedEnvironment and Lightning's SLURMEnvironment do, so that the tasks
  of one job form one process group instead of training N copies into one run directory.

This module reads the environment only; Accelerate and torch.distributed form the group.
"""

from __future__ import annotations

import os
import signal

from ssltrain.errors import UserError

# Accelerate's order (accelerate.utils.environment.get_cpu_distributed_information).
WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")
# What a launcher sets; an outer launcher's leftovers (pytest run under torchrun) would leak into children.
LAUNCHER_VARS = WORLD_VARS + RANK_VARS + ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                                          "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU")
MASTER_PORT_RANGE = (20000, 60000)  # where a port derived from a SLURM job id falls


def _first_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return int(value)
    return default


def world_size() -> int:
    """Processes the launcher started; 1 when ssltrain runs on its own."""
    return _first_int(WORLD_VARS, 1)


def rank() -> int:
    """This process's global rank; 0 when ssltrain runs on its own."""
    return _first_int(RANK_VARS, _first_int(("LOCAL_RANK",), 0))


def local_rank() -> int:
    """This process's rank among those of its machine; 0 when ssltrain runs on its own."""
    return _first_int(LOCAL_RANK_VARS, 0)


def join_job() -> str | None:
    """When submitit or srun started several tasks of one job and no launcher variable is set, export
    MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE from the scheduler's
    variables. Returns what started the tasks ("submitit", "slurm"), or None when nothing is exported
    (one task, or a launcher's variables already there). Idempotent."""
    if any(os.environ.get(name) for name in WORLD_VARS):
        return None
    if os.environ.get("SUBMITIT_EXECUTOR"):  # a task of a submitit job, e.g. from hydra-submitit-launcher
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        if JobEnvironment().num_tasks <= 1:
            return None
        # Every task keeps every GPU of its node visible: Accelerate picks cuda:LOCAL_RANK.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return "submitit"
    tasks = _first_int(("SLURM_STEP_NUM_TASKS",), 1)  # set by srun for the tasks it starts, not in the batch script
    if tasks <= 1:
        return None
    os.environ.update(_slurm_torch_env(tasks))
    return "slurm"


def _slurm_torch_env(tasks: int) -> dict[str, str]:
    try:
        from submitit.slurm.slurm import SlurmJobEnvironment
    except ImportError:
        raise UserError(f"srun started {tasks} tasks (SLURM_STEP_NUM_TASKS={tasks}); to join them in one run "
                        f"ssltrain reads SLURM's node list with submitit: pip install 'ssltrain[slurm]' (or start "
                        f"one task per node that runs torchrun)") from None
    job = SlurmJobEnvironment()
    low, high = MASTER_PORT_RANGE
    port = os.environ.get("MASTER_PORT") or str(low + int(job.raw_job_id) % (high - low))
    nodes = max(1, _first_int(("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES"), 1))
    return {
        "MASTER_ADDR": os.environ.get("MASTER_ADDR") or job.hostnames[0],
        "MASTER_PORT": port,
        "RANK": str(job.global_rank),
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": str(job.local_rank),
        "LOCAL_WORLD_SIZE": str(tasks // nodes),
    }


def check_not_alone() -> None:
    """`accelerate launch` with a MULTI_CPU config (or --cpu --num_processes N) and no mpirun hostfile
    starts one process: it sets MASTER_ADDR for the group it means to form but no rank or world size.
    Stop with one line instead of training one process where the config file asked for several."""
    launched_by_accelerate = os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
    if launched_by_accelerate and os.environ.get("MASTER_ADDR") and world_size() == 1:
        raise UserError(
            "accelerate launch started 1 process of a multi-process CPU launch (MASTER_ADDR is set, no "
            "WORLD_SIZE): accelerate starts several CPU processes only through mpirun (mpirun_config: "
            "mpirun_hostfile in its config file); or launch them with `accelerate launch --multi_gpu "
            "--num_processes N -m ssltrain` or `torchrun --nproc_per_node N -m ssltrain` (hardware=cpu joins "
            "them in one gloo group)")


def pass_on_preemption(signum: int | None) -> None:
    """In a submitit job, hand the preemption signal that stopped the run (after its checkpoint) to the
    handler submitit installed for it: on rank 0 that requeues the job and exits (the requeued job
    runs the same sweep job in the same run directory, where trainer.resume=auto continues); on the
    other ranks it returns."""
    if signum is None or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    from submitit import JobEnvironment

    if signum == getattr(signal, f"SIG{JobEnvironment.USR_SIG}", None) and callable(signal.getsignal(signum)):
        signal.raise_signal(signum)
