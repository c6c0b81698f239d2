"""`pd-dist plan`: size an online-distillation run (teacher:student rank split, wire traffic, store size).

In online mode a frozen teacher runs forward-only on its own ranks while the students train on theirs
(README, "Online"). This module answers, before anything is launched: how many of the cluster's
GPUs should be teachers, how fast the run goes, how many bytes cross the teacher -> student bridge,
and how large an offline logits store for the same token budget would be.

Formulas (all per token of the budget; ``F`` = achieved FLOP/s per GPU, e.g. 40% MFU of an H100's
~1e15 bf16 dense = 400e12):

- Teacher forward: ``2 * N_t`` FLOPs per token. Student training (forward + backward):
  ``6 * N_s`` FLOPs per token. N counts every parameter, embeddings and LM head included
  (the head's matmul is real work; the input embedding lookup is not, so this slightly overcounts).
- Capacities with ``T`` teacher and ``S`` student GPUs, in tokens/s:
  ``cap_t = T * F / (2 N_t)``, ``cap_s = S * F / (6 N_s)``. The run goes at
  ``tokens_per_s = min(cap_t, cap_s)``; the slower side is 100% busy, the other side's utilisation
  is ``tokens_per_s / cap``. The continuous optimum is ``T / S = (2 N_t) / (6 N_s) = N_t / (3 N_s)``.
- Search: every integer split ``T + S = gpus_per_node * nodes`` with ``T, S >= 1`` (with whole-node
  teachers: ``T`` a multiple of ``gpus_per_node``, so ``nodes >= 2``; with ``divisible``: ``S % T == 0``,
  as one-rank teacher replicas serving equal shares of students need), maximising ``tokens_per_s``;
  ties (within 1e-12 relative) go to fewer teacher GPUs.
- ``step_time_s = global_batch_tokens / tokens_per_s``; ``wall_time_s = tokens / tokens_per_s``.
- Wire, teacher -> student: ``entries * bytes_per_entry`` per token, where ``entries`` is ``top_k``
  when the transport sends fixed-width (padded) rows, as the bridge's sparse-logits batch is fixed-k
  (``wire_padded=True``, default), or ``mean_kept`` when it sends only kept entries. Default
  ``bytes_per_entry = 6`` = int32 index + fp16 value.
  Wire, student -> teacher: token ids, ``token_id_bytes`` per token (default 4, int32), plus one
  ``sample_id_bytes`` sample id per sequence of ``seq_len`` tokens (default 8, int64).
  ``wire_bytes_per_step = wire_bytes_per_token * global_batch_tokens`` (both directions, summed over
  all teacher/student pairs); ``wire_bytes_per_s = wire_bytes_per_token * tokens_per_s``.
- Dense reference: ``vocab_size * 2`` bytes per token (fp16 logits over the whole vocabulary);
  ``wire_reduction = dense / (teacher -> student bytes per token)``.
- Offline store: ``tokens * mean_kept * store_bytes_per_entry`` (only kept entries are stored;
  ``store_bytes_per_entry`` is what a kept entry costs after the store's packing/compression, default
  2.5 bytes, e.g. a delta-coded index plus a compressed fp16 value; pass the real figure of your store).
  ``dense_store_bytes = tokens * vocab_size * 2`` for comparison.

Not counted: attention score FLOPs (``~ 2 * layers * seq_len * hidden`` per token, a few % at 4k for
these sizes; ``seq_len`` only enters through sample ids), pipeline bubbles, data-parallel gradient
communication and optimizer time, recomputation (activation checkpointing adds ~ 2 N_s), the student's
KD-loss FLOPs, bridge latency (assumed hidden by prefetching several micro-batches ahead), load
imbalance between teacher replicas, memory limits (a teacher replica must fit its GPUs), stragglers,
evaluation and checkpointing. The numbers are a throughput-balance estimate, not a schedule.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Optional

DEFAULT_VOCAB = 151552
_REL_TIE = 1e-12

_DECIMAL = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}
_BINARY = {"": 1.0, "k": 2.0 ** 10, "m": 2.0 ** 20, "b": 2.0 ** 30, "g": 2.0 ** 30, "t": 2.0 ** 40,
           "p": 2.0 ** 50}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgtp]?)\s*$", re.IGNORECASE)


@dataclass
class PlanInput:
    """What `make_plan` needs. Sizes are counts (parameters, tokens), not bytes."""
    teacher_params: float
    student_params: float
    tokens: float  # token budget of the run
    seq_len: int = 4096
    top_k: int = 50
    mean_kept: Optional[float] = None  # mean kept entries per token after top-p; None = top_k
    gpus_per_node: int = 8
    nodes: int = 1
    flops_per_gpu: float = 400e12  # achieved FLOP/s per GPU (e.g. 40% MFU of ~1e15 bf16 dense)
    global_batch_tokens: int = 4 * 1024 * 1024
    vocab_size: int = DEFAULT_VOCAB
    bytes_per_entry: float = 6.0  # on the wire: int32 index + fp16 value
    store_bytes_per_entry: float = 2.5  # in an offline store, per kept entry, after packing
    wire_padded: bool = True  # wire rows are fixed-width top_k (padding included), else mean_kept
    token_id_bytes: float = 4.0  # student -> teacher, per token
    sample_id_bytes: float = 8.0  # student -> teacher, per sequence

    @property
    def kept(self) -> float:
        return float(self.top_k if self.mean_kept is None else self.mean_kept)

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def validate(self) -> None:
        """Raise ValueError (one line) on impossible input."""
        def positive(name, v):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")

        for name in ("teacher_params", "student_params", "tokens", "flops_per_gpu", "bytes_per_entry",
                     "store_bytes_per_entry"):
            positive(name, getattr(self, name))
        for name in ("seq_len", "top_k", "gpus_per_node", "nodes", "global_batch_tokens", "vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("token_id_bytes", "sample_id_bytes"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be >= 0, got {v!r}")
        if self.top_k > self.vocab_size:
            raise ValueError(f"top_k ({self.top_k}) must not exceed vocab_size ({self.vocab_size})")
        if self.mean_kept is not None:
            positive("mean_kept", self.mean_kept)
            if self.mean_kept > self.top_k:
                raise ValueError(f"mean_kept ({self.mean_kept}) must not exceed top_k ({self.top_k}): "
                                 "top-p keeps at most k entries")
        if self.total_gpus < 2:
            raise ValueError(f"need at least 2 GPUs (one teacher, one student), got "
                             f"{self.gpus_per_node} per node x {self.nodes} node(s)")


@dataclass
class Plan:
    inp: PlanInput
    whole_nodes: bool
    teacher_gpus: int
    student_gpus: int
    teacher_nodes: int  # nodes hosting teacher ranks (listed first in the hostfile); exact when whole_nodes
    ratio: float  # teacher_gpus / student_gpus
    students_per_teacher: Optional[int]  # student_gpus / teacher_gpus when whole, else None
    ideal_ratio: float  # continuous balance point N_t / (3 N_s)
    teacher_flops_per_token: float  # 2 N_t
    student_flops_per_token: float  # 6 N_s
    teacher_capacity_tokens_per_s: float
    student_capacity_tokens_per_s: float
    tokens_per_s: float
    step_time_s: float  # one global batch of global_batch_tokens
    steps: int  # ceil(tokens / global_batch_tokens)
    wall_time_s: float  # whole token budget
    teacher_util: float  # fraction of teacher GPU time busy (1.0 = teacher-bound)
    student_util: float
    bottleneck: str  # "teacher", "student" or "balanced"
    wire_entries_per_token: float  # top_k if wire_padded else mean_kept
    wire_logits_bytes_per_token: float  # teacher -> student
    wire_ids_bytes_per_token: float  # student -> teacher
    wire_bytes_per_token: float  # both directions
    wire_bytes_per_step: float
    wire_bytes_per_s: float
    dense_fp16_bytes_per_token: float  # vocab * 2
    wire_reduction: float  # dense / teacher -> student bytes
    store_bytes: float  # offline store for the whole budget
    store_bytes_per_token: float
    dense_store_bytes: float  # full fp16 logits for the whole budget


def _capacities(inp: PlanInput, t: int, s: int) -> tuple[float, float]:
    return (t * inp.flops_per_gpu / (2.0 * inp.teacher_params),
            s * inp.flops_per_gpu / (6.0 * inp.student_params))


def candidate_teacher_gpus(inp: PlanInput, whole_nodes: bool, divisible: bool = False) -> list[int]:
    """Teacher GPU counts allowed by the constraints (students get the rest, at least 1)."""
    g = inp.total_gpus
    step = inp.gpus_per_node if whole_nodes else 1
    return [t for t in range(step, g, step) if not divisible or (g - t) % t == 0]


def make_plan(inp: PlanInput, whole_nodes: bool = True, divisible: bool = False) -> Plan:
    """The split of ``gpus_per_node * nodes`` GPUs that maximises tokens/s (see module docstring).

    ``divisible``: only splits where every teacher rank serves the same whole number of student ranks
    (student_gpus % teacher_gpus == 0), as pd_dist.cluster.topology requires when a teacher replica is one
    rank (``topology.students_per_teacher``)."""
    inp.validate()
    if whole_nodes and inp.nodes < 2:
        raise ValueError(f"whole-node teachers need nodes >= 2 (teachers on one, students on another), "
                         f"got nodes={inp.nodes}; allow teachers and students to share a node instead "
                         f"(--no-whole-nodes)")
    best_t, best_tps = None, -1.0
    for t in candidate_teacher_gpus(inp, whole_nodes, divisible):
        tps = min(_capacities(inp, t, inp.total_gpus - t))
        if tps > best_tps * (1.0 + _REL_TIE):  # strictly better: ties keep the smaller t (seen first)
            best_t, best_tps = t, tps
    if best_t is None:
        raise ValueError(f"no split of {inp.total_gpus} GPUs satisfies the constraints (whole_nodes="
                         f"{whole_nodes}, divisible={divisible})")
    t = best_t
    s = inp.total_gpus - t
    cap_t, cap_s = _capacities(inp, t, s)
    tps = min(cap_t, cap_s)
    if abs(cap_t - cap_s) <= _REL_TIE * max(cap_t, cap_s):
        bottleneck = "balanced"
    else:
        bottleneck = "teacher" if cap_t < cap_s else "student"
    entries = float(inp.top_k) if inp.wire_padded else inp.kept
    logits_b = entries * inp.bytes_per_entry
    ids_b = inp.token_id_bytes + inp.sample_id_bytes / inp.seq_len
    wire_b = logits_b + ids_b
    dense_b = inp.vocab_size * 2.0
    return Plan(
        inp=inp, whole_nodes=whole_nodes, teacher_gpus=t, student_gpus=s,
        teacher_nodes=math.ceil(t / inp.gpus_per_node), ratio=t / s,
        students_per_teacher=s // t if s % t == 0 else None,
        ideal_ratio=inp.teacher_params / (3.0 * inp.student_params),
        teacher_flops_per_token=2.0 * inp.teacher_params, student_flops_per_token=6.0 * inp.student_params,
        teacher_capacity_tokens_per_s=cap_t, student_capacity_tokens_per_s=cap_s, tokens_per_s=tps,
        step_time_s=inp.global_batch_tokens / tps, steps=math.ceil(inp.tokens / inp.global_batch_tokens),
        wall_time_s=inp.tokens / tps, teacher_util=min(1.0, tps / cap_t), student_util=min(1.0, tps / cap_s),
        bottleneck=bottleneck, wire_entries_per_token=entries, wire_logits_bytes_per_token=logits_b,
        wire_ids_bytes_per_token=ids_b, wire_bytes_per_token=wire_b,
        wire_bytes_per_step=wire_b * inp.global_batch_tokens, wire_bytes_per_s=wire_b * tps,
        dense_fp16_bytes_per_token=dense_b, wire_reduction=dense_b / logits_b,
        store_bytes=inp.tokens * inp.kept * inp.store_bytes_per_entry,
        store_bytes_per_token=inp.kept * inp.store_bytes_per_entry,
        dense_store_bytes=inp.tokens * dense_b)


def parse_size(text, vocab_size: int = DEFAULT_VOCAB, binary: bool = False) -> float:
    """"9B" -> 9e9, "330M", "1.9b", "100B", "4k", "1e12", "1.5T"; or a preset name of
    pd_dist.models.PRESETS (e.g. "pd-1.9b"), resolved to its parameter count at ``vocab_size``.

    Suffixes k/M/B(=G)/T/P are decimal unless ``binary`` (then powers of 1024: "4k" -> 4096)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    s = str(text).strip()
    from pd_dist.models import PRESETS  # light: torch is imported by models anyway

    by_lower = {name.lower(): name for name in PRESETS}
    if s.lower() in by_lower:
        from pd_dist.models import preset_param_count

        return float(preset_param_count(by_lower[s.lower()], vocab_size))
    m = _SIZE_RE.match(s)
    if not m:
        raise ValueError(f"cannot read size {text!r}: expected a number with an optional suffix "
                         f"k/M/B/T (e.g. 9B, 330M, 4k) or a preset ({', '.join(PRESETS)})")
    value = float(m.group(1)) * (_BINARY if binary else _DECIMAL)[m.group(2).lower()]
    if not math.isfinite(value):
        raise ValueError(f"cannot read size {text!r}: not finite")
    return value


