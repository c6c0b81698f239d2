"""Online distillation: a frozen teacher serving sparse logits to the student ranks it is paired with.

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
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .bridge import (KIND_REFUSAL, KIND_REPLY, KIND_REQUEST, OP_STOP, OP_WORK, PREAMBLE_NBYTES, REFUSAL_NBYTES,
                     REFUSE_MALFORMED, REFUSED, TAG_REQ, TAG_REQ_BODY, TAG_RESP, TAG_RESP_BODY, BadMessage,
                     PeerError, WireSpec, check_preamble, check_request, decode_response, encode_refusal,
                     encode_response, exchange_hello, recv_preamble, refusal_error, send_message, wait, wait_all)
from .logits import SparseLogits
from .topology import LOST_TEACHERS, StoreLog, Topology, mark_teacher_lost, teacher_is_lost

# The first handshake waits for the other side to start (and, with no teacher.path, for the teacher's
# own pre-training); a peer that dies meanwhile still fails it at once.
STARTUP_TIMEOUT_S = 3600.0
# How long a teacher waits for a student's next request: no limit in practice (see receive_requests).
IDLE_WAIT = datetime.timedelta(days=3650)
# topology.teacher_failover: the store keys of the students each teacher rank is asked to adopt
# (ADOPT/<teacher rank>), of the student clients done with their teacher, and how often a serving
# replica looks at them.
ADOPT = "pd/failover/adopt"
STUDENTS_DONE = "pd/failover/done"
STUDENTS_FINISHED = "pd/failover/finished"  # a count: clients that trained to the end of the run


def job_finished(topo: Topology) -> bool:
    """With topology.teacher_failover: every student client of the job said it trained to the end (read
    once all are done; a replica's own stats cannot know, its students may have gone elsewhere)."""
    return topo.store.add(STUDENTS_FINISHED, 0) >= topo.layout.dp


def first_live_replica(topo: Topology) -> Optional[int]:
    """The lowest teacher replica not recorded lost (the one that completes shared work), or None."""
    return next((r for r in range(topo.layout.n_replicas) if not teacher_is_lost(topo.store, r)), None)
ADOPT_POLL_S = 0.5


@dataclass
class _Pending:
    """One request in flight: what it asked, its buffers, and what _Answers found of its answer."""
    seq: int
    ids: np.ndarray
    resp_buf: torch.Tensor
    req_buf: torch.Tensor
    sends: list = field(default_factory=list)
    head: Optional[torch.Tensor] = None  # the answer's preamble, received into PREAMBLE_ROOM slots
    head_work: object = None
    kind: int = 0  # KIND_REPLY or KIND_REFUSAL, once the preamble is checked
    answered: int = -1  # the request number the preamble names
    body: Optional[torch.Tensor] = None
    body_work: object = None
    error: Optional[PeerError] = None
    ready: threading.Event = field(default_factory=threading.Event)  # kind/body_work or error are set


class _Answers:
    """The answers of one teacher rank, in request order: a thread waits for each answer's preamble (up
    to the peer timeout), checks it, and posts its body's receive into a buffer of the size it checked,
    so an answer lands while the student trains yet no answer of another size reaches gloo (which
    aborts the process when a message outgrows its buffer). After a bad preamble nothing
    more is read from that teacher: every later request gets the same error (a silent or closed peer
    fails each request on its own, as gloo does)."""

    def __init__(self, bridge, peer: int, spec: WireSpec, me_desc: str, peer_desc: str, timeout_s: float):
        self.bridge, self.peer, self.timeout = bridge, peer, timeout_s
        self.what, self.waiting = f"{me_desc}: from {peer_desc}", f"{me_desc} waiting for logits from {peer_desc}"
        self.sizes = {KIND_REPLY: spec.response_nbytes(), KIND_REFUSAL: REFUSAL_NBYTES}
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name=f"pd-student-answers-{peer}").start()

    def add(self, p: _Pending) -> None:
        """Follow ``p``, whose preamble receive is posted (in the order they were posted)."""
        self.queue.put(p)

    def close(self) -> None:
        self.queue.put(None)

    def _run(self) -> None:
        broken: Optional[BadMessage] = None
        while (p := self.queue.get()) is not None:
            try:
                if broken is not None:
                    raise broken
                wait(p.head_work, self.timeout, self.waiting)
                kind, seq = check_preamble(p.head, self.sizes, self.what)
                # A refusal may name no request (its preamble was unreadable): it ends the student anyway.
                if seq != p.seq and kind == KIND_REPLY:
                    raise BadMessage(f"{self.what}: answer to request {seq} where request {p.seq}'s was due",
                                     REFUSE_MALFORMED, seq, seq)
                p.body = p.resp_buf if kind == KIND_REPLY else torch.zeros(2, dtype=torch.int64)
                p.body_work = self.bridge.recv([p.body], self.peer, TAG_RESP_BODY)
                p.kind, p.answered = kind, seq
            except BadMessage as e:  # its body is never received: nothing after it can be
                p.error = broken = e
            except PeerError as e:  # silent or gone: each later answer fails (or arrives) on its own
                p.error = e
            except RuntimeError:  # gloo refuses to post on a connection already closed
                p.error = PeerError(f"{self.waiting}: peer closed the connection (exited or crashed)")
            p.ready.set()


