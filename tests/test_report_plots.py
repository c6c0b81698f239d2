"""The report's pictures say what they show: no bars for one seed, the real range for several, and the
training curves' smoothing (pd_dist.explore.report)."""
from __future__ import annotations

import pytest


def test_gain_bars_draw_the_real_range_or_none_for_one_seed():
    from pd_dist.explore.report import gain_bars

    labels, means, errs, note = gain_bars({"nll": [0.02], "kld": [0.01]})
    assert labels == ["nll", "kld"] and means == pytest.approx([2.0, 1.0]) and errs is None
    assert note == "1 seed per point: no bars"
    labels, means, errs, note = gain_bars({"nll": [0.01, 0.04, 0.02], "kld": [0.0, 0.01, -0.01]})
    assert means == pytest.approx([100 * 0.07 / 3, 0.0])
    assert errs[0] == pytest.approx([100 * (0.07 / 3 - 0.01), 0.01 * 100])  # mean down to the lowest seed
    assert errs[1] == pytest.approx([100 * (0.04 - 0.07 / 3), 0.01 * 100])  # up to the highest
    assert note == "bars: lowest to highest of 3 seeds"


def test_ema_is_debiased_exponential_smoothing():
    from pd_dist.explore.report import ema

    assert ema([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])  # not pulled toward 0 at the start
    got = ema([1.0, 3.0], decay=0.5)
    assert got == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])


def test_plots_render_without_event_files(tmp_path):
    from pd_dist.explore.report import plots

    rows = [{"settings": {"distill.loss": k}, "dir": str(tmp_path / k), "losses": [5.0, 4.0, 3.5], "gain": g}
            for k, g in (("nll", 0.02), ("kld", 0.01))]
    files = plots("distill.loss", rows, tmp_path / "plots")
    assert all((tmp_path / "plots" / f).stat().st_size > 1000 for f in files)


def test_paired_gain_is_mean_and_standard_error_over_seeds():
    import statistics

    from pd_dist.explore.report import axis_table, paired_gain

    g = [0.004, 0.026, 0.018]
    se = statistics.stdev(g) / 3 ** 0.5
    assert paired_gain(g) == f"{sum(g) / 3:+.2%} ± {se:.2%} (3/3)"
    assert paired_gain([-0.01]) == "-1.00% (0/1)" and paired_gain([None]) == "—"
    rows = [{"settings": {"k": v}, "val_loss": 4.0, "gain": x, "agreement": None, "downstream": {}}
            for v, x in (("a", 0.01), ("a", 0.03), ("b", -0.01))]
    lines, _ = axis_table("k", rows)
    assert lines[0].endswith("paired gain: mean ± SE (seeds PD better) |")
    assert lines[2].endswith(f"{paired_gain([0.01, 0.03])} |") and lines[3].endswith("-1.00% (0/1) |")


def test_table_shows_each_settings_teacher_multiplier_and_balance_when_they_differ():
    """A teacher-size axis: each setting's own teacher loss (not one mean over different teachers), its
    token multiplier and its compute balance in TFLOPs with the offline break-even."""
    from pd_dist.core.compute_gain import compute_balance
    from pd_dist.explore.report import axis_table

    bal = compute_balance(1.5, 2e12, "offline", 1e12, 4.5e12)  # saves 1e12: break-even after 5 students
    rows = [{"settings": {"t": "small"}, "val_loss": 5.0, "gain": 0.04, "agreement": 0.6, "downstream": {},
             "teacher_val_loss": 4.6, "multiplier": {"multiplier": 1.5, "how": "interpolated", "bound": None},
             "balance": bal},
            {"settings": {"t": "big"}, "val_loss": 5.2, "gain": 0.01, "agreement": 0.5, "downstream": {},
             "teacher_val_loss": 4.8, "multiplier": {"multiplier": None, "how": "below", "bound": 0.25},
             "balance": None}]
    lines, _ = axis_table("t", rows)
    assert "teacher val loss" in lines[0] and "token multiplier" in lines[0]
    assert lines[2] == "| small | 1 | 5.0000 | +4.00% | 0.6000 | 4.6000 | 1.50x | 1 / 1; break-even 5 students |"
    assert lines[3].endswith("| 4.8000 | < 0.25x | — |")
    same = [dict(r, teacher_val_loss=4.7) for r in rows]
    assert "teacher val loss" not in axis_table("t", same)[0][0]
