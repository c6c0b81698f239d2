"""Per-step schedules for the KD share ``alpha`` and the learning rate.

The training loss is ``L = (1 - alpha) * L_lm + alpha * L_kd`` (Peng et al. 2024, "Pre-training
Distillation for LLMs: A Design Space Exploration", arXiv 2410.16215, Sec. on loss selection).

Conventions shared by every schedule here:

* Steps are 0-based optimizer steps, ``step in [0, total_steps)``. The value returned for step ``s``
  is the one used *for* the update at step ``s`` (so step 0 is the first update, ``total_steps - 1``
  the last).
* Every function is a pure, deterministic function of ``(step, total_steps, config)``: a checkpoint
  only has to store the step (plus the configs, see :func:`schedule_state`, to check on resume).
* Results are clamped so they lie exactly within their documented bounds despite float error.
* A ramp of zero length is skipped. When ``total_steps == 1`` the single step is both the first
  and the last step; ramps that would need two distinct steps (``linear_*``, cosine LR) then give
  their *start* value.
* Warmup/decay lengths given as fractions become whole steps by rounding half up
  (``floor(frac * total_steps + 0.5)``), see :func:`wsd_phase_steps`; a fraction that rounds to 0
  steps means no such phase.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from pd_dist.core.configlib import ConfigError, check_choices, doc, fail

__all__ = [
    "ALPHA_SCHEDULES", "LR_SCHEDULES", "LR_DECAY_SHAPES", "MAX_LR",
    "AlphaConfig", "LRConfig",
    "alpha_at", "lr_at", "wsd_phase_steps",
    "schedule_state", "check_schedule_state",
]

AlphaSchedule = Literal["constant", "linear_increase", "linear_decrease", "periodic", "wsd", "wsd_beta"]
LRSchedule = Literal["constant", "cosine", "wsd"]
DecayShape = Literal["linear", "cosine", "sqrt"]
ALPHA_SCHEDULES = get_args(AlphaSchedule)
LR_SCHEDULES = get_args(LRSchedule)
LR_DECAY_SHAPES = get_args(DecayShape)


# AdamW moves each weight by about lr per step: beyond this the first steps already overflow.
MAX_LR = 10.0


def _key(prefix: str, name: str) -> str:
    """Join a dotted config prefix and a field name ('' prefix -> just the name)."""
    return f"{prefix}.{name}" if prefix else name


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_fraction(prefix: str, name: str, value: Any) -> None:
    if not _is_real(value) or not (0.0 <= value <= 1.0):
        fail(_key(prefix, name), value, "must be a number in [0, 1]")


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


def _lerp(lo: float, hi: float, f: float) -> float:
    """``lo + (hi - lo) * f`` clamped into [lo, hi], exactly ``lo``/``hi`` at ``f`` = 0/1."""
    if f <= 0.0:
        return lo
    if f >= 1.0:
        return hi
    return _clamp(lo + (hi - lo) * f, lo, hi)


# --------------------------------------------------------------------------------------- alpha

@dataclass
class AlphaConfig:
    """Schedule of alpha, the KD share in ``L = (1 - alpha) * L_lm + alpha * L_kd``."""

    schedule: AlphaSchedule = field(default="wsd", metadata=doc(
        "per-step alpha: 'wsd' is WSD-alpha (warmup min->max, stable at max, decay max->min); 'wsd_beta' applies "
        "the same WSD shape to the LM-loss share beta = 1 - alpha (paper's WSD-LM)"))
    value: float = field(default=0.5, metadata=doc("alpha for schedule 'constant', in [0, 1]"))
    min: float = field(default=0.0, metadata=doc(
        "lower end in [0, 1] for linear_*/periodic/wsd (wsd warms up from and decays to min); "
        "for wsd_beta the lower end of beta = 1 - alpha"))
    max: float = field(default=0.9, metadata=doc(
        "upper end in [0, 1], >= min (the paper's WSD-alpha peak is 0.9); for wsd_beta the upper "
        "end of beta = 1 - alpha"))
    warmup_frac: float = field(default=0.1, metadata=doc(
        "wsd/wsd_beta: fraction of total steps in the warmup, in [0, 1]"))
    decay_frac: float = field(default=0.1, metadata=doc(
        "wsd/wsd_beta: fraction of total steps in the final decay, in [0, 1]; "
        "warmup_frac + decay_frac <= 1 (the stable phase is the rest)"))
    period_steps: int = field(default=100, metadata=doc(
        "periodic: period in optimizer steps, >= 1"))

    def validate(self, prefix: str = "") -> None:
        check_choices(self, prefix)
        for name in ("value", "min", "max"):
            v = getattr(self, name)
            if not _is_real(v) or not (0.0 <= v <= 1.0):
                fail(_key(prefix, name), v, "alpha values must be numbers in [0, 1]")
        if self.min > self.max:
            fail(_key(prefix, "max"), self.max, f"must be >= min ({self.min!r})")
        _check_fraction(prefix, "warmup_frac", self.warmup_frac)
        _check_fraction(prefix, "decay_frac", self.decay_frac)
        if self.warmup_frac + self.decay_frac > 1.0 + 1e-12:
            fail(_key(prefix, "decay_frac"), self.decay_frac,
                 f"warmup_frac + decay_frac must be <= 1 (warmup_frac = {self.warmup_frac!r})")
        if not _is_int(self.period_steps) or self.period_steps < 1:
            fail(_key(prefix, "period_steps"), self.period_steps, "must be an integer >= 1")


def _check_step(step: Any, total_steps: Any) -> tuple[int, int]:
    try:
        step = operator.index(step)
        total_steps = operator.index(total_steps)
    except TypeError:
        raise ValueError(f"step and total_steps must be integers, got {step!r}, {total_steps!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} outside [0, total_steps={total_steps})")
    return step, total_steps


def _round_steps(frac: float, total_steps: int) -> int:
    return int(math.floor(frac * total_steps + 0.5))


def wsd_phase_steps(total_steps: int, warmup_frac: float, decay_frac: float) -> tuple[int, int]:
    """Whole-step ``(warmup, decay)`` lengths of a fractional WSD schedule.

    Each fraction times ``total_steps`` is rounded half up; the decay is then cut so that
    ``warmup + decay <= total_steps`` (rounding both up can overshoot by one).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    w = min(_round_steps(warmup_frac, total_steps), total_steps)
    d = min(_round_steps(decay_frac, total_steps), total_steps - w)
    return w, d