class TeacherClient:
    """Student side: submit requests ahead, collect answers into preallocated buffers, check ids."""

    def __init__(self, topo: Topology, spec: WireSpec, startup_timeout_s: float = STARTUP_TIMEOUT_S,
                 log: Callable[[str], None] = lambda s: print(s, flush=True)):
        self.topo, self.spec, self.log = topo, spec, log
        # Requests go to the teacher replica's first stage, answers come from its last (the same rank
        # unless the teacher is pipelined).
        self.peer, self.peer_out = topo.my_teacher(), topo.my_teacher_exit()
        self.peer_desc = f"teacher {topo.describe(self.peer)}"
        self.me_desc = f"student {topo.describe(topo.rank)}"
        self.timeout = topo.peer_timeout_s
        self.failover = topo.teacher_failover
        self.home = self.replica = topo.layout.teacher_of(topo.dp_rank)
        self.pending: dict[int, _Pending] = {}
        # Requests sent to a lost replica: kept alive, since a silent (not dead) peer may still write
        # into their buffers.
        self._abandoned: list[_Pending] = []
        self._answers: Optional[_Answers] = None
        try:
            for peer in dict.fromkeys((self.peer, self.peer_out)):
                exchange_hello(topo.bridge, spec, peer, self.me_desc, f"teacher {topo.describe(peer)}",
                               max(startup_timeout_s, self.timeout))
        except PeerError as e:
            if not self.failover:
                raise
            self._fail_over(e, max(startup_timeout_s, self.timeout))  # the others may still be starting
        if self._answers is None:
            self._answers = self._follow()
        self._free_resp: list[torch.Tensor] = []
        self._free_req: list[torch.Tensor] = []
        self.seq = 0
        self.wait_time = 0.0
        self.bytes_received = 0
        self.tokens_received = 0
        self.closed = False

    def submit(self, sample_ids: np.ndarray, tokens: torch.Tensor) -> int:
        """Ask for the logits of one micro-batch (tokens [n, seq_len], n <= micro-batch); returns a ticket."""
        spec = self.spec
        n = len(sample_ids)
        if not 0 < n <= spec.micro_batch or tokens.shape != (n, spec.seq_len):
            raise ValueError(f"request of {n} samples of shape {tuple(tokens.shape)} does not fit the wire spec")
        req = self._free_req.pop() if self._free_req else torch.empty(spec.request_numel(), dtype=torch.int64)
        req.zero_()
        req[0], req[1], req[2] = OP_WORK, self.seq, n
        req[3:3 + n] = torch.as_tensor(sample_ids, dtype=torch.int64)
        off = 3 + spec.micro_batch
        req[off:off + n * spec.seq_len] = tokens.reshape(-1).to("cpu", torch.int64)
        resp = self._free_resp.pop() if self._free_resp else torch.empty(spec.response_nbytes(), dtype=torch.uint8)
        p = self.pending[self.seq] = _Pending(self.seq, np.asarray(sample_ids).copy(), resp, req)
        self.seq += 1
        try:
            self._post(p)
        except RuntimeError:  # gloo refuses to post on a connection already closed
            if not self.failover:
                raise
            self._fail_over(PeerError(f"{self.me_desc} sending a request to {self.peer_desc}: peer closed "
                                      "the connection (exited or crashed)"))
        return p.seq

    def _follow(self) -> _Answers:
        return _Answers(self.topo.bridge, self.peer_out, self.spec, self.me_desc, self.peer_desc, self.timeout)

    def _post(self, p: _Pending) -> None:
        bridge = self.topo.bridge
        # The answer's preamble receive is posted first: it lands there, and _Answers posts the body's.
        p.head, p.head_work = recv_preamble(bridge, self.peer_out, TAG_RESP)
        p.sends = send_message(bridge, self.peer, TAG_REQ, KIND_REQUEST, p.req_buf, p.seq)
        self._answers.add(p)

    def result(self, ticket: int) -> SparseLogits:
        """The answer to `ticket`, [n, seq_len, k]; blocks up to the peer timeout."""
        p = self.pending.pop(ticket)
        t0 = time.perf_counter()
        try:
            if not p.ready.wait(self.timeout):
                raise PeerError(f"{self.me_desc} waiting for logits from {self.peer_desc}: peer was silent for "
                                f"{self.timeout:g}s")
            if p.error is not None:
                raise p.error
            wait(p.body_work, self.timeout, f"{self.me_desc} waiting for logits from {self.peer_desc}")
            wait_all(p.sends, self.timeout, f"{self.me_desc} sending a request to {self.peer_desc}")
        except PeerError as e:
            self.wait_time += time.perf_counter() - t0
            if not self.failover or isinstance(e, BadMessage):  # a faulty answer is no reason to move
                raise
            self.pending[ticket] = p
            self._fail_over(e)  # every request in flight, this one too, now goes to another replica
            return self.result(ticket)
        self.wait_time += time.perf_counter() - t0
        if p.kind == KIND_REFUSAL:
            raise refusal_error(p.body, p.answered, f"{self.me_desc}: {self.peer_desc}")
        seq, ids, sparse = decode_response(self.spec, p.resp_buf, f"{self.me_desc}: {self.peer_desc}")
        if seq != p.seq or not np.array_equal(ids, p.ids):
            raise PeerError(f"{self.me_desc}: {self.peer_desc} answered request {seq} with sample ids "
                            f"{ids.tolist()[:8]} but request {p.seq} asked for {p.ids.tolist()[:8]}")
        self._free_resp.append(p.resp_buf)
        self._free_req.append(p.req_buf)
        self.bytes_received += PREAMBLE_NBYTES + self.spec.response_nbytes()
        self.tokens_received += len(ids) * self.spec.seq_len
        return sparse

    def close(self, finished: bool = False) -> None:
        """Tell the teacher this student is done (after collecting anything still pending); ``finished``:
        it trained to the end of the run (not stopped or interrupted), which the stop carries in its
        count slot."""
        if self.closed:
            return
        self.closed = True
        for t in sorted(self.pending):
            self.result(t)
        stop = torch.zeros(self.spec.request_numel(), dtype=torch.int64)
        stop[0], stop[1], stop[2] = OP_STOP, self.seq, int(bool(finished))
        try:
            wait_all(send_message(self.topo.bridge, self.peer, TAG_REQ, KIND_REQUEST, stop, self.seq), self.timeout,
                     f"{self.me_desc} stopping {self.peer_desc}")
        except PeerError:
            if not self.failover:
                raise  # with failover, a replica gone after the last answer needs no stop
        finally:
            self._answers.close()
        if self.failover:
            if finished:  # counted before "done", so whoever sees every client done sees the final count
                self.topo.store.add(STUDENTS_FINISHED, 1)
            StoreLog(self.topo.store, STUDENTS_DONE).push(self.topo.rank)

    def abandon(self) -> None:
        """Every replica is lost and the caller answers from elsewhere: forget the requests in flight (their
        buffers are kept: a silent replica may still write into them), so close() waits for none."""
        self._abandoned.extend(self.pending.values())
        self.pending = {}

    def replicas_alive(self) -> int:
        """Teacher replicas of the job not recorded lost (by any student)."""
        return self.topo.layout.n_replicas - StoreLog(self.topo.store, LOST_TEACHERS).count()

    def _fail_over(self, err: PeerError, hello_timeout_s: Optional[float] = None) -> None:
        """This client's replica is gone (``err`` says how): record it lost, have the next live replica in
        replica order after this client's own adopt it, and re-send the requests in flight there, in
        order. Raises the last replica's error when none is left."""
        topo, layout, store = self.topo, self.topo.layout, self.topo.store
        lost_desc = self.peer_desc
        mark_teacher_lost(store, self.replica)
        self._abandoned.extend(self.pending.values())
        n = layout.n_replicas
        for k in range(1, n):
            cand = (self.home + k) % n
            if cand == self.replica or teacher_is_lost(store, cand):
                continue
            rank = layout.entry(cand)
            desc = f"teacher {topo.describe(rank)}"
            StoreLog(store, f"{ADOPT}/{rank}").push(topo.rank)
            try:
                exchange_hello(topo.bridge, self.spec, rank, self.me_desc, desc, hello_timeout_s or self.timeout)
            except PeerError as e:
                mark_teacher_lost(store, cand)
                err = PeerError(f"{self.me_desc}: {e}")
                continue
            self.replica, self.peer, self.peer_out, self.peer_desc = cand, rank, rank, desc
            if self._answers is not None:
                self._answers.close()  # what it still follows was abandoned above
            self._answers = self._follow()
            self.log(f"pd-dist: {self.me_desc}: lost {lost_desc} ({str(err).split(': ')[-1]}); continuing "
                     f"with {desc}, re-sending {len(self.pending)} request(s) in flight "
                     f"({self.replicas_alive()} of {n} teacher replicas alive)")
            # Fresh buffers (the old ones may still be written by a silent replica), sent in order: the
            # new replica answers them in this order.
            self.pending = {seq: _Pending(seq, p.ids, torch.empty(self.spec.response_nbytes(), dtype=torch.uint8),
                                          p.req_buf.clone()) for seq, p in sorted(self.pending.items())}
            try:
                for p in self.pending.values():
                    self._post(p)
            except RuntimeError:  # this one died meanwhile
                return self._fail_over(PeerError(f"{self.me_desc} sending a request to {desc}: peer closed "
                                                 "the connection (exited or crashed)"))
            return
        raise err


