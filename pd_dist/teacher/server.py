"""Online distillation, the teacher's side: a frozen teacher serving sparse logits to the student ranks
it is paired with (the student's side is pd_dist.signals.online_client).

The teacher is a stateless server: it receives token ids + sample ids of micro-batches, runs forward,
truncates top-p-k, and answers with indices + kept logits + the same sample ids. Requests that are
waiting from several students are batched into one forward. Students own the data order: their
client sends requests `distill.prefetch` micro-batches ahead, so the teacher computes step n+1 while
the student trains on step n, and checks the sample ids of every answer.

With topology.teacher_failover, students outlive a teacher replica: a client whose replica dies or is
silent for the peer timeout records it lost on the job's store, asks the next live replica (in replica
order after its own) to adopt it, and re-sends its requests in flight there in order. The teacher is
deterministic and stateless and every request carries its sample ids and tokens, so the answers are the
ones the lost replica would have sent. A serving replica polls the store for students to adopt and
serves until every student of the job is done.
"""
from __future__ import annotations

import datetime
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from pd_dist.cluster.bridge import (KIND_REFUSAL, KIND_REPLY, KIND_REQUEST, OP_STOP, REFUSED, STARTUP_TIMEOUT_S, TAG_REQ, TAG_REQ_BODY,
                                    TAG_RESP, BadMessage, PeerError, WireSpec, check_preamble, check_request,
                                    encode_refusal, encode_response, exchange_hello, recv_preamble, send_message,
                                    wait_all)
from pd_dist.cluster.failover import ADOPT, ADOPT_POLL_S, STUDENTS_DONE, StoreLog, teacher_is_lost
from pd_dist.core.logits import SparseLogits
from pd_dist.cluster.topology import Topology

# How long a teacher waits for a student's next request: no limit in practice (see receive_requests).
IDLE_WAIT = datetime.timedelta(days=3650)
def receive_requests(topo: Topology, spec: WireSpec, me_desc: str, s: int, inbox: "queue.Queue") -> None:
    """One thread per student: block on its next request (gloo recvs complete only in wait()) and put it
    in ``inbox``: the request, or the PeerError that ends this student.

    A server has no idle timeout (students pause for evaluation, checkpoints, their own start-up):
    the wait is given an explicit bound of years, since a bare wait() would end at the bridge's
    peer timeout. A student that dies closes its connection, which fails the wait at once. A preamble
    of another kind or size than a request's is put as a BadMessage and ends this thread: its body is
    never received (gloo would abort this process if it outgrew the buffer), so nothing after it can be."""
    student = f"student {topo.describe(s)}"
    sizes = {KIND_REQUEST: 8 * spec.request_numel()}
    while True:
        head, work = recv_preamble(topo.bridge, s, TAG_REQ)
        buf = torch.zeros(spec.request_numel(), dtype=torch.int64)  # zeros: nothing stale in any slot
        try:
            work.wait(IDLE_WAIT)
            try:
                check_preamble(head, sizes, f"{me_desc}: from {student}")
            except BadMessage as e:
                inbox.put((s, e))
                return
            topo.bridge.recv([buf], s, TAG_REQ_BODY).wait(IDLE_WAIT)
        except RuntimeError as e:
            inbox.put((s, PeerError(f"{me_desc}: {student} closed the connection (exited or crashed): "
                                    f"{str(e).splitlines()[0][:120]}")))
            return
        inbox.put((s, buf))
        if int(buf[0]) == OP_STOP:
            return


WATCH_POLL_S = 1.0  # how often an idle teacher looks at its students' heartbeats


def check_students(watch, topo: Topology, me_desc: str) -> None:
    """PeerError naming a student whose heartbeat stopped for the peer timeout (dead, hung, or cut off:
    a cut link closes no connection, so the teacher's wait for its next request would never end)."""
    for r, age in watch.stalled():
        if age != age:  # NaN: the job store (rank 0) is unreachable
            raise PeerError(f"{me_desc}: the job's store on {topo.describe(0)} is unreachable (rank 0 died "
                            "or the network to it is cut)")
        raise PeerError(f"{me_desc}: student {topo.describe(r)} stopped: no heartbeat for {age:.0f}s (it "
                        "died, hangs, or the network to it is cut)")


