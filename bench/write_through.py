"""Benchmark: what distill.write_through costs a teacher replica (pd_dist.teacher.stores.WriteThrough).

The serving path: a frozen teacher (the preset below with seeded random weights at the given
vocabulary, or --teacher PATH) answers `batches` micro-batches of random tokens through the answer
function a TeacherServer calls, once bare and once wrapped in WriteThrough (records queued to a
background thread that appends them to the replica's spool file on local disk; its close, which
waits for the last writes, is inside the timing). Rounds alternate which of bare / wrapped goes first
and the fastest of each is kept (the machine may be shared). serve_slowdown = wrapped / bare - 1 (goal <= 0.05).

After the run: completing the store from the spool (pd_dist.teacher.stores.complete_store on one rank: every
sample read back from the spool, encoded and written into shards, manifest last), reported as
complete_s and its ratio to the bare serving time of the same samples (complete_vs_serve): work done
once, after the students finish, off the training path.

Prints progress to stderr and one JSON line last on stdout.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import emit, log  # noqa: E402
from pd_dist.core.logits import SignalSpec  # noqa: E402
from pd_dist.teacher.inference import FrozenTeacher  # noqa: E402
from pd_dist.models import ModelConfig, build_model  # noqa: E402
from pd_dist.teacher.stores import WriteThrough, complete_store  # noqa: E402
from pd_dist.store import StoreMeta, verify_store  # noqa: E402


class _Tokens:
    """The data complete_store reads windows from (random tokens, fixed seed)."""

    def __init__(self, n: int, seq_len: int, vocab: int):
        self.windows = torch.randint(0, vocab, (n, seq_len + 1), generator=torch.Generator().manual_seed(0))

    def batch(self, ids) -> np.ndarray:
        return self.windows[torch.as_tensor(np.asarray(ids))].numpy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small-teacher")
    ap.add_argument("--teacher", type=Path, default=None, help="a save_pretrained teacher (overrides --preset)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    mc = ModelConfig(path=str(args.teacher)) if args.teacher else ModelConfig(preset=args.preset)
    model = build_model(mc, args.vocab, seed=0)
    teacher = FrozenTeacher(model, torch.device("cpu"), torch.float32, SignalSpec.of("top_p_k", top_p=0.95, top_k=args.top_k),
                            1024, keep_lse=True)
    n = args.batches * args.micro_batch
    data = _Tokens(n, args.seq_len, args.vocab)
    batches = [(torch.from_numpy(data.batch(np.arange(i, i + args.micro_batch)))[:, :-1],
                np.arange(i, i + args.micro_batch)) for i in range(0, n, args.micro_batch)]
    teacher(*batches[0])  # warm-up
    bare, wrapped = [], []
    with tempfile.TemporaryDirectory(prefix="pd_wt_bench_") as tmp:
        def run_bare():
            t0 = time.perf_counter()
            for tok, ids in batches:
                teacher(tok, ids)
            bare.append(time.perf_counter() - t0)

        def run_wrapped(r):
            t0 = time.perf_counter()
            wt = WriteThrough(teacher, Path(tmp) / f"round{r}", "teacher00000", args.seq_len,
                              min(args.top_k, args.vocab))
            for tok, ids in batches:
                wt(tok, ids)
            wt.close()
            wrapped.append(time.perf_counter() - t0)

        for r in range(args.rounds):  # alternate which goes first
            if r % 2:
                run_wrapped(r)
                run_bare()
            else:
                run_bare()
                run_wrapped(r)
            log(f"round {r}: bare {bare[-1]:.2f}s, write-through {wrapped[-1]:.2f}s")
        meta = StoreMeta(teacher={"name": "bench", "config_hash": "-", "weights_hash": "-"}, tokenizer_hash="-",
                         data_fingerprint="-", seq_len=args.seq_len, vocab_size=args.vocab, top_p=0.95,
                         top_k=args.top_k, n_samples=n, shard_size=max(1, n // 4)).resolved()
        root = Path(tmp) / f"round{args.rounds - 1}"
        spool_bytes = sum(f.stat().st_size for f in (root / ".spool").glob("*.bin"))
        t0 = time.perf_counter()
        complete_store(root, meta, data, teacher, args.micro_batch, source="write_through",
                    fill_from="the teacher", log=log)
        complete = time.perf_counter() - t0
        assert verify_store(root) == []
    b, w = min(bare), min(wrapped)
    tokens = n * args.seq_len
    emit({"teacher": str(args.teacher) if args.teacher else f"{args.preset} (random weights)",
          "vocab_size": args.vocab, "seq_len": args.seq_len, "top_k": args.top_k, "tokens": tokens,
          "rounds": args.rounds, "bare_serve_s": round(b, 3), "write_through_serve_s": round(w, 3),
          "serve_tokens_per_s": round(tokens / b), "write_through_tokens_per_s": round(tokens / w),
          "serve_slowdown": round(w / b - 1, 4), "spool_bytes_per_token": round(spool_bytes / tokens, 1),
          "complete_s": round(complete, 3), "complete_vs_serve": round(complete / b, 4)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