class PrefetchingTeacher:
    """Keeps `prefetch` requests in flight along the student's known future micro-batches."""

    def __init__(self, client: TeacherClient, plan: Iterator[np.ndarray],
                 tokens_of: Callable[[np.ndarray], torch.Tensor], prefetch: int):
        self.client, self.plan, self.tokens_of, self.prefetch = client, plan, tokens_of, prefetch
        self.queue: deque[tuple[int, np.ndarray]] = deque()
        self.exhausted = False

    def _fill(self, depth: int) -> None:
        while len(self.queue) < depth and not self.exhausted:
            try:
                ids = next(self.plan)
            except StopIteration:
                self.exhausted = True
                return
            self.queue.append((self.client.submit(ids, self.tokens_of(ids)), ids))

    def next(self, expected_ids: np.ndarray) -> SparseLogits:
        """Logits for the next training micro-batch, which must be `expected_ids`."""
        self._fill(1)
        if not self.queue:
            raise RuntimeError("the training plan ran out before training did")
        ticket, ids = self.queue.popleft()
        if not np.array_equal(ids, expected_ids):
            raise RuntimeError(f"prefetch plan out of step with training: planned {ids.tolist()[:8]}, "
                               f"training {np.asarray(expected_ids).tolist()[:8]}")
        self._fill(self.prefetch)  # the teacher works on these while this micro-batch trains
        return self.client.result(ticket)

    def now(self, ids: np.ndarray, tokens: torch.Tensor) -> SparseLogits:
        """Logits for an out-of-plan batch (evaluation); queued behind what is already in flight."""
        return self.client.result(self.client.submit(ids, tokens))


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
        inbox: queue.Queue = queue.Queue()
        for s in self.students:
            threading.Thread(target=receive_requests, args=(self.topo, spec, self.me_desc, s, inbox),
                             daemon=True, name=f"pd-teacher-recv-{s}").start()
        sends: dict[int, deque] = {s: deque() for s in self.students}
        free: list[torch.Tensor] = []
        active = set(self.students)
        refused: set[int] = set()  # students whose bad request ended them: what else they send is ignored
        finished: set[int] = set()  # students whose stop said they trained to the end
        watch = self.topo.watch(sorted(active), self.topo.peer_timeout_s)
        adoption = _Adoption(self.topo, spec, self.me_desc, self.log) if self.topo.teacher_failover else None
        last_log = time.perf_counter()
        while True:
            if lockstep is None and not active and (adoption is None or adoption.all_done()):
                break
            items = self._collect(inbox, WATCH_POLL_S if lockstep is None else lockstep.poll_s)
            if adoption is not None:
                for s in adoption.poll(active):
                    sends[s] = deque()
                    active.add(s)
                    watch.add(s)
                    threading.Thread(target=receive_requests, args=(self.topo, spec, self.me_desc, s, inbox),
                                     daemon=True, name=f"pd-teacher-recv-{s}").start()
            if adoption is not None and adoption.given_up:
                # Its students re-sent their requests elsewhere and wait for nothing from it.
                self.log("the students of this replica gave it up (it was silent past topology.peer_timeout_s) "
                         "and were adopted by others; leaving")
                return self.stats
            check_students(watch, self.topo, self.me_desc)
            work = []
            for s, r in items:
                if s in refused:
                    continue
                try:
                    if isinstance(r, Exception):
                        raise r
                    op, seq, n = check_request(r, spec, self.me_desc, self.topo.describe(s))
                except BadMessage as e:  # that student is refused, the others are served on
                    refuse(self.topo, s, e.seq, e, self.log)
                    refused.add(s)
                    active.discard(s)
                    watch.forget(s)
                    continue
                if op == OP_STOP:
                    active.discard(s)
                    watch.forget(s)
                    if n == 1:
                        finished.add(s)
                    continue
                ids = r[3:3 + n].numpy().copy()
                off = 3 + spec.micro_batch
                work.append((s, seq, ids, r[off:off + n * spec.seq_len].reshape(n, spec.seq_len)))
            tokens = torch.cat([w[3] for w in work]) if work else None
            sample_ids = np.concatenate([w[2] for w in work]) if work else None
            chunks = [] if tokens is None else [(tokens[i:i + self.max_batch], sample_ids[i:i + self.max_batch])
                                                for i in range(0, len(tokens), self.max_batch)]
            rounds = len(chunks)
            if lockstep is not None:
                rounds, anyone = lockstep.agree(len(chunks), bool(active))
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
        self.stats.finished = finished >= set(self.students)
        return self.stats

    @staticmethod
    def _collect(inbox: "queue.Queue", poll_s: Optional[float]) -> list:
        """Everything waiting now, to batch into one forward: block for the first item (poll_s None),
        or wait at most poll_s for it (lockstep rounds go on even when this rank has nothing)."""
        try:
            items = [inbox.get(timeout=poll_s)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(inbox.get_nowait())
            except queue.Empty:
                return items


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
        inbox: queue.Queue = queue.Queue()
        active = set(self.students) if self.is_entry else set()
        if self.is_entry:
            for s in self.students:
                threading.Thread(target=receive_requests, args=(self.topo, spec, self.me_desc, s, inbox),
                                 daemon=True, name=f"pd-teacher-recv-{s}").start()
        sends: deque = deque()
        refused: set[int] = set()
        watch = self.topo.watch(sorted(active), self.topo.peer_timeout_s)
        while True:
            work = []
            if self.is_entry:
                check_students(watch, self.topo, self.me_desc)
                for s, r in TeacherServer._collect(inbox, self.lockstep.poll_s):
                    if s in refused:
                        continue
                    try:
                        if isinstance(r, Exception):
                            raise r
                        op, seq, n = check_request(r, spec, self.me_desc, self.topo.describe(s))
                    except BadMessage as e:
                        # The exit stage answers: the refusal rides this round's meta (n = REFUSED).
                        self.log(f"{e}; refused, and student {self.topo.describe(s)} is no longer served")
                        refused.add(s)
                        active.discard(s)
                        watch.forget(s)
                        work.append((s, e.seq, torch.tensor([e.code, e.value]), None))
                        continue
                    if op == OP_STOP:
                        active.discard(s)
                        watch.forget(s)
                        continue
                    off = 3 + mb
                    work.append((s, seq, r[3:3 + n].clone(), r[off:off + n * spec.seq_len].reshape(n, spec.seq_len)))
            rounds, anyone = self.lockstep.agree(len(work), bool(active))
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
        return self.stats
