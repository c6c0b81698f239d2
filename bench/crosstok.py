"""Distillation across tokenizers, before training: how much of the student's text aligns with the
teacher's, how much of the teacher's vocabulary maps exactly, and what alignment and projection cost.

Tokenizers, all byte-level BPEs trained by pd-dist's own trainer on the embedded corpus:
- A, the teacher's: the embedded default's, vocab 4096 (`--teacher-tokenizer`, default:
  runs/default/data/tokenizer, trained here when missing);
- B and C, bench/crosstok_gain.py's student tokenizers (trained there, or here when missing): B half
  A's vocabulary (2048) on the same corpus, C A's size (4096) on the corpus's second half only.

For the pairs A->B and A->C: the aligned fraction of the student's positions over held-out documents
(the documents after the first 95% of the corpus), the teacher vocabulary's exact and mapped
fractions, and the cost per student token of aligning a document and projecting a top-50 teacher
signal onto the student's vocabulary (random teacher values; one process), against the default
student's consumption (~4.0k tokens/s on this machine: docs/benchmarks.md). The teacher mass that maps
nowhere needs the trained teacher's distributions and is not measured here.

With `--library` (bench/crosstok_gain.py's, after it ran): the offline loader's own path, in one process
(teacher.crosstok.CrossTokenizerStore.get_batch: read and decode the teacher's stored records, align,
project), in student tokens per second against the same consumption. Last line: one JSON object.

    python bench/crosstok.py     # under a minute on 2 cores once A exists
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, log  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONSUMED_TOK_S = 4000.0  # the default student's training throughput here (docs/benchmarks.md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-tokenizer", default=str(REPO / "runs" / "default" / "data" / "tokenizer"))
    ap.add_argument("--docs", type=int, default=200, help="held-out documents measured")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_crosstok"), help="bench/crosstok_gain.py's --out")
    ap.add_argument("--library", default=None, help="the teacher's library bench/crosstok_gain.py trained from")
    ap.add_argument("--micro-batches", type=int, default=40, help="--library: micro-batches of 8 windows read")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # as in the offline loader's DataLoader workers (one thread each)
    from pd_dist.core.crosstok import align_positions, byte_ends, student_signal
    from pd_dist.core.logits import SparseLogits
    from pd_dist.data.corpus import embedded_documents
    from pd_dist.data.prepare import load_tokenizer, train_tokenizer
    from pd_dist.data.tokenizer_pair import aligned_fraction, checked_token_bytes, pair_projection

    t0 = time.perf_counter()
    docs = list(embedded_documents(0))
    cut = int(len(docs) * 0.95)
    train, held = docs[:cut], docs[cut:cut + args.docs]
    work = Path(tempfile.mkdtemp(prefix="pd_crosstok_"))
    tok_a = Path(args.teacher_tokenizer)
    if not (tok_a / "tokenizer.json").is_file():
        log(f"no tokenizer in {tok_a}: training A (vocab 8192) on the corpus")
        tok_a = work / "A"
        train_tokenizer(train, 8192, tok_a)
    from crosstok_gain import student_tokenizers

    toks = student_tokenizers(Path(args.out))
    teacher = load_tokenizer(tok_a)
    ta = checked_token_bytes(teacher, "A")
    g = torch.Generator().manual_seed(0)
    out = {"docs": len(held), "top_k": args.top_k}
    for name in ("B", "C"):
        student = load_tokenizer(toks[name])
        tb = checked_token_bytes(student, name)
        proj = pair_projection(tok_a, toks[name], work)
        s = proj.summary()
        frac = aligned_fraction(held, teacher, student, ta, tb)
        target = torch.from_numpy(proj.target)
        tokens = 0
        spent = 0.0
        for text in held:
            ids_t = teacher(text, add_special_tokens=False)["input_ids"]
            ids_s = student(text, add_special_tokens=False)["input_ids"]
            if not ids_s or not ids_t:
                continue
            vals, idx = torch.randn(len(ids_t), len(ta), generator=g).mul(3).topk(args.top_k)
            sig = SparseLogits(idx, vals)
            t = time.perf_counter()
            aligned = align_positions(byte_ends([tb[i] for i in ids_s]), byte_ends([ta[i] for i in ids_t]))
            student_signal(sig, torch.from_numpy(aligned), target, 1.0)
            spent += time.perf_counter() - t
            tokens += len(ids_s)
        rate = tokens / max(spent, 1e-9)
        out[f"A_to_{name}"] = {"aligned_frac": round(frac, 4), "exact_frac": round(s["exact_frac"], 4),
                               "mapped_frac": round(s["mapped"] / s["teacher_vocab"], 4),
                               "student_vocab": len(tb), "align_project_tok_s": round(rate),
                               "vs_consumption": round(rate / CONSUMED_TOK_S, 1)}
        log(f"A -> {name}: aligned {frac:.1%} of the student's positions, {s['exact_frac']:.1%} of A's vocabulary "
            f"exact, align + project {rate:,.0f} student tokens/s ({rate / CONSUMED_TOK_S:.0f}x consumption)")
    if args.library:
        out["loader"] = loader_rates(Path(args.out), Path(args.library), tok_a, args.micro_batches)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    emit(out)
    return 0


def loader_rates(out: Path, library: Path, tok_a: Path, micro_batches: int) -> dict:
    """Student tokens per second of CrossTokenizerStore.get_batch (one process) for B's and C's data."""
    import numpy as np

    from pd_dist.config import load_config
    from pd_dist.data import PackedDataset
    from pd_dist.signals.sources import DocumentStoreWindows
    from pd_dist.teacher.crosstok import CrossTokenizer, CrossTokenizerStore

    rates = {}
    for name in ("B", "C"):
        views = sorted(out.glob(f"data-{name}-teacher-*"))
        if not views:
            continue
        data, tdata = PackedDataset(out / f"data-{name}"), PackedDataset(views[0])
        cfg = load_config(None, [f"data.tokenizer={out / f'data-{name}' / 'tokenizer'}",
                                 f"teacher.path={tok_a}", "distill.teacher_context=document",
                                 "distill.cross_tokenizer=map"])
        pair = CrossTokenizer.build(cfg, data, tdata)
        store = CrossTokenizerStore(DocumentStoreWindows.open(library, tdata, cfg.distill.signal_spec(0), None), pair)
        rng = np.random.default_rng(0)
        batches = [rng.choice(data.n_train, 8, replace=False) for _ in range(micro_batches)]
        store.get_batch(batches[0])  # warm the page cache and the pair
        t = time.perf_counter()
        for ids in batches:
            store.get_batch(ids)
        rate = micro_batches * 8 * data.seq_len / (time.perf_counter() - t)
        rates[name] = {"student_tok_s": round(rate), "vs_consumption": round(rate / CONSUMED_TOK_S, 1)}
        log(f"offline loader, A -> {name}: {rate:,.0f} student tokens/s in one process "
            f"({rate / CONSUMED_TOK_S:.1f}x consumption)")
    return rates


if __name__ == "__main__":
    sys.exit(main())
