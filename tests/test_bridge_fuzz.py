"""Malformed bridge messages over real gloo: every one is refused in one line naming the sender, and no
receiver dies of it.

gloo aborts the receiving process (SIGABRT) when a message outgrows the buffer posted for it, so these
cases run where the real thing runs: each test forks one child process in which every rank of a bridge
is a ProcessGroupGloo of its own on 127.0.0.1 (a thread per rank, one in-memory store). A child that
aborts fails the test with the end of its stderr instead of taking pytest with it. The cases are drawn
from seeded generators: sizes shorter, longer and far longer than the buffer, sample ids on both sides
of the dataset and at the int64 extremes, replies with a token kept twice at a random position, and
hellos of older and newer protocol versions.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import tempfile
import threading
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pd_dist.cluster.bridge import (HELLO_FIELDS, KIND_HELLO, KIND_REFUSAL, KIND_REPLY, KIND_REQUEST, MAGIC,
                            OP_WORK, PREAMBLE_ROOM, REFUSAL_NBYTES, REFUSE_IDS, REFUSE_MALFORMED, REFUSE_SIZE,
                            REFUSE_TOKENS, TAG_HELLO, TAG_HELLO_BODY, TAG_REQ, TAG_REQ_BODY, TAG_RESP,
                            TAG_RESP_BODY, VERSION, BadRequest, PeerError, check_preamble, check_request,
                            decode_response, encode_refusal, encode_response, exchange_hello, pack_indices,
                            preamble, recv_preamble, refusal_error, send_message, unpack_indices)
from pd_dist.core.logits import SparseLogits
from pd_dist.signals.online_client import TeacherClient
from pd_dist.teacher.server import TeacherServer
from pd_dist.cluster.topology import LaunchEnv, Topology, TopologyConfig, make_layout
from test_online import SPEC, TinyTeacher, _poke

# Sends in flight: gloo drops a send whose work is freed before a receive meets it, and the bodies of
# refused messages are never received.
KEEP: list = []
REQ = 8 * SPEC.request_numel()
RESP = SPEC.response_nbytes()
N = SPEC.n_samples
WAIT = datetime.timedelta(seconds=30)


# ------------------------------------------------------------------------------------------ harness
def isolated(fn, *args, timeout: float = 240.0):
    """fn(*args) in a forked child; its return value. A child that dies (gloo aborts with SIGABRT) or
    raises fails the test with what it printed or raised."""
    ctx = mp.get_context("fork")
    recv_end, send_end = ctx.Pipe(duplex=False)
    err = tempfile.TemporaryFile()

    def child():
        os.dup2(err.fileno(), 2)
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        torch.set_num_threads(1)
        try:
            send_end.send(("ok", fn(*args)))
        except BaseException:
            send_end.send(("raised", traceback.format_exc()))
        os._exit(0)  # no teardown: bodies that were refused are still pending on their senders

    proc = ctx.Process(target=child, daemon=True)
    proc.start()
    send_end.close()
    try:
        if not recv_end.poll(timeout):
            proc.kill()
            pytest.fail(f"no result within {timeout:g}s")
        status, value = recv_end.recv()
    except EOFError:
        proc.join(5)
        err.seek(0)
        pytest.fail(f"the child died (exit code {proc.exitcode}):\n{err.read().decode(errors='replace')[-3000:]}")
    proc.join(5)
    if status != "ok":
        pytest.fail(value)
    return value


def world(n: int, timeout_s: float = 20.0) -> dict[int, Topology]:
    """n ranks on one real gloo bridge, rank 0 the teacher, the others its students."""
    store = dist.HashStore()
    groups: dict[int, object] = {}

    def make(r):
        groups[r] = dist.ProcessGroupGloo(dist.PrefixStore("bridge/", store), r, n, WAIT)
    threads = [threading.Thread(target=make, args=(r,)) for r in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    layout = make_layout(TopologyConfig(teacher_ranks=[0]), n, online=True)
    return {r: Topology(env=LaunchEnv(r, n, 0, "127.0.0.1", 0, "test", "node0"), backend="gloo", layout=layout,
                        role="teacher" if r == 0 else "student", hosts={q: f"host{q}, node0" for q in range(n)},
                        bridge=groups[r], peer_timeout_s=timeout_s) for r in range(n)}


def desc(r: int) -> str:
    return f"rank {r} (host{r}, node0)"


def read_request(bridge, src: int) -> torch.Tensor:
    head, w = recv_preamble(bridge, src, TAG_REQ)
    w.wait(WAIT)
    check_preamble(head, {KIND_REQUEST: REQ}, "test")
    req = torch.zeros(SPEC.request_numel(), dtype=torch.int64)
    bridge.recv([req], src, TAG_REQ_BODY).wait(WAIT)
    return req


def read_answer(bridge, src: int) -> tuple[int, int, torch.Tensor]:
    head, w = recv_preamble(bridge, src, TAG_RESP)
    w.wait(WAIT)
    kind, seq = check_preamble(head, {KIND_REPLY: RESP, KIND_REFUSAL: REFUSAL_NBYTES}, "test")
    body = torch.zeros(RESP if kind == KIND_REPLY else REFUSAL_NBYTES, dtype=torch.uint8)
    bridge.recv([body], src, TAG_RESP_BODY).wait(WAIT)
    return kind, seq, body


def request(ids, tokens=None, n=None) -> torch.Tensor:
    req = torch.zeros(SPEC.request_numel(), dtype=torch.int64)
    ids = [int(i) for i in ids]
    req[0], req[1], req[2] = OP_WORK, 0, len(ids) if n is None else n
    req[3:3 + len(ids)] = torch.tensor(ids, dtype=torch.int64)
    off = 3 + SPEC.micro_batch
    tok = torch.zeros(len(ids), SPEC.seq_len, dtype=torch.int64) if tokens is None else tokens
    req[off:off + tok.numel()] = tok.reshape(-1)
    return req


# ------------------------------------------------------------------------------------------ requests
def bad_requests(seed: int) -> list[tuple]:
    """(what, argument, expected refusal code, expected value, needle in the teacher's log) for requests
    a teacher must refuse: every class of wrong size, sample ids outside [0, n_samples), and preambles
    that are no request of this version."""
    rng = np.random.default_rng(seed)
    sizes = sorted({0, 8, REQ - 8, REQ - 1, *rng.integers(1, REQ, 3).tolist(),  # short
                    REQ + 1, REQ + 8, *rng.integers(REQ + 1, 8 * PREAMBLE_ROOM, 2).tolist(),  # longer
                    100 * REQ, 1 << 24, int(rng.integers(1 << 16, 1 << 22))})  # far longer
    ids = sorted({-1, -(1 << 63), (1 << 62), (1 << 63) - 1, N, N + 1, *(N + rng.integers(2, 1 << 40, 2)).tolist(),
                  *(-rng.integers(2, 1 << 40, 2)).tolist()})
    cases = [("size", s, REFUSE_SIZE, s, f"request 0 of {s} bytes ({REQ} expected)") for s in sizes]
    cases += [("id", (v, int(rng.integers(0, SPEC.micro_batch))), REFUSE_IDS, v,
               f"request 0 from student {{me}} has sample id {v} outside the dataset [0, {N})") for v in ids]
    cases += [("version", v, REFUSE_MALFORMED, 0, f"protocol version {VERSION} here vs {v} there")
              for v in (1, 2, VERSION + 1, int(rng.integers(VERSION + 2, 1 << 40)))]
    cases += [("kind", k, REFUSE_MALFORMED, k, "where a request belongs") for k in (KIND_HELLO, KIND_REPLY, 77)]
    cases += [("bare", None, REFUSE_MALFORMED, 0, "not a pd-dist message (first word 0x1,")]  # as version 2 sent it
    cases += [("tokens", SPEC.vocab_size + int(rng.integers(0, 50)), REFUSE_TOKENS, None, "outside the vocabulary")]
    cases += [("count", int(rng.choice([0, SPEC.micro_batch + 1, -5])), REFUSE_MALFORMED, 0, "malformed request 0")]
    return cases


def _attack(bridge, what, arg) -> None:
    """Send one bad request to the teacher (rank 0); bodies that must not be read are sent all the same."""
    if what == "size":
        KEEP.extend(send_message(bridge, 0, TAG_REQ, KIND_REQUEST, torch.ones(arg, dtype=torch.uint8)))
    elif what == "id":
        v, slot = arg
        ids = [N - 1, 0][:SPEC.micro_batch]
        ids[slot] = v
        KEEP.extend(send_message(bridge, 0, TAG_REQ, KIND_REQUEST, request(ids)))
    elif what in ("version", "kind"):
        head = preamble(KIND_REQUEST, REQ)
        head[1 if what == "version" else 2] = arg
        KEEP.append(bridge.send([head], 0, TAG_REQ))
        KEEP.append(bridge.send([request([1])], 0, TAG_REQ_BODY))
    elif what == "bare":
        KEEP.append(bridge.send([request([1])], 0, TAG_REQ))
    elif what == "tokens":
        tok = torch.zeros(1, SPEC.seq_len, dtype=torch.int64)
        tok[0, -1] = arg
        KEEP.extend(send_message(bridge, 0, TAG_REQ, KIND_REQUEST, request([3], tok)))
    elif what == "count":
        KEEP.extend(send_message(bridge, 0, TAG_REQ, KIND_REQUEST, request([3, 4], n=arg)))


def _serve_through_attacks(cases: list[tuple]) -> dict:
    """Rank 0 serves; ranks 2.. each send one bad request and read the refusal; rank 1 is a good student
    served before, during and after them (sample ids 0 and n_samples - 1 included)."""
    topos = world(2 + len(cases))
    model = TinyTeacher()
    seen, logs, out = [], [], {}

    def answer(tokens, ids):
        seen.extend(int(i) for i in ids)
        return model.sparse(tokens)

    def serve():
        try:
            out["stats"] = TeacherServer(topos[0], SPEC, answer, max_batch=8, log=logs.append,
                                         startup_timeout_s=20).serve()
        except Exception as e:
            out["error"] = repr(e)
    server = threading.Thread(target=serve)
    server.start()
    refusals = {}

    def rogue(r, what, arg):
        try:
            exchange_hello(topos[r].bridge, SPEC, 0, f"student {desc(r)}", f"teacher {desc(0)}", 20)
            _attack(topos[r].bridge, what, arg)
            kind, seq, body = read_answer(topos[r].bridge, 0)
            code, value = body.view(torch.int64).tolist()
            refusals[r] = (kind, code, value, str(refusal_error(body, seq, "teacher")))
        except Exception as e:
            refusals[r] = repr(e)
    good = {}

    def student():
        try:
            client = TeacherClient(topos[1], SPEC, startup_timeout_s=20)
            rng = np.random.default_rng(1)
            ok = []
            for step in range(8):
                if step == 4:
                    [t.join() for t in rogues]  # every rogue has had its refusal
                ids = np.array([0, N - 1]) if step % 2 == 0 else rng.integers(0, N, 2)
                tok = torch.as_tensor(rng.integers(0, SPEC.vocab_size, (2, SPEC.seq_len)))
                got = client.result(client.submit(ids, tok))
                want = model.sparse(tok)
                ok.append(bool(torch.equal(got.values, want.values) and torch.equal(got.indices[got.mask],
                                                                                     want.indices[want.mask])))
            client.close(finished=True)
            good["ok"] = ok
        except Exception as e:
            good["error"] = repr(e)
    rogues = [threading.Thread(target=rogue, args=(2 + i, c[0], c[1])) for i, c in enumerate(cases)]
    st = threading.Thread(target=student)
    [t.start() for t in rogues + [st]]
    st.join(120)
    server.join(60)
    stats = out.get("stats")
    return {"refusals": refusals, "logs": logs, "good": good, "seen": seen, "server_error": out.get("error"),
            "alive": server.is_alive(), "requests": stats.requests if stats else None}


def _check_attacks(cases, res):
    assert res["server_error"] is None and not res["alive"], res["server_error"]
    assert res["good"] == {"ok": [True] * 8}, res["good"]
    assert res["requests"] == 8
    assert all(0 <= i < N for i in res["seen"]) and {0, N - 1} <= set(res["seen"]), sorted(set(res["seen"]))
    for i, (what, arg, code, value, needle) in enumerate(cases):
        r = 2 + i
        got = res["refusals"][r]
        assert isinstance(got, tuple), (what, arg, got)
        kind, gcode, gvalue, msg = got
        assert (kind, gcode) == (KIND_REFUSAL, code), (what, arg, got)
        if value is not None:
            assert gvalue == value, (what, arg, got)
        assert msg.startswith("teacher refused request"), msg
        line = [s for s in res["logs"] if f"student {desc(r)} is no longer served" in s]
        assert len(line) == 1, (what, arg, res["logs"])
        assert line[0].startswith(f"teacher {desc(0)}: ") and needle.format(me=desc(r)) in line[0], (needle, line)
        assert f"student {desc(r)}" in line[0].split("; refused")[0], line  # the sender is named


@pytest.mark.parametrize("seed", [0, 1])
def test_bad_requests_are_refused_and_the_teacher_serves_its_other_students(seed):
    cases = bad_requests(seed)
    for part in (cases[:len(cases) // 2], cases[len(cases) // 2:]):  # worlds of <= 20 ranks
        _check_attacks(part, isolated(_serve_through_attacks, part))


def test_the_request_cases_cover_what_they_claim():
    cases = bad_requests(0)
    sizes = [c[1] for c in cases if c[0] == "size"]
    assert min(sizes) == 0 and any(s < REQ for s in sizes) and any(REQ < s <= 8 * PREAMBLE_ROOM for s in sizes)
    assert max(sizes) >= 1 << 24
    ids = [c[1][0] for c in cases if c[0] == "id"]
    assert {-1, -(1 << 63), 1 << 62, N} <= set(ids) and all(not 0 <= v < N for v in ids)


def test_check_request_takes_exactly_the_ids_of_the_dataset():
    rng = np.random.default_rng(5)
    for _ in range(200):
        v = int(rng.choice([rng.integers(-(1 << 62), 1 << 62), rng.integers(-3, N + 3)]))
        slot = int(rng.integers(0, 2))
        ids = [int(rng.integers(0, N)), int(rng.integers(0, N))]
        ids[slot] = v
        if 0 <= v < N:
            assert check_request(request(ids), SPEC, "t", "s")[2] == 2
        else:
            with pytest.raises(BadRequest, match=rf"sample id {v} outside the dataset \[0, {N}\)") as e:
                check_request(request(ids), SPEC, "t", "s")
            assert (e.value.code, e.value.value, e.value.seq) == (REFUSE_IDS, v, 0)


# ------------------------------------------------------------------------------------------ replies
def bad_replies(seed: int) -> list[tuple]:
    """(what, argument, needle in the student's error) for answers a student must refuse."""
    rng = np.random.default_rng(seed)
    sizes = sorted({0, RESP - 1, int(rng.integers(1, RESP)), RESP + 1, int(rng.integers(RESP + 1, 4 * RESP)),
                    100 * RESP, 1 << 22})
    cases = [("size", s, f"reply 0 of {s} bytes ({RESP} expected)") for s in sizes]
    cases += [("refusal_size", s, f"refusal 0 of {s} bytes ({REFUSAL_NBYTES} expected)") for s in (8, 24, RESP)]
    cases += [("kind", k, "where a reply or refusal belongs") for k in (KIND_HELLO, KIND_REQUEST, 99)]
    cases += [("version", v, f"protocol version {VERSION} here vs {v} there") for v in (2, VERSION + 1)]
    cases += [("bare", None, "not a pd-dist message")]
    cases += [("seq", int(rng.integers(1, 1 << 30)), "where request 0's was due")]
    for _ in range(3):
        s, pos = int(rng.integers(0, 2)), int(rng.integers(0, SPEC.seq_len))
        a, b = (int(x) for x in rng.choice(SPEC.width, 2, replace=False))
        cases.append(("dup", (s, pos, a, b), f"twice at sample {[5, 6][s]}, position {pos}"))
    cases += [("nan", None, "NaN or +inf logits"), ("index", SPEC.vocab_size, "outside the vocabulary"),
              ("count", SPEC.micro_batch + 1, f"with {SPEC.micro_batch + 1} samples"),
              ("refusal", None, "refused request 0: token ids outside the vocabulary (97)")]
    return cases


def _full_reply(seq: int, ids, rng) -> tuple[torch.Tensor, SparseLogits]:
    """A reply whose every slot is kept (so any two slots can be made to collide)."""
    n = len(ids)
    idx = torch.stack([torch.randperm(SPEC.vocab_size, generator=rng)[:SPEC.width]
                       for _ in range(n * SPEC.seq_len)]).reshape(n, SPEC.seq_len, SPEC.width)
    vals = torch.sort(torch.randn(n, SPEC.seq_len, SPEC.width, generator=rng), -1, descending=True).values
    sp = SparseLogits(idx, vals)
    return encode_response(SPEC, seq, np.asarray(ids), sp, torch.empty(RESP, dtype=torch.uint8)), sp


def _answer(bridge, s, what, arg, req, rng) -> None:
    seq, ids = int(req[1]), req[3:3 + int(req[2])].numpy()
    buf, _ = _full_reply(seq, ids, rng)
    if what == "size":
        KEEP.extend(send_message(bridge, s, TAG_RESP, KIND_REPLY, torch.ones(arg, dtype=torch.uint8), seq))
    elif what == "refusal_size":
        KEEP.extend(send_message(bridge, s, TAG_RESP, KIND_REFUSAL, torch.ones(arg, dtype=torch.uint8), seq))
    elif what in ("kind", "version"):
        head = preamble(KIND_REPLY, RESP, seq)
        head[2 if what == "kind" else 1] = arg
        KEEP.append(bridge.send([head], s, TAG_RESP))
        KEEP.append(bridge.send([buf], s, TAG_RESP_BODY))
    elif what == "bare":  # what versions 1 and 2 sent: the reply with no preamble (its header fits the room)
        KEEP.append(bridge.send([buf[:8 * PREAMBLE_ROOM]], s, TAG_RESP))
    elif what == "seq":
        KEEP.extend(send_message(bridge, s, TAG_RESP, KIND_REPLY, buf, arg))
    elif what == "dup":
        smp, pos, a, b = arg
        h = SPEC.response_layout()[0]
        end = h + len(ids) * SPEC.seq_len * SPEC.width * SPEC.index_bytes
        idx = unpack_indices(buf[h:end], SPEC.index_bytes, (len(ids), SPEC.seq_len, SPEC.width))
        idx[smp, pos, b] = idx[smp, pos, a]
        buf[h:end] = pack_indices(idx, SPEC.index_bytes)
        KEEP.extend(send_message(bridge, s, TAG_RESP, KIND_REPLY, buf, seq))
    elif what in ("nan", "index", "count"):
        _poke(buf, SPEC, {"nan": "value", "index": "index", "count": "n"}[what],
              {"nan": (3, float("nan")), "index": arg, "count": arg}[what])
        KEEP.extend(send_message(bridge, s, TAG_RESP, KIND_REPLY, buf, seq))
    elif what == "refusal":
        KEEP.extend(send_message(bridge, s, TAG_RESP, KIND_REFUSAL, encode_refusal(REFUSE_TOKENS, 97), seq))
    elif what == "good":
        KEEP.extend(send_message(bridge, s, TAG_RESP, KIND_REPLY, buf, seq))


def _students_of_a_rogue_teacher(cases: list[tuple]) -> dict:
    """Rank 0 answers student 1 + i's request with case i (and the last student well: the control)."""
    cases = cases + [("good", None, None)]
    topos = world(1 + len(cases))
    rng = torch.Generator().manual_seed(3)
    teacher_err = {}

    def teacher():
        try:
            br = topos[0].bridge
            for s in range(1, len(cases) + 1):
                exchange_hello(br, SPEC, s, f"teacher {desc(0)}", f"student {desc(s)}", 20)
            for s in range(1, len(cases) + 1):
                _answer(br, s, *cases[s - 1][:2], read_request(br, s), rng)
        except Exception:
            teacher_err["error"] = traceback.format_exc()
    threading.Thread(target=teacher, daemon=True).start()
    got = {}

    def student(s):
        try:
            client = TeacherClient(topos[s], SPEC, startup_timeout_s=20)
            sp = client.result(client.submit(np.array([5, 6]), torch.zeros(2, SPEC.seq_len, dtype=torch.int64)))
            got[s] = ("answered", bool(torch.isfinite(sp.values).all()))
        except PeerError as e:
            got[s] = ("refused", str(e))
        except Exception:
            got[s] = ("crashed", traceback.format_exc())
    threads = [threading.Thread(target=student, args=(s,)) for s in range(1, len(cases) + 1)]
    [t.start() for t in threads]
    [t.join(90) for t in threads]
    return {"got": got, "teacher": teacher_err}


@pytest.mark.parametrize("seed", [0, 1])
def test_bad_replies_are_refused_by_the_student_naming_the_teacher(seed):
    cases = bad_replies(seed)
    res = isolated(_students_of_a_rogue_teacher, cases)
    assert not res["teacher"], res["teacher"]
    assert res["got"][len(cases) + 1] == ("answered", True)  # the control: a good reply is taken
    for i, (what, arg, needle) in enumerate(cases):
        s = 1 + i
        status, msg = res["got"][s]
        assert status == "refused", (what, arg, msg)
        assert msg.startswith(f"student {desc(s)}: ") and f"teacher {desc(0)}" in msg, (what, arg, msg)
        assert needle in msg and "\n" not in msg, (what, arg, needle, msg)


def test_a_token_kept_twice_at_one_position_is_refused():
    """Generated: any two kept slots of any position made equal is refused; dropped slots (index 0,
    -inf) may repeat, also an index kept elsewhere in the row."""
    rng = torch.Generator().manual_seed(11)
    g = np.random.default_rng(11)
    for trial in range(60):
        buf, sp = _full_reply(trial, [7, 8], rng)
        assert decode_response(SPEC, buf)[0] == trial
        smp, pos = int(g.integers(0, 2)), int(g.integers(0, SPEC.seq_len))
        a, b = (int(x) for x in g.choice(SPEC.width, 2, replace=False))
        idx, vals = sp.indices.clone(), sp.values.clone()
        if trial % 3 == 0:  # drop the tail from slot 2 on: those all travel as index 0, and 0 may be kept
            vals[smp, pos, 2:] = float("-inf")
            idx[smp, pos, 2:] = 0
            idx[smp, pos, 0] = 0
            idx[smp, pos, 1] = int(g.integers(1, SPEC.vocab_size))
            out = encode_response(SPEC, trial, np.array([7, 8]), SparseLogits(idx, vals),
                                  torch.empty(RESP, dtype=torch.uint8))
            assert torch.equal(decode_response(SPEC, out)[2].indices, idx)
            continue
        idx[smp, pos, b] = idx[smp, pos, a]
        out = encode_response(SPEC, trial, np.array([7, 8]), SparseLogits(idx, vals),
                              torch.empty(RESP, dtype=torch.uint8))
        with pytest.raises(PeerError, match=rf"answered request {trial} with token index {int(idx[smp, pos, a])} "
                                            rf"twice at sample {[7, 8][smp]}, position {pos}$"):
            decode_response(SPEC, out, sender="s")


# ------------------------------------------------------------------------------------------ hellos
OLD_HELLO = {1: 10, 2: 12}  # fields of versions 1 and 2's bare hello


def _old_peer(bridge, peer: int, version: int) -> list[int]:
    """What versions 1 and 2 did: a bare hello both ways, the receive sized for their own. Returns what
    this old peer received (an abort here would end the child)."""
    mine = torch.zeros(OLD_HELLO[version], dtype=torch.int64)
    mine[0], mine[1], mine[2] = MAGIC, version, SPEC.vocab_size
    theirs = torch.zeros_like(mine)
    r = bridge.recv([theirs], peer, TAG_HELLO)
    bridge.send([mine], peer, TAG_HELLO).wait(WAIT)
    r.wait(WAIT)
    return theirs.tolist()


HELLO_CASES = [  # (what, argument, needle)
    ("old", 1, f"protocol version {VERSION} here vs 1 there"),
    ("old", 2, f"protocol version {VERSION} here vs 2 there"),
    ("newer", VERSION + 1, f"protocol version {VERSION} here vs {VERSION + 1} there"),
    ("newer", 1 << 40, f"protocol version {VERSION} here vs {1 << 40} there"),
    ("bare", None, "not a pd-dist message"),
    ("kind", KIND_REQUEST, "request 0 where a hello belongs"),
    ("size", 96, f"hello 0 of 96 bytes ({8 * len(HELLO_FIELDS)} expected)"),
    ("size", 1 << 20, f"hello 0 of {1 << 20} bytes ({8 * len(HELLO_FIELDS)} expected)"),
    ("field", "vocab_size", "vocab_size 97 here vs 98 there"),
]


def _rogue_hello(bridge, peer: int, what, arg) -> object:
    if what == "old":
        return _old_peer(bridge, peer, arg)
    head, r = recv_preamble(bridge, peer, TAG_HELLO)
    mine = SPEC.hello()
    if what == "field":
        mine[HELLO_FIELDS.index(arg)] += 1
    nbytes = arg if what == "size" else 8 * mine.numel()
    if what == "bare":
        KEEP.append(bridge.send([torch.tensor([7, 7, 7])], peer, TAG_HELLO))
    else:
        p = preamble(KIND_HELLO, nbytes)
        if what == "newer":
            p[1] = arg
        if what == "kind":
            p[2] = arg
        KEEP.append(bridge.send([p], peer, TAG_HELLO))
    body = mine if what != "size" else torch.ones(arg, dtype=torch.uint8)
    KEEP.append(bridge.send([body], peer, TAG_HELLO_BODY))  # never read unless the preamble is right
    if what == "field":
        theirs = torch.zeros_like(mine)
        bridge.recv([theirs], peer, TAG_HELLO_BODY).wait(WAIT)
    r.wait(WAIT)
    return head[:5].tolist()


def _hellos() -> dict:
    """Each case twice: the rogue as a student meeting a real TeacherServer (one world each: a failed
    handshake ends a teacher), and as a teacher met by a real TeacherClient (all in one world)."""
    out = {"server": {}, "client": {}, "old_saw": {}}
    for i, (what, arg, _) in enumerate(HELLO_CASES):
        topos = world(2)
        seen = {}
        t = threading.Thread(target=lambda: seen.update(v=_rogue_hello(topos[1].bridge, 0, what, arg)))
        t.start()
        try:
            TeacherServer(topos[0], SPEC, lambda tok, ids: None, max_batch=8, startup_timeout_s=10)
            out["server"][i] = ("accepted", "")
        except PeerError as e:
            out["server"][i] = ("refused", str(e))
        t.join(30)
        if what == "old":
            out["old_saw"][i] = seen.get("v")
    topos = world(1 + len(HELLO_CASES), timeout_s=10)

    def rogue():
        for i, (what, arg, _) in enumerate(HELLO_CASES):
            _rogue_hello(topos[0].bridge, 1 + i, what, arg)
    threading.Thread(target=rogue, daemon=True).start()

    def student(i):
        try:
            TeacherClient(topos[1 + i], SPEC, startup_timeout_s=10)
            out["client"][i] = ("accepted", "")
        except PeerError as e:
            out["client"][i] = ("refused", str(e))
    threads = [threading.Thread(target=student, args=(i,)) for i in range(len(HELLO_CASES))]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    return out


def test_a_hello_of_another_version_or_size_fails_cleanly_on_both_sides():
    res = isolated(_hellos)
    for i, (what, arg, needle) in enumerate(HELLO_CASES):
        status, msg = res["server"][i]
        assert status == "refused" and needle in msg, (what, arg, msg)
        assert msg.startswith(f"handshake between teacher {desc(0)} and student {desc(1)} failed: "), msg
        status, msg = res["client"][i]
        assert status == "refused" and needle in msg, (what, arg, msg)
        assert msg.startswith(f"handshake between student {desc(1 + i)} and teacher {desc(0)} failed: "), msg
        if what == "old":  # the old peer read this version's preamble: its own check names the version
            assert res["old_saw"][i][:2] == [MAGIC, VERSION], res["old_saw"][i]