def _parse_int(text, binary: bool = True, what: str = "value") -> int:
    v = parse_size(text, binary=binary) if not re.match(r"^\s*[a-zA-Z]", str(text)) else None
    if v is None or v != int(v):
        raise ValueError(f"{what} must be an integer (e.g. 4096 or 4k), got {text!r}")
    return int(v)


def _si(x: float, unit: str = "") -> str:
    for div, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _count(x: float) -> str:
    """Counts the way model and token budgets are spoken of: 9B, 330M, 100B."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _dur(sec: float) -> str:
    if sec < 120:
        return f"{sec:.3g} s"
    if sec < 2 * 3600:
        return f"{sec / 60:.3g} min"
    if sec < 2 * 86400:
        return f"{sec / 3600:.3g} h"
    return f"{sec / 86400:.3g} days"


def format_plan(plan: Plan) -> str:
    """A human-readable table of a plan."""
    i = plan.inp
    rows = [
        ("teacher / student params", f"{_count(i.teacher_params)} / {_count(i.student_params)}"),
        ("FLOPs per token", f"teacher fwd 2N = {_si(plan.teacher_flops_per_token, 'FLOP')}, "
                            f"student train 6N = {_si(plan.student_flops_per_token, 'FLOP')}"),
        ("GPUs", f"{i.total_gpus} = {i.nodes} node(s) x {i.gpus_per_node}, "
                 f"{_si(i.flops_per_gpu, 'FLOP/s')} achieved each"),
        ("split teacher:student", f"{plan.teacher_gpus}:{plan.student_gpus} GPUs "
                                  f"(teacher on {plan.teacher_nodes} node(s)"
                                  f"{', whole nodes' if plan.whole_nodes else ''})"),
        ("ratio (ideal N_t/3N_s)", f"{plan.ratio:.3g} ({plan.ideal_ratio:.3g})"),
        ("students per teacher", f"{plan.students_per_teacher}" if plan.students_per_teacher else
         "not a whole number: one-rank teacher replicas need --divisible (topology.students_per_teacher)"),
        ("capacity teacher/student", f"{_si(plan.teacher_capacity_tokens_per_s, 'tok/s')} / "
                                     f"{_si(plan.student_capacity_tokens_per_s, 'tok/s')}"),
        ("throughput", f"{_si(plan.tokens_per_s, 'tok/s')} ({plan.bottleneck}-bound)"),
        ("utilisation teacher/student", f"{plan.teacher_util:.0%} / {plan.student_util:.0%}"),
        ("step", f"{_count(i.global_batch_tokens)} tokens in {_dur(plan.step_time_s)}; {plan.steps} steps"),
        ("wall time", f"{_dur(plan.wall_time_s)} for {_count(i.tokens)} tokens"),
        ("wire per token", f"{_si(plan.wire_bytes_per_token, 'B')} "
                           f"({plan.wire_entries_per_token:g} entries x {i.bytes_per_entry:g} B "
                           f"+ {plan.wire_ids_bytes_per_token:.3g} B ids)"),
        ("wire per step / per s", f"{_si(plan.wire_bytes_per_step, 'B')} / "
                                  f"{_si(plan.wire_bytes_per_s, 'B/s')}"),
        ("vs dense fp16 logits", f"{_si(plan.dense_fp16_bytes_per_token, 'B')}/token, "
                                 f"{plan.wire_reduction:.4g}x less on the wire"),
        ("offline store", f"{_si(plan.store_bytes, 'B')} ({i.kept:g} kept x {i.store_bytes_per_entry:g} B "
                          f"per token; dense fp16 {_si(plan.dense_store_bytes, 'B')})"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


# The paper's gains of PD over LM-only (Peng et al. 2024: +1.6% to +8.0%, read here as relative loss
# gains), turned into token multipliers through Chinchilla's fitted loss law L(N, D) = E + A/N^alpha +
# B/D^beta (Hoffmann et al. 2022, approach 3) when no pilot run's measured multiplier is given.
PAPER_GAINS = (0.016, 0.080)
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def law_multiplier(gain: float, params: float, tokens: float, law: dict = CHINCHILLA) -> Optional[float]:
    """The LM-only tokens, over ``tokens``, that bring a ``params`` model's loss under ``law`` down by the
    relative ``gain``; None when no amount of data does (the gain goes below the law's floor at that
    size)."""
    lm = law["E"] + law["A"] / params ** law["alpha"] + law["B"] / tokens ** law["beta"]
    data_term = lm * (1.0 - gain) - law["E"] - law["A"] / params ** law["alpha"]
    if data_term <= 0:
        return None
    return (law["B"] / data_term) ** (1.0 / law["beta"]) / tokens


@dataclass
class ROI:
    """`pd-dist plan --roi`: the projected cost and return of distilling one student (GPU-hours at the
    plan's achieved FLOP/s per GPU), per teacher mode. Every figure is a projection."""
    student_gpu_h: float  # 6 N_s D / F: the student's own training
    teacher_colocated_gpu_h: float  # 2 N_t D / F, on the students' GPUs, every run
    teacher_online_gpu_h: float  # the teacher ranks' GPUs for the run's wall time (busy or waiting)
    teacher_offline_gpu_h: float  # the generation job, once: 2 N_t D / F
    students: int  # students the offline store serves
    store_bytes: float
    multipliers: list[float | None]  # one (a pilot's) or the paper range's two
    source: str  # where the multiplier comes from
    saved_gpu_h: list[float | None]  # (multiplier - 1) x student_gpu_h, per multiplier
    break_even_students: list[int | None]  # offline: generation / saved, rounded up


def make_roi(plan: Plan, students: int = 1, pilot: Optional[float] = None, pilot_source: str = "") -> ROI:
    """The ROI of ``plan``'s run: a pilot's measured multiplier, else the paper's range through Chinchilla's
    law at the plan's student size and token budget."""
    if students < 1:
        raise ValueError(f"students must be >= 1, got {students}")
    i, f = plan.inp, plan.inp.flops_per_gpu
    hours = 3600.0
    student = plan.student_flops_per_token * i.tokens / f / hours
    teacher = plan.teacher_flops_per_token * i.tokens / f / hours
    if pilot is not None:
        mults, source = [pilot], f"measured on the pilot run {pilot_source} at its own size"
    else:
        mults = [law_multiplier(g, i.student_params, i.tokens) for g in PAPER_GAINS]
        source = (f"the paper's gain range +{PAPER_GAINS[0]:.1%} to +{PAPER_GAINS[1]:.1%} in loss through "
                  "Chinchilla's fitted loss law (Hoffmann et al. 2022) at this student size and budget")
    saved = [None if m is None else (m - 1.0) * student for m in mults]
    breaks = [math.ceil(teacher / x) if x is not None and x > 0 else None for x in saved]
    return ROI(student, teacher, plan.teacher_gpus * plan.wall_time_s / hours, teacher, students,
               plan.store_bytes, mults, source, saved, breaks)


def format_roi(r: ROI) -> str:
    """The ROI as labelled lines: each a projection with its source."""
    def gh(x):
        return "n/a" if x is None else f"{x:,.0f} GPU-h"

    def mult(m):
        return "unreachable by LM-only data at this size" if m is None else f"{m:.2f}x"

    ms = " to ".join(mult(m) for m in r.multipliers)
    saved = " to ".join(gh(x) for x in r.saved_gpu_h)
    per_student = r.teacher_offline_gpu_h / r.students
    rows = [
        ("student training", f"{gh(r.student_gpu_h)} per student (6N_s x tokens)"),
        ("teacher, colocated", f"{gh(r.teacher_colocated_gpu_h)} per student, every run (2N_t x tokens)"),
        ("teacher, online", f"{gh(r.teacher_online_gpu_h)} per student (its ranks for the run's wall time)"),
        ("teacher, offline", f"{gh(r.teacher_offline_gpu_h)} once; {gh(per_student)} per student over "
                             f"{r.students} student(s)"),
        ("offline store", _si(r.store_bytes, "B")),
        ("token multiplier", f"{ms} ({r.source})"),
        ("student compute saved", f"{saved} per student at equal loss ((multiplier - 1) x student training)"),
        ("offline break-even", " to ".join("never" if n is None else f"{n} student(s)"
                                           for n in r.break_even_students)),
    ]
    w = max(len(k) for k, _ in rows)
    return "projected (every figure below is a projection, with its source):\n" + "\n".join(
        f"{k:<{w}}  {v}" for k, v in rows)


def plan_to_dict(plan: Plan) -> dict:
    return dataclasses.asdict(plan)


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 from main, instead of usage + SystemExit
        raise _ArgError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pd-dist plan", description=(
        "Balance an online-distillation run: teacher:student GPU split (teacher forward 2N_t vs student "
        "training 6N_s FLOPs per token), bytes on the wire, offline store size. Sizes accept k/M/B/T "
        "suffixes (decimal) or a model preset name."),
        epilog="With --config F (and --nodes, --gpus-per-node) it prints instead the rank map of that "
               "experiment config on that cluster: every rank's host, role, replica or stage, "
               "data-parallel rank and which teacher replica serves it, starting nothing.")
    p.add_argument("--teacher", required=True, help="teacher parameters, e.g. 9B, or a preset name")
    p.add_argument("--student", required=True, help="student parameters, e.g. 1.9B, or a preset (pd-1.9b)")
    p.add_argument("--tokens", default="100B", help="token budget (default 100B)")
    p.add_argument("--seq-len", default="4096", help="sequence length (k = 1024; default 4096)")
    p.add_argument("--top-k", default="50", help="k of top-p-k truncation (default 50)")
    p.add_argument("--mean-kept", type=float, default=None,
                   help="mean entries kept per token after top-p (default: top-k)")
    p.add_argument("--gpus-per-node", default="8", help="GPUs per node (default 8)")
    p.add_argument("--nodes", default="1", help="nodes (default 1)")
    p.add_argument("--flops-per-gpu", type=float, default=400e12,
                   help="achieved FLOP/s per GPU (default 400e12, ~40%% MFU of an H100)")
    p.add_argument("--global-batch-tokens", default="4M", help="tokens per global batch (k/M = 1024-based; "
                                                               "default 4M)")
    p.add_argument("--vocab-size", default=str(DEFAULT_VOCAB), help=f"vocabulary (default {DEFAULT_VOCAB})")
    p.add_argument("--bytes-per-entry", type=float, default=6.0, help="wire bytes per entry (default 6)")
    p.add_argument("--store-bytes-per-entry", type=float, default=2.5,
                   help="offline-store bytes per kept entry (default 2.5)")
    p.add_argument("--wire-padded", action=argparse.BooleanOptionalAction, default=True,
                   help="wire rows carry top-k entries with padding (default) or only kept entries")
    p.add_argument("--whole-nodes", action=argparse.BooleanOptionalAction, default=True,
                   help="teacher ranks take whole nodes (default; needs --nodes >= 2)")
    p.add_argument("--divisible", action="store_true",
                   help="only splits where student GPUs are a multiple of teacher GPUs (one-rank teacher "
                        "replicas, each serving the same number of students)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--roi", action="store_true",
                   help="also project the return on the teacher's compute: GPU-hours per role and mode, the "
                        "store, the token multiplier and the offline break-even (labelled projections)")
    p.add_argument("--pilot", default=None, help="--roi: a finished run (or its summary.json) whose measured "
                                                 "pd_token_multiplier replaces the paper's range")
    p.add_argument("--students", default="1", help="--roi: students one offline store serves (default 1)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense peak TFLOPs; with --mfu it sets --flops-per-gpu (peak x mfu)")
    p.add_argument("--mfu", type=float, default=0.4, help="--peak-tflops: the achieved fraction (default 0.4)")
    return p


