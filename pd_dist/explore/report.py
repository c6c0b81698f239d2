"""The report of a sweep: one table per axis like the paper's, loss curves, gain-vs-setting plots.

Every number is recomputed from the run directories the sweep left (each point's summary.json, eval.json
when `pd-dist eval` ran, and its LM-only baseline's), so `report.md` and `plots/` can be deleted and
written again. Per axis, the points are grouped by that axis's value (averaged over the other axes' values
and the seeds; for a one-at-a-time key, only the base recipe and the points that vary that key alone) and the table gives, per setting: the held-out loss (mean and spread = max - min over the
runs), the gain over the matching LM-only baseline (LM - PD) / LM in loss, top-1 agreement with the
teacher, and downstream accuracy per task where evaluated. The line under each table names the best
setting and says whether the seeds make the ordering uncertain: the best and the runner-up differ by less
than the larger of their spreads.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Optional

from pd_dist.core.compute_gain import curve_multiplier


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(sweep_dir: Path) -> tuple[dict, list[dict]]:
    """(sweep.json, one record per finished point with its figures and its baseline's)."""
    sweep_dir = Path(sweep_dir)
    plan = _read(sweep_dir / "sweep.json")
    if not plan:
        raise FileNotFoundError(f"{sweep_dir}: no sweep.json (not a pd-dist sweep directory)")
    rows = []
    for rec in plan["points"]:
        if rec["kind"] != "pd":
            continue
        d = Path(rec["dir"])
        s, e = _read(d / "summary.json"), _read(d / "eval.json")
        if not s.get("finished"):
            continue
        row = {"name": rec["name"], "settings": rec["settings"], "seed": rec["seed"], "dir": str(d),
               "val_loss": e.get("val_loss", s.get("val_loss")), "losses": s.get("losses", []),
               "agreement": e.get("teacher_top1_agreement", s.get("teacher_top1_agreement")),
               "teacher_val_loss": e.get("teacher_val_loss", s.get("teacher_val_loss")),
               "downstream": {t: r.get("acc") for t, r in e.get("downstream", {}).items()}}
        b = Path(rec["baseline_dir"]) if rec.get("baseline_dir") else None
        lm = e.get("lm_only_val_loss")
        if lm is None and b is not None:
            lm = _read(b / "eval.json").get("val_loss", _read(b / "summary.json").get("val_loss"))
        row["lm_only_val_loss"] = lm
        row["gain"] = (lm - row["val_loss"]) / lm if lm and row["val_loss"] is not None else None
        row["multiplier"] = _multiplier(s, row["val_loss"], b)
        row["balance"] = _balance(d, s, row["multiplier"])
        rows.append(row)
    return plan, rows


def _multiplier(summary: dict, val_loss: Optional[float], baseline: Optional[Path]) -> Optional[dict]:
    """The point's token multiplier (core.compute_gain.token_multiplier): its own, or read off its
    baseline's LM-only curve (lm_curve.json) at the point's held-out loss; None without a curve."""
    if summary.get("token_multiplier"):
        return summary["token_multiplier"]
    curve = _read(baseline / "lm_curve.json") if baseline is not None else {}
    if not curve or val_loss is None or not summary.get("steps"):
        return None
    return curve_multiplier(curve, val_loss, summary["steps"])


def _balance(run_dir: Path, summary: dict, m: Optional[dict]) -> Optional[dict]:
    """The point's compute balance (core.compute_gain.compute_balance): its own, or formed here from its
    resolved config and compute figures and the multiplier read off its baseline's curve."""
    if summary.get("compute_balance"):
        return summary["compute_balance"]
    if m is None or not (run_dir / "config.yaml").is_file():
        return None
    from pd_dist.config import load_config
    from pd_dist.run import run_balance

    try:
        cfg = load_config(run_dir / "config.yaml")
    except Exception:  # a config of another version: no balance rather than no report
        return None
    return run_balance(cfg, cfg.data.vocab_size, cfg.data.seq_len, summary["steps"], summary.get("compute"),
                       m["multiplier"])


def _fmt_balance(bs: list[Optional[dict]]) -> str:
    """One setting's compute balance, the mean over its seeds: student TFLOPs saved against the teacher's
    spent, and the offline store's break-even (its generation over the mean saving, rounded up)."""
    bs = [b for b in bs if b and b["student_saved"] is not None and b["teacher_spent"] is not None]
    if not bs:
        return "—"
    saved, spent = statistics.mean(b["student_saved"] for b in bs), statistics.mean(b["teacher_spent"] for b in bs)
    cell = f"{saved / 1e12:.3g} / {spent / 1e12:.3g}"
    gen = bs[0]["generation_flops"]
    if bs[0]["mode"] == "offline" and gen and saved > 0:
        cell += f"; break-even {math.ceil(gen / saved)} students"
    return cell


def _fmt_multiplier(ms: list[Optional[dict]]) -> str:
    """The token multipliers of one setting's seeds: their mean (x), marked '(extrap.)' when any was
    extrapolated beyond the LM-only curve; a bound when none could be read."""
    ms = [m for m in ms if m]
    vals = [m["multiplier"] for m in ms if m["multiplier"] is not None]
    if vals:
        extrap = " (extrap.)" if any(m["how"] == "extrapolated" for m in ms) else ""
        return f"{statistics.mean(vals):.2f}x{extrap}"
    if ms:
        return ("< " if ms[0]["how"] == "below" else "> ") + f"{ms[0]['bound']:.2f}x"
    return "—"


def axis_rows(axis: str, rows: list[dict], plan: dict) -> list[dict]:
    """The rows that speak to one axis, each with the axis's value in its settings. A one-at-a-time key
    (the paper's design) compares the base recipe with the points that vary that key alone, the base
    point showing the base config's value; a cartesian or zipped axis uses the base recipe's points."""
    oat = plan.get("oat_base") or {}
    out = []
    for r in rows:
        varied = set(r["settings"]) & set(oat)
        if varied <= ({axis} if axis in oat else set()):
            out.append({**r, "settings": {**({axis: oat[axis]} if axis in oat else {}), **r["settings"]}})
    return out


def _tb_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar of the run's TensorBoard events; [] when unavailable."""
    tb = Path(run_dir) / "tensorboard"
    if not tb.is_dir():
        return []
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return []
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def lm_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, LM loss on the training batch) from the run's TensorBoard events: the part of the
    objective that is comparable across alpha, temperature and loss kinds; [] when unavailable."""
    return _tb_scalars(run_dir, "train/lm_loss")


def _ordered(keys: list[str]) -> list[str]:
    """Settings in file order, or by value when every value is a number."""
    vals = [json.loads(k) for k in keys]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return [k for _, k in sorted(zip(vals, keys))]
    return keys


def _stats(vals: list[Optional[float]]) -> tuple[Optional[float], Optional[float], int]:
    v = [x for x in vals if x is not None]
    if not v:
        return None, None, 0
    return statistics.mean(v), max(v) - min(v), len(v)


def _fmt(mean: Optional[float], spread: Optional[float], n: int, pct: bool = False) -> str:
    if mean is None:
        return "—"
    f = (lambda x: f"{x:+.2%}") if pct else (lambda x: f"{x:.4f}")
    return f(mean) + (f" ({f(spread).lstrip('+')})" if n > 1 else "")


def paired_gain(gains: list[Optional[float]]) -> str:
    """The gains of one setting's seeds, each against its own LM-only twin (same initialisation and data
    order): mean ± standard error, and how many seeds favour PD; '—' for none, no SE for one seed."""
    g = [x for x in gains if x is not None]
    if not g:
        return "—"
    better = f"{sum(x > 0 for x in g)}/{len(g)}"
    if len(g) < 2:
        return f"{g[0]:+.2%} ({better})"
    return f"{statistics.mean(g):+.2%} ± {statistics.stdev(g) / len(g) ** 0.5:.2%} ({better})"


def axis_table(axis: str, rows: list[dict]) -> tuple[list[str], Optional[str]]:
    """Markdown lines of one axis's table, and its summary line."""
    groups: dict[str, list[dict]] = defaultdict(list)
    order: list[str] = []
    for r in rows:
        key = json.dumps(r["settings"].get(axis))
        if key not in groups:
            order.append(key)
        groups[key].append(r)
    tasks = sorted({t for r in rows for t in r["downstream"]})
    seeded = any(len(g) > 1 for g in groups.values())  # each run's gain is paired with its own LM-only twin
    curves = any(r.get("multiplier") for r in rows)
    teachers = _stats([r.get("teacher_val_loss") for r in rows])
    several = teachers[0] is not None and teachers[1] >= 1e-6
    head = ["setting", "runs", "val loss (spread)", "gain over LM-only", "top-1 agreement"] + [f"{t} acc" for t in tasks]
    head += ["teacher val loss"] if several else []
    head += ["token multiplier", "TFLOPs saved / teacher's"] if curves else []
    head += ["paired gain: mean ± SE (seeds PD better)"] if seeded else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ranked = []
    for key in _ordered(order):
        rs = groups[key]
        loss = _stats([r["val_loss"] for r in rs])
        gain = _stats([r["gain"] for r in rs])
        agree = _stats([r["agreement"] for r in rs])
        cells = [json.loads(key), len(rs), _fmt(*loss), _fmt(*gain, pct=True), _fmt(*agree)]
        cells += [_fmt(*_stats([r["downstream"].get(t) for r in rs])) for t in tasks]
        cells += [_fmt(*_stats([r.get("teacher_val_loss") for r in rs]))] if several else []
        cells += [_fmt_multiplier([r.get("multiplier") for r in rs]),
                  _fmt_balance([r.get("balance") for r in rs])] if curves else []
        cells += [paired_gain([r["gain"] for r in rs])] if seeded else []
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        if loss[0] is not None:
            ranked.append((loss[0], loss[1] or 0.0, loss[2], json.loads(key)))
    if not ranked:
        return lines, None
    ranked.sort(key=lambda x: x[0])
    best = ranked[0]
    summary = f"best {axis}: {best[3]!r} (val loss {best[0]:.4f})"
    if len(ranked) > 1:
        second = ranked[1]
        gap = second[0] - best[0]
        if best[2] < 2 and second[2] < 2:
            summary += f"; one run per setting: no seed spread to judge the ordering (gap to {second[3]!r}: {gap:.4f})"
        elif gap < max(best[1], second[1]):
            summary += (f"; ordering uncertain: the gap to {second[3]!r} ({gap:.4f}) is within the seed spread "
                        f"({max(best[1], second[1]):.4f})")
        else:
            summary += f"; ahead of {second[3]!r} by {gap:.4f}, more than the seed spread ({max(best[1], second[1]):.4f})"
    return lines, summary


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, held-out loss) at the run's evaluation points, from its TensorBoard events; [] when
    unavailable."""
    return _tb_scalars(run_dir, "eval/val_loss")


SMOOTHING = 0.9  # the training curves' exponential moving average: s_t = 0.9 s_(t-1) + 0.1 x_t


def ema(values: list[float], decay: float = SMOOTHING) -> list[float]:
    """The exponential moving average of ``values`` (debiased, as TensorBoard's smoothing: the first
    points are not pulled toward 0)."""
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        acc = decay * acc + (1 - decay) * v
        weight = decay * weight + (1 - decay)
        out.append(acc / weight)
    return out


def gain_bars(gains: dict[str, list[float]]) -> tuple[list[str], list[float], Optional[list[list[float]]], str]:
    """What the gain plot draws per setting (label -> gains of its seeds, fractions): labels, mean gains
    in %, error bars from the mean to the lowest and highest seed (None when every setting has one
    seed: no bars are drawn, and the title says so) and the title's note."""
    labels, means, lo, hi = [], [], [], []
    for label, g in gains.items():
        if not g:
            continue
        m = statistics.mean(g)
        labels.append(label)
        means.append(100 * m)
        lo.append(100 * (m - min(g)))
        hi.append(100 * (max(g) - m))
    seeds = sorted({len(g) for g in gains.values() if g})
    if seeds == [1] or not seeds:
        return labels, means, None, "1 seed per point: no bars"
    n = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    return labels, means, [lo, hi], f"bars: lowest to highest of {n} seeds"


