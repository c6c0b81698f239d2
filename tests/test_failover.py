"""topology.teacher_failover in one process: teacher servers and student clients over the in-memory
bridge of tests/test_online.py, sharing one in-memory job store (heartbeats, adoptions, lost replicas).

A replica "dies" as a SIGKILLed rank looks to its peers: its connections fail at once and its
heartbeat stops. Each student checks every answer against the teacher run on its own tokens, so a
re-sent request answered late, twice, out of order or by the wrong replica fails the test.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pd_dist.cluster.bridge import PeerError
from pd_dist.core.configlib import ConfigError
from pd_dist.signals.online_client import PrefetchingTeacher, TeacherClient
from pd_dist.teacher.server import TeacherServer
from pd_dist.cluster.topology import LaunchEnv, Topology, TopologyConfig, make_layout
from test_online import SPEC, FakeBridge, FakeNet, TinyTeacher


class Job:
    """world ranks, the first `teachers` of them teacher replicas, each student served by its own."""

    def __init__(self, world: int, teachers: int, timeout: float = 5.0):
        self.net, self.store = FakeNet(), dist.HashStore()
        self.store.set_timeout(__import__("datetime").timedelta(seconds=10))
        layout = make_layout(TopologyConfig(teacher_ranks=list(range(teachers))), world, online=True)
        self.topos = {}
        for r in range(world):
            env = LaunchEnv(r, world, 0, "127.0.0.1", 0, "test", "node0")
            t = Topology(env=env, backend="gloo", layout=layout, role="teacher" if r < teachers else "student",
                         hosts={q: f"host{q}, node0" for q in range(world)},
                         bridge=FakeBridge(self.net, r, timeout), peer_timeout_s=timeout, store=self.store,
                         teacher_failover=True)
            t.HEARTBEAT_S = 0.1
            t.start_heartbeat()
            self.topos[r] = t
        self.model = TinyTeacher()
        self.logs: list[str] = []
        self.servers: dict[int, dict] = {}

    def serve(self, r: int) -> None:
        out = self.servers[r] = {}

        def run():
            try:
                server = TeacherServer(self.topos[r], SPEC, lambda t, ids: self.model.sparse(t), max_batch=8,
                                       log=lambda s: self.logs.append(f"[teacher {r}] {s}"), startup_timeout_s=5)
                out["stats"] = server.serve()
            except Exception as e:  # surfaced by the test
                out["error"] = e
        out["thread"] = threading.Thread(target=run, daemon=True)
        out["thread"].start()

    def kill(self, r: int) -> None:
        """Rank r is gone: its connections fail at once and its heartbeat stops."""
        self.net.dead.add(r)
        self.topos[r]._beat.set()


def _together(sync: threading.Barrier) -> None:
    try:
        sync.wait()
    except threading.BrokenBarrierError:  # a student failed (as a test may want): the others go on alone
        pass


def _student(job: Job, rank: int, steps: int, kill_at: dict, results: dict, errors: dict,
             sync: threading.Barrier) -> None:
    """Train-like loop: prefetch 2 ahead, check every answer; before step s, kill the ranks kill_at[s]
    (all students take each step together, so who has moved where at each step is known)."""
    try:
        client = TeacherClient(job.topos[rank], SPEC, startup_timeout_s=5, log=job.logs.append)
        rng = np.random.default_rng(rank)
        plan = [np.array([rank * 100 + 2 * i, rank * 100 + 2 * i + 1]) for i in range(steps)]
        tokens = {int(i): torch.as_tensor(rng.integers(0, 97, 6)) for p in plan for i in p}
        pf = PrefetchingTeacher(client, iter(plan), lambda ids: torch.stack([tokens[int(i)] for i in ids]),
                                prefetch=2)
        got, replicas = [], []
        for step, ids in enumerate(plan):
            _together(sync)  # everyone is done with the step before
            for r in kill_at.get(step, ()):
                job.kill(r)
            _together(sync)
            sp = pf.next(ids)
            want = job.model.sparse(torch.stack([tokens[int(i)] for i in ids]))
            got.append(torch.equal(sp.indices[sp.mask], want.indices[want.mask])
                       and torch.equal(sp.values, want.values))
            replicas.append(client.replica)
        client.close()
        results[rank] = (got, replicas, client.replicas_alive())
    except Exception as e:
        errors[rank] = e
        sync.abort()


def test_students_of_lost_replicas_move_to_the_next_live_one_and_get_the_same_logits():
    """3 replicas (ranks 0-2) serving students 3-5. Replica 1 dies at student 4's step 3: student 4
    moves to replica 2 (the next after its own). Replica 2 dies at student 5's step 6: students 4 and
    5 both move to replica 0 (next live after 1, resp. after 2). Every answer is the teacher's."""
    job = Job(6, 3)
    for r in range(3):
        job.serve(r)
    results, errors = {}, {}
    kills = {3: {}, 4: {3: [1]}, 5: {6: [2]}}
    sync = threading.Barrier(3, timeout=30)
    ths = [threading.Thread(target=_student, args=(job, r, 10, kills[r], results, errors, sync)) for r in (3, 4, 5)]
    [t.start() for t in ths]
    [t.join(60) for t in ths]
    assert not errors, errors
    assert all(all(got) for got, _, _ in results.values()), results
    _, rep4, alive4 = results[4]
    _, rep5, _ = results[5]
    assert rep4 == [1] * 3 + [2] * 3 + [0] * 4 and rep5 == [2] * 6 + [0] * 4, (rep4, rep5)
    assert results[3][1] == [0] * 10 and alive4 == 1
    job.servers[0]["thread"].join(20)
    assert "error" not in job.servers[0], job.servers[0].get("error")
    # Replica 0 answered its own student's 10 requests and took over the others' from where they left.
    assert job.servers[0]["stats"].requests >= 10 + 4 + 4
    lost = [ln for ln in job.logs if "lost teacher rank" in ln]
    assert any(ln.startswith("pd-dist: student rank 4 (host4, node0): lost teacher rank 1 (host1, node0)")
               and "continuing with teacher rank 2 (host2, node0)" in ln for ln in lost), lost
    assert any("student rank 5" in ln and "continuing with teacher rank 0" in ln for ln in lost), lost
    adopted = [ln for ln in job.logs if ln.startswith("[teacher 0] adopted student rank")]
    assert sorted(adopted) == ["[teacher 0] adopted student rank 4 (host4, node0): its teacher replica was lost",
                               "[teacher 0] adopted student rank 5 (host5, node0): its teacher replica was lost"]
    # The end of the run waits for every live rank, not for the lost replicas (which never close).
    closers = [threading.Thread(target=job.topos[r].close) for r in (0, 3, 4, 5)]
    [t.start() for t in closers]
    [t.join(20) for t in closers]
    assert not any(t.is_alive() for t in closers)


