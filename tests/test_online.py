"""Online-mode protocol in one process: teacher server and student clients over an in-memory bridge.

The bridge here has the semantics the real gloo bridge has for this protocol (ordered delivery per
(source, tag), blocking waits with a timeout, a closed peer failing the wait, a message shorter than its
buffer filling a prefix, a longer one aborting the receiver), so the server, the client, the handshake,
the sample-id checks and the error paths are tested without process groups. The same code runs over
gloo in tests/test_bridge_fuzz.py (in one process) and tests/test_online_launch.py (launched).
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
import torch

from pd_dist.cluster.bridge import (KIND_REFUSAL, KIND_REPLY, KIND_REQUEST, REFUSAL_NBYTES, TAG_REQ, TAG_REQ_BODY,
                            TAG_RESP, TAG_RESP_BODY, PeerError, WireSpec, check_preamble, decode_response,
                            encode_response, pack_indices, recv_preamble, refusal_error, send_message,
                            unpack_indices)
from pd_dist.core.configlib import ConfigError
from pd_dist.core.logits import SignalSpec, SparseLogits
from pd_dist.signals.online_client import PrefetchingTeacher, TeacherClient
from pd_dist.teacher.server import TeacherServer
from pd_dist.cluster.topology import LaunchEnv, Topology, TopologyConfig, assign_roles, make_layout


class _Work:
    def __init__(self, fn=None, default_timeout=None):
        self.fn, self.default_timeout = fn, default_timeout

    def wait(self, timeout=None):
        # Like gloo: a bare wait() is bounded by the process group's timeout, not unbounded.
        if self.fn is not None:
            self.fn(self.default_timeout if timeout is None else timeout.total_seconds())
        return True


class FakeNet:
    """Mailboxes keyed by (src, dst, tag); a rank marked dead fails its peers' waits. ``aborts`` lists
    the messages that outgrew their buffer (where gloo aborts the receiving process)."""

    def __init__(self):
        self.boxes: dict = {}
        self.lock = threading.Lock()
        self.dead: set[int] = set()
        self.aborts: list[str] = []

    def box(self, key) -> queue.Queue:
        with self.lock:
            return self.boxes.setdefault(key, queue.Queue())


class FakeBridge:
    def __init__(self, net: FakeNet, rank: int, timeout: float):
        self.net, self.rank, self.timeout = net, rank, timeout

    def send(self, tensors, dst, tag):
        self.net.box((self.rank, dst, tag)).put(tensors[0].clone())
        return _Work()

    def recv(self, tensors, src, tag):
        out = tensors[0]
        box = self.net.box((src, self.rank, tag))

        def fn(timeout):
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if src in self.net.dead:
                    raise RuntimeError(f"Connection closed by peer [127.0.0.1]:{src}")
                try:
                    item = box.get(timeout=0.05)
                    break
                except queue.Empty:
                    if deadline is not None and time.monotonic() > deadline:
                        raise RuntimeError("Timed out waiting 1000ms for recv operation to complete")
            got, room = item.reshape(-1).view(torch.uint8), out.view(-1).view(torch.uint8)
            if got.numel() > room.numel():
                self.net.aborts.append(f"{got.numel()} bytes from rank {src} into {room.numel()} on tag {tag}")
                raise AssertionError(f"gloo would abort rank {self.rank}: {self.net.aborts[-1]}")
            room[:got.numel()] = got
        return _Work(fn, self.timeout)


def topo_for(rank, net, world=3, teachers=(0,), timeout=5.0):
    env = LaunchEnv(rank, world, 0, "127.0.0.1", 0, "test", "node0")
    role = "teacher" if rank in teachers else "student"
    layout = make_layout(TopologyConfig(teacher_ranks=list(teachers)), world, online=True)
    return Topology(env=env, backend="gloo", layout=layout, role=role,
                    hosts={r: f"host{r}, node0" for r in range(world)}, bridge=FakeBridge(net, rank, timeout),
                    peer_timeout_s=timeout)


SPEC = WireSpec(vocab_size=97, tokenizer_hash="abc", seq_len=6, signal=SignalSpec.of("top_p_k", top_p=0.9, top_k=5),
                value_dtype="fp32", micro_batch=2, n_samples=1000)


class TinyTeacher(torch.nn.Module):
    """Logits = a fixed random function of the tokens, so answers can be checked exactly."""

    def __init__(self, vocab=97):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(vocab, vocab, generator=g) * 3

    def sparse(self, tokens, spec=SPEC):
        return spec.signal.form(self.table[tokens])


def start_server(topo, spec=SPEC, model=None, errors=None):
    model = model or TinyTeacher()
    out = {}

    def run():
        try:
            server = TeacherServer(topo, spec, lambda t, ids: model.sparse(t, spec), max_batch=8,
                                   startup_timeout_s=5)
            out["stats"] = server.serve()
        except Exception as e:  # surfaced by the test
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out, model


def test_wire_round_trip_keeps_indices_values_and_dropped_entries():
    for vocab, nbytes in [(97, 2), (151552, 3), (1 << 25, 4)]:
        idx = torch.randint(0, vocab, (7, 5))
        assert torch.equal(unpack_indices(pack_indices(idx, nbytes), nbytes, idx.shape), idx)
    spec = WireSpec(151552, "h", 4, SignalSpec.of("top_p_k", top_p=0.95, top_k=3), "bf16", 2, n_samples=16)
    assert spec.index_bytes == 3
    vals = torch.tensor([[5.0, 2.0, float("-inf")]] * 8).reshape(2, 4, 3)
    idx = torch.randint(0, 151552, (2, 4, 3))
    idx[..., 2] = 0
    buf = torch.empty(spec.response_nbytes(), dtype=torch.uint8)
    encode_response(spec, 7, np.array([11, 12]), SparseLogits(idx, vals), buf)
    seq, ids, sp = decode_response(spec, buf)
    assert seq == 7 and ids.tolist() == [11, 12]
    assert torch.equal(sp.indices, idx) and torch.equal(sp.values, vals)  # bf16-exact values chosen


def _reply(spec=SPEC, n=2, seq=3):
    model = TinyTeacher()
    tok = torch.arange(n * spec.seq_len).reshape(n, spec.seq_len) % spec.vocab_size
    buf = torch.empty(spec.response_nbytes(), dtype=torch.uint8)
    return encode_response(spec, seq, np.arange(n), model.sparse(tok, spec), buf)


def _poke(buf, spec, what, value):
    """Overwrite one field of an encoded reply: the count, the first index or a value."""
    h, ib, _ = spec.response_layout()
    if what == "n":
        buf[:h].view(torch.int64)[1] = value
    elif what == "index":
        buf[h:h + ib].view(torch.uint8)[:spec.index_bytes] = torch.tensor(
            [value & 0xFF, (value >> 8) & 0xFF], dtype=torch.uint8)[:spec.index_bytes]
    elif what == "value":
        buf[h + ib:].view(torch.float32)[value[0]] = value[1]
    elif what == "row":  # every entry of the first position dropped
        buf[h + ib:].view(torch.float32)[:spec.width] = float("-inf")
    return buf


@pytest.mark.parametrize("what,value,needle", [
    ("n", 0, "with 0 samples (1..2 expected)"), ("n", 3, "with 3 samples"), ("n", -7, "with -7 samples"),
    ("index", 97, "token index 97 outside the vocabulary [0, 97)"),
    ("index", 65535, "token index 65535 outside"),
    ("value", (0, float("nan")), "NaN or +inf logits"), ("value", (4, float("inf")), "NaN or +inf logits"),
    ("row", None, "a position that keeps no entry"),
])
def test_a_reply_out_of_range_is_refused_naming_the_sender(what, value, needle):
    seq, ids, sp = decode_response(SPEC, _reply())  # the unmodified reply decodes
    assert seq == 3 and ids.tolist() == [0, 1] and torch.isfinite(sp.values).any(-1).all()
    with pytest.raises(PeerError) as e:
        decode_response(SPEC, _poke(_reply(), SPEC, what, value), sender="student X: teacher rank 0")
    assert str(e.value).startswith("student X: teacher rank 0 answered request 3") and needle in str(e.value)


def test_every_message_size_follows_from_the_hello():
    """Every body size is a function of the hello (one size for every spec), so two sides that agree on
    the hello agree on every size (the receivers check each preamble's size anyway)."""
    import itertools

    specs = [WireSpec(v, "t", s, SignalSpec.of(sig, top_p=0.9, top_k=k), d, mb, n_samples=5)
             for v, s, k, d, mb, sig in itertools.product(
        (97, 70000, 1 << 24 + 1), (6, 7), (1, 5, 200), ("fp32", "bf16"), (1, 2), ("top_p_k", "head_tail"))]
    assert len({sp.hello().numel() for sp in specs}) == 1
    for a, b in itertools.combinations(specs, 2):
        if torch.equal(a.hello(), b.hello()):
            assert (a.request_numel(), a.response_nbytes()) == (b.request_numel(), b.response_nbytes())
        elif (a.request_numel(), a.response_nbytes()) != (b.request_numel(), b.response_nbytes()):
            assert not torch.equal(a.hello(), b.hello())


def _recv_answer(bridge, src):
    """(kind, request number, body) of the next answer from ``src``, read the way a client reads it."""
    head, w = recv_preamble(bridge, src, TAG_RESP)
    w.wait()
    kind, seq = check_preamble(head, {KIND_REPLY: SPEC.response_nbytes(), KIND_REFUSAL: REFUSAL_NBYTES}, "test")
    body = torch.zeros(SPEC.response_nbytes() if kind == KIND_REPLY else REFUSAL_NBYTES, dtype=torch.uint8)
    bridge.recv([body], src, TAG_RESP_BODY).wait()
    return kind, seq, body


def test_a_bad_request_ends_only_its_student():

    net = FakeNet()
    logs = []
    model = TinyTeacher()
    out = {}

    def run():
        try:
            server = TeacherServer(topo_for(0, net), SPEC, lambda t, ids: model.sparse(t), max_batch=8,
                                   log=logs.append, startup_timeout_s=5)
            out["stats"] = server.serve()
        except Exception as e:
            out["error"] = e
    server = threading.Thread(target=run, daemon=True)
    server.start()
    clients = {}

    def connect(r):
        clients[r] = TeacherClient(topo_for(r, net), SPEC, startup_timeout_s=5)
    hs = [threading.Thread(target=connect, args=(r,)) for r in (1, 2)]
    [t.start() for t in hs]
    [t.join(10) for t in hs]
    bad, good = clients[1], clients[2]
    tok = torch.zeros(2, 6, dtype=torch.int64)
    assert torch.equal(good.result(good.submit(np.array([1, 2]), tok)).values, model.sparse(tok).values)
    bad_tok = tok.clone()
    bad_tok[1, 4] = 97
    t1 = bad.submit(np.array([5, 6]), bad_tok)
    t2 = bad.submit(np.array([7, 8]), tok)  # already in flight: ignored once its student is refused
    with pytest.raises(PeerError, match=r"teacher rank 0 \(host0, node0\) refused request 0: token ids "
                                        r"outside the vocabulary \(97\)"):
        bad.result(t1)
    assert t2 in bad.pending
    net.dead.add(1)  # the refused student exits; the teacher does not take that for a fault
    assert any("request 0 from student rank 1 (host1, node0) has token id 97 outside the vocabulary [0, 97)"
               in line for line in logs), logs
    for i in range(3):
        assert torch.equal(good.result(good.submit(np.array([10 + i]), tok[:1])).values,
                           model.sparse(tok[:1]).values)
    good.close()
    server.join(10)
    assert not server.is_alive() and "error" not in out, out.get("error")
    assert out["stats"].requests == 4

    # a malformed header (0 samples) is refused the same way
    net = FakeNet()
    _, out, _ = start_server(topo_for(0, net, world=2))
    c = TeacherClient(topo_for(1, net, world=2), SPEC, startup_timeout_s=5)
    req = torch.zeros(SPEC.request_numel(), dtype=torch.int64)
    req[:3] = torch.tensor([1, 0, 0])
    send_message(c.topo.bridge, 0, TAG_REQ, KIND_REQUEST, req)
    kind, seq, body = _recv_answer(c.topo.bridge, 0)
    assert kind == KIND_REFUSAL
    with pytest.raises(PeerError, match="refused request 0: a malformed request"):
        raise refusal_error(body, seq, "teacher")
    assert not net.aborts


def test_two_students_get_their_own_logits_with_prefetch():
    net = FakeNet()
    server, out, model = start_server(topo_for(0, net))
    results = {}

    def student(rank):
        topo = topo_for(rank, net)
        client = TeacherClient(topo, SPEC, startup_timeout_s=5)
        rng = np.random.default_rng(rank)
        plan = [np.array([rank * 100 + 2 * i, rank * 100 + 2 * i + 1]) for i in range(6)]
        tokens = {int(i): torch.as_tensor(rng.integers(0, 97, 6)) for p in plan for i in p}
        pf = PrefetchingTeacher(client, iter(plan), lambda ids: torch.stack([tokens[int(i)] for i in ids]),
                                prefetch=2)
        got = []
        for ids in plan:
            sp = pf.next(ids)
            want = model.sparse(torch.stack([tokens[int(i)] for i in ids]))
            got.append(torch.equal(sp.indices[sp.mask], want.indices[want.mask])
                       and torch.equal(sp.values, want.values))
            assert len(client.pending) <= 2  # never more than `prefetch` in flight after taking one
        ev_ids = np.array([999])
        ev_tok = torch.as_tensor(rng.integers(0, 97, (1, 6)))
        sp = pf.now(ev_ids, ev_tok)
        got.append(torch.equal(sp.values, model.sparse(ev_tok).values))
        client.close()
        results[rank] = got

    threads = [threading.Thread(target=student, args=(r,)) for r in (1, 2)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    server.join(30)
    assert "error" not in out, out.get("error")
    assert results == {1: [True] * 7, 2: [True] * 7}
    assert out["stats"].requests == 14 and out["stats"].tokens == 2 * (6 * 2 + 1) * 6


def test_wrong_sample_ids_are_detected():
    net = FakeNet()
    topo_t = topo_for(0, net, world=2)
    spec = SPEC

    def rogue():  # answers with the ids shifted by one
        from pd_dist.cluster.bridge import exchange_hello
        br = topo_t.bridge
        exchange_hello(br, spec, 1, "teacher", "student", 5)
        head, w = recv_preamble(br, 1, TAG_REQ)
        w.wait()
        req = torch.empty(spec.request_numel(), dtype=torch.int64)
        br.recv([req], 1, TAG_REQ_BODY).wait()
        n = int(req[2])
        ids = req[3:3 + n].numpy() + 1
        sp = TinyTeacher().sparse(req[3 + spec.micro_batch:3 + spec.micro_batch + n * 6].reshape(n, 6))
        buf = torch.empty(spec.response_nbytes(), dtype=torch.uint8)
        send_message(br, 1, TAG_RESP, KIND_REPLY, encode_response(spec, int(req[1]), ids, sp, buf), int(req[1]))

    threading.Thread(target=rogue, daemon=True).start()
    client = TeacherClient(topo_for(1, net, world=2), spec, startup_timeout_s=5)
    t = client.submit(np.array([4, 5]), torch.zeros(2, 6, dtype=torch.int64))
    with pytest.raises(PeerError, match=r"sample ids \[5, 6\] but request 0 asked for \[4, 5\]"):
        client.result(t)


@pytest.mark.parametrize("field,change,hello_name", [
    ("signal", SignalSpec.of("top_p_k", top_p=0.9, top_k=20), "top_k"), ("seq_len", 8, "seq_len"),
    ("vocab_size", 98, "vocab_size"), ("tokenizer_hash", "xyz", "tokenizer_hash"),
    ("value_dtype", "bf16", "value_dtype"), ("signal", SignalSpec.of("top_p_k", top_p=0.8, top_k=5), "top_p"),
    ("signal", SignalSpec.of("head_tail", top_p=0.9, top_k=1, samples=4), "signal"),
    ("signal", SignalSpec.of("sampled", samples=5, seed=1), "signal_params_hash"), ("n_samples", 999, "n_samples")])
def test_handshake_mismatch_fails_on_both_sides_naming_both_ranks(field, change, hello_name):
    net = FakeNet()
    _, out, _ = start_server(topo_for(0, net, world=2))
    bad = WireSpec(**{**SPEC.__dict__, field: change})
    with pytest.raises(PeerError) as e:
        TeacherClient(topo_for(1, net, world=2), bad, startup_timeout_s=5)
    msg = str(e.value)
    assert "rank 1 (host1" in msg and "teacher rank 0 (host0" in msg
    assert hello_name in msg
    time.sleep(0.3)
    assert isinstance(out.get("error"), PeerError) and "handshake" in str(out["error"])


def test_silent_teacher_times_out_and_dead_teacher_fails_at_once():
    net = FakeNet()
    topo_t = topo_for(0, net, world=2, timeout=0.5)
    from pd_dist.cluster.bridge import exchange_hello
    threading.Thread(target=exchange_hello, args=(topo_t.bridge, SPEC, 1, "t", "s", 5), daemon=True).start()
    client = TeacherClient(topo_for(1, net, world=2, timeout=0.5), SPEC, startup_timeout_s=5)
    t0 = time.monotonic()
    with pytest.raises(PeerError, match=r"teacher rank 0 \(host0, node0\).*silent for 0.5s"):
        client.result(client.submit(np.array([1]), torch.zeros(1, 6, dtype=torch.int64)))
    assert time.monotonic() - t0 < 3
    net.dead.add(0)
    t0 = time.monotonic()
    with pytest.raises(PeerError, match="closed the connection"):
        client.result(client.submit(np.array([2]), torch.zeros(1, 6, dtype=torch.int64)))
    assert time.monotonic() - t0 < 1


def test_server_waits_out_a_student_idle_past_the_peer_timeout():
    """Students pause between requests (engine start-up, evaluation, checkpoints): a teacher must not
    take a pause longer than the peer timeout for a dead student."""
    net = FakeNet()
    server, out, model = start_server(topo_for(0, net, world=2, timeout=0.3))
    client = TeacherClient(topo_for(1, net, world=2, timeout=0.3), SPEC, startup_timeout_s=5)
    time.sleep(1.0)  # three peer timeouts before the first request
    tok = torch.zeros(1, 6, dtype=torch.int64)
    assert torch.equal(client.result(client.submit(np.array([1]), tok)).values, model.sparse(tok).values)
    time.sleep(1.0)
    client.result(client.submit(np.array([2]), tok))
    client.close()
    server.join(5)
    assert "error" not in out, out.get("error")
    assert out["stats"].requests == 2


def test_server_reports_a_student_that_died():
    net = FakeNet()
    _, out, _ = start_server(topo_for(0, net, world=2))
    client = TeacherClient(topo_for(1, net, world=2), SPEC, startup_timeout_s=5)
    client.result(client.submit(np.array([1]), torch.zeros(1, 6, dtype=torch.int64)))
    net.dead.add(1)
    for _ in range(100):
        if "error" in out:
            break
        time.sleep(0.05)
    assert isinstance(out.get("error"), PeerError) and "student rank 1 (host1" in str(out["error"])


def test_role_assignment():
    cfg = TopologyConfig()
    assert assign_roles(cfg, 3, ["a"] * 3) == [0]  # one node: rank 0 alone
    nodes = ["a", "a", "b", "b", "c", "c"]
    assert assign_roles(cfg, 6, nodes) == [0, 1]  # several nodes: the whole first node
    assert assign_roles(TopologyConfig(teacher_nodes=2), 8, nodes + ["c", "c"]) == [0, 1, 2, 3]
    assert assign_roles(TopologyConfig(teacher_ranks=[5]), 6, nodes) == [5]
    with pytest.raises(ConfigError, match="cannot be split evenly"):
        make_layout(TopologyConfig(teacher_ranks=[0, 1]), 5, ["a"] * 5, online=True)
    with pytest.raises(ConfigError, match="must leave nodes for students"):
        assign_roles(TopologyConfig(teacher_nodes=3), 6, nodes)
    with pytest.raises(ConfigError, match="students_per_teacher"):
        make_layout(TopologyConfig(students_per_teacher=3), 5, ["a"] * 5, online=True)
    net = FakeNet()
    topos = {r: topo_for(r, net, world=6, teachers=(0, 1)) for r in range(6)}
    assert [topos[r].dp_rank for r in range(2, 6)] == [0, 1, 2, 3] and topos[2].dp_size == 4
    assert [topos[r].my_teacher() for r in range(2, 6)] == [0, 0, 1, 1]
    assert topos[0].my_students() == [2, 3] and topos[1].my_students() == [4, 5]
