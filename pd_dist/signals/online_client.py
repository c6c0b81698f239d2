"""The student side of online distillation: a client that sends the teacher replica it is paired with
the token ids and sample ids of micro-batches ahead of training, receives the sparse logits into
preallocated buffers and checks every answer's sample ids; and a prefetcher that keeps
`distill.prefetch` requests in flight along the student's known data order (the teacher computes step
n+1 while the student trains on step n).

With topology.teacher_failover a client whose replica dies or is silent for the peer timeout records it
lost, asks the next live replica to adopt it, and re-sends its requests in flight there, in order (the
teacher is deterministic and stateless, so the answers are the ones the lost replica would have sent).
The serving side is pd_dist.teacher.server.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from pd_dist.cluster.bridge import (KIND_REFUSAL, KIND_REPLY, KIND_REQUEST, OP_STOP, OP_WORK, PREAMBLE_NBYTES,
                                    REFUSAL_NBYTES, REFUSE_MALFORMED, STARTUP_TIMEOUT_S, TAG_REQ,
                                    TAG_RESP, TAG_RESP_BODY, BadMessage, PeerError, WireSpec, check_preamble,
                                    decode_response, exchange_hello, recv_preamble, refusal_error, send_message,
                                    wait, wait_all)
from pd_dist.cluster.failover import (ADOPT, LOST_TEACHERS, STUDENTS_DONE, STUDENTS_FINISHED, StoreLog,
                                      mark_teacher_lost, teacher_is_lost)
from pd_dist.cluster.topology import Topology
from pd_dist.core.logits import SparseLogits


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
