"""Where every rank of a job sits, computed from the config and the launcher's node layout alone.

Nothing starts here, so the map of a 512-rank job can be printed on a laptop (`pd-dist plan --config`,
`launch/pretrain_pd.py --dry-run`), and the running job builds its groups from the same function.

- Roles (online mode): teacher ranks take whole nodes by default (topology.teacher_nodes /
  teacher_ranks, see topology.assign_roles); every other rank is a student. Other modes: all students.
- A teacher replica is `teacher.pipeline_stages` consecutive teacher ranks (stage 0 takes the
  requests, the last stage answers); with `teacher.zero_stage: 3` every teacher rank is its own
  replica for serving while the weights are partitioned over all of them.
- A student pipeline is `train.pipeline_stages` consecutive student ranks: student-world rank r is
  data-parallel rank r // P, stage r % P (the pipe axis varies fastest, so a pipeline stays on a node
  when P divides the ranks per node). Only the last stage computes the loss, so only it talks to a
  teacher.
- Student data-parallel rank d is served by teacher replica d // students_per_teacher.
- Replicas and pipelines must not span nodes unless topology.cross_node says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pd_dist.core.configlib import doc, fail


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
    cross_node: bool = field(default=False, metadata=doc(
        "allow a teacher replica or a student pipeline to span nodes (refused by default: their "
        "stages exchange activations every micro-batch)"))
    teacher_failover: bool = field(default=False, metadata=doc(
        "online: when a teacher replica dies or is silent for peer_timeout_s, its students re-send what "
        "was in flight to the next live replica (in replica order) and go on with the same logits; the "
        "run fails only when no replica is left. Global rank 0 (the job's store) must survive; one "
        "replica per teacher rank (no teacher.zero_stage 3 or teacher.pipeline_stages > 1)"))

    def validate(self, prefix: str) -> None:
        if any(r < 0 for r in self.teacher_ranks) or len(set(self.teacher_ranks)) != len(self.teacher_ranks):
            fail(f"{prefix}.teacher_ranks", self.teacher_ranks, "must be distinct ranks >= 0")
        if self.teacher_nodes < 0:
            fail(f"{prefix}.teacher_nodes", self.teacher_nodes, "must be >= 0")
        if self.students_per_teacher < 0:
            fail(f"{prefix}.students_per_teacher", self.students_per_teacher, "must be >= 0")
        if not MIN_TIMEOUT_S <= self.peer_timeout_s <= MAX_TIMEOUT_S:
            fail(f"{prefix}.peer_timeout_s", self.peer_timeout_s,
                 f"must be in [{MIN_TIMEOUT_S:g}, {MAX_TIMEOUT_S:g}] s (at least a few of the 1 s heartbeats, "
                 "or live peers are taken for dead; at most a week: a dead peer must end the job)")


MIN_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 7 * 24 * 3600.0


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
    if world_size - len(teachers) < 1:
        fail("topology.teacher_ranks", teachers, f"must leave student ranks (world size {world_size})")
    return teachers


@dataclass(frozen=True)
class RankPlace:
    rank: int
    node: str
    local_rank: int
    role: str                 # "teacher" | "student"
    role_rank: int            # rank in the role's own world
    replica: int              # teacher: replica index; student: data-parallel rank
    stage: int                # pipeline stage inside the replica (0 without pipelining)
    stages: int


@dataclass
class Layout:
    world: int
    nodes: list[str]                       # node of every global rank
    online: bool
    teachers: list[int] = field(default_factory=list)
    students: list[int] = field(default_factory=list)
    teacher_stages: int = 1
    teacher_zero3: bool = False
    student_stages: int = 1
    students_per_teacher: int = 0

    # ---------------------------------------------------------------------------- structure
    @property
    def n_replicas(self) -> int:
        return len(self.teachers) // self.teacher_stages if self.online else 0

    @property
    def dp(self) -> int:
        return len(self.students) // self.student_stages

    def replica_ranks(self, i: int) -> list[int]:
        """Global ranks of teacher replica i, stage order."""
        r = self.teacher_stages
        return self.teachers[i * r:(i + 1) * r]

    def pipeline_ranks(self, d: int) -> list[int]:
        """Global ranks of student data-parallel replica d, stage order."""
        p = self.student_stages
        return self.students[d * p:(d + 1) * p]

    def client(self, d: int) -> int:
        """The rank of student replica d that talks to its teacher: its last stage."""
        return self.pipeline_ranks(d)[-1]

    def teacher_of(self, d: int) -> int:
        """Teacher replica serving student data-parallel rank d."""
        return d // self.students_per_teacher

    def entry(self, replica: int) -> int:
        """The teacher rank that takes replica `replica`'s requests (its first stage)."""
        return self.replica_ranks(replica)[0]

    def exit(self, replica: int) -> int:
        """The teacher rank that sends replica `replica`'s answers (its last stage)."""
        return self.replica_ranks(replica)[-1]

    def clients_of(self, replica: int) -> list[int]:
        s = self.students_per_teacher
        return [self.client(d) for d in range(replica * s, (replica + 1) * s)]

    def place(self, rank: int) -> RankPlace:
        local = [r for r in range(self.world) if self.nodes[r] == self.nodes[rank]].index(rank)
        if rank in self._teacher_index:
            i = self._teacher_index[rank]
            return RankPlace(rank, self.nodes[rank], local, "teacher", i, i // self.teacher_stages,
                             i % self.teacher_stages, self.teacher_stages)
        i = self._student_index[rank]
        return RankPlace(rank, self.nodes[rank], local, "student", i, i // self.student_stages,
                         i % self.student_stages, self.student_stages)

    def __post_init__(self):
        self._teacher_index = {r: i for i, r in enumerate(self.teachers)}
        self._student_index = {r: i for i, r in enumerate(self.students)}