def _wsd_ramp(step: int, total_steps: int, warmup: int, decay: int) -> float:
    """WSD shape in [0, 1]: 0 at step 0 (if warmup), 1 when stable, 0 at the last step (if decay).

    Warmup steps ``s < warmup`` give ``s / warmup`` (the first stable step would be 1); decay steps
    ``s >= total_steps - decay`` give ``(total_steps - 1 - s) / decay`` (the last stable step would be
    1), so warmup and decay mirror each other and every warmup/decay step lies strictly below 1.
    """
    r = 1.0
    if warmup > 0 and step < warmup:
        r = step / warmup
    if decay > 0 and step >= total_steps - decay:
        r = min(r, (total_steps - 1 - step) / decay)
    return r


def alpha_at(step: int, total_steps: int, cfg: AlphaConfig) -> float:
    """Alpha (KD share) used for the update at 0-based optimizer step ``step`` of ``total_steps``.

    Schedules (``lo = cfg.min``, ``hi = cfg.max``, ``T = total_steps``):

    * ``constant``: ``cfg.value`` at every step.
    * ``linear_increase``: ``lo + (hi - lo) * step / (T - 1)``: ``lo`` at step 0, ``hi`` at the last
      step (``T == 1``: ``lo``).
    * ``linear_decrease``: ``hi`` at step 0 down to ``lo`` at the last step (``T == 1``: ``hi``).
    * ``periodic``: ``lo + (hi - lo) * 0.5 * (1 - cos(2 pi step / period_steps))``: starts at ``lo``,
      peaks at ``hi`` half a period later, period ``cfg.period_steps``.
    * ``wsd`` (WSD-alpha): with ``W, D = wsd_phase_steps(T, warmup_frac, decay_frac)``, warm up
      linearly ``lo -> hi`` over the first ``W`` steps (``lo`` at step 0, ``hi`` reached at step
      ``W``), stay at ``hi``, then decay linearly over the last ``D`` steps, reaching ``lo`` at the
      last step. I.e. ``lo + (hi - lo) * min(1, step / W, (T - 1 - step) / D)`` (terms with a zero
      length dropped).
    * ``wsd_beta`` (the paper's WSD schedule on the LM-loss share): the same WSD shape is applied to
      ``beta = 1 - alpha`` -- beta warms up ``lo -> hi``, stays at ``hi``, decays to ``lo`` -- and
      ``alpha = 1 - beta``; the result lies in ``[1 - hi, 1 - lo]``.

    The result is clamped into the schedule's range. Raises ValueError if ``total_steps < 1`` or
    ``step`` is outside ``[0, total_steps)``, ConfigError if ``cfg`` is invalid.
    """
    step, total_steps = _check_step(step, total_steps)
    cfg.validate("")
    lo, hi = float(cfg.min), float(cfg.max)
    s = cfg.schedule
    if s == "constant":
        return float(cfg.value)
    if s in ("linear_increase", "linear_decrease"):
        p = step / (total_steps - 1) if total_steps > 1 else 0.0
        if s == "linear_decrease":
            p = 1.0 - p
        return _lerp(lo, hi, p)
    if s == "periodic":
        phase = (step % cfg.period_steps) / cfg.period_steps
        return _lerp(lo, hi, 0.5 * (1.0 - math.cos(2.0 * math.pi * phase)))
    warmup, decay = wsd_phase_steps(total_steps, cfg.warmup_frac, cfg.decay_frac)
    r = _wsd_ramp(step, total_steps, warmup, decay)
    v = _lerp(lo, hi, r)
    if s == "wsd":
        return v
    # wsd_beta: v is beta, the LM share.
    return _clamp(1.0 - v, 1.0 - hi, 1.0 - lo)