def pilot_multiplier(path: str) -> float:
    """pd_token_multiplier of a finished run directory or its summary.json (ValueError, one line, if it
    has none)."""
    p = Path(path)
    f = p / "summary.json" if p.is_dir() else p
    try:
        m = json.loads(f.read_text()).get("pd_token_multiplier")
    except (OSError, ValueError) as e:
        raise ValueError(f"--pilot {path}: cannot read {f} ({e})") from None
    if m is None:
        raise ValueError(f"--pilot {path}: {f} has no pd_token_multiplier (a run with baseline.points > 1 "
                         "whose distilled loss the LM-only curve reaches)")
    return float(m)


def rank_map_main(argv: list[str]) -> int:
    """`pd-dist plan --config F [--set k=v] --nodes N --gpus-per-node M`: the whole rank map."""
    p = _Parser(prog="pd-dist plan --config", description="print the rank map of a job under a config")
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--nodes", default="1")
    p.add_argument("--gpus-per-node", "--ranks-per-node", dest="per_node", default="8")
    from pd_dist.core.configlib import ConfigError

    try:
        args = p.parse_args(argv)
        from pd_dist.config import load_config

        return print_rank_map(load_config(args.config, args.overrides), _parse_int(args.nodes, what="--nodes"),
                              _parse_int(args.per_node, what="--gpus-per-node"))
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (_ArgError, ConfigError, ValueError) as e:
        print(f"pd-dist plan: error: {e}", file=sys.stderr)
        return 2


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return rank_map_main(argv)
    try:
        args = build_parser().parse_args(argv)
        vocab = _parse_int(args.vocab_size, what="--vocab-size")
        inp = PlanInput(
            teacher_params=parse_size(args.teacher, vocab_size=vocab),
            student_params=parse_size(args.student, vocab_size=vocab),
            tokens=parse_size(args.tokens), seq_len=_parse_int(args.seq_len, what="--seq-len"),
            top_k=_parse_int(args.top_k, what="--top-k"), mean_kept=args.mean_kept,
            gpus_per_node=_parse_int(args.gpus_per_node, what="--gpus-per-node"),
            nodes=_parse_int(args.nodes, what="--nodes"),
            flops_per_gpu=args.peak_tflops * 1e12 * args.mfu if args.peak_tflops else args.flops_per_gpu,
            global_batch_tokens=_parse_int(args.global_batch_tokens, what="--global-batch-tokens"),
            vocab_size=vocab, bytes_per_entry=args.bytes_per_entry,
            store_bytes_per_entry=args.store_bytes_per_entry, wire_padded=args.wire_padded)
        plan = make_plan(inp, whole_nodes=args.whole_nodes, divisible=args.divisible)
        if args.peak_tflops is not None and not (args.peak_tflops > 0 and 0 < args.mfu <= 1):
            raise ValueError(f"--peak-tflops {args.peak_tflops} must be > 0 and --mfu {args.mfu} in (0, 1]")
        roi = (make_roi(plan, _parse_int(args.students, what="--students"),
                        pilot_multiplier(args.pilot) if args.pilot else None, args.pilot or "")
               if args.roi else None)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (_ArgError, ValueError) as e:
        print(f"pd-dist plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        d = plan_to_dict(plan)
        if roi is not None:
            d["roi"] = dataclasses.asdict(roi)
        print(json.dumps(d, indent=2, sort_keys=True))
    else:
        print(format_plan(plan) + ("" if roi is None else "\n\n" + format_roi(roi)))
    return 0


def layout_balance(cfg, layout) -> str:
    """The configured layout's teacher:student compute balance (pd_dist.core.flops: model FLOPs per
    token from the shapes, attention included; every rank assumed equally fast), with a one-line warning
    when the run will be teacher-bound. Online: the teacher ranks' capacity against what the students
    consume, and the split that balances them; colocated: each rank's share spent on the teacher;
    offline and LM-only: the teacher's cost is the generation job's (or none)."""
    from pd_dist.models import model_shape

    d = cfg.distill
    if d.mode in ("none", "offline"):
        return "compute balance: no teacher runs in this job" + (
            " (its cost is the generation job's)" if d.mode == "offline" else "")
    vocab = cfg.data.vocab_size
    seq = cfg.data.seq_len
    student = model_shape(cfg.model, vocab).train_flops(seq)

    known = cfg.teacher.path and (Path(cfg.teacher.path) / "config.json").is_file()
    tcfg = cfg.teacher if known else type(cfg.teacher)(preset=cfg.teacher.preset)
    if cfg.teacher.path and not known:
        return f"compute balance: teacher.path {cfg.teacher.path} is not readable here (its shape is unknown)"
    teacher = model_shape(tcfg, vocab).forward_flops(d.teacher_seq_len or seq)
    if d.mode == "colocated":
        return (f"compute balance: each rank spends {teacher / (teacher + student):.0%} of its model FLOPs on the "
                f"teacher's forward ({teacher / 1e6:,.1f} MFLOP/token against the student's {student / 1e6:,.1f})")
    t, s = len(layout.teachers), len(layout.students)
    served = (t / teacher) / (s / student)  # teacher capacity / student consumption, in tokens
    ideal_t = layout.world * teacher / (teacher + student)
    line = (f"compute balance: {t} teacher rank(s) for {s} student rank(s); the teachers can serve {served:.0%} of "
            f"what the students consume ({teacher / 1e6:,.1f} MFLOP/token forward against {student / 1e6:,.1f} "
            f"training); balanced at about {ideal_t:.0f}:{layout.world - ideal_t:.0f} of these {layout.world} ranks")
    if served < 0.95:
        line += (f"\nwarning: this run will be teacher-bound: the students wait {1 - served:.0%} of the time; "
                 "give the teacher more ranks (topology.teacher_ranks / teacher_nodes) or see pd-dist plan")
    return line


def describe_curve_cost(cfg) -> str:
    """What the LM-only baseline and its curve cost, in LM-only runs of the run's own length."""
    from pd_dist.core.compute_gain import branch_step, curve_lengths

    T = cfg.train.steps
    lengths = curve_lengths(T, cfg.baseline.extend, cfg.baseline.points, cfg.optim.warmup_steps)
    if len(lengths) < 2 or branch_step(T, cfg.optim) is None:
        return f"baseline: the LM-only twin ({T} steps), no LM-only curve (no token multiplier)"
    steps = lengths[-1] + sum(b - branch_step(b, cfg.optim) for b in lengths[:-1])
    return (f"baseline: the LM-only twin and its curve, runs of {', '.join(map(str, lengths))} steps: a "
            f"{lengths[-1]}-step trunk and the decays, {steps} steps in all ({steps / T:.2f}x the twin alone)")


def print_rank_map(cfg, nodes: int, per_node: int) -> int:
    """The layout of a job of `nodes` x `per_node` ranks under `cfg`, checked and printed; nothing
    starts (`pd-dist plan --config`, `launch/pretrain_pd.py --dry-run`). ConfigError if impossible."""
    from pd_dist.core.configlib import ConfigError
    from pd_dist.cluster.layout import format_layout

    if nodes < 1 or per_node < 1:
        raise ConfigError(f"--nodes {nodes} x --ranks-per-node {per_node}: both must be >= 1")
    world = nodes * per_node
    if cfg.distill.mode == "online" and world < 2:
        raise ConfigError("config key 'distill.mode' = 'online': needs at least 2 ranks")
    layout = cfg.layout(world, [f"node{r // per_node}" for r in range(world)])
    print(format_layout(layout))
    print(layout_balance(cfg, layout))
    if cfg.baseline:
        print(describe_curve_cost(cfg))
    cfg.check_world(layout.dp)
    if cfg.distill.cross_tokenizer != "off":
        from pd_dist.data.tokenizer_pair import describe_pair

        print(describe_pair(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
