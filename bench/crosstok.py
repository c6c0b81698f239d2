"""Distillation across tokenizers, before training: how much of the student's text aligns with the
teacher's, how much of the teacher's vocabulary maps exactly, and what alignment and projection cost.

Tokenizers, all byte-level BPEs trained by pd-dist's own trainer on the embedded corpus:
- A, the teacher's: vocab 8192 on the whole corpus (`--teacher-tokenizer`, default: the embedded
  default run's, runs/default/data/tokenizer, trained here when missing);
- B: vocab 4096 on the same corpus;
- C: vocab 8192 on the corpus's second half only, so its merges differ.

For the pairs A->B and A->C: the aligned fraction of the student's positions over held-out documents
(the documents after the first 95% of the corpus), the teacher vocabulary's exact and mapped
fractions, and the cost per student token of aligning a document and projecting a top-50 teacher
signal onto the student's vocabulary (random teacher values; one process), against the default
student's consumption (~4.0k tokens/s on this machine: docs/benchmarks.md). The teacher mass that maps
nowhere needs the trained teacher's distributions and is not measured here. Last line: one JSON object.

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
    args = ap.parse_args()

    import torch

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
    log("training B (vocab 4096, same corpus) and C (vocab 8192, second half)")
    train_tokenizer(train, 4096, work / "B")
    train_tokenizer(train[len(train) // 2:], 8192, work / "C")
    teacher = load_tokenizer(tok_a)
    ta = checked_token_bytes(teacher, "A")
    g = torch.Generator().manual_seed(0)
    out = {"docs": len(held), "top_k": args.top_k}
    for name in ("B", "C"):
        student = load_tokenizer(work / name)
        tb = checked_token_bytes(student, name)
        proj = pair_projection(tok_a, work / name, work)
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
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
