"""One teacher pass for every student: the miniature of distill.teacher_context document.

With the embedded default's teacher (pre-trained first if missing), writes one library of document
stores (format 3) and trains the default student from it, each launch beside its own LM-only twin
(`baseline: true`, same tokens and initialisation):

- `doc256`: data.seq_len 256 (the default's shape);
- `doc128`: data.seq_len 128 over the same tokens (16 samples a step instead of 8, val_samples 64);
- `blend`: the embedded corpus (weight 3) blended with a second source (weight 1), 2M characters as
  JSON lines: by default the standard library past the embedded corpus's cap (the teacher's domain,
  text it never saw); `--second numpy` (run `blend_numpy`) this machine's numpy sources, code the
  teacher never learned, where distillation from it hurts; the library gains that source's store and
  reads the embedded corpus's from the first pass;
- `window256`: today's recipe from a window store (format 2) at seq_len 256, for reference;
- `window_blend`: the same recipe over the `blend` data, so a blend's gain can be told apart from the
  document store's.

The window runs reuse their document twin's LM-only baseline (same data, seed and initialisation).
`--seed N` and `--mask` (data.document_mask true for the students and the window teachers; a window
store of its own) run every arm again under names ending -seedN / -mask.

Every run uses the default's tokenizer (data.tokenizer), so the embedded source keeps its fingerprint
whatever its seq_len or blend. Reported per run: teacher, LM-only and PD held-out losses and the gain,
and whether each PD run beats its twin by more than the three-seed spread of docs/benchmarks.md
(`--spread`, 0.058: the larger of the two arms'). Last line: one JSON object.

    python bench/doc_store.py            # ~40 minutes on 2 cores once the teacher exists
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_teacher, emit, launch_entry, log  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _second_source(path: Path, kind: str, max_chars: int) -> None:
    """The blend's second source as JSON lines, up to max_chars: ``stdlib``, the standard library past the
    embedded corpus's 6M-character cap (its continuation: the teacher's domain, text it never saw), or
    ``numpy``, this machine's numpy sources (code the teacher never learned)."""
    if path.is_file():
        return
    sys.path.insert(0, str(REPO))
    if kind == "stdlib":
        from pd_dist.data.corpus import EMBEDDED_MAX_CHARS, embedded_documents

        # The cap keeps documents up to and including the one that reaches it: the rest is unseen.
        total, texts = 0, []
        for t in embedded_documents(0):
            if total >= EMBEDDED_MAX_CHARS:
                texts.append(t)
            total += len(t)
    else:
        import numpy

        texts = (f.read_text(errors="replace") for f in sorted(Path(numpy.__file__).parent.rglob("*.py")))
    total = 0
    with open(path, "w") as fh:
        for text in texts:
            if total + len(text) > max_chars:
                break
            fh.write(json.dumps({"text": text}) + "\n")
            total += len(text)


