"""Where this process sits: ranks from the launcher, its role, and its process groups.

One Topology object is built once per process and passed to whoever needs a group; nothing here is a
module-level global. Without a live teacher (modes none/colocated/offline) every rank is a student and
the default world is the student world. In online mode the job is split into two roles:

- teacher ranks (whole nodes by default) and student ranks, each with its own *default* world made
  from one TCPStore with a PrefixStore per role, so DeepSpeed on a student rank sees only students
  (ZeRO, checkpoints, monitors unmodified) and a teacher rank sees only teachers;
- one bridge process group over all ranks (gloo, also on GPU clusters: see init_topology), used only
  for teacher <-> student point-to-point traffic; the role worlds use NCCL on GPU.

Which rank plays which part (teacher replicas and their stages, student data-parallel ranks and
pipeline stages, who serves whom) is the job's Layout (pd_dist.cluster.layout), computed from the config and
the nodes alone; the Topology holds it with the groups built from it.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from pd_dist.cluster.failover import LOST_TEACHERS, HeartbeatWatch, StoreLog, mark_teacher_lost, teacher_is_lost
from pd_dist.cluster.layout import Layout, TopologyConfig, assign_roles, make_layout  # noqa: F401 (re-exported)


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
            # mpirun: Open MPI and MPICH/Hydra put rank and size in the environment; mpi4py (the `mpi`
            # extra) is only asked where a launcher gives the rank without the size.
            rank = int(env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", 0)))
            size = env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE"))
            if size is None:
                from mpi4py import MPI

                rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
            world = int(size)
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


@dataclass
class Topology:
    """This process's place in the job and its groups, built once (init_topology) and passed on.

    `role_rank`/`role_size`: this rank in its role's own default world (what DeepSpeed sees).
    `dp_rank`/`dp_size`: its data-parallel rank and degree (the role world divided by pipeline stages);
    `stage`/`stages`: its pipeline stage (0 / 1 without pipelining). `dp_group` reduces over the ranks
    of this stage (the whole role world without pipelining), `pipe_group` spans this rank's pipeline."""
    env: LaunchEnv
    backend: str
    layout: Layout
    role: str = "student"
    hosts: dict[int, str] = field(default_factory=dict)      # global rank -> "host (node)"
    dp_group: Optional[dist.ProcessGroup] = None
    pipe_group: Optional[dist.ProcessGroup] = None
    bridge: Optional[dist.ProcessGroup] = None
    peer_timeout_s: float = 300.0
    # The job's TCPStore (global rank 0 hosts its server, on MASTER_ADDR only, which lives as long as
    # this object); online roles also publish small facts to each other on it (data ready, teacher figures).
    store: Optional[dist.Store] = None
    # topology.teacher_failover: students outlive a teacher replica (online.TeacherClient), so the end of
    # the run must not wait on a teacher that is gone (close).
    teacher_failover: bool = False
    _beat: Optional[object] = field(default=None, repr=False)  # the heartbeat thread's stop event
    _beat_thread: Optional[object] = field(default=None, repr=False)

    HEARTBEAT_S = 1.0

    def start_heartbeat(self) -> None:
        """Count this rank's heartbeats on the job store (a counter, not a clock: nodes' clocks differ), so
        that after a failed collective the survivors can name the rank that stopped (dead_ranks)."""
        import threading

        if self.store is None or self._beat is not None:
            return
        stop = threading.Event()
        self._beat = stop
        key, store = f"pd/beat/{self.rank}", self.store

        def beat():
            while not stop.is_set():
                try:
                    store.add(key, 1)
                except Exception:  # the store's host is gone: nothing left to tell
                    return
                stop.wait(self.HEARTBEAT_S)
        self._beat_thread = threading.Thread(target=beat, daemon=True, name="pd-heartbeat")
        self._beat_thread.start()
        # A daemon thread still inside a store call when the interpreter finalizes aborts the process
        # ("terminate called without an active exception"): whatever way the process ends, stop it first.
        import atexit

        atexit.register(self.stop_heartbeat)

    def stop_heartbeat(self) -> None:
        """Stop the heartbeat and wait for its thread (at most one beat's store call)."""
        import threading

        if self._beat is not None:
            self._beat.set()
        th = self._beat_thread
        if th is not None and th is not threading.current_thread():
            th.join(timeout=10)

    def dead_ranks(self, wait_s: float = 4.0) -> list[int]:
        """Ranks of the job whose heartbeat did not advance over ``wait_s`` (a few beats). Rank 0 hosts
        the store: when the store cannot be reached, rank 0 is the one gone."""
        import time

        if self.store is None or self._beat is None:
            return []
        watch = self.watch([r for r in range(self.env.world_size) if r != self.rank], 0.9 * wait_s)
        stalled = watch.stalled()  # reads every counter once
        if not stalled:
            time.sleep(wait_s)
            stalled = watch.stalled()
        return [r for r, age in stalled if age == age or self.rank != 0]  # NaN age: rank 0's store is gone

    def watch(self, ranks: list[int], timeout_s: float) -> "HeartbeatWatch":
        """A HeartbeatWatch over ``ranks`` (a server that waits on peers with no deadline of its own)."""
        return HeartbeatWatch(self, list(ranks), timeout_s)

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
        return self.layout.online

    @property
    def teacher_ranks(self) -> list[int]:
        return self.layout.teachers

    @property
    def student_ranks(self) -> list[int]:
        return self.layout.students

    @property
    def students_per_teacher(self) -> int:
        return self.layout.students_per_teacher

    @property
    def role_members(self) -> list[int]:
        """Global ranks of this role's world, in role-rank order."""
        return self.layout.teachers if self.role == "teacher" else self.layout.students

    @property
    def role_rank(self) -> int:
        return self.role_members.index(self.rank)

    @property
    def role_size(self) -> int:
        return len(self.role_members)

    @property
    def stages(self) -> int:
        return self.layout.teacher_stages if self.role == "teacher" else self.layout.student_stages

    @property
    def stage(self) -> int:
        return self.role_rank % self.stages

    @property
    def dp_rank(self) -> int:
        return self.role_rank // self.stages

    @property
    def dp_size(self) -> int:
        return self.role_size // self.stages

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def is_logger(self) -> bool:
        """The one rank of its role's world that writes metrics, prints progress and exports."""
        return self.role_rank == 0

    def my_teacher(self) -> int:
        """Global rank of the teacher replica's entry (first stage) serving this student pipeline."""
        return self.layout.entry(self.layout.teacher_of(self.dp_rank))

    def my_teacher_exit(self) -> int:
        """Global rank that sends this student its teacher's answers (the replica's last stage)."""
        return self.layout.exit(self.layout.teacher_of(self.dp_rank))

    def my_students(self) -> list[int]:
        """Global ranks of the student clients (last stages) this teacher replica serves, in dp order."""
        return self.layout.clients_of(self.dp_rank)

    def describe(self, rank: int) -> str:
        return f"rank {rank} ({self.hosts.get(rank, '?')})"

    def barrier(self) -> None:
        """All ranks of this role's world."""
        if dist.is_initialized():
            dist.barrier()

    def role_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over every rank of this role's world."""
        if dist.is_initialized() and self.role_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks of this stage."""
        if dist.is_initialized() and self.dp_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
        return t

    def _leave_with_survivors(self) -> None:
        """The end-of-run barrier of a job whose teacher replicas may be gone (topology.teacher_failover):
        a bridge barrier would wait on them, so every rank counts itself closing on the job's store and
        waits until every rank has, or is a teacher lost mid-run (recorded by its students, or found
        here with no heartbeat for the peer timeout). Heartbeats go on until this rank has passed."""
        import time

        store = self.store
        lost = StoreLog(store, LOST_TEACHERS)
        try:
            teachers = self.layout.teachers
            if self.role != "teacher" or not teacher_is_lost(store, teachers.index(self.rank)):
                store.set(f"pd/closing/{self.rank}", "1")  # a lost teacher that comes back counts as lost
                store.add("pd/closing", 1)
            watch = self.watch([r for r in teachers if r != self.rank], self.peer_timeout_s)
            gone: set[int] = set()
            deadline = time.monotonic() + max(3600.0, self.peer_timeout_s)
            while time.monotonic() < deadline:
                gone.update(teachers[i] for i in lost.new())
                if store.add("pd/closing", 0) + len(gone) >= self.env.world_size:
                    break
                for r, age in watch.stalled():
                    if age != age:  # NaN: rank 0's store is gone, nobody left to wait for
                        return
                    watch.forget(r)
                    # One with its closing key set has passed the barrier and stopped beating: not lost.
                    if not store.check([f"pd/closing/{r}"]):
                        mark_teacher_lost(store, teachers.index(r))
                time.sleep(0.1)
        except Exception:  # the store's host is gone: nothing to wait for
            pass
        finally:
            if self._beat is not None:
                self._beat.set()

    def close(self) -> None:
        survivors = self.teacher_failover and self.bridge is not None
        if self._beat is not None and not survivors:  # else beats go on until the barrier is passed
            self._beat.set()
        if self.bridge is not None:
            # Everyone leaves together: global rank 0 hosts the job's TCPStore, and a rank that exits
            # while its peers still tear down their groups can take them (or itself) down uncleanly.
            if survivors:
                self._leave_with_survivors()
            else:
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


def _pipeline_groups(layout: Layout, role: str, role_rank: int):
    """(dp_group, pipe_group) of a pipelined role world (students: train.pipeline_stages, teachers:
    teacher.pipeline_stages): every rank creates every group, in the same order (new_group's rule)."""
    P = layout.teacher_stages if role == "teacher" else layout.student_stages
    if P == 1:
        return dist.group.WORLD, None
    dp = (len(layout.teachers) if role == "teacher" else len(layout.students)) // P
    dp_group = pipe_group = None
    for stage in range(P):
        g = dist.new_group([d * P + stage for d in range(dp)])
        if role_rank % P == stage:
            dp_group = g
    for d in range(dp):
        g = dist.new_group([d * P + s for s in range(P)])
        if role_rank // P == d:
            pipe_group = g
    return dp_group, pipe_group


def init_topology(timeout_s: float = 1800.0, env: Optional[LaunchEnv] = None,
                  topology: Optional[TopologyConfig] = None, online: bool = False, student_stages: int = 1,
                  teacher_stages: int = 1, teacher_zero3: bool = False) -> Topology:
    """Start the process groups and return the Topology.

    Without `online`, one default world over all ranks (the students). With it, the role worlds and
    the bridge. The layout's other parameters are ExperimentConfig.layout_args()."""
    env = env or LaunchEnv.from_environ()
    topology = topology or TopologyConfig()
    backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    kw = dict(online=online, student_stages=student_stages, teacher_stages=teacher_stages,
              teacher_zero3=teacher_zero3)
    if not online:
        # deepspeed.init_distributed reads these; Slurm/MPI launches may not have set them.
        os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size),
                          LOCAL_RANK=str(env.local_rank), MASTER_ADDR=env.master_addr,
                          MASTER_PORT=str(env.master_port))
        timeout = datetime.timedelta(seconds=timeout_s)
        store = job_store(env, timeout)
        dist.init_process_group(backend, store=dist.PrefixStore("pd/world/all/", store), rank=env.rank,
                                world_size=env.world_size, timeout=timeout)
        _init_deepspeed(backend, timeout, env.rank)
        h = socket.gethostname()
        nodes = [None] * env.world_size
        dist.all_gather_object(nodes, (env.node, h))
        layout = make_layout(topology, env.world_size, [n for n, _ in nodes], **kw)
        dp_group, pipe_group = _pipeline_groups(layout, "student", env.rank)
        topo = Topology(env=env, backend=backend, layout=layout, dp_group=dp_group, pipe_group=pipe_group,
                        hosts={r: hr if hr == n else f"{hr}, {n}" for r, (n, hr) in enumerate(nodes)},
                        store=store)
        topo.start_heartbeat()
        return topo

    timeout = datetime.timedelta(seconds=topology.peer_timeout_s)
    store = job_store(env, datetime.timedelta(seconds=max(topology.peer_timeout_s, 60.0)))
    store.set(f"pd/node/{env.rank}", env.node)
    store.set(f"pd/host/{env.rank}", socket.gethostname())
    nodes = [store.get(f"pd/node/{r}").decode() for r in range(env.world_size)]
    hosts = {}
    for r in range(env.world_size):
        h = store.get(f"pd/host/{r}").decode()
        hosts[r] = h if h == nodes[r] else f"{h}, {nodes[r]}"
    layout = make_layout(topology, env.world_size, nodes, **kw)
    role = "teacher" if env.rank in set(layout.teachers) else "student"
    members = layout.teachers if role == "teacher" else layout.students
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
    _init_deepspeed(backend, timeout, role_rank, world_tag=role)
    dp_group, pipe_group = _pipeline_groups(layout, role, role_rank)
    topo = Topology(env=env, backend=backend, layout=layout, role=role, hosts=hosts, dp_group=dp_group,
                    pipe_group=pipe_group, bridge=bridge, peer_timeout_s=topology.peer_timeout_s, store=store,
                    teacher_failover=topology.teacher_failover)
    topo.start_heartbeat()
    return topo


