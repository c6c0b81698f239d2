"""Where this process sits: ranks from the launcher, its role, and its process groups.

One Topology object is built once per process and passed to whoever needs a group; nothing here is a
module-level global. Without a live teacher (modes none/colocated/offline) every rank is a student and
the default world is the student world. In online mode the job is split into two roles:

- teacher ranks (whole nodes by default) and student ranks, each with its own *default* world made
  from one TCPStore with a PrefixStore per role, so DeepSpeed on a student rank sees only students
  (ZeRO, checkpoints, monitors unmodified) and a teacher rank sees only teachers;
- one bridge process group over all ranks (gloo, also on GPU clusters: see init_topology), used only
  for teacher <-> student point-to-point traffic; the role worlds use NCCL on GPU.

Student dp rank s is served by teacher replica s // students_per_teacher (a replica is one rank).
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from .configlib import doc, fail


@dataclass
class TopologyConfig:
    """Role assignment for online distillation (ignored in other modes)."""
    teacher_ranks: list[int] = field(default_factory=list, metadata=doc(
        "global ranks that run the teacher (overrides teacher_nodes)"))
    teacher_nodes: int = field(default=0, metadata=doc(
        "teachers take the first N nodes; 0 = auto: 1 node when the job spans several nodes, else "
        "global rank 0 alone"))
    students_per_teacher: int = field(default=0, metadata=doc(
        "student ranks served by one teacher replica; 0 = students / teachers (must divide)"))
    peer_timeout_s: float = field(default=300.0, metadata=doc(
        "a peer silent for this long (or gone) ends the run on every rank with an error naming it"))

    def validate(self, prefix: str) -> None:
        if any(r < 0 for r in self.teacher_ranks) or len(set(self.teacher_ranks)) != len(self.teacher_ranks):
            fail(f"{prefix}.teacher_ranks", self.teacher_ranks, "must be distinct ranks >= 0")
        if self.teacher_nodes < 0:
            fail(f"{prefix}.teacher_nodes", self.teacher_nodes, "must be >= 0")
        if self.students_per_teacher < 0:
            fail(f"{prefix}.students_per_teacher", self.students_per_teacher, "must be >= 0")
        if not self.peer_timeout_s > 0:
            fail(f"{prefix}.peer_timeout_s", self.peer_timeout_s, "must be > 0")


@dataclass
class LaunchEnv:
    """Rank facts read from the launcher (deepspeed/torchrun: RANK...; srun: SLURM_*; mpirun: mpi4py)."""
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str
    node: str = ""  # node identity: the launcher's node rank where given, else the host name

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
        node = env.get("CROSS_RANK") or env.get("SLURM_NODEID") or socket.gethostname()
        return cls(rank, world, local, addr, port, source, f"node{node}" if str(node).isdigit() else node)


def assign_roles(cfg: TopologyConfig, world_size: int, nodes: list[str]) -> list[int]:
    """Global ranks of the teachers. `nodes[r]` is rank r's node; nodes are ordered by first rank."""
    if cfg.teacher_ranks:
        teachers = sorted(cfg.teacher_ranks)
        if teachers[-1] >= world_size:
            fail("topology.teacher_ranks", cfg.teacher_ranks, f"ranks must be < world size {world_size}")
    else:
        order = list(dict.fromkeys(nodes))
        n = cfg.teacher_nodes or (1 if len(order) > 1 else 0)
        if n >= len(order) and n > 0:
            fail("topology.teacher_nodes", cfg.teacher_nodes,
                 f"must leave nodes for students: the job has {len(order)} node(s)")
        teachers = [r for r in range(world_size) if nodes[r] in order[:n]] if n else [0]
    students = world_size - len(teachers)
    if students < 1:
        fail("topology.teacher_ranks", teachers, f"must leave student ranks (world size {world_size})")
    spt = cfg.students_per_teacher or (students // len(teachers) if students % len(teachers) == 0 else 0)
    if spt == 0 or spt * len(teachers) != students:
        fail("topology.students_per_teacher", cfg.students_per_teacher,
             f"{students} student ranks cannot be split evenly over {len(teachers)} teacher replica(s)")
    return teachers


@dataclass
class Topology:
    """This process's place in the job. `dp_group` is what DeepSpeed and the trainer reduce over."""
    env: LaunchEnv
    backend: str
    role: str = "student"
    teacher_ranks: list[int] = field(default_factory=list)  # global ranks, online mode only
    students_per_teacher: int = 0
    hosts: dict[int, str] = field(default_factory=dict)      # global rank -> "host (node)"
    dp_group: Optional[dist.ProcessGroup] = None
    bridge: Optional[dist.ProcessGroup] = None
    peer_timeout_s: float = 300.0
    # Online mode: the job's TCPStore (global rank 0 hosts its server, which lives as long as this
    # object); roles also use it to publish small facts to each other (data ready, teacher figures).
    store: Optional[dist.Store] = None

    def __post_init__(self):
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend {self.backend!r}: must be gloo or nccl")
        if self.role not in ("student", "teacher"):
            raise ValueError(f"role {self.role!r}: must be student or teacher")

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def online(self) -> bool:
        return bool(self.teacher_ranks)

    @property
    def student_ranks(self) -> list[int]:
        t = set(self.teacher_ranks)
        return [r for r in range(self.env.world_size) if r not in t]

    @property
    def role_members(self) -> list[int]:
        """Global ranks of this role's world, in role-rank order (online mode)."""
        return self.teacher_ranks if self.role == "teacher" else self.student_ranks

    @property
    def dp_rank(self) -> int:
        if self.online:  # role worlds are built in global-rank order
            return self.role_members.index(self.rank)
        return dist.get_rank(self.dp_group) if dist.is_initialized() else 0

    @property
    def dp_size(self) -> int:
        if self.online:
            return len(self.role_members)
        return dist.get_world_size(self.dp_group) if dist.is_initialized() else 1

    @property
    def is_logger(self) -> bool:
        """The one rank of its role's world that writes metrics, prints progress and exports."""
        return self.dp_rank == 0

    def my_teacher(self) -> int:
        """Global rank of the teacher replica serving this student."""
        return self.teacher_ranks[self.dp_rank // self.students_per_teacher]

    def my_students(self) -> list[int]:
        """Global ranks of the students this teacher serves, in student dp order."""
        i = self.teacher_ranks.index(self.rank)
        s = self.student_ranks
        return s[i * self.students_per_teacher:(i + 1) * self.students_per_teacher]

    def describe(self, rank: int) -> str:
        return f"rank {rank} ({self.hosts.get(rank, '?')})"

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.dp_group)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and self.dp_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
        return t

    def close(self) -> None:
        if self.bridge is not None:
            # Everyone leaves together: global rank 0 hosts the job's TCPStore, and a rank that exits
            # while its peers still tear down their groups can take them (or itself) down uncleanly.
            try:
                opts = dist.BarrierOptions()
                opts.timeout = datetime.timedelta(seconds=max(3600.0, self.peer_timeout_s))
                self.bridge.barrier(opts).wait()
            except Exception:  # a peer already gone: nothing to wait for
                pass
            try:
                self.bridge.shutdown() if hasattr(self.bridge, "shutdown") else None
            except Exception:  # a peer already gone: nothing left to flush
                pass
            self.bridge = None
        if dist.is_initialized():
            dist.destroy_process_group()


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_topology(timeout_s: float = 1800.0, env: Optional[LaunchEnv] = None,
                  online: Optional[TopologyConfig] = None) -> Topology:
    """Start the process groups and return the Topology.

    Without `online`, one default world over all ranks. With it, the role worlds and the bridge."""
    import deepspeed

    env = env or LaunchEnv.from_environ()
    backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    if online is None:
        # deepspeed.init_distributed reads these; Slurm/MPI launches may not have set them.
        os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size),
                          LOCAL_RANK=str(env.local_rank), MASTER_ADDR=env.master_addr,
                          MASTER_PORT=str(env.master_port))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
        h = socket.gethostname()
        return Topology(env=env, backend=backend, dp_group=dist.group.WORLD,
                        hosts={env.rank: h if h == env.node else f"{h}, {env.node}"})

    timeout = datetime.timedelta(seconds=online.peer_timeout_s)
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, env.rank == 0,
                          timeout=datetime.timedelta(seconds=max(online.peer_timeout_s, 60.0)),
                          wait_for_workers=False)
    store.set(f"pd/node/{env.rank}", env.node)
    store.set(f"pd/host/{env.rank}", socket.gethostname())
    nodes = [store.get(f"pd/node/{r}").decode() for r in range(env.world_size)]
    hosts = {}
    for r in range(env.world_size):
        h = store.get(f"pd/host/{r}").decode()
        hosts[r] = h if h == nodes[r] else f"{h}, {nodes[r]}"
    teachers = assign_roles(online, env.world_size, nodes)
    students = [r for r in range(env.world_size) if r not in set(teachers)]
    role = "teacher" if env.rank in teachers else "student"
    members = teachers if role == "teacher" else students
    role_rank = members.index(env.rank)
    dist.init_process_group(backend, store=dist.PrefixStore(f"pd/world/{role}/", store), rank=role_rank,
                            world_size=len(members), timeout=timeout)
    # The bridge is gloo on GPU clusters too (teacher logits cross it from host memory over TCP):
    # a teacher waits on several students at once, one blocking receive per student thread, which
    # gloo supports and NCCL does not (its ops on a communicator must come from one ordered stream);
    # a dead peer closes its gloo connection and fails the wait at once instead of at a watchdog
    # timeout; and the traffic is small (~250 B/token at top-0.95-50, see bench/online.py).
    bridge = dist.ProcessGroupGloo(dist.PrefixStore("pd/bridge/", store), env.rank, env.world_size, timeout)
    # DeepSpeed (and anything else reading the environment) must see the role world, not the job.
    os.environ.update(RANK=str(role_rank), WORLD_SIZE=str(len(members)), LOCAL_RANK=str(env.local_rank))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timeout)
    spt = online.students_per_teacher or len(students) // len(teachers)
    topo = Topology(env=env, backend=backend, role=role, teacher_ranks=teachers, students_per_teacher=spt,
                    hosts=hosts, dp_group=dist.group.WORLD, bridge=bridge,
                    peer_timeout_s=online.peer_timeout_s, store=store)
    return topo