def test_the_last_replica_gone_ends_the_student_naming_the_dead_teacher():
    job = Job(4, 2, timeout=1.0)
    for r in range(2):
        job.serve(r)
    results, errors = {}, {}
    sync = threading.Barrier(2, timeout=30)
    ths = [threading.Thread(target=_student, args=(job, r, 6, {3: [0, 1]} if r == 3 else {}, results, errors,
                                                   sync)) for r in (2, 3)]
    [t.start() for t in ths]
    [t.join(30) for t in ths]
    assert set(errors) == {2, 3}, (errors, results)
    for r, e in errors.items():
        assert isinstance(e, PeerError) and f"student rank {r} (host{r}, node0)" in str(e), e
        assert "teacher rank" in str(e) and "closed the connection" in str(e), e


def test_a_silent_replica_is_left_after_the_peer_timeout():
    """A replica that hangs (its connection stays open) is given up after topology.peer_timeout_s, and
    the answers it may still send land in buffers the client no longer reads."""
    job = Job(4, 2, timeout=0.5)
    job.serve(0)
    stuck = threading.Event()
    stalled = {}

    def run_stalled():  # replica 1 hangs in its first forward until the test lets it go
        def forward(t, ids):
            stuck.wait(30)
            return job.model.sparse(t)
        try:
            stalled["stats"] = TeacherServer(job.topos[1], SPEC, forward, max_batch=8, startup_timeout_s=5,
                                             log=lambda s: job.logs.append(f"[teacher 1] {s}")).serve()
        except Exception as e:
            stalled["error"] = e
    th1 = threading.Thread(target=run_stalled, daemon=True)
    th1.start()
    other = {}
    th = threading.Thread(target=lambda: other.update(c=TeacherClient(job.topos[2], SPEC, startup_timeout_s=5)))
    th.start()
    client = TeacherClient(job.topos[3], SPEC, startup_timeout_s=5, log=job.logs.append)
    th.join(10)
    tok = torch.arange(12).reshape(2, 6)
    t = client.submit(np.array([7, 8]), tok)
    sp = client.result(t)  # replica 1 never answers: after 0.5 s the request goes to replica 0
    assert client.replica == 0 and torch.equal(sp.values, job.model.sparse(tok).values)
    assert any("lost teacher rank 1" in ln and "silent for 0.5s" in ln for ln in job.logs), job.logs
    stuck.set()  # replica 1 wakes up, answers into buffers nobody reads, sees it was given up and leaves
    th1.join(10)
    assert not th1.is_alive() and "error" not in stalled, stalled.get("error")
    assert any(ln.startswith("[teacher 1] the students of this replica gave it up") for ln in job.logs), job.logs
    client.close()
    other["c"].close()
    job.servers[0]["thread"].join(10)
    assert "error" not in job.servers[0] and job.servers[0]["stats"].requests == 1


