"""Benchmark: online distillation, a teacher rank streaming top-p-k sparse logits to a student rank.

Two real processes over torch.distributed (gloo on CPU), started by this script with RANK /
WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT and joined with
init_topology(topology=TopologyConfig(teacher_ranks=[0]), online=True): rank 0 is the teacher, rank 1 the student.
Each process uses ONE torch thread (torch.set_num_threads(1), OMP/MKL_NUM_THREADS=1), so the two
share the machine's cores without oversubscribing them. Inputs are random token ids (fixed seed), a
fixed list of `steps` micro-batches known to both sides (sample ids i*mb .. (i+1)*mb - 1).

Phases, in lock-step (each TeacherServer / TeacherClient pair begins with the protocol's hello
exchange, which doubles as a barrier, and ends with the client's stop message):
  1. teacher alone: the teacher rank times the frozen teacher (forward + top-p-k) over all micro-batches (after a
     warm-up) while the student rank idles in the next hello;
  2. collect (untimed): the student fetches every micro-batch's logits through a TeacherClient;
  3. student alone: the student times `steps` training steps on the collected logits (PDStudent forward
     with the fused LM+KD loss, backward, torch.optim.AdamW step) while the teacher idles in the next
     hello. No DeepSpeed engine: the bench isolates the overlap machinery (client, server, prefetch,
     wire), and the engine's step on one CPU rank adds the same work to both the alone and online runs;
  4. online: the student runs the same steps taking logits through PrefetchingTeacher(prefetch=2)
     while the TeacherServer serves; timed: total, time inside next(), client.wait_time (blocked on
     logits).

overlap_ratio = online_s / max(teacher_alone_s, student_alone_s) (1.0 = perfect overlap; the
serial sum would give up to 2.0); teacher_wait_frac = wait / online_s. The main configuration has the
faster teacher (tiny-teacher vs small-student); `teacher_slower` swaps sides (small-teacher vs
tiny-student), where the student necessarily waits and only overlap_ratio is meaningful.

Every phase runs `rounds` times (alternating, in the order above) and the fastest round of each phase
is used, which filters out rounds where other jobs took the cores. Because the machine may be shared,
the JSON also reports, per chosen phase, `foreign_cores`: how many cores other processes used
(machine busy CPU from /proc/stat minus this bench's ranks, per wall second). On 2 cores, foreign load
during the online phase slows it more than the alone phases (two ranks must be scheduled instead of
one), so overlap_ratio is only a clean measure where foreign_cores is ~0. Less load-sensitive
companions: `client_overhead_s` (student time inside PrefetchingTeacher.next() minus the wait: the
client's own cost on the critical path), teacher_wait_frac (for a faster teacher, waits stay short
whatever the load), and `student_online_cpu_ratio` / `teacher_online_cpu_ratio` (each rank's CPU
seconds online over alone: the work the online machinery adds; under load these rise too, as the two
ranks then share caches and host cores with other jobs).

Wire: WireSpec(vocab 151552, top_p 0.95, top_k 50, bf16 values: the GPU default).bytes_per_token()
against dense fp16 logits (2 * 151552 bytes/token) gives wire_reduction. The measured run uses the same
spec except its vocabulary (4096: 2-byte indices instead of 3); measured_bytes_per_token =
client.bytes_received / client.tokens_received over that run, checked equal to its spec's
bytes_per_token (every reply travels whole, its preamble and per-micro-batch header included).

Prints progress to stderr and one JSON line last on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import cpu_seconds, emit, log  # noqa: E402

TEACHER, STUDENT = 0, 1
REAL_VOCAB = 151552  # the paper's (GLM-4) vocabulary


def machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used (all cores), from /proc/stat.

    Used to tell how much of each phase's cores other jobs took: the bench may share the machine."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    busy = v[0] + v[1] + v[2] + sum(v[5:8])  # user nice system irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ ranks
def rank_main(args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from pd_dist.cluster.bridge import WireSpec
    from pd_dist.core.logits import SignalSpec
    from pd_dist.models import ModelConfig, build_model, count_params
    from pd_dist.signals.online_client import PrefetchingTeacher, TeacherClient
    from pd_dist.teacher.server import TeacherServer
    from pd_dist.cluster.topology import TopologyConfig, init_topology
    from pd_dist.teacher.inference import FrozenTeacher
    from pd_dist.train.student import PDStudent

    topo = init_topology(topology=TopologyConfig(teacher_ranks=[TEACHER], peer_timeout_s=120), online=True)
    me = f"[{args.label} {topo.role}]"
    mb, seq, steps = args.micro_batch, args.seq_len, args.steps
    g = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, args.vocab, (steps * mb, seq + 1), generator=g)  # row = sample id
    inputs, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    plan = [np.arange(i * mb, (i + 1) * mb) for i in range(steps)]
    signal = SignalSpec.of("top_p_k", top_p=args.top_p, top_k=args.top_k)
    spec = WireSpec(vocab_size=args.vocab, tokenizer_hash="bench-online", seq_len=seq, signal=signal,
                    value_dtype=args.wire_dtype, micro_batch=mb, n_samples=steps * mb)
    out = {"role": topo.role, "threads": torch.get_num_threads()}

    rounds = args.rounds
    if topo.role == "teacher":
        model = build_model(ModelConfig(preset=args.teacher), args.vocab, seed=1)
        out["params"] = count_params(model)
        teacher = FrozenTeacher(model, torch.device("cpu"), torch.float32, signal, args.chunk)
        for ids in plan[:args.warmup]:
            teacher(inputs[ids])
        alone, alone_cpu, online_cpu, online_fwd, busy = [], [], [], [], []
        for r in range(rounds):
            # 1. teacher alone (the student waits in the hello of the next client)
            b0, c0, t0 = machine_busy_s(), cpu_seconds(), time.perf_counter()
            for ids in plan:
                teacher(inputs[ids])
            alone.append(time.perf_counter() - t0)
            alone_cpu.append(cpu_seconds() - c0)
            busy.append(machine_busy_s() - b0)
            log(f"{me} round {r}: alone {alone[-1]:.2f}s for {steps} micro-batches")
            # 2. collect (round 0) or a bare barrier; the student's alone phase then runs while the
            # online server waits in its hello; 4. online
            for phase in ("collect" if r == 0 else "barrier", "online"):
                server = TeacherServer(topo, spec, teacher, max_batch=mb)
                c0 = cpu_seconds()
                stats = server.serve()
                if phase == "online":
                    online_cpu.append(cpu_seconds() - c0)
                    online_fwd.append(stats.forward_s)
                    log(f"{me} round {r}: served {stats.requests} requests in {stats.batches} forwards, "
                        f"forward {stats.forward_s:.2f}s")
        out.update(teacher_alone_s=alone, teacher_alone_cpu_s=alone_cpu, teacher_alone_busy_s=busy,
                   online_teacher_cpu_s=online_cpu,
                   online_teacher_forward_s=online_fwd)
    else:
        model = build_model(ModelConfig(preset=args.student), args.vocab, seed=2)
        model.train()
        out["params"] = count_params(model)
        student = PDStudent(model, kind=args.kind, temperature=1.0, chunk_size=args.chunk)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        normalizer = float(mb * seq)

        def train_step(i, sparse):
            ids = plan[i]
            loss = student(inputs[ids], targets[ids], sparse, args.alpha, normalizer).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        alone, alone_cpu, online, online_cpu, waits, idle_cpu = [], [], [], [], [], []
        alone_busy, online_busy, next_s = [], [], []
        for r in range(rounds):
            # 2. round 0: collect every micro-batch's logits (untimed); later rounds: barrier only.
            c0 = cpu_seconds()
            client = TeacherClient(topo, spec)  # returns once the teacher's alone phase is over
            idle_cpu.append(cpu_seconds() - c0)
            if r == 0:
                collected = [client.result(client.submit(ids, inputs[ids])) for ids in plan]
            client.close()
            if r == 0:
                for i in range(args.warmup):
                    train_step(i, collected[i])
            # 3. student alone
            b0, c0, t0 = machine_busy_s(), cpu_seconds(), time.perf_counter()
            for i in range(steps):
                loss = train_step(i, collected[i])
            alone.append(time.perf_counter() - t0)
            alone_cpu.append(cpu_seconds() - c0)
            alone_busy.append(machine_busy_s() - b0)
            # 4. online
            client = TeacherClient(topo, spec)
            remote = PrefetchingTeacher(client, iter(plan), lambda ids: inputs[ids], prefetch=args.prefetch)
            in_next = 0.0
            b0, c0, t0 = machine_busy_s(), cpu_seconds(), time.perf_counter()
            for i in range(steps):
                t1 = time.perf_counter()
                sparse = remote.next(plan[i])
                in_next += time.perf_counter() - t1
                loss = train_step(i, sparse)
            online.append(time.perf_counter() - t0)
            next_s.append(in_next)
            online_cpu.append(cpu_seconds() - c0)
            online_busy.append(machine_busy_s() - b0)
            client.close()
            waits.append(client.wait_time)
            log(f"{me} round {r}: alone {alone[-1]:.2f}s, online {online[-1]:.2f}s for {steps} steps, "
                f"waited {client.wait_time:.2f}s (loss {loss:.3f})")
        out.update(student_alone_s=alone, student_alone_cpu_s=alone_cpu, online_s=online,
                   online_student_cpu_s=online_cpu, wait_s=waits, idle_wait_cpu_s=idle_cpu,
                   student_alone_busy_s=alone_busy, online_busy_s=online_busy, next_s=next_s,
                   bytes_received=client.bytes_received, tokens_received=client.tokens_received,
                   spec_bytes_per_token=spec.bytes_per_token())
    # The result goes out before teardown: both sides are done with the bridge here (the student's
    # last close() was answered by the teacher's serve() returning).
    print(json.dumps(out), flush=True)
    store = topo.store
    topo.close()
    # Ordered exit: rank 0 hosts the TCPStore; leaving while the student still tears down its groups
    # can abort it in C++ teardown ("terminate called without an active exception", seen here).
    if topo.role == "student":
        store.set("bench/student_closed", "1")
    else:
        store.wait(["bench/student_closed"])
    return out


# ------------------------------------------------------------------------------------------ parent
exit_codes: list = []  # (config, rank, code) of ranks that failed in teardown after reporting


def run_config(args, label: str, teacher: str, student: str) -> dict:
    port = free_port()
    procs = []
    for r in (TEACHER, STUDENT):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1",
                   OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        cmd = [sys.executable, os.path.abspath(__file__), "--rank-worker", "--label", label,
               "--teacher", teacher, "--student", student] + args.passthrough
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    res = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=args.timeout)
            lines = stdout.strip().splitlines()
            if not lines or not lines[-1].startswith("{"):
                raise RuntimeError(f"{label}: rank {len(res)} exited with {p.returncode} and no result")
            if p.returncode != 0:  # after its result: a teardown failure, reported but not fatal
                log(f"[{label}] WARNING: rank {len(res)} exited with {p.returncode} after reporting")
                exit_codes.append((label, len(res), p.returncode))
            res.append(json.loads(lines[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    t, s = res
    # Least-disturbed round of each phase (min wall time): the machine may be shared with other jobs.
    def best(xs):
        return min(range(len(xs)), key=lambda i: xs[i])

    it, is_, k = best(t["teacher_alone_s"]), best(s["student_alone_s"]), best(s["online_s"])
    ta, sa = t["teacher_alone_s"][it], s["student_alone_s"][is_]
    online, wait_s = s["online_s"][k], s["wait_s"][k]
    alone = max(ta, sa)
    # Cores other jobs used during each chosen phase: machine busy CPU minus our ranks' CPU, per second.
    foreign = {
        "teacher_alone": (t["teacher_alone_busy_s"][it] - t["teacher_alone_cpu_s"][it]) / ta,
        "student_alone": (s["student_alone_busy_s"][is_] - s["student_alone_cpu_s"][is_]) / sa,
        "online": (s["online_busy_s"][k] - s["online_student_cpu_s"][k] - t["online_teacher_cpu_s"][k]) / online,
    }
    return {
        "overlap_ratio": online / alone,
        "teacher_wait_frac": wait_s / online,
        # CPU work the online machinery adds per side (request/response encode + decode, threads):
        # online CPU seconds over alone CPU seconds, insensitive to other jobs on the machine.
        "student_online_cpu_ratio": s["online_student_cpu_s"][k] / s["student_alone_cpu_s"][is_],
        "teacher_online_cpu_ratio": t["online_teacher_cpu_s"][k] / t["teacher_alone_cpu_s"][it],
        "foreign_cores": foreign,
        # Student time inside PrefetchingTeacher.next() (submit ahead + wait + decode + id check) in
        # the chosen online round, and that minus the wait: the client's own cost on the critical path.
        "next_s": s["next_s"][k], "client_overhead_s": s["next_s"][k] - wait_s,
        "teacher_alone_s": ta, "student_alone_s": sa, "online_s": online, "wait_s": wait_s,
        "serial_s": ta + sa,
        "faster_side": "teacher" if ta < sa else "student",
        "rounds": {"teacher_alone_s": t["teacher_alone_s"], "student_alone_s": s["student_alone_s"],
                   "online_s": s["online_s"], "wait_s": s["wait_s"], "next_s": s["next_s"],
                   "teacher_alone_cpu_s": t["teacher_alone_cpu_s"],
                   "student_alone_cpu_s": s["student_alone_cpu_s"],
                   "online_student_cpu_s": s["online_student_cpu_s"],
                   "online_teacher_cpu_s": t["online_teacher_cpu_s"],
                   "online_teacher_forward_s": t["online_teacher_forward_s"],
                   "student_idle_wait_cpu_s": s["idle_wait_cpu_s"],
                   "teacher_alone_busy_s": t["teacher_alone_busy_s"],
                   "student_alone_busy_s": s["student_alone_busy_s"], "online_busy_s": s["online_busy_s"]},
        "teacher_preset": teacher, "student_preset": student,
        "teacher_params": t["params"], "student_params": s["params"],
        "bytes_received": s["bytes_received"], "tokens_received": s["tokens_received"],
        "measured_bytes_per_token": s["bytes_received"] / s["tokens_received"],
        "spec_bytes_per_token": s["spec_bytes_per_token"],
        "threads": {"teacher": t["threads"], "student": s["threads"]},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="micro-batches (1 per step) per timed phase")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3,
                    help="repeats of the (teacher alone, student alone, online) phases; min wall time is used")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary of the measured runs")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--wire-dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--kind", default="nll")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--chunk", type=int, default=1024, help="loss / truncation chunk (tokens)")
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    ap.add_argument("--fast-teacher", default="tiny-teacher:small-student",
                    help="main configuration, teacher:student presets (teacher the faster side)")
    ap.add_argument("--slow-teacher", default="small-teacher:tiny-student",
                    help="second configuration, teacher:student presets (teacher the slower side)")
    ap.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--label", default="", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", default="", help=argparse.SUPPRESS)
    ap.add_argument("--student", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_worker:
        rank_main(args)
        return 0
    # Options forwarded to the ranks (everything but the parent-only ones).
    args.passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                        if k not in ("timeout", "fast_teacher", "slow_teacher", "rank_worker", "label",
                                     "teacher", "student")]

    from pd_dist.cluster.bridge import WireSpec
    from pd_dist.core.logits import SignalSpec

    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    runs = {}
    for label, pair in (("main", args.fast_teacher), ("teacher_slower", args.slow_teacher)):
        teacher, student = pair.split(":")
        log(f"[{label}] teacher {teacher}, student {student}: {args.steps} steps of {args.micro_batch}x"
            f"{args.seq_len} tokens, vocab {args.vocab}, {args.threads} thread(s) per rank")
        runs[label] = run_config(args, label, teacher, student)
        r = runs[label]
        log(f"[{label}] teacher alone {r['teacher_alone_s']:.2f}s, student alone {r['student_alone_s']:.2f}s, "
            f"online {r['online_s']:.2f}s (waited {r['wait_s']:.2f}s): overlap_ratio {r['overlap_ratio']:.3f}, "
            f"teacher_wait_frac {r['teacher_wait_frac']:.3f}; other jobs used "
            + ", ".join(f"{v:.2f}" for v in r["foreign_cores"].values())
            + " cores during teacher alone / student alone / online")

    real = WireSpec(vocab_size=REAL_VOCAB, tokenizer_hash="-", seq_len=args.seq_len,
                    signal=SignalSpec.of("top_p_k", top_p=0.95, top_k=50), value_dtype="bf16", micro_batch=args.micro_batch, n_samples=1)  # for its sizes only
    dense = 2.0 * REAL_VOCAB
    m, slow = runs["main"], runs["teacher_slower"]
    measured_ok = all(abs(r["measured_bytes_per_token"] - r["spec_bytes_per_token"]) < 1e-9 for r in runs.values())
    result = {
        "overlap_ratio": m["overlap_ratio"], "teacher_wait_frac": m["teacher_wait_frac"],
        "wire_reduction": dense / real.bytes_per_token(),
        "wire_bytes_per_token": real.bytes_per_token(), "dense_fp16_bytes_per_token": dense,
        "wire_spec": {"vocab": REAL_VOCAB, "top_p": 0.95, "top_k": 50, "value_dtype": "bf16",
                      "index_bytes": real.index_bytes, "micro_batch": args.micro_batch, "seq_len": args.seq_len},
        "measured_bytes_per_token": m["measured_bytes_per_token"],
        "measured_spec_bytes_per_token": m["spec_bytes_per_token"],
        "measured_matches_spec": measured_ok,
        "measured_wire_reduction": 2.0 * args.vocab / m["measured_bytes_per_token"],
        "measured_spec": {"vocab": args.vocab, "top_p": args.top_p, "top_k": args.top_k,
                          "value_dtype": args.wire_dtype,
                          "index_bytes": 2 if args.vocab <= 1 << 16 else (3 if args.vocab <= 1 << 24 else 4)},
        "teacher_alone_s": m["teacher_alone_s"], "student_alone_s": m["student_alone_s"],
        "online_s": m["online_s"], "wait_s": m["wait_s"], "serial_s": m["serial_s"],
        "faster_side": m["faster_side"],
        "student_online_cpu_ratio": m["student_online_cpu_ratio"],
        "teacher_online_cpu_ratio": m["teacher_online_cpu_ratio"], "foreign_cores": m["foreign_cores"],
        "next_s": m["next_s"], "client_overhead_s": m["client_overhead_s"],
        "teacher_preset": m["teacher_preset"], "student_preset": m["student_preset"],
        "teacher_params": m["teacher_params"], "student_params": m["student_params"],
        "main": m,
        "teacher_slower": {k: slow[k] for k in (
            "overlap_ratio", "teacher_wait_frac", "teacher_alone_s", "student_alone_s", "online_s", "wait_s",
            "serial_s", "faster_side", "next_s", "client_overhead_s", "student_online_cpu_ratio",
            "teacher_online_cpu_ratio", "foreign_cores", "teacher_preset", "student_preset", "teacher_params",
            "student_params", "measured_bytes_per_token")},
        "steps": args.steps, "micro_batch": args.micro_batch, "seq_len": args.seq_len, "vocab": args.vocab,
        "prefetch": args.prefetch, "threads": args.threads, "cpus": os.cpu_count(), "kind": args.kind,
        "goals": {"overlap_ratio<=1.15": m["overlap_ratio"] <= 1.15,
                  "teacher_wait_frac<0.05": (m["teacher_wait_frac"] < 0.05
                                             if m["faster_side"] == "teacher" else None),
                  "wire_reduction>=1000": dense / real.bytes_per_token() >= 1000},
        "rounds": args.rounds,
        "teardown_failures": exit_codes,
        # 1-minute load average: well above 2 means other jobs shared the cores with the ranks.
        "loadavg_1m": {"before": load_before, "after": os.getloadavg()[0]},
        "total_s": time.perf_counter() - t0,
    }
    log("goals: " + ", ".join(f"{k}: {v}" for k, v in result["goals"].items())
        + f"; other jobs used {m['foreign_cores']['online']:.2f} cores during the main online phase")
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