# ------------------------------------------------------------------------------------------ lr

@dataclass
class LRConfig:
    """Learning-rate schedule (linear warmup, then constant / cosine / warmup-stable-decay). The
    experiment's `optim` section is this plus the optimizer's own settings (config.OptimConfig)."""

    lr: float = field(default=1e-3, metadata=doc(f"peak learning rate, in (0, {MAX_LR:g}]"))
    lr_schedule: LRSchedule = field(default="wsd", metadata=doc(
        "per-step learning rate after the linear warmup"))
    min_lr_ratio: float = field(default=0.1, metadata=doc(
        "final lr as a fraction of lr, in [0, 1] (end of cosine / wsd decay, at the last step)"))
    warmup_steps: int = field(default=20, metadata=doc(
        "linear warmup from 0, in optimizer steps (>= 0): step s < warmup_steps gets "
        "lr * (s + 1) / warmup_steps, so the first step gets lr / warmup_steps"))
    decay_frac: float = field(default=0.2, metadata=doc(
        "wsd: fraction of total steps in the final decay, in [0, 1]"))
    decay_shape: DecayShape = field(default="linear", metadata=doc(
        "wsd decay shape (sqrt: 1 - sqrt(progress), MiniCPM-style)"))

    def validate(self, prefix: str = "") -> None:
        check_choices(self, prefix)
        if not _is_real(self.lr) or not 0 < self.lr <= MAX_LR:
            fail(_key(prefix, "lr"), self.lr, f"must be a finite number > 0 and <= {MAX_LR:g}")
        _check_fraction(prefix, "min_lr_ratio", self.min_lr_ratio)
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            fail(_key(prefix, "warmup_steps"), self.warmup_steps, "must be an integer >= 0")
        _check_fraction(prefix, "decay_frac", self.decay_frac)


def _decay_factor(p: float, shape: str) -> float:
    """1 at progress 0 down to 0 at progress 1."""
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0 - math.sqrt(p)  # sqrt