def context_overhead(data_dir: Path, chunk: int, windows: int = 2000) -> float:
    """Teacher tokens a colocated/online run in document context reads per window token (chunk prefixes
    before each window included), over random training windows of the prepared data in ``data_dir``."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from pd_dist.data import PackedDataset

    data = PackedDataset(data_dir)
    rng = np.random.default_rng(0)
    read = asked = 0
    for i in rng.integers(0, data.n_train, windows):
        s, a = data.window(int(i))
        pieces = data.document_index(s).pieces(a, a + data.seq_len, chunk)
        read += int((pieces[:, 1] - pieces[:, 0]).sum())
        asked += data.seq_len
    return read / asked


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_doc_store"))
    ap.add_argument("--default-dir", default=str(REPO / "runs" / "default"),
                    help="the default run's output_dir: its tokenizer and teacher are reused")
    ap.add_argument("--spread", type=float, default=0.058, help="the three-seed spread to beat")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only these (doc256 doc128 blend window256 window_blend)")
    ap.add_argument("--second", choices=["stdlib", "numpy"], default="stdlib",
                    help="the blend's second source: the standard library past the embedded cap, or numpy")
    ap.add_argument("--seed", type=int, default=None, help="train.seed of every run (runs named ...-seedN)")
    ap.add_argument("--mask", action="store_true",
                    help="data.document_mask true for every run, students and window teachers (runs named ...-mask)")
    args = ap.parse_args()
    out, default = Path(args.out), Path(args.default_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher = default_teacher(default)
    second = out / f"{args.second}_sources.jsonl"
    _second_source(second, args.second, 2_000_000)
    lib = out / "library"
    common = [f"data.tokenizer={default / 'data' / 'tokenizer'}", f"teacher.path={teacher}"]
    doc = ["distill.mode=offline", "distill.teacher_context=document", f"distill.store={lib}"]
    masked = "-mask" if args.mask else ""
    blend = ["data.source=blend", f"data.blend=[{{path: embedded, weight: 3}}, {{path: {second}, weight: 1}}]"]
    runs = {
        "doc256": (doc, []),
        "doc128": (doc, ["data.seq_len=128", "train.global_batch_size=16", "train.micro_batch_size=16",
                         "data.val_samples=64"]),
        "blend" if args.second == "stdlib" else "blend_numpy": (doc, blend),
        # A window store depends on the mask (the teacher's forward does); a document store does not.
        "window256": (["distill.mode=offline", f"distill.store={out / ('window_store' + masked)}"], []),
        "window_blend": (["distill.mode=offline", f"distill.store={out / ('window_store_blend' + masked)}"], blend),
    }
    data_of = {"doc256": "256", "window256": "256", "doc128": "128", "blend": "blend", "window_blend": "blend",
               "blend_numpy": "blend_numpy"}
    twin_of = {"window256": "doc256", "window_blend": "blend"}  # the window run shares that run's LM-only twin
    results, timings = {}, {}
    for name, (mode, shape) in runs.items():
        if args.only is not None and name not in args.only:
            continue
        seeded = [f"train.seed={args.seed}"] if args.seed is not None else []
        base = name
        if args.seed is not None:
            name = f"{name}-seed{args.seed}"
        if args.mask:
            seeded.append("data.document_mask=true")
            name += "-mask"
        run = out / name
        data_dir = out / f"data-{data_of[base]}"
        twin = out / name.replace(base, twin_of[base]) / "baseline" if base in twin_of else None
        if twin is not None and twin.is_dir() and not (run / "baseline").exists():
            shutil.copytree(twin, run / "baseline")  # the same LM-only twin: not trained again
        cfg = common + mode + shape + seeded + [f"data.dir={data_dir}"]
        if not (run / "summary.json").is_file():
            t = time.perf_counter()
            log(f"{name}: teacher pass (kept where the store has it already)")
            text = launch_entry("generate_logits.py", cfg + [f"output_dir={run}"], cwd=REPO)
            timings[f"{name}_generate_s"] = round(time.perf_counter() - t, 1)
            for line in text.splitlines():
                if "[generate]" in line and ("complete" in line or "kept" in line):
                    log("  " + line.strip())
            t = time.perf_counter()
            log(f"{name}: LM-only twin + distilled student -> {run}")
            launch_entry("pretrain_pd.py", cfg + [f"output_dir={run}", "baseline=true"], cwd=REPO)
            timings[f"{name}_train_s"] = round(time.perf_counter() - t, 1)
        s = json.loads((run / "summary.json").read_text())
        gap = s["lm_only_val_loss"] - s["val_loss"]
        results[name] = {"teacher_val_loss": s.get("teacher_val_loss"), "lm_only_val_loss": s["lm_only_val_loss"],
                         "pd_val_loss": s["val_loss"], "pd_gain": s["pd_gain"], "gap": gap,
                         "beats_twin_beyond_spread": gap > args.spread}
        log(f"{name}: teacher {s.get('teacher_val_loss')} | LM-only {s['lm_only_val_loss']:.4f} | "
            f"PD {s['val_loss']:.4f} | gain {s['pd_gain']:+.2%} | gap {gap:.4f} (spread {args.spread})")
    extra = {}
    for name, d in (("256", out / "data-256"), ("128", out / "data-128")):
        if (d / "meta.json").is_file():  # the teacher reads documents in chunks of 256 (its seq_len)
            extra[f"context_overhead_seq{name}"] = round(context_overhead(d, 256), 3)
    sfx = (f"-seed{args.seed}" if args.seed is not None else "") + masked  # every run of this invocation's
    if f"doc256{sfx}" in results and f"window256{sfx}" in results:
        extra["doc_vs_window_256"] = results[f"doc256{sfx}"]["pd_val_loss"] - results[f"window256{sfx}"]["pd_val_loss"]
        extra["doc_within_spread_of_window"] = abs(extra["doc_vs_window_256"]) <= args.spread
    if f"blend{sfx}" in results and f"window_blend{sfx}" in results:
        extra["doc_vs_window_blend"] = (results[f"blend{sfx}"]["pd_val_loss"]
                                        - results[f"window_blend{sfx}"]["pd_val_loss"])
    library_runs = [r for n, r in results.items() if not n.startswith("window")]  # the window runs: reference
    emit({"runs": results, "spread": args.spread, **extra, **timings,
          "all_beat_twins": all(r["beats_twin_beyond_spread"] for r in library_runs) if library_runs else None,
          "wall_s": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
