"""Tests for pd_dist.core.schedules: shapes, boundaries, bounds, validation, checkpoint state."""
import dataclasses
import json

import numpy as np
import pytest

from pd_dist.core import configlib
from pd_dist.core.configlib import ConfigError
from pd_dist.core.schedules import (
    ALPHA_SCHEDULES, LR_DECAY_SHAPES, LR_SCHEDULES, AlphaConfig, LRConfig, alpha_at,
    check_schedule_state, lr_at, schedule_state, wsd_phase_steps,
)


def alphas(cfg, T):
    return np.array([alpha_at(s, T, cfg) for s in range(T)])


def lrs(cfg, T):
    return np.array([lr_at(s, T, cfg) for s in range(T)])


def A(**kw):
    return configlib.build(AlphaConfig, kw, "distill.alpha")


def L(**kw):
    # No warmup and a 10% decay unless a test says otherwise (the shapes these tests pin).
    return configlib.build(LRConfig, {"warmup_steps": 0, "decay_frac": 0.1, **kw}, "optim")


# ------------------------------------------------------------------------------------ alpha

def test_defaults_are_valid_and_documented():
    AlphaConfig().validate("")
    LRConfig().validate("")
    for cls in (AlphaConfig, LRConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f.name
    assert AlphaConfig().schedule == "wsd" and AlphaConfig().max == 0.9


def test_constant_alpha():
    cfg = A(schedule="constant", value=0.3)
    assert np.all(alphas(cfg, 17) == 0.3)
    assert alpha_at(0, 1, cfg) == 0.3


@pytest.mark.parametrize("T", [2, 3, 10, 101])
def test_linear_alpha(T):
    inc = A(schedule="linear_increase", min=0.1, max=0.7)
    dec = A(schedule="linear_decrease", min=0.1, max=0.7)
    a, d = alphas(inc, T), alphas(dec, T)
    assert a[0] == 0.1 and a[-1] == 0.7
    assert d[0] == 0.7 and d[-1] == 0.1
    assert np.all(np.diff(a) > 0) and np.all(np.diff(d) < 0)
    ref = np.interp(np.arange(T), [0, T - 1], [0.1, 0.7])
    np.testing.assert_allclose(a, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(d, ref[::-1], rtol=0, atol=1e-12)
    assert np.all((a >= 0.1) & (a <= 0.7)) and np.all((d >= 0.1) & (d <= 0.7))


def test_linear_alpha_single_step_gives_start_value():
    assert alpha_at(0, 1, A(schedule="linear_increase", min=0.2, max=0.8)) == 0.2
    assert alpha_at(0, 1, A(schedule="linear_decrease", min=0.2, max=0.8)) == 0.8


def test_periodic_alpha():
    cfg = A(schedule="periodic", min=0.2, max=0.6, period_steps=8)
    a = alphas(cfg, 40)
    assert a[0] == 0.2
    assert a[4] == 0.6                                # peak exactly at half a period
    assert a[2] == pytest.approx(0.4)
    np.testing.assert_array_equal(a[:8], a[8:16])  # exactly periodic
    np.testing.assert_array_equal(a[0::8], np.full(5, 0.2))
    assert np.all((a >= 0.2) & (a <= 0.6))
    assert np.all(np.diff(a[:5]) > 0) and np.all(np.diff(a[4:9]) < 0)
    ref = 0.2 + 0.4 * 0.5 * (1 - np.cos(2 * np.pi * np.arange(40) / 8))
    np.testing.assert_allclose(a, ref, atol=1e-12)
    # period 1: always min
    assert np.all(alphas(A(schedule="periodic", min=0.3, max=0.9, period_steps=1), 5) == 0.3)


def wsd_ref(T, lo, hi, wf, df):
    """Independent WSD reference via np.interp (requires a non-empty stable phase)."""
    W, D = round(wf * T), round(df * T)
    xp, fp = [], []
    if W > 0:
        xp += [0]
        fp += [lo]
    xp += [W, T - D - 1]
    fp += [hi, hi]
    if D > 0:
        xp += [T - 1]
        fp += [lo]
    return np.interp(np.arange(T), xp, fp)


@pytest.mark.parametrize("T,wf,df", [(100, 0.1, 0.1), (1000, 0.05, 0.2), (50, 0.0, 0.3),
                                     (50, 0.3, 0.0), (40, 0.25, 0.5), (7, 0.0, 0.0)])
def test_wsd_alpha_matches_interp_reference(T, wf, df):
    cfg = A(schedule="wsd", min=0.1, max=0.9, warmup_frac=wf, decay_frac=df)
    np.testing.assert_allclose(alphas(cfg, T), wsd_ref(T, 0.1, 0.9, wf, df), rtol=0, atol=1e-12)


def test_wsd_alpha_boundaries_and_monotonicity():
    T = 100
    cfg = A(schedule="wsd", min=0.0, max=0.9, warmup_frac=0.1, decay_frac=0.2)
    assert wsd_phase_steps(T, 0.1, 0.2) == (10, 20)
    a = alphas(cfg, T)
    assert a[0] == 0.0                       # warms up from min
    assert a[9] < 0.9 and a[10] == 0.9      # stable begins right after the 10 warmup steps
    assert np.all(a[10:80] == 0.9)           # stable at max
    assert a[80] < 0.9                       # first of the 20 decay steps
    assert a[-1] == 0.0                      # reaches min at the last step
    assert np.all(np.diff(a[:11]) > 0) and np.all(np.diff(a[79:]) < 0)
    assert np.all((a >= 0.0) & (a <= 0.9))
    # warmup and decay mirror each other when their lengths agree
    s = A(schedule="wsd", min=0.2, max=0.8, warmup_frac=0.15, decay_frac=0.15)
    b = alphas(s, 60)
    np.testing.assert_allclose(b, b[::-1], atol=1e-12)


def test_wsd_alpha_edge_cases():
    # total_steps=1 and fractions that round to 0 steps -> stable at max
    assert alpha_at(0, 1, A(schedule="wsd", min=0.1, max=0.9)) == 0.9
    assert wsd_phase_steps(4, 0.1, 0.1) == (0, 0)
    assert np.all(alphas(A(schedule="wsd", min=0.1, max=0.9), 4) == 0.9)
    # rounding half up can make warmup+decay exceed T: decay is cut
    assert wsd_phase_steps(3, 0.5, 0.5) == (2, 1)
    a = alphas(A(schedule="wsd", min=0.1, max=0.9, warmup_frac=0.5, decay_frac=0.5), 3)
    assert a[0] == 0.1 and a[-1] == 0.1 and np.all((a >= 0.1) & (a <= 0.9))
    # no stable phase: warmup then decay, everything strictly inside and bounded
    a = alphas(A(schedule="wsd", min=0.0, max=1.0, warmup_frac=0.5, decay_frac=0.5), 10)
    assert a[0] == 0.0 and a[-1] == 0.0 and np.all(a < 1.0)
    # whole run is warmup / whole run is decay
    a = alphas(A(schedule="wsd", min=0.0, max=1.0, warmup_frac=1.0, decay_frac=0.0), 5)
    np.testing.assert_allclose(a, [0, 0.2, 0.4, 0.6, 0.8])
    a = alphas(A(schedule="wsd", min=0.0, max=1.0, warmup_frac=0.0, decay_frac=1.0), 5)
    np.testing.assert_allclose(a, [0.8, 0.6, 0.4, 0.2, 0.0])
    # min == max: flat
    assert np.all(alphas(A(schedule="wsd", min=0.4, max=0.4), 20) == 0.4)


@pytest.mark.parametrize("T", [1, 3, 10, 100, 997])
def test_wsd_beta_is_one_minus_wsd_of_beta(T):
    kw = dict(min=0.1, max=0.7, warmup_frac=0.1, decay_frac=0.2)
    beta = alphas(A(schedule="wsd", **kw), T)
    alpha = alphas(A(schedule="wsd_beta", **kw), T)
    np.testing.assert_allclose(alpha, 1.0 - beta, rtol=0, atol=1e-15)
    assert np.all((alpha >= 1 - 0.7) & (alpha <= 1 - 0.1))
    if T >= 10:
        assert alpha[0] == pytest.approx(0.9) and alpha[-1] == pytest.approx(0.9)
        assert alpha[T // 2] == pytest.approx(0.3)


def test_alpha_bounds_exact_over_many_configs():
    rng = np.random.default_rng(0)
    for _ in range(60):
        lo, hi = sorted(rng.random(2))
        T = int(rng.integers(1, 300))
        wf = float(rng.random() * 0.5)
        df = float(rng.random() * 0.5)
        for sched in ALPHA_SCHEDULES:
            cfg = AlphaConfig(schedule=sched, value=float(lo), min=float(lo), max=float(hi),
                              warmup_frac=wf, decay_frac=df, period_steps=int(rng.integers(1, 50)))
            a = alphas(cfg, T)
            assert np.all((a >= 0.0) & (a <= 1.0)), sched
            if sched in ("linear_increase", "linear_decrease", "periodic", "wsd"):
                assert np.all((a >= lo) & (a <= hi)), sched
            if sched == "wsd":  # endpoints hit exactly
                W, D = wsd_phase_steps(T, wf, df)
                if W:
                    assert a[0] == lo
                if D:
                    assert a[-1] == lo
                assert np.all(a[W:T - D] == hi)
            if sched == "wsd_beta":
                assert np.all((a >= 1 - hi) & (a <= 1 - lo)), sched


def test_alpha_is_deterministic_pure_function():
    cfg = A(schedule="wsd")
    assert [alpha_at(s, 50, cfg) for s in range(50)] == [alpha_at(s, 50, cfg) for s in range(50)]


# --------------------------------------------------------------------------------------- lr

def test_lr_warmup():
    cfg = L(lr_schedule="constant", lr=1.0, warmup_steps=4)
    v = lrs(cfg, 10)
    np.testing.assert_allclose(v, [0.25, 0.5, 0.75, 1.0, 1, 1, 1, 1, 1, 1])
    assert v[3] == 1.0 and v[0] == 1.0 / 4


def test_lr_constant():
    assert np.all(lrs(L(lr_schedule="constant", lr=2e-4), 12) == 2e-4)


@pytest.mark.parametrize("T,W", [(100, 0), (100, 10), (2, 0), (2, 1), (50, 49)])
def test_lr_cosine(T, W):
    cfg = L(lr_schedule="cosine", lr=3e-4, min_lr_ratio=0.1, warmup_steps=W)
    v = lrs(cfg, T)
    a = max(W - 1, 0)
    assert v[a] == 3e-4                       # peak at the last warmup step (or step 0)
    floor = 3e-4 * 0.1
    assert v[-1] == floor                     # floor exactly at the last step
    assert np.all(np.diff(v[a:]) <= 0)
    assert np.all(v <= 3e-4) and np.all(v[a:] >= floor)
    s = np.arange(a, T)
    ref = floor + (3e-4 - floor) * 0.5 * (1 + np.cos(np.pi * (s - a) / (T - 1 - a)))
    np.testing.assert_allclose(v[a:], ref, rtol=1e-12)


@pytest.mark.parametrize("shape", LR_DECAY_SHAPES)
def test_lr_wsd(shape):
    T, W = 100, 5
    cfg = L(lr_schedule="wsd", lr=1e-3, min_lr_ratio=0.1, warmup_steps=W, decay_frac=0.2,
            decay_shape=shape)
    v = lrs(cfg, T)
    np.testing.assert_allclose(v[:W], 1e-3 * np.arange(1, W + 1) / W)
    assert np.all(v[W - 1:80] == 1e-3)     # stable at peak until the decay
    assert v[80] < 1e-3                    # first of 20 decay steps
    assert v[-1] == pytest.approx(1e-4, rel=1e-12) and v[-1] >= 1e-4
    assert np.all(np.diff(v[79:]) < 0)
    assert np.all((v[W:] >= 1e-4) & (v[W:] <= 1e-3))
    p = (np.arange(80, 100) - 79) / 20
    f = {"linear": 1 - p, "cosine": 0.5 * (1 + np.cos(np.pi * p)), "sqrt": 1 - np.sqrt(p)}[shape]
    np.testing.assert_allclose(v[80:], 1e-4 + 9e-4 * f, rtol=1e-12)


def test_lr_wsd_linear_matches_interp_reference():
    T, W, D = 200, 10, 30
    cfg = L(lr_schedule="wsd", lr=1.0, min_lr_ratio=0.0, warmup_steps=W, decay_frac=D / T)
    ref = np.interp(np.arange(T), [-1, W - 1, T - D - 1, T - 1], [0.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(lrs(cfg, T), ref, atol=1e-12)


def test_lr_edge_cases():
    # total_steps=1
    for sched in LR_SCHEDULES:
        assert lr_at(0, 1, L(lr_schedule=sched, lr=1e-3)) == 1e-3
        assert lr_at(0, 1, L(lr_schedule=sched, lr=1e-3, warmup_steps=1)) == 1e-3
    # warmup_steps >= total_steps: all steps are warmup, no decay
    for sched in LR_SCHEDULES:
        np.testing.assert_allclose(lrs(L(lr_schedule=sched, lr=1.0, warmup_steps=8), 4),
                                   [1 / 8, 2 / 8, 3 / 8, 4 / 8])
        np.testing.assert_allclose(lrs(L(lr_schedule=sched, lr=1.0, warmup_steps=4), 4),
                                   [0.25, 0.5, 0.75, 1.0])
    # decay fraction rounding to 0 steps -> no decay
    assert np.all(lrs(L(lr_schedule="wsd", lr=1.0, decay_frac=0.01), 20) == 1.0)
    # decay never starts before warmup ends: it takes the post-warmup steps
    v = lrs(L(lr_schedule="wsd", lr=1.0, min_lr_ratio=0.0, warmup_steps=8, decay_frac=0.5), 10)
    assert v[7] == 1.0 and v[8] == 0.5 and v[9] == 0.0
    # min_lr_ratio 1 -> flat after warmup; 0 -> decays to exactly 0
    assert np.all(lrs(L(lr_schedule="cosine", lr=1.0, min_lr_ratio=1.0), 9) == 1.0)
    assert lr_at(9, 10, L(lr_schedule="cosine", lr=1.0, min_lr_ratio=0.0)) == 0.0


def test_lr_bounds_over_many_configs():
    rng = np.random.default_rng(1)
    for _ in range(60):
        T = int(rng.integers(1, 300))
        W = int(rng.integers(0, 40))
        ratio = float(rng.random())
        for sched in LR_SCHEDULES:
            for shape in LR_DECAY_SHAPES:
                cfg = LRConfig(lr_schedule=sched, lr=float(rng.random() + 1e-3), min_lr_ratio=ratio,
                               warmup_steps=W, decay_frac=float(rng.random()), decay_shape=shape)
                v = lrs(cfg, T)
                assert np.all((v > 0) & (v <= cfg.lr))
                post = v[W:]
                assert np.all(post >= cfg.lr * ratio)


# ------------------------------------------------------------------------------ step checks

@pytest.mark.parametrize("fn,cfg", [(alpha_at, AlphaConfig()), (lr_at, LRConfig())])
def test_step_out_of_range(fn, cfg):
    for step, T in [(-1, 10), (10, 10), (11, 10), (0, 0), (0, -3)]:
        with pytest.raises(ValueError):
            fn(step, T, cfg)
    assert fn(np.int64(3), np.int64(10), cfg) == fn(3, 10, cfg)


# ------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kw,key", [
    ({"schedule": "cosine"}, "distill.alpha.schedule"),
    ({"value": 1.5}, "distill.alpha.value"),
    ({"value": -0.1}, "distill.alpha.value"),
    ({"min": -0.01}, "distill.alpha.min"),
    ({"max": 1.01}, "distill.alpha.max"),
    ({"min": 0.6, "max": 0.5}, "distill.alpha.max"),
    ({"warmup_frac": -0.1}, "distill.alpha.warmup_frac"),
    ({"warmup_frac": 1.1}, "distill.alpha.warmup_frac"),
    ({"decay_frac": 2.0}, "distill.alpha.decay_frac"),
    ({"warmup_frac": 0.6, "decay_frac": 0.5}, "distill.alpha.decay_frac"),
    ({"period_steps": 0}, "distill.alpha.period_steps"),
    ({"max": float("nan")}, "distill.alpha.max"),
])
def test_alpha_validation(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + "'"):
        A(**kw)


def test_alpha_unknown_schedule_lists_allowed():
    with pytest.raises(ConfigError) as e:
        A(schedule="nope")
    for name in ALPHA_SCHEDULES:
        assert repr(name) in str(e.value)


@pytest.mark.parametrize("kw,key", [
    ({"lr_schedule": "linear"}, "optim.lr_schedule"),
    ({"lr": 0.0}, "optim.lr"),
    ({"lr": -1e-3}, "optim.lr"),
    ({"lr": float("inf")}, "optim.lr"),
    ({"min_lr_ratio": 1.5}, "optim.min_lr_ratio"),
    ({"min_lr_ratio": -0.5}, "optim.min_lr_ratio"),
    ({"warmup_steps": -1}, "optim.warmup_steps"),
    ({"decay_frac": 1.5}, "optim.decay_frac"),
    ({"decay_shape": "exp"}, "optim.decay_shape"),
])
def test_lr_validation(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + "'"):
        L(**kw)


def test_lr_unknown_names_list_allowed():
    with pytest.raises(ConfigError) as e:
        L(lr_schedule="linear")
    for name in LR_SCHEDULES:
        assert repr(name) in str(e.value)
    with pytest.raises(ConfigError) as e:
        L(decay_shape="exp")
    for name in LR_DECAY_SHAPES:
        assert repr(name) in str(e.value)


def test_validation_with_empty_prefix_uses_bare_key():
    with pytest.raises(ConfigError, match="'max'"):
        configlib.build(AlphaConfig, {"max": 2.0})
    with pytest.raises(ConfigError, match="'lr'"):
        LRConfig(lr=0.0).validate("")


def test_schedule_fns_reject_invalid_config():
    with pytest.raises(ConfigError):
        alpha_at(0, 10, AlphaConfig(min=0.9, max=0.1))
    with pytest.raises(ConfigError):
        lr_at(0, 10, LRConfig(lr=-1.0))


# ---------------------------------------------------------------------------- checkpoint state

def test_schedule_state_round_trip():
    a = A(schedule="wsd_beta", min=0.05, max=0.85, warmup_frac=0.07)
    lr = L(lr_schedule="cosine", lr=1.7e-4, warmup_steps=123)
    state = json.loads(json.dumps(schedule_state(a, lr)))
    assert state == {"alpha": dataclasses.asdict(a), "lr": dataclasses.asdict(lr)}
    check_schedule_state(state, a, lr)  # no error
    # rebuilding the configs from the stored state gives equal configs
    assert configlib.build(AlphaConfig, state["alpha"], "distill.alpha") == a
    assert configlib.build(LRConfig, state["lr"], "optim.lr") == lr
    check_schedule_state(state, AlphaConfig(**state["alpha"]), LRConfig(**state["lr"]))


def test_schedule_state_mismatch_names_keys():
    a, lr = AlphaConfig(), LRConfig()
    state = json.loads(json.dumps(schedule_state(a, lr)))
    with pytest.raises(ConfigError) as e:
        check_schedule_state(state, dataclasses.replace(a, max=0.8),
                             dataclasses.replace(lr, warmup_steps=10))
    msg = str(e.value)
    assert "alpha.max" in msg and "lr.warmup_steps" in msg
    assert "alpha.min" not in msg and "lr.lr " not in msg
    # missing / extra keys and sections are differences too
    bad = json.loads(json.dumps(state))
    del bad["alpha"]["period_steps"]
    bad["lr"]["extra"] = 1
    with pytest.raises(ConfigError) as e:
        check_schedule_state(bad, a, lr)
    assert "alpha.period_steps" in str(e.value) and "lr.extra" in str(e.value)
    with pytest.raises(ConfigError, match="lr"):
        check_schedule_state({"alpha": state["alpha"]}, a, lr)