def plots(axis: str, rows: list[dict], out: Path) -> list[str]:
    """Per setting (seed mean): held-out loss at the evaluation points and the training LM loss smoothed
    (ema, stated on the axis); and the gain vs setting with the seeds' real range; the PNG file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    safe = axis.replace("/", "_")
    out.mkdir(parents=True, exist_ok=True)
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[json.dumps(r["settings"].get(axis))].append(r)
    fig, ax = plt.subplots(figsize=(6, 4))
    lm = {key: [lm_curve(Path(r["dir"])) for r in rs] for key, rs in by.items()}
    use_lm = all(all(c) for c in lm.values())  # the total objective mixes LM and KD by alpha
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    any_eval = False
    for j, key in enumerate(_ordered(list(by))):
        color = colors[j % len(colors)]
        if use_lm:
            curves = [[v for _, v in c] for c in lm[key]]
            steps = [t for t, _ in lm[key][0]]
        else:
            curves = [r["losses"] for r in by[key] if r["losses"]]
            steps = list(range(1, 1 + min((len(c) for c in curves), default=0)))
        if curves:
            n = min(len(c) for c in curves)
            mean = ema([statistics.mean(c[i] for c in curves) for i in range(n)])
            ax.plot(steps[:n], mean, color=color, lw=0.8, alpha=0.6)
        evals = [eval_curve(Path(r["dir"])) for r in by[key]]
        if evals and all(evals):
            n = min(len(e) for e in evals)
            ax.plot([t for t, _ in evals[0][:n]], [statistics.mean(e[i][1] for e in evals) for i in range(n)],
                    color=color, marker="o", lw=1.6, label=json.loads(key))
            any_eval = True
        elif curves:
            ax.lines[-1].set_label(json.loads(key))
    ax.set_xlabel("step")
    what = "LM loss on the training batch" if use_lm else "training objective"
    ax.set_ylabel(f"{'held-out loss (dots); ' if any_eval else ''}{what}, EMA {SMOOTHING:g} (thin)")
    ax.set_title(f"{'LM loss' if use_lm else 'loss'} curves by {axis} (seed means)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    f1 = f"loss_{safe}.png"
    fig.savefig(out / f1, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    gains = {str(json.loads(key)): [r["gain"] for r in by[key] if r["gain"] is not None] for key in _ordered(list(by))}
    labels, means, errs, note = gain_bars(gains)
    ax.bar(range(len(labels)), means, yerr=errs, capsize=3 if errs else 0)
    ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("gain over LM-only, % of loss"), ax.set_title(f"gain vs {axis} ({note})")
    fig.tight_layout()
    f2 = f"gain_{safe}.png"
    fig.savefig(out / f2, dpi=100)
    plt.close(fig)
    return [f1, f2]


def write_report(sweep_dir: str | Path, with_plots: bool = True) -> Path:
    """report.md (and plots/) in the sweep directory; returns the report's path."""
    sweep_dir = Path(sweep_dir)
    plan, rows = collect(sweep_dir)
    axes = plan.get("axes") or []
    total = sum(1 for p in plan["points"] if p["kind"] == "pd")
    lines = [f"# Sweep report: {sweep_dir}", "",
             f"{len(rows)} of {total} distilled runs finished; gains are (LM - PD) / LM in held-out loss "
             "against each run's LM-only baseline (same student, tokens and seed); spread = max - min.",
             "Recomputed from the run directories by `pd-dist report`."]
    teacher = _stats([r["teacher_val_loss"] for r in rows])
    if teacher[0] is not None and teacher[1] < 1e-6:
        lines.append(f"Teacher held-out loss: {teacher[0]:.4f}.")
    elif teacher[0] is not None:  # several teachers: each setting's own, in its table
        lines.append("Teachers differ: each setting's teacher held-out loss is in its table.")
    summaries = []
    for axis in axes or ["(base)"]:
        lines += ["", f"## {axis}", ""]
        these = axis_rows(axis, rows, plan)
        table, summary = axis_table(axis, these)
        lines += table
        if summary:
            lines += ["", summary]
            summaries.append(summary)
        if with_plots and these:
            for f in plots(axis, these, sweep_dir / "plots"):
                lines += ["", f"![{f}](plots/{f})"]
    lines += ["", "## Runs", "", "| run | seed | val loss | LM-only | gain |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['seed']} | {r['val_loss']:.4f} | "
                     f"{r['lm_only_val_loss'] if r['lm_only_val_loss'] is None else format(r['lm_only_val_loss'], '.4f')} | "
                     f"{'—' if r['gain'] is None else format(r['gain'], '+.2%')} |")
    out = sweep_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
