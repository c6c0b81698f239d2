"""Distillation across tokenizers, trained: the miniature of distill.cross_tokenizer.

The teacher is the embedded default's (pre-trained first if missing), with the default's tokenizer A
(byte-level BPE, vocab 4096). Its document stores are written once, in A's vocabulary, from the data
as A tokenizes it (launch/generate_logits.py with the cross-tokenizer config; `--library` reuses an
existing library of the same teacher and data, e.g. bench/doc_store.py's). Two student tokenizers,
both byte-level BPEs trained here by pd-dist's own trainer on the embedded corpus:

- B: half A's vocabulary (2048) on the same corpus;
- C: A's vocabulary size (4096) on the corpus's second half only, so the merges differ.

For each student tokenizer and seed, the default student is trained offline from the one library with
`map` and with `uld`, each beside the same LM-only twin (same tokenizer, tokens, seed and
initialisation; trained once, copied to the uld run). Reported per run: LM-only and PD held-out
losses, the gap, the aligned fraction and mapped mass; per tokenizer and arm, whether every seed's gap
exceeds the spread of the three LM-only losses (the bar: beat the twin by more than the spread of 3
seeds), on the mean gap and on every seed, and the paired view (both students of a seed share
initialisation and data order): whether every seed beats its twin, the standard error of the mean gap
and its ratio. Last line: one JSON object.

    python bench/crosstok_gain.py --library runs/bench_doc_store/library   # ~45 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_teacher, emit, launch_entry, log  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def student_tokenizers(out: Path) -> dict[str, Path]:
    """B and C (module docstring), trained once into ``out``."""
    from pd_dist.data.corpus import embedded_documents
    from pd_dist.data.prepare import train_tokenizer

    want = {"B": (2048, "all"), "C": (4096, "second_half")}
    dirs = {name: out / f"tokenizer_{name}" for name in want}
    if all((d / "tokenizer.json").is_file() for d in dirs.values()):
        return dirs
    docs = list(embedded_documents(0))
    for name, (vocab, part) in want.items():
        if not (dirs[name] / "tokenizer.json").is_file():
            texts = docs if part == "all" else docs[len(docs) // 2:]
            log(f"training tokenizer {name}: vocab {vocab} on {'the corpus' if part == 'all' else 'its second half'}")
            train_tokenizer(texts, vocab, dirs[name])
    return dirs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_crosstok"))
    ap.add_argument("--default-dir", default=str(REPO / "runs" / "default"),
                    help="the default run's output_dir: its teacher (and tokenizer A) are reused")
    ap.add_argument("--library", default=None, help="the teacher's library (default: <out>/library)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    ap.add_argument("--only", nargs="*", default=None, help="student tokenizers to run (B C)")
    ap.add_argument("--arms", nargs="*", default=["map", "uld"],
                    help="map, uld, or either @ALPHA_MAX (e.g. uld@0.5: the ULD paper's weighting, LM and KD alike)")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for every run (smoke: train.steps=4)")
    args = ap.parse_args()
    out, default = Path(args.out), Path(args.default_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher = default_teacher(default)
    lib = Path(args.library) if args.library else out / "library"
    toks = student_tokenizers(out)
    results: dict = {}
    generated = False
    for name, tok in toks.items():
        if args.only is not None and name not in args.only:
            continue
        common = [f"data.tokenizer={tok}", f"teacher.path={teacher}", f"data.dir={out / f'data-{name}'}",
                  "distill.mode=offline", "distill.teacher_context=document", f"distill.store={lib}", *args.set]
        for seed in args.seeds:
            for arm in args.arms:
                run = out / f"{name}-{arm}-seed{seed}"
                how, _, amax = arm.partition("@")  # e.g. uld@0.5: distill.alpha.max 0.5 (LM and KD weighed alike)
                cfg = common + [f"distill.cross_tokenizer={how}", f"train.seed={seed}", f"output_dir={run}"] + (
                    [f"distill.alpha.max={amax}"] if amax else [])
                if not generated:
                    log(f"the teacher's library {lib} (kept where it holds the source already)")
                    text = launch_entry("generate_logits.py", cfg, cwd=REPO)
                    for line in text.splitlines():
                        if "[generate]" in line or "[tokenizers]" in line:
                            log("  " + line.strip())
                    generated = True
                twin = out / f"{name}-{args.arms[0]}-seed{seed}" / "baseline"
                if arm != args.arms[0] and twin.is_dir() and not (run / "baseline").exists():
                    shutil.copytree(twin, run / "baseline")  # the same LM-only twin: not trained again
                if not (run / "summary.json").is_file():
                    t = time.perf_counter()
                    log(f"{run.name}: LM-only twin + distilled student")
                    launch_entry("pretrain_pd.py", cfg + ["baseline=true"], cwd=REPO)
                    log(f"  {time.perf_counter() - t:.0f} s")
                s = json.loads((run / "summary.json").read_text())
                ct = s.get("cross_tokenizer") or {}
                gap = s["lm_only_val_loss"] - s["val_loss"]
                results[run.name] = {"tokenizer": name, "arm": arm, "seed": seed,
                                     "lm_only_val_loss": s["lm_only_val_loss"], "pd_val_loss": s["val_loss"],
                                     "pd_gain": s["pd_gain"], "gap": gap, "aligned_frac": ct.get("aligned_frac"),
                                     "mapped_mass": ct.get("mapped_mass"),
                                     "sample_aligned_frac": ct.get("sample_aligned_frac"),
                                     "exact_frac": ct.get("exact_frac")}
                log(f"{run.name}: LM-only {s['lm_only_val_loss']:.4f} | PD {s['val_loss']:.4f} | gap {gap:+.4f} | "
                    f"aligned {ct.get('aligned_frac')} | mapped mass {ct.get('mapped_mass')}")
    verdict = {}
    for name in toks:
        for arm in args.arms:
            rs = [r for r in results.values() if r["tokenizer"] == name and r["arm"] == arm]
            if not rs:
                continue
            lm = [r["lm_only_val_loss"] for r in rs]
            spread = max(lm) - min(lm) if len(lm) > 1 else None
            gaps = [r["gap"] for r in rs]
            se = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else None
            verdict[f"{name}_{arm}"] = {
                "seeds": len(rs), "mean_gap": statistics.mean(gaps), "min_gap": min(gaps), "lm_spread": spread,
                # the bar: the gap beyond the spread of the LM-only losses over the seeds
                "mean_gap_beyond_spread": None if spread is None else statistics.mean(gaps) > spread,
                "every_gap_beyond_spread": None if spread is None else min(gaps) > spread,
                # both students of a seed share initialisation and data order: the paired view
                "every_seed_beats_twin": min(gaps) > 0, "paired_se": se,
                "paired_t": None if not se else statistics.mean(gaps) / se,
                "mean_gain": statistics.mean(r["pd_gain"] for r in rs)}
    emit({"runs": results, "verdict": verdict, "wall_s": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
