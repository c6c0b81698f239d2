"""Where this process sits: global rank/world from the launcher's environment, and its process groups.

One Topology object is built once per process and passed to whoever needs a group; nothing here is a
module-level global. This build has one role (student) whose data-parallel world is the default
world that DeepSpeed sees.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class LaunchEnv:
    """Rank facts read from the launcher (deepspeed/torchrun: RANK...; srun: SLURM_*; mpirun: mpi4py)."""
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str

    @classmethod
    def from_environ(cls, env: Optional[dict] = None) -> "LaunchEnv":
        env = os.environ if env is None else env
        if "RANK" in env and "WORLD_SIZE" in env:
            rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
            source = "env"
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            # deepspeed --launcher slurm and plain srun set no RANK: map Slurm's own variables.
            rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
            local, source = int(env.get("SLURM_LOCALID", 0)), "slurm"
        elif "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
            from mpi4py import MPI  # optional extra: pip install pd-dist[mpi]

            comm = MPI.COMM_WORLD
            rank, world = comm.Get_rank(), comm.Get_size()
            local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", 0)))
            source = "mpi"
        else:
            rank, world, local, source = 0, 1, 0, "single"
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = int(env.get("MASTER_PORT", "29500"))
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world} (from {source} environment)")
        return cls(rank, world, local, addr, port, source)


@dataclass
class Topology:
    """This process's place in the job. `dp_group` is what DeepSpeed and the trainer reduce over."""
    env: LaunchEnv
    backend: str
    host: str = field(default_factory=socket.gethostname)
    dp_group: Optional[dist.ProcessGroup] = None

    def __post_init__(self):
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend {self.backend!r}: must be gloo or nccl")

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp_group) if dist.is_initialized() else 0

    @property
    def dp_size(self) -> int:
        return dist.get_world_size(self.dp_group) if dist.is_initialized() else 1

    @property
    def is_logger(self) -> bool:
        """The one rank that writes metrics, prints progress and exports."""
        return self.dp_rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.dp_group)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and self.dp_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
        return t

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_topology(timeout_s: float = 1800.0, env: Optional[LaunchEnv] = None) -> Topology:
    """Start the default world (DeepSpeed's comm on top of it) and return the Topology."""
    import deepspeed

    env = env or LaunchEnv.from_environ()
    backend = default_backend()
    # deepspeed.init_distributed reads these; Slurm/MPI launches may not have set them.
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size),
                      LOCAL_RANK=str(env.local_rank), MASTER_ADDR=env.master_addr,
                      MASTER_PORT=str(env.master_port))
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
    return Topology(env=env, backend=backend, dp_group=dist.group.WORLD)
