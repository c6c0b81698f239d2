"""Compute-equivalent gain: what distillation is worth in LM-only tokens, and what it cost.

The LM-only curve is a set of held-out losses, each that of an LM-only run of its own length (not the
pre-decay losses one long run passes through on its way: with a warmup-stable-decay schedule those sit
above what a run of that length reaches once it decays). :func:`curve_lengths` picks the lengths and
:func:`branch_step` where each one leaves a shared stable trunk (Hu et al. 2024, MiniCPM; Hagele et
al. 2024: a WSD run of any length is the trunk up to its decay). :func:`token_multiplier` reads the
LM-only tokens that match a distilled student's loss off that curve, and :func:`compute_balance` sets
the student compute it saves against the teacher compute it spent.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

from pd_dist.core.schedules import LRConfig, lr_at, wsd_decay_steps


def curve_lengths(total: int, extend: float, points: int, warmup: int = 0) -> list[int]:
    """The run lengths (optimizer steps) of the LM-only curve: ``points`` lengths evenly spaced over
    (0, extend x total], rounded, with ``total`` itself among them (the distilled run's own length:
    its twin). Lengths a warmup of ``warmup`` steps would fill are left out (such a run never reaches
    its schedule), so fewer than ``points`` may come back. Raises ValueError on a bad argument."""
    if total < 1 or points < 1 or not extend >= 1.0 or warmup < 0:
        raise ValueError(f"curve_lengths: total {total} and points {points} must be >= 1, extend {extend} "
                         f">= 1 and warmup {warmup} >= 0")
    end = max(total, round(extend * total))
    lengths = {total, end} if points > 1 else {total}
    for k in range(1, points):
        lengths.add(round(k * end / points))
    if len(lengths) > points:  # total fell between two spaced lengths: drop the spaced one nearest it
        spaced = sorted(lengths - {total, end}, key=lambda b: abs(b - total))
        lengths.discard(spaced[0])
    return sorted(b for b in lengths if b > warmup)


def branch_step(length: int, cfg: LRConfig) -> Optional[int]:
    """Steps a run of ``length`` shares with any longer run of the same schedule: ``length`` for a
    constant LR (every step is the trunk's), ``length - decay`` for wsd (the stable phase; the decay
    is its own), None for cosine (its every step depends on the length: nothing is shared)."""
    if cfg.lr_schedule == "constant":
        return length
    if cfg.lr_schedule == "wsd":
        return length - wsd_decay_steps(length, cfg)
    return None


def check_shared_prefix(length: int, trunk: int, cfg: LRConfig) -> int:
    """:func:`branch_step` of ``length`` after checking that a run of ``length`` steps and the trunk of
    ``trunk`` steps use the same learning rate at every step before it (raises ValueError if not: a
    branch would then not be the run it stands for)."""
    at = branch_step(length, cfg)
    if at is None:
        raise ValueError(f"optim.lr_schedule {cfg.lr_schedule}: a run's every step depends on its length, so "
                         "shorter runs share nothing with a longer one (use wsd or constant for the LM-only curve)")
    if trunk < length:
        raise ValueError(f"the trunk ({trunk} steps) is shorter than the run it branches ({length})")
    # Both schedules are the warmup then the peak until their decays begin: checked at every step
    # where either could differ (the warmup's, and the last shared one).
    for s in {*range(min(cfg.warmup_steps, at)), at - 1} - {-1}:
        a, b = lr_at(s, length, cfg), lr_at(s, trunk, cfg)
        if a != b:
            raise ValueError(f"step {s}: a run of {length} steps has lr {a:g}, the trunk of {trunk} {b:g}")
    return at


def _loglog_fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least squares of log loss = c - a log steps: returns (a, c)."""
    xs = [math.log(b) for b, _ in points]
    ys = [math.log(v) for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    a = -sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return a, my + a * mx


def token_multiplier(curve: Sequence[tuple[int, float]], loss: float, steps: int, fit_last: int = 3) -> dict:
    """The LM-only steps (so tokens, at the same batch) that reach held-out ``loss``, over ``steps``:
    the distilled student's compute-equivalent gain (1.5: its distillation was worth 50% more data).

    ``curve``: (run length, held-out loss) of LM-only runs of those lengths. The first length whose loss
    is at or below ``loss`` and the one before it are interpolated as a power law (log loss linear in
    log steps, exact for a curve L = A x steps^-a). Beyond the curve's end the power law fitted to its
    last ``fit_last`` points extrapolates (labelled so; it has no floor, so it reads fewer steps than a
    curve that flattens: the multiplier it gives is conservative). Below its first length: only a bound.

    Returns {"multiplier", "lm_steps", "how", "bound"}: ``how`` is "interpolated", "extrapolated",
    "below" (multiplier None, ``bound`` the first length / steps: the multiplier is at most that) or
    "flat" (the curve stops improving: nothing to extrapolate). ``bound`` is the longest run measured
    over ``steps`` when the curve does not reach ``loss`` (the multiplier is at least that)."""
    pts = sorted((int(b), float(v)) for b, v in curve)
    if not pts or steps < 1 or not math.isfinite(loss) or loss <= 0:
        raise ValueError(f"token_multiplier: need a curve ({len(pts)} points), steps >= 1 ({steps}) and a "
                         f"finite positive loss ({loss})")
    if any(b < 1 or not (math.isfinite(v) and v > 0) for b, v in pts):
        raise ValueError(f"token_multiplier: every point needs a length >= 1 and a finite positive loss: {pts}")
    for k, (b, v) in enumerate(pts):
        if v <= loss:
            if k == 0:
                return {"multiplier": None, "lm_steps": None, "how": "below", "bound": b / steps}
            (b0, v0) = pts[k - 1]
            frac = (math.log(v0) - math.log(loss)) / (math.log(v0) - math.log(v)) if v0 != v else 1.0
            lm = math.exp(math.log(b0) + frac * (math.log(b) - math.log(b0)))
            return {"multiplier": lm / steps, "lm_steps": lm, "how": "interpolated", "bound": None}
    bound = pts[-1][0] / steps
    tail = pts[-fit_last:]
    if len(tail) < 2:
        return {"multiplier": None, "lm_steps": None, "how": "flat", "bound": bound}
    a, c = _loglog_fit(tail)
    if a <= 0:
        return {"multiplier": None, "lm_steps": None, "how": "flat", "bound": bound}
    lm = math.exp((c - math.log(loss)) / a)
    return {"multiplier": lm / steps, "lm_steps": lm, "how": "extrapolated", "bound": bound}


def curve_multiplier(curve: dict, loss: float, steps: int) -> dict:
    """:func:`token_multiplier` read off an LM-only curve as the runs record it (lm_curve.json: its
    ``points`` and ``lengths``), with ``extend``: how far the curve reaches, in multiples of ``steps``."""
    m = token_multiplier([(p["steps"], p["val_loss"]) for p in curve["points"]], loss, steps)
    return {**m, "extend": curve["lengths"][-1] / steps}


def describe_multiplier(m: dict, extend: float) -> str:
    """One line for a run's closing lines: the multiplier, how it was read, and what it means."""
    how = m["how"]
    if how == "below":
        return (f"PD token multiplier < {m['bound']:.2f}: the distilled student is worse than LM-only at the "
                "curve's shortest run, so distillation cost more than it gave")
    if how == "flat":
        return (f"PD token multiplier > {m['bound']:.2f} (LM-only's curve stops improving before the distilled "
                "student's loss, so no multiple of its tokens is known to reach it)")
    x = m["multiplier"]
    if how == "extrapolated":
        src = (f"extrapolated: a power law fitted to the LM-only curve's last points, beyond its end at "
               f"{m['bound']:.2f}x; set baseline.extend higher to measure it")
    else:
        src = f"interpolated on the LM-only curve up to {extend:g}x the run's tokens"
    verdict = (f"LM-only would need {x:.2f}x the tokens to match" if x >= 1 else
               f"below 1: the distilled student is worse than LM-only on the same tokens; LM-only matches it "
               f"with {x:.2f}x")
    return f"PD token multiplier {x:.2f} ({verdict}; {src})"


def compute_balance(multiplier: Optional[float], student_flops: float, mode: str,
                    teacher_flops: Optional[float], generation_flops: Optional[float] = None) -> dict:
    """The run's compute account, in FLOPs.

    ``student_flops``: the distilled student's training compute (LM-only costs the same per token).
    ``teacher_flops``: the teacher's forwards spent on this run (colocated and online: every token it
    ran; offline: its share of the generation job, the tokens this run read). ``generation_flops``:
    offline, the whole generation job, which every student trained from the store shares.

    Returns {"student_saved", "teacher_spent", "net", "pays", "break_even_students"}: ``student_saved``
    = (multiplier - 1) x student_flops (negative: PD cost student compute too); ``net`` = saved -
    spent; ``break_even_students`` (offline): how many students, each saving as much, the store must
    serve before its generation is paid for (None when a student saves nothing). Figures are None
    where an input is unknown."""
    saved = None if multiplier is None else (multiplier - 1.0) * student_flops
    net = None if saved is None or teacher_flops is None else saved - teacher_flops
    out = {"mode": mode, "student_flops": student_flops, "student_saved": saved, "teacher_spent": teacher_flops,
           "net": net, "pays": None if net is None else net > 0, "generation_flops": generation_flops,
           "break_even_students": None}
    if mode == "offline" and generation_flops is not None and saved is not None and saved > 0:
        out["break_even_students"] = math.ceil(generation_flops / saved)
    return out


def describe_balance(b: dict) -> str:
    """The compute balance in one line: saved against spent, in PFLOPs."""
    def pf(x):
        return "n/a" if x is None else f"{x / 1e15:.4g} PFLOPs"

    line = (f"compute balance: student compute saved at equal loss {pf(b['student_saved'])} (of "
            f"{pf(b['student_flops'])} trained) against teacher forwards {pf(b['teacher_spent'])}")
    if b["mode"] == "offline":
        if b["generation_flops"] is not None:
            n = b["break_even_students"]
            line += (f"; the store's generation {pf(b['generation_flops'])} pays for itself after "
                     + (f"{n} student(s) like this one" if n else "no number of students (none saves compute)"))
    elif b["net"] is not None:
        line += "; net " + ("saving" if b["pays"] else "cost") + f" {pf(abs(b['net']))}"
    return line