def make_layout(cfg: TopologyConfig, world_size: int, nodes: list[str] | None = None, *, online: bool,
                student_stages: int = 1, teacher_stages: int = 1, teacher_zero3: bool = False) -> Layout:
    """The job's layout for `world_size` ranks on `nodes` (node of every global rank, default one
    node); refuses an impossible one with a ConfigError naming the key. (ExperimentConfig.layout
    passes its keys.)"""
    nodes = list(nodes or ["node0"] * world_size)
    if len(nodes) != world_size:
        raise ValueError(f"{len(nodes)} node names for {world_size} ranks")
    P, R = student_stages, teacher_stages
    if online:
        teachers = assign_roles(cfg, world_size, nodes)
    else:
        teachers = []
        R = 1
    students = [r for r in range(world_size) if r not in set(teachers)]
    if online and len(teachers) % R:
        fail("teacher.pipeline_stages", R, f"must divide the {len(teachers)} teacher rank(s)")
    if len(students) % P:
        fail("train.pipeline_stages", P, f"must divide the {len(students)} student rank(s)")
    layout = Layout(world_size, nodes, online, teachers, students, R, online and teacher_zero3, P)
    if online:
        spt = cfg.students_per_teacher or (
            layout.dp // layout.n_replicas if layout.dp % layout.n_replicas == 0 else 0)
        if spt == 0 or spt * layout.n_replicas != layout.dp:
            fail("topology.students_per_teacher", cfg.students_per_teacher,
                 f"{layout.dp} student pipeline(s) cannot be split evenly over {layout.n_replicas} "
                 "teacher replica(s)")
        layout.students_per_teacher = spt
    if not cfg.cross_node:
        _check_on_one_node(layout)
    return layout


def _check_on_one_node(layout: Layout) -> None:
    groups = [("teacher replica", i, layout.replica_ranks(i), "teacher.pipeline_stages")
              for i in range(layout.n_replicas)] if layout.teacher_stages > 1 else []
    if layout.student_stages > 1:
        groups += [("student pipeline", d, layout.pipeline_ranks(d), "train.pipeline_stages")
                   for d in range(layout.dp)]
    for what, i, ranks, key in groups:
        spans = sorted({layout.nodes[r] for r in ranks})
        if len(spans) > 1:
            fail("topology.cross_node", False,
                 f"{what} {i} (ranks {ranks[0]}-{ranks[-1]}) would span nodes {', '.join(spans)}; choose "
                 f"{key} dividing the ranks per node, or set topology.cross_node=true")


def _ranks_text(ranks: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def format_layout(layout: Layout, hosts: dict[int, str] | None = None) -> str:
    """The whole rank map, one line per rank, with a summary first."""
    n_nodes = len(dict.fromkeys(layout.nodes))
    lines = [f"{layout.world} ranks on {n_nodes} node(s)"]
    if layout.online:
        t = (f"teachers: {len(layout.teachers)} rank(s) = {layout.n_replicas} replica(s) x "
             f"{layout.teacher_stages} stage(s)")
        if layout.teacher_zero3:
            t += f", weights partitioned over all {len(layout.teachers)} (ZeRO-3)"
        lines.append(t)
    lines.append(f"students: {len(layout.students)} rank(s) = {layout.dp} data-parallel x "
                 f"{layout.student_stages} pipeline stage(s)")
    if layout.online:
        lines.append(f"each teacher replica serves {layout.students_per_teacher} student pipeline(s)")
    lines.append("")
    lines.append(f"{'rank':>5}  {'host':<16} {'local':>5}  {'role':<7} {'replica/dp':>10}  {'stage':>5}  link")
    for r in range(layout.world):
        p = layout.place(r)
        host = (hosts or {}).get(r, p.node)
        link = ""
        if p.role == "teacher" and layout.online:
            if p.stage == 0:
                link = f"takes requests of student ranks {_ranks_text(layout.clients_of(p.replica))}"
            if p.stage == layout.teacher_stages - 1:
                link += ("; " if link else "") + f"answers student ranks {_ranks_text(layout.clients_of(p.replica))}"
        elif p.role == "student" and p.stage == p.stages - 1 and layout.online:
            i = layout.teacher_of(p.replica)
            link = f"teacher replica {i}: requests to rank {layout.entry(i)}, answers from rank {layout.exit(i)}"
        lines.append(f"{r:>5}  {host:<16} {p.local_rank:>5}  {p.role:<7} {p.replica:>10}  "
                     f"{p.stage:>2}/{p.stages:<2}  {link}".rstrip())
    return "\n".join(lines)