@pytest.mark.parametrize("override,what", [("teacher.zero_stage=3", "teacher.zero_stage 3"),
                                           ("teacher.pipeline_stages=2", "teacher.pipeline_stages > 1")])
def test_failover_is_refused_where_the_teachers_run_in_lockstep(override, what):
    from conftest import SMOKE
    from pd_dist.config import load_config

    sets = ["distill.mode=online", "topology.teacher_failover=true", override]
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, sets)
    assert str(e.value).startswith("config key 'topology.teacher_failover' = True: cannot work with " + what)
    load_config(SMOKE, sets[:2])  # accepted on its own


def test_a_replica_dead_before_the_handshake_is_replaced_at_start():
    job = Job(4, 2)
    job.serve(0)
    job.kill(1)  # never started serving
    other = {}
    th = threading.Thread(target=lambda: other.update(c=TeacherClient(job.topos[2], SPEC, startup_timeout_s=5)))
    th.start()
    client = TeacherClient(job.topos[3], SPEC, startup_timeout_s=5, log=job.logs.append)
    th.join(10)
    assert client.replica == 0 and client.replicas_alive() == 1
    tok = torch.arange(6).reshape(1, 6)
    assert torch.equal(client.result(client.submit(np.array([3]), tok)).values, job.model.sparse(tok).values)
    client.close()
    other["c"].close()
    job.servers[0]["thread"].join(10)
    assert "error" not in job.servers[0] and job.servers[0]["stats"].requests == 1


def test_the_end_of_the_run_does_not_wait_for_a_teacher_that_died_unnoticed():
    """A replica that dies after its students are done is recorded by nobody: the end-of-run barrier
    finds it by its stopped heartbeat (after the peer timeout) and lets the others leave."""
    job = Job(4, 2, timeout=0.5)
    job.kill(1)
    closers = [threading.Thread(target=job.topos[r].close) for r in (0, 2, 3)]
    assert not job.store.check(["pd/failover/lost-replica/1"])
    [t.start() for t in closers]
    [t.join(20) for t in closers]
    assert not any(t.is_alive() for t in closers)
    assert job.store.check(["pd/failover/lost-replica/1"])  # found by the barrier, not by a student
