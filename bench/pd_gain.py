"""Does the default recipe win? The embedded default's student distilled vs trained LM-only, over seeds.

For each seed, one launch of the real entry point (`deepspeed launch/pretrain_pd.py`, the default config
with `baseline: true`) trains the LM-only twin and the distilled student on the same tokens from the
same initialisation, against one fixed teacher (the default run's, pre-trained first if missing).
Seeds change the student's initialisation and data order, not the teacher. Reported: the teacher's
held-out loss, the LM-only and distilled students' held-out losses per seed, their means, the spread
(max - min over seeds) of each, and the gain (LM - PD) / LM.

Both students of a seed share initialisation and data order, so the statistic is the paired one: the
per-seed gap LM - PD, its mean and standard error over the seeds (`paired`), and the recipe wins when
the mean exceeds 3 standard errors (`wins`). The older unpaired criterion, the mean gap against the
larger spread of the two students' losses, is kept beside it (`wins_unpaired`): the LM-only losses'
spread across seeds is far larger than the paired differences' (seeds change what both students see),
so it can call a gain that every seed shows a tie. Last line: one JSON object.

    python bench/pd_gain.py                 # 5 seeds, ~15 minutes on 2 cores once the teacher exists
    python bench/pd_gain.py --seeds 1 2 3 4 5 --set distill.loss=kld
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_teacher, emit, launch_entry, log  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2, 3, 4])
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_pd_gain"))
    ap.add_argument("--default-dir", default=str(REPO / "runs" / "default"),
                    help="the default run's output_dir: its data and teacher are reused")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config overrides for every seed (e.g. distill.loss=kld)")
    args = ap.parse_args()
    out, default = Path(args.out), Path(args.default_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher = default_teacher(default)
    runs = {}
    for seed in args.seeds:
        run = out / f"seed{seed}"
        if not (run / "summary.json").is_file():
            log(f"seed {seed}: LM-only baseline + distilled student -> {run}")
            launch_entry("pretrain_pd.py", [f"output_dir={run}", f"data.dir={default / 'data'}", f"teacher.path={teacher}",
                     "baseline=true", f"train.seed={seed}", *args.overrides], cwd=REPO)
        s = json.loads((run / "summary.json").read_text())
        runs[seed] = s
        log(f"seed {seed}: teacher {s['teacher_val_loss']:.4f} | LM-only {s['lm_only_val_loss']:.4f} | "
            f"PD {s['val_loss']:.4f} | gain {s['pd_gain']:+.2%}")
    lm = [runs[s]["lm_only_val_loss"] for s in args.seeds]
    pd = [runs[s]["val_loss"] for s in args.seeds]
    gains = [runs[s]["pd_gain"] for s in args.seeds]
    spread_lm, spread_pd = max(lm) - min(lm), max(pd) - min(pd)
    gap = statistics.mean(lm) - statistics.mean(pd)
    teacher_loss = runs[args.seeds[0]]["teacher_val_loss"]
    paired = paired_stats([a - b for a, b in zip(lm, pd)])
    emit({"seeds": args.seeds, "teacher_val_loss": teacher_loss,
          "lm_only_val_loss": lm, "pd_val_loss": pd, "pd_gain": gains,
          "lm_only_mean": statistics.mean(lm), "pd_mean": statistics.mean(pd),
          "pd_gain_mean": statistics.mean(gains), "lm_only_spread": spread_lm, "pd_spread": spread_pd,
          "gap": gap, "margin_over_spread": gap / max(spread_lm, spread_pd, 1e-12),
          "teacher_vs_lm_only": (statistics.mean(lm) - teacher_loss) / statistics.mean(lm),
          "paired": paired, "wins": paired["t"] is not None and paired["t"] > 3,
          "wins_unpaired": gap > max(spread_lm, spread_pd), "overrides": args.overrides,
          "wall_s": round(time.perf_counter() - t0, 1)})
    return 0


def paired_stats(gaps: list[float]) -> dict:
    """Mean, standard error (sample standard deviation / sqrt(n)) and their ratio of per-seed gaps, with
    how many seeds favour PD; SE and ratio are None below 2 seeds."""
    n = len(gaps)
    mean = statistics.mean(gaps) if gaps else None
    se = statistics.stdev(gaps) / n ** 0.5 if n > 1 else None
    return {"n": n, "mean_gap": mean, "se": se, "t": mean / se if se else None,
            "seeds_pd_better": sum(g > 0 for g in gaps)}


if __name__ == "__main__":
    sys.exit(main())