def lr_at(step: int, total_steps: int, cfg: LRConfig) -> float:
    """Learning rate used for the update at 0-based optimizer step ``step`` of ``total_steps``.

    With ``W = cfg.warmup_steps``, ``T = total_steps``, ``lr_min = cfg.lr * cfg.min_lr_ratio``:

    * Warmup (every schedule): step ``s < W`` gets ``lr * (s + 1) / W`` -- linear from 0, the first
      step gets ``lr / W`` and step ``W - 1`` the peak ``lr``. If ``W >= T`` every step is a warmup
      step (no stable/decay phase; with ``W > T`` the peak is never reached).
    * ``constant``: ``lr`` after the warmup.
    * ``cosine``: the peak ``lr`` is at step ``a = max(W - 1, 0)``; after it
      ``lr_min + (lr - lr_min) * 0.5 * (1 + cos(pi * (s - a) / (T - 1 - a)))``, reaching ``lr_min`` at
      the last step (``T == 1`` with no warmup: ``lr``).
    * ``wsd``: warmup, stable at ``lr``, then decay over the last ``D = round(decay_frac * T)`` steps
      (rounded half up; never starting before the warmup ends, so ``D <= T - W``): decay step ``s``
      has progress ``p = (s - (T - D - 1)) / D`` in ``(0, 1]`` and gets
      ``lr_min + (lr - lr_min) * f(p)`` with ``f`` = ``1 - p`` (linear),
      ``0.5 * (1 + cos(pi p))`` (cosine) or ``1 - sqrt(p)`` (sqrt, MiniCPM-style); the last step
      gets ``lr_min``. A decay that rounds to 0 steps means no decay.

    The result is clamped into ``(0, lr]`` during warmup and ``[lr_min, lr]`` after it. Raises
    ValueError if ``total_steps < 1`` or ``step`` is outside ``[0, total_steps)``, ConfigError if
    ``cfg`` is invalid.
    """
    step, total_steps = _check_step(step, total_steps)
    cfg.validate("")
    peak = float(cfg.lr)
    lr_min = _clamp(peak * cfg.min_lr_ratio, 0.0, peak)
    warmup = cfg.warmup_steps
    if step < warmup:
        return _clamp(peak * ((step + 1) / warmup), 0.0, peak)
    if cfg.lr_schedule == "constant":
        return peak
    if cfg.lr_schedule == "cosine":
        a = max(warmup - 1, 0)
        span = total_steps - 1 - a
        p = (step - a) / span if span > 0 else 0.0
        return _lerp(lr_min, peak, 0.5 * (1.0 + math.cos(math.pi * p)))
    # wsd
    decay = wsd_decay_steps(total_steps, cfg)
    if decay > 0 and step >= total_steps - decay:
        p = (step - (total_steps - decay - 1)) / decay
        f = _decay_factor(p, cfg.decay_shape)
        return _lerp(lr_min, peak, f)
    return peak


def wsd_decay_steps(total_steps: int, cfg: LRConfig) -> int:
    """The wsd learning-rate schedule's decay length in a run of ``total_steps`` (see :func:`lr_at`)."""
    return min(_round_steps(cfg.decay_frac, total_steps), total_steps - min(cfg.warmup_steps, total_steps))


# ------------------------------------------------------------------------------ checkpoint state

def schedule_state(cfg_alpha: AlphaConfig, cfg_lr: LRConfig) -> dict:
    """JSON-able ``{"alpha": {...}, "lr": {...}}`` of both schedule configs, for checkpoints (only the
    LRConfig fields of ``cfg_lr``, which may be a subclass carrying optimizer settings too)."""
    return {"alpha": dataclasses.asdict(cfg_alpha),
            "lr": {f.name: getattr(cfg_lr, f.name) for f in dataclasses.fields(LRConfig)}}


def check_schedule_state(saved: dict, cfg_alpha: AlphaConfig, cfg_lr: LRConfig) -> None:
    """Raise ConfigError naming every differing key (e.g. ``alpha.max``) between a checkpoint's
    :func:`schedule_state` and the resumed run's configs. Every field is compared (even ones the
    selected schedule ignores); keys missing from or extra in ``saved`` count as differences."""
    if not isinstance(saved, dict):
        raise ConfigError(f"checkpoint schedule state must be a mapping, got {type(saved).__name__}")
    now = schedule_state(cfg_alpha, cfg_lr)
    if isinstance(saved.get("lr"), dict) and "schedule" in saved["lr"]:  # checkpoints before the rename
        saved = {**saved, "lr": {("lr_schedule" if k == "schedule" else k): v for k, v in saved["lr"].items()}}
    missing = object()
    diffs = []
    for section in ("alpha", "lr"):
        old = saved.get(section)
        if not isinstance(old, dict):
            diffs.append(f"{section} (checkpoint has {old!r})")
            continue
        cur = now[section]
        for k in list(cur) + sorted(k for k in old if k not in cur):
            a, b = old.get(k, missing), cur.get(k, missing)
            if a is missing or b is missing or a != b:
                fa = "<missing>" if a is missing else repr(a)
                fb = "<missing>" if b is missing else repr(b)
                diffs.append(f"{section}.{k} (checkpoint {fa}, now {fb})")
    for k in sorted(k for k in saved if k not in now):
        diffs.append(f"{k} (only in checkpoint)")
    if diffs:
        raise ConfigError("resumed run's schedules differ from the checkpoint's: " + "; ".join(diffs)
                          + " -- resume with the checkpoint's schedule config")
