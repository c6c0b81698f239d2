"""The compute-equivalent gain: the LM-only curve's lengths and branch points, the token multiplier read
off a curve with a known answer, and the compute balance's arithmetic."""
from __future__ import annotations

import math

import pytest

from pd_dist.core.compute_gain import (branch_step, check_shared_prefix, compute_balance, curve_lengths,
                                       describe_balance, describe_multiplier, token_multiplier)
from pd_dist.core.schedules import LRConfig, lr_at

pytestmark = pytest.mark.fast


def test_curve_lengths_spaced_up_to_extend_with_the_run_among_them():
    assert curve_lengths(240, 2.0, 8, warmup=20) == [60, 120, 180, 240, 300, 360, 420, 480]
    assert curve_lengths(240, 1.0, 8, warmup=20) == [30, 60, 90, 120, 150, 180, 210, 240]
    # 100 steps to 150: spaced 19 (inside the warmup: left out), 38, 56, 75, 94 (the run's 100 replaces
    # it, the spaced length nearest the run), 112, 131, 150
    assert curve_lengths(100, 1.5, 8, warmup=20) == [38, 56, 75, 100, 112, 131, 150]
    assert curve_lengths(240, 3.0, 1) == [240]  # one point: the twin alone
    with pytest.raises(ValueError, match="extend 0.5"):
        curve_lengths(240, 0.5, 8)


@pytest.mark.parametrize("schedule", ["wsd", "constant"])
@pytest.mark.parametrize("decay_frac,warmup", [(0.2, 20), (0.1, 0), (0.37, 7)])
def test_every_branch_follows_the_trunk_step_for_step_until_it_leaves(schedule, decay_frac, warmup):
    """Brute force: every step before the branch point has the same learning rate in the run of that
    length and in the trunk; the branch point is where the run's own decay begins."""
    cfg = LRConfig(lr=1e-3, lr_schedule=schedule, warmup_steps=warmup, decay_frac=decay_frac, min_lr_ratio=0.1)
    lengths = curve_lengths(240, 2.0, 8, warmup)
    trunk = lengths[-1]
    for b in lengths[:-1]:
        at = check_shared_prefix(b, trunk, cfg)
        assert all(lr_at(s, b, cfg) == lr_at(s, trunk, cfg) for s in range(at))
        if schedule == "wsd" and at < b:
            assert lr_at(at, b, cfg) < lr_at(at, trunk, cfg)  # the run's decay starts right there
        if schedule == "constant":
            assert at == b


def test_cosine_shares_nothing():
    cfg = LRConfig(lr=1e-3, lr_schedule="cosine", warmup_steps=10)
    assert branch_step(100, cfg) is None
    with pytest.raises(ValueError, match="cosine"):
        check_shared_prefix(100, 200, cfg)


def _power_curve(lengths, a=3.0, p=0.2):
    return [(b, a * b ** -p) for b in lengths]


def test_multiplier_interpolated_on_a_power_law_is_exact():
    """L(b) = 3 b^-0.2 (a power law: log-log linear, which the interpolation is exact for). The PD
    student's loss equals L(1.5 x 240 = 360 steps) -> multiplier 1.5; between two points of the curve."""
    curve = _power_curve([60, 120, 180, 240, 300, 420, 480])  # 360 itself is not on the curve
    m = token_multiplier(curve, 3.0 * 360 ** -0.2, 240)
    assert m["how"] == "interpolated" and m["multiplier"] == pytest.approx(1.5, rel=1e-12)
    # worse than LM-only on the same tokens: below 1, still read off the curve
    m = token_multiplier(curve, 3.0 * 150 ** -0.2, 240)
    assert m["how"] == "interpolated" and m["multiplier"] == pytest.approx(150 / 240, rel=1e-12)
    assert "below 1" in describe_multiplier(m, 2.0)


def test_multiplier_extrapolated_beyond_the_curve_labelled_and_bounded():
    curve = _power_curve([30, 60, 90, 120, 150, 180, 210, 240])
    m = token_multiplier(curve, 3.0 * 600 ** -0.2, 240)
    assert m["how"] == "extrapolated" and m["multiplier"] == pytest.approx(2.5, rel=1e-9)
    assert m["bound"] == 1.0  # the curve ends at the run's own length: at least 1 is measured
    assert "extrapolated" in describe_multiplier(m, 1.0)
    # an offset curve (it flattens): the fit without a floor reads fewer steps than the truth
    floor = [(b, 2.0 + 3.0 * b ** -0.5) for b in range(30, 241, 30)]
    truth = 600
    m = token_multiplier(floor, 2.0 + 3.0 * truth ** -0.5, 240)
    assert m["how"] == "extrapolated" and 1.0 < m["multiplier"] < truth / 240