def loopback_name(addr: str) -> bool:
    """Whether ``addr`` is a host name (not an IP literal) that resolves only to loopback here, as
    Debian's and Ubuntu's `/etc/hosts` line `127.0.1.1 node1` makes node1 on node1 itself."""
    import ipaddress

    try:
        ipaddress.ip_address(addr)
        return False
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def single_host(env: Optional[dict] = None, world_size: Optional[int] = None) -> bool:
    """Whether the launcher says every rank runs on this host (its local size is the world size).
    Unknown counts as several hosts."""
    env = os.environ if env is None else env
    world = world_size if world_size is not None else int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1")))
    for k in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if str(env.get(k, "")).isdigit():
            return int(env[k]) >= world
    return world <= 1


def _listen_socket(addr: str, port: int) -> Optional[socket.socket]:
    """A listening TCP socket on ``addr``:``port`` only, or None when ``addr`` is not an address of this
    host (a name that resolves elsewhere, e.g. behind NAT): then the store listens on every interface."""
    import errno

    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RuntimeError(f"MASTER_ADDR {addr!r} does not resolve: {e.strerror}") from None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(4096)
            return sock
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRNOTAVAIL:
                raise RuntimeError(f"cannot listen on MASTER_ADDR {addr} port {port}: {e.strerror} "
                                   "(another job on this port? set MASTER_PORT)") from None
    return None


