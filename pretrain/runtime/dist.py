"""The one place that reads launcher environment variables.

Three ways to start ranks are supported, one process per device in each:
  * `deepspeed` / `torchrun`: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    (the deepspeed launcher also appends `--local_rank=N`, which must agree with LOCAL_RANK);
  * `srun`: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, plus MASTER_ADDR / MASTER_PORT that the
    sbatch script exports (see slurm/);
  * nothing set: one process, rank 0 of 1.
Everything else in the trainer receives a `DistEnv`; nobody else reads these variables. DeepSpeed
itself reads the torchrun names, so `export_torch_env` writes them (from whichever launcher) before
`deepspeed.init_distributed`. A partly-set environment is an error, never a guess: a rank that
silently believes it is alone would hang its peers at the first collective.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping

TORCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
SLURM_VARS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")
MASTER_VARS = ("MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" (also the deepspeed launcher), "slurm" or "single"
    local_world_size: int = 1  # processes on this node (sizes CPU thread pools); world size if unknown

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export_torch_env(self, environ: dict | None = None) -> None:
        """Write the torchrun variable names that DeepSpeed and torch.distributed read."""
        env = os.environ if environ is None else environ
        env.update(RANK=str(self.rank), LOCAL_RANK=str(self.local_rank), WORLD_SIZE=str(self.world_size),
                   MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer; "
                         f"the launcher should set it to a rank or a count") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _master(environ: Mapping[str, str], world_size: int, launcher: str) -> tuple[str, int]:
    present = [v for v in MASTER_VARS if environ.get(v)]
    if len(present) == 2:
        return environ["MASTER_ADDR"], _int(environ, "MASTER_PORT")
    if world_size == 1 and not present:
        return "127.0.0.1", _free_port()
    missing = [v for v in MASTER_VARS if v not in present]
    hint = ('export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1) and a '
            'MASTER_PORT derived from $SLURM_JOB_ID in the sbatch script' if launcher == "slurm"
            else "start the ranks with deepspeed or torchrun, which set both")
    raise RuntimeError(f"partly set distributed environment: {launcher} world of {world_size} but "
                       f"{', '.join(missing)} not set; {hint}.")


def from_environ(environ: Mapping[str, str] | None = None, local_rank_arg: int | None = None) -> DistEnv:
    """Map the launcher's variables to a DistEnv, or raise naming what is missing.

    Args:
        environ: the environment to read (defaults to os.environ; tests pass a dict).
        local_rank_arg: the `--local_rank` the deepspeed launcher appends (-1 or None when absent).
    """
    environ = os.environ if environ is None else environ
    torch_set = [v for v in TORCH_VARS if v in environ]
    slurm_set = [v for v in SLURM_VARS if v in environ]
    if torch_set:
        # torchrun / deepspeed variables win over SLURM_* ones: inside an sbatch script that runs
        # `deepspeed` or `torchrun`, the Slurm variables describe the job, not these processes.
        if len(torch_set) != len(TORCH_VARS):
            missing = [v for v in TORCH_VARS if v not in environ]
            raise RuntimeError(f"partly set distributed environment: {', '.join(torch_set)} set but "
                               f"{', '.join(missing)} not; start the ranks with deepspeed, torchrun or "
                               f"srun, or unset {', '.join(torch_set)} for a single process.")
        rank, local_rank, world = (_int(environ, v) for v in TORCH_VARS)
        launcher = "torchrun"
    elif slurm_set:
        if len(slurm_set) != len(SLURM_VARS):
            missing = [v for v in SLURM_VARS if v not in environ]
            raise RuntimeError(f"partly set Slurm environment: {', '.join(slurm_set)} set but "
                               f"{', '.join(missing)} not; launch one task per device with srun.")
        rank, local_rank, world = (_int(environ, v) for v in SLURM_VARS)
        launcher = "slurm"
    else:
        rank, local_rank, world, launcher = 0, 0, 1, "single"
    if local_rank_arg is not None and local_rank_arg >= 0 and local_rank_arg != local_rank:
        raise RuntimeError(f"--local_rank={local_rank_arg} disagrees with the launcher's local rank "
                           f"{local_rank} ({launcher}); do not pass --local_rank by hand.")
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank <= rank:
        raise RuntimeError(f"inconsistent distributed environment from {launcher}: rank {rank}, "
                           f"local rank {local_rank}, world size {world}.")
    addr, port = _master(environ, world, launcher)
    return DistEnv(rank, local_rank, world, addr, port, launcher, _local_world(environ, launcher, world))


def _local_world(environ: Mapping[str, str], launcher: str, world: int) -> int:
    # Optional hints only (never part of the partly-set check): torchrun sets LOCAL_WORLD_SIZE, the
    # deepspeed launcher LOCAL_SIZE, srun SLURM_STEP_TASKS_PER_NODE as e.g. "2(x3)" or "4,2".
    names = {"torchrun": ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"), "slurm": ("SLURM_STEP_TASKS_PER_NODE",)}
    for name in names.get(launcher, ()):
        head = environ.get(name, "").split(",")[0].split("(")[0]
        if head.isdigit() and int(head) > 0:
            return int(head)
    return world