def test_multiplier_below_the_curve_and_flat_curve():
    curve = _power_curve([60, 120, 240])
    m = token_multiplier(curve, 10.0, 240)
    assert m == {"multiplier": None, "lm_steps": None, "how": "below", "bound": 0.25}
    assert "< 0.25" in describe_multiplier(m, 1.0)
    flat = [(60, 5.0), (120, 5.0), (240, 5.1)]
    m = token_multiplier(flat, 4.0, 240)
    assert m["how"] == "flat" and m["multiplier"] is None and m["bound"] == 1.0
    with pytest.raises(ValueError, match="finite positive loss"):
        token_multiplier(curve, float("nan"), 240)
    with pytest.raises(ValueError, match="length >= 1"):
        token_multiplier([(0, 5.0), (10, 4.0)], 4.5, 10)


def test_compute_balance_arithmetic():
    # multiplier 1.5 of 2e15 student FLOPs saves 1e15; a colocated teacher spent 3e15: a net cost of 2e15
    b = compute_balance(1.5, 2e15, "colocated", 3e15)
    assert b["student_saved"] == pytest.approx(1e15) and b["net"] == pytest.approx(-2e15) and b["pays"] is False
    assert "net cost 2 PFLOPs" in describe_balance(b)
    # offline: the run's share 0.5e15, the whole generation 4e15; each student saves 1e15 -> 4 students
    b = compute_balance(1.5, 2e15, "offline", 0.5e15, 4e15)
    assert b["net"] == pytest.approx(0.5e15) and b["pays"] is True and b["break_even_students"] == 4
    assert "after 4 student(s)" in describe_balance(b)
    b = compute_balance(1.5, 2e15, "offline", 0.5e15, 4.1e15)
    assert b["break_even_students"] == 5  # a part of a student is a whole one more
    b = compute_balance(0.8, 2e15, "offline", 0.5e15, 4e15)
    assert b["student_saved"] == pytest.approx(-0.4e15) and b["break_even_students"] is None
    assert "no number of students" in describe_balance(b)
    b = compute_balance(None, 2e15, "online", 1e15)
    assert b["student_saved"] is None and b["net"] is None and math.isfinite(b["teacher_spent"])


def test_baseline_section_and_its_shorthand(tmp_path):
    """`baseline: true` is short for baseline.enabled; a key set over the shorthand keeps it on, and a
    bool set over the written-out section keeps its other keys; bad values name the key."""
    from pd_dist.config import load_config
    from pd_dist.core.configlib import ConfigError

    f = tmp_path / "c.yaml"
    f.write_text("baseline: true\n")
    c = load_config(f, ["baseline.extend=2.5"])
    assert c.baseline.enabled and c.baseline.extend == 2.5 and c.baseline.points == 8 and bool(c.baseline)
    f.write_text("baseline: {enabled: true, extend: 3, points: 5}\n")
    c = load_config(f, ["baseline=false"])
    assert not c.baseline and (c.baseline.extend, c.baseline.points) == (3.0, 5)
    assert not load_config(f, ["baseline=false"]).baseline.enabled
    with pytest.raises(ConfigError, match="baseline.extend"):
        load_config(f, ["baseline.extend=0.5"])
    with pytest.raises(ConfigError, match="baseline.points"):
        load_config(f, ["baseline.points=0"])


def test_dry_run_states_the_curve_cost():
    """The default: a 480-step trunk plus decays of 20% of 60, 120, ..., 420 steps (12 + 24 + ... + 84 =
    336): 816 steps, 3.4x the 240-step twin."""
    from pd_dist.config import load_config
    from pd_dist.explore.plan import describe_curve_cost

    assert "816 steps in all (3.40x the twin alone)" in describe_curve_cost(load_config())
    assert "no LM-only curve" in describe_curve_cost(load_config(None, ["baseline.points=1"]))
    assert "no LM-only curve" in describe_curve_cost(load_config(None, ["optim.lr_schedule=cosine"]))