def job_store(env: LaunchEnv, timeout: datetime.timedelta) -> "dist.TCPStore":
    """The job's TCPStore, served by global rank 0. torch's own listens on every interface; this one
    listens on MASTER_ADDR only (the store has no authentication: see docs/operations.md), unless that
    is not an address of this host, or is a name that resolves to loopback here in a job of several
    hosts (where the others could not reach a loopback listener)."""
    kw = {}
    if env.rank == 0:
        if loopback_name(env.master_addr) and not single_host(world_size=env.world_size):
            # The other nodes reach this name at its real address, which a loopback listener refuses.
            print(f"pd-dist: MASTER_ADDR {env.master_addr} resolves to loopback on this host (an /etc/hosts "
                  "line): the job store listens on every interface so the other nodes can reach it; pass "
                  "this node's IP as MASTER_ADDR to listen on that address only", flush=True)
            sock = None
        else:
            sock = _listen_socket(env.master_addr, env.master_port)
        if sock is not None:
            kw["master_listen_fd"] = sock.detach()  # the store owns the descriptor from here on
    return dist.TCPStore(env.master_addr, env.master_port, env.world_size, env.rank == 0, timeout=timeout,
                         wait_for_workers=False, **kw)


def _init_deepspeed(backend: str, timeout: datetime.timedelta, rank: int, world_tag: str = "") -> None:
    """deepspeed.init_distributed (which starts the default world from MASTER_ADDR/PORT unless a role
    world was started already), without its shared-memory leak.

    On the CPU accelerator, DeepSpeed maps a 69 MB allreduce workspace per rank in /dev/shm, named
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, and never unlinks it: every
    launch leaves its files behind until the RAM-backed /dev/shm fills. The name has no world in it, so
    the teacher and student worlds of one online job would also open each other's buffers; the role is
    added to the address part while DeepSpeed reads it (`world_tag`, only for a role world already
    connected, where the address is just a name). Once every rank of the world has mapped its peers' buffers, each unlinks its own
    name (the memory lives on in the mappings)."""
    import deepspeed

    addr = os.environ.get("MASTER_ADDR", "")
    tagged = f"{addr}-{world_tag}" if world_tag else addr
    os.environ["MASTER_ADDR"] = tagged
    try:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    finally:
        os.environ["MASTER_ADDR"] = addr
    dist.barrier()
    shm = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{tagged}_{os.environ.get('MASTER_PORT', '')}_{rank}"
    try:
        shm.unlink()
    except OSError:
        pass  # not created (no shared-memory op, ranks on several nodes) or already gone