def refuse(topo: Topology, s: int, seq: int, err: BadMessage, log: Callable[[str], None]) -> None:
    """Answer a bad request with a refusal (the student fails at once, naming why) and say so here; the
    teacher goes on serving its other students. Best effort: the student may already be gone."""
    log(f"{err}; refused, and student {topo.describe(s)} is no longer served")
    try:
        wait_all(send_message(topo.bridge, s, TAG_RESP, KIND_REFUSAL, encode_refusal(err.code, err.value), seq),
                 topo.peer_timeout_s, "refusal")
    except (PeerError, RuntimeError):  # RuntimeError: gloo refuses to post on a closed connection
        pass


@dataclass
class Request:
    """One checked request: from student rank ``student``, request number ``seq``, the sample ids and
    their token rows [n, seq_len]."""
    student: int
    seq: int
    ids: torch.Tensor
    tokens: torch.Tensor


class Intake:
    """The one request intake of a teacher that receives requests (a plain replica, or a pipelined
    replica's entry stage): a receiving thread per student, the check of every request, and the
    bookkeeping both servers need: who is still served (``active``), who was refused for a bad request,
    who said stop after training to the end (``finished``), and the heartbeats of those served."""

    def __init__(self, topo: Topology, spec: WireSpec, me_desc: str, students: list[int]):
        self.topo, self.spec, self.me_desc = topo, spec, me_desc
        self.inbox: queue.Queue = queue.Queue()
        self.active: set[int] = set()
        self.refused: set[int] = set()  # students whose bad request ended them: what else they send is ignored
        self.finished: set[int] = set()  # students whose stop said they trained to the end
        self.watch = topo.watch([], topo.peer_timeout_s)
        for s in students:
            self.add(s)

    def add(self, s: int) -> None:
        """Start serving student ``s`` (at start, or adopted from a lost replica)."""
        self.active.add(s)
        self.watch.add(s)
        threading.Thread(target=receive_requests, args=(self.topo, self.spec, self.me_desc, s, self.inbox),
                         daemon=True, name=f"pd-teacher-recv-{s}").start()

    def check_heartbeats(self) -> None:
        check_students(self.watch, self.topo, self.me_desc)

    def take(self, poll_s: Optional[float], on_refusal: Callable[[int, BadMessage], None]) -> list[Request]:
        """The requests waiting now (blocking for the first up to ``poll_s``), checked: a bad one ends its
        student (``on_refusal(student, error)`` answers it) and the others are served on; a stop ends its
        student."""
        out = []
        for s, r in self._collect(poll_s):
            if s in self.refused:
                continue
            try:
                if isinstance(r, Exception):
                    raise r
                op, seq, n = check_request(r, self.spec, self.me_desc, self.topo.describe(s))
            except BadMessage as e:
                self._end(s)
                self.refused.add(s)
                on_refusal(s, e)
                continue
            if op == OP_STOP:
                self._end(s)
                if n == 1:
                    self.finished.add(s)
                continue
            off = 3 + self.spec.micro_batch
            out.append(Request(s, seq, r[3:3 + n].clone(), r[off:off + n * self.spec.seq_len].reshape(n, self.spec.seq_len)))
        return out

    def all_finished(self, students: list[int]) -> bool:
        return self.finished >= set(students)

    def _end(self, s: int) -> None:
        self.active.discard(s)
        self.watch.forget(s)

    def _collect(self, poll_s: Optional[float]) -> list:
        """Everything waiting now, to batch into one forward: block for the first item (poll_s None),
        or wait at most poll_s for it (lockstep rounds go on even when this rank has nothing)."""
        try:
            items = [self.inbox.get(timeout=poll_s)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                return items


class _Adoption:
    """A serving replica's side of topology.teacher_failover: the students it is asked to adopt (from
    the job's store, polled at most every ADOPT_POLL_S), and whether every student client of the job is
    done, so that it does not leave while a lost replica's students may still turn to it. Waiting for
    the others, it watches their heartbeats as it watches its own students'."""

    def __init__(self, topo: Topology, spec: WireSpec, me_desc: str, log: Callable[[str], None]):
        self.topo, self.spec, self.me_desc, self.log = topo, spec, me_desc, log
        self.asks = StoreLog(topo.store, f"{ADOPT}/{topo.rank}")
        self.done_log = StoreLog(topo.store, STUDENTS_DONE)
        self.clients = {topo.layout.client(d) for d in range(topo.layout.dp)}
        self.done: set[int] = set()
        self.others = None  # the heartbeats of the clients not done, once this replica has no student left
        self.last = 0.0
        self.given_up = False  # its students recorded this replica lost (it was silent past the timeout)

    def poll(self, active: set[int]) -> list[int]:
        """Students handshaken and adopted since the last poll (none between polls)."""
        now = time.monotonic()
        if now - self.last < ADOPT_POLL_S:
            return []
        self.last = now
        self.given_up = teacher_is_lost(self.topo.store, self.topo.dp_rank)
        for s in self.done_log.new():
            self.done.add(s)
            if self.others is not None:
                self.others.forget(s)
        adopted = []
        for s in self.asks.new():
            if s in active or s in self.done:
                continue
            try:
                exchange_hello(self.topo.bridge, self.spec, s, self.me_desc, f"student {self.topo.describe(s)}",
                               self.topo.peer_timeout_s)
            except PeerError as e:  # it gave up on this replica or died: its own replica's problem
                self.log(f"student {self.topo.describe(s)} asked to be adopted but {e}")
                continue
            self.log(f"adopted student {self.topo.describe(s)}: its teacher replica was lost")
            adopted.append(s)
        return adopted

    def all_done(self) -> bool:
        """Every student client of the job said it is done; raises a PeerError naming one of the
        others whose heartbeat stopped meanwhile (the run failed elsewhere: nobody is left to serve)."""
        if self.done >= self.clients:
            return True
        if self.others is None:
            self.others = self.topo.watch(sorted(self.clients - self.done), self.topo.peer_timeout_s)
        check_students(self.others, self.topo, self.me_desc)
        return False


@dataclass
class ServeStats:
    requests: int = 0
    tokens: int = 0
    forward_s: float = 0.0
    batches: int = 0
    started: float = field(default_factory=time.perf_counter)
    finished: bool = False  # every student said it trained to the end of the run


class TeacherServer:
    """Teacher side: serve the students this replica is paired with until each has said stop.
    ``logits_fn(tokens [n, T], sample_ids [n] or None)`` answers a batch (None: a padding forward)."""

    def __init__(self, topo: Topology, spec: WireSpec, logits_fn: Callable[..., SparseLogits],
                 max_batch: int, log: Callable[[str], None] = lambda s: None, log_every_s: float = 30.0,
                 metrics: Callable[[int, dict], None] = lambda n, d: None,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S):
        self.topo, self.spec, self.logits_fn = topo, spec, logits_fn
        self.max_batch = max(max_batch, spec.micro_batch)
        self.students = topo.my_students()
        self.me_desc = f"teacher {topo.describe(topo.rank)}"
        self.log, self.log_every_s, self.metrics = log, log_every_s, metrics
        for s in self.students:
            exchange_hello(topo.bridge, spec, s, self.me_desc, f"student {topo.describe(s)}",
                           max(startup_timeout_s, topo.peer_timeout_s))
        self.stats = ServeStats()

    def _report(self, now: float) -> None:
        el = max(now - self.stats.started, 1e-9)
        self.log(f"served {self.stats.requests} requests, {self.stats.tokens / el:,.0f} tok/s, "
                 f"forward busy {self.stats.forward_s / el:.0%}")
        self.metrics(self.stats.requests, {"teacher/tokens_per_sec": self.stats.tokens / el,
                                           "teacher/forward_busy_frac": self.stats.forward_s / el,
                                           "teacher/requests": self.stats.requests})

    def serve(self, lockstep: Optional["Lockstep"] = None) -> ServeStats:
        """Serve until every student of this replica has said stop. With `lockstep` (teacher ranks whose
        forwards are collective, e.g. ZeRO-3-partitioned weights), every round all teacher ranks run the
        same number of forward chunks, padding with dummy ones, and leave together."""
        spec, bridge = self.spec, self.topo.bridge
        intake = Intake(self.topo, spec, self.me_desc, self.students)
        sends: dict[int, deque] = {s: deque() for s in self.students}
        free: list[torch.Tensor] = []
        adoption = _Adoption(self.topo, spec, self.me_desc, self.log) if self.topo.teacher_failover else None
        last_log = time.perf_counter()
        while True:
            if lockstep is None and not intake.active and (adoption is None or adoption.all_done()):
                break
            # Waiting for the first request blocks at most a heartbeat poll (lockstep: a round's poll).
            poll_s = WATCH_POLL_S if lockstep is None else lockstep.poll_s
            requests = intake.take(poll_s, lambda s, e: refuse(self.topo, s, e.seq, e, self.log))
            if adoption is not None:
                for s in adoption.poll(intake.active):
                    sends[s] = deque()
                    intake.add(s)
            if adoption is not None and adoption.given_up:
                # Its students re-sent their requests elsewhere and wait for nothing from it.
                self.log("the students of this replica gave it up (it was silent past topology.peer_timeout_s) "
                         "and were adopted by others; leaving")
                return self.stats
            intake.check_heartbeats()
            work = [(q.student, q.seq, q.ids.numpy(), q.tokens) for q in requests]
            tokens = torch.cat([w[3] for w in work]) if work else None
            sample_ids = np.concatenate([w[2] for w in work]) if work else None
            chunks = [] if tokens is None else [(tokens[i:i + self.max_batch], sample_ids[i:i + self.max_batch])
                                                for i in range(0, len(tokens), self.max_batch)]
            rounds = len(chunks)
            if lockstep is not None:
                rounds, anyone = lockstep.agree(len(chunks), bool(intake.active))
                if rounds == 0:
                    if not anyone:
                        break
                    continue
            elif not work:
                continue
            t0 = time.perf_counter()
            parts = [self.logits_fn(c, ids) for c, ids in chunks]
            for _ in range(rounds - len(chunks)):  # keep the collective forwards in step with the others
                self.logits_fn(lockstep.dummy(spec.seq_len), None)
            self.stats.forward_s += time.perf_counter() - t0
            if not work:
                continue
            sparse = SparseLogits.cat(parts) if len(parts) > 1 else parts[0]
            self.stats.batches += 1
            at = 0
            for s, seq, ids, _ in work:
                n = len(ids)
                while sends[s] and len(sends[s]) > 4:  # bound buffers in flight per student
                    w, b = sends[s].popleft()
                    wait_all(w, self.topo.peer_timeout_s, f"{self.me_desc} sending to student {self.topo.describe(s)}")
                    free.append(b)
                buf = free.pop() if free else torch.empty(spec.response_nbytes(), dtype=torch.uint8)
                encode_response(spec, seq, ids, sparse[at:at + n].to("cpu"), buf)
                sends[s].append((send_message(bridge, s, TAG_RESP, KIND_REPLY, buf, seq), buf))
                at += n
                self.stats.requests += 1
                self.stats.tokens += n * spec.seq_len
            now = time.perf_counter()
            if now - last_log > self.log_every_s:
                last_log = now
                self._report(now)
        self._report(time.perf_counter())
        for s in sends:
            for w, _ in sends[s]:
                wait_all(w, self.topo.peer_timeout_s, f"{self.me_desc} sending to student {self.topo.describe(s)}")
        self.stats.finished = intake.all_finished(self.students)
        return self.stats


class Lockstep:
    """The round agreement of teacher ranks whose forwards are collective (ZeRO-3 gathers each layer's
    weights from every rank): each round every rank says how many forward chunks it has and whether it
    still serves; all run the largest count (dummy chunks where they have fewer) until none serves.
    The agreement is one all_reduce(MAX) on the teacher world."""

    def __init__(self, group=None, device: Optional[torch.device] = None, poll_s: float = 0.002):
        self.group, self.device, self.poll_s = group, device or torch.device("cpu"), poll_s
        self._dummy: Optional[torch.Tensor] = None

    def agree(self, chunks: int, active: bool) -> tuple[int, bool]:
        import torch.distributed as dist

        t = torch.tensor([chunks, int(active)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t[0]), bool(t[1])

    def dummy(self, seq_len: int) -> torch.Tensor:
        if self._dummy is None or self._dummy.shape[1] != seq_len:
            self._dummy = torch.zeros(1, seq_len, dtype=torch.int64)
        return self._dummy


class StagedTeacherServer:
    """A teacher replica spread over pipeline stages (teacher.pipeline_stages > 1). The entry stage
    takes its students' requests, the exit stage answers them; every stage of every replica runs the
    same rounds (`Lockstep`, since the pipeline engine synchronises the teacher world on each batch).
    Each round the entry stage broadcasts what it batched (student, request number and sample ids of
    each micro-batch) along its replica, all stages run `forward(tokens or None, n)`, which returns the
    exit stage's sparse logits per micro-batch, and the exit stage sends them to their students.

    `forward(micro_batches, n)`: on the entry stage micro_batches is a list of n [mb, seq_len] token
    tensors (dummy rows where it has nothing); elsewhere None. It returns a list of n SparseLogits
    [mb, seq_len, k] on the exit stage and None elsewhere."""

    def __init__(self, topo: Topology, spec: WireSpec, forward, pipe_group, entry: int, exit: int,
                 lockstep: Lockstep, log: Callable[[str], None] = lambda s: None,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S):
        self.topo, self.spec, self.forward, self.group = topo, spec, forward, pipe_group
        self.entry, self.exit, self.lockstep, self.log = entry, exit, lockstep, log
        self.is_entry, self.is_exit = topo.rank == entry, topo.rank == exit
        self.students = topo.my_students()
        self.me_desc = f"teacher {topo.describe(topo.rank)}"
        if self.is_entry or self.is_exit:
            for s in self.students:
                exchange_hello(topo.bridge, spec, s, self.me_desc, f"student {topo.describe(s)}",
                               max(startup_timeout_s, topo.peer_timeout_s))
        self.stats = ServeStats()
        # Inside the teacher world, group ranks are role ranks: the entry's is its index there.
        self._entry_role_rank = topo.layout.teachers.index(entry)

    def serve(self) -> ServeStats:
        import torch.distributed as dist

        spec, mb = self.spec, self.spec.micro_batch
        intake = Intake(self.topo, spec, self.me_desc, self.students if self.is_entry else [])
        sends: deque = deque()

        def refusal(s: int, e: BadMessage) -> None:  # the exit stage answers: it rides this round's meta
            self.log(f"{e}; refused, and student {self.topo.describe(s)} is no longer served")
            work.append((s, e.seq, torch.tensor([e.code, e.value]), None))

        while True:
            work = []
            if self.is_entry:
                intake.check_heartbeats()
                work += [(q.student, q.seq, q.ids, q.tokens) for q in intake.take(self.lockstep.poll_s, refusal)]
            rounds, anyone = self.lockstep.agree(len(work), bool(intake.active))
            if rounds == 0:
                if not anyone:
                    break
                continue
            # What this replica's rounds carry: student rank, request number, n, sample ids (-1: dummy);
            # for a refusal (n = REFUSED) its code and value in the first two id slots (two even if mb is 1).
            meta = torch.full((rounds, 3 + max(mb, 2)), -1, dtype=torch.int64)
            tokens = None
            if self.is_entry:
                tokens = []
                for i in range(rounds):
                    t = torch.zeros(mb, spec.seq_len, dtype=torch.int64)
                    if i < len(work):
                        s, seq, ids, tok = work[i]
                        meta[i, :3] = torch.tensor([s, seq, len(ids) if tok is not None else REFUSED])
                        meta[i, 3:3 + len(ids)] = ids
                        if tok is not None:
                            t[:len(ids)] = tok
                    tokens.append(t)
            dist.broadcast(meta, src=self._entry_role_rank, group=self.group)
            t0 = time.perf_counter()
            out = self.forward(tokens, rounds)
            self.stats.forward_s += time.perf_counter() - t0
            if not self.is_exit:
                continue
            for i in range(rounds):
                s, seq, n = (int(x) for x in meta[i, :3])
                if s < 0:
                    continue
                while len(sends) > 4 * max(1, len(self.students)):
                    w, _ = sends.popleft()
                    wait_all(w, self.topo.peer_timeout_s, f"{self.me_desc} sending an answer")
                if n == REFUSED:
                    buf = encode_refusal(int(meta[i, 3]), int(meta[i, 4]))
                    sends.append((send_message(self.topo.bridge, s, TAG_RESP, KIND_REFUSAL, buf, seq), buf))
                    continue
                buf = torch.empty(spec.response_nbytes(), dtype=torch.uint8)
                encode_response(spec, seq, meta[i, 3:3 + n].numpy(), out[i][:n].to("cpu"), buf)
                sends.append((send_message(self.topo.bridge, s, TAG_RESP, KIND_REPLY, buf, seq), buf))
                self.stats.requests += 1
                self.stats.tokens += n * spec.seq_len
        for w, _ in sends:
            wait_all(w, self.topo.peer_timeout_s, f"{self.me_desc} sending an answer")
        # The entry stage took the stops: only it knows whether every student trained to the end.
        self.stats.finished = self.is_entry and intake.all_finished(self.students)
        return self.stats
