"""`distill.dump_logits`: an LM-only run writes its own truncated logits into an offline store as it
trains, so a teacher's pre-training pays for the logits (the paper's second source of offline logits).

These are the logits of a *moving* model: each sample's entry comes from the model as it was at the
step that trained on it (the last such step when a sample is seen more than once). Samples the run
never reached are filled at the end from the final model, so the store covers the whole dataset and
is an ordinary store (same format, checks and tools).

During training each rank appends fixed-size records (sample id, step, indices, values, lse) to its
own spool file; at the end the ranks build the shards round-robin from all spools and rank 0 writes
the manifest.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .data import PackedDataset
from .logits import SparseLogits
from .store import ShardWriter, StoreMeta, shard_done, shard_ranges, write_manifest
from .topology import Topology


def record_dtype(seq_len: int, k: int) -> np.dtype:
    return np.dtype([("sample", "<i8"), ("step", "<i8"), ("idx", "<i4", (seq_len, k)),
                     ("val", "<f4", (seq_len, k)), ("lse", "<f4", (seq_len,))])


class LogitsDump:
    """Per-rank spool of a training run's own logits, truncated to top-p-k (``top_p_k``)."""

    def __init__(self, root: Path, rank: int, seq_len: int, top_p: float, k: int):
        self.dir = Path(root) / ".dump"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.top_p_k = (top_p, k)
        self.dtype = record_dtype(seq_len, k)
        self.path = self.dir / f"rank{rank:05d}.bin"
        self.fh = open(self.path, "ab")

    def add(self, step: int, ids: np.ndarray, own: SparseLogits) -> None:
        """The logits of samples `ids` as trained at `step` ([B, T, k], carrying lse)."""
        rec = np.zeros(len(ids), self.dtype)
        rec["sample"] = ids
        rec["step"] = step
        rec["idx"] = own.indices.to("cpu", torch.int32).numpy()
        rec["val"] = own.values.to("cpu", torch.float32).numpy()
        rec["lse"] = own.lse.to("cpu", torch.float32).numpy()
        self.fh.write(rec.tobytes())

    def at_step(self, step: int) -> "_StepSink":
        """What the student's forward hands its own logits to during `step`."""
        return _StepSink(self, step)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


class _StepSink:
    def __init__(self, dump: LogitsDump, step: int):
        self.dump, self.step, self.top_p_k = dump, step, dump.top_p_k

    def __call__(self, ids: np.ndarray, own: SparseLogits) -> None:
        self.dump.add(self.step, ids, own)


def _latest_records(spool_dir: Path, dtype: np.dtype) -> dict[int, tuple[np.memmap, int]]:
    """sample id -> (spool, record index) of the latest step that trained on it."""
    best: dict[int, tuple[int, int, np.memmap, int]] = {}
    for f in sorted(spool_dir.glob("rank*.bin")):
        n = f.stat().st_size // dtype.itemsize  # a record cut by a crash is ignored
        if n == 0:
            continue
        mm = np.memmap(f, dtype=dtype, mode="r", shape=(n,))
        samples, steps = np.asarray(mm["sample"]), np.asarray(mm["step"])
        for j in range(n):  # later records of equal step (a resumed run redoing it) win
            key = (int(steps[j]), j)
            cur = best.get(int(samples[j]))
            if cur is None or key >= cur[:2]:
                best[int(samples[j])] = (key[0], key[1], mm, j)
    return {s: (v[2], v[3]) for s, v in best.items()}


def build_store(root: Path, meta: StoreMeta, topo: Topology, data: PackedDataset,
                final_logits: Callable[[torch.Tensor], SparseLogits],
                micro_batch: int, log=print) -> None:
    """Shards from the spools (round-robin over ranks), the rest from the final model; then manifest."""
    root = Path(root)
    dtype = record_dtype(meta.seq_len, meta.width)
    latest = _latest_records(root / ".dump", dtype)
    ranges = shard_ranges(meta.n_samples, meta.shard_size)
    filled = 0
    for i in range(topo.dp_rank, len(ranges), topo.dp_size):
        if shard_done(root, meta, i):
            continue
        first, end = ranges[i]
        missing = [s for s in range(first, end) if s not in latest]
        computed = {}
        for b in range(0, len(missing), micro_batch):
            ids = np.asarray(missing[b:b + micro_batch])
            sparse = final_logits(torch.from_numpy(data.batch(ids))[:, :-1]).to("cpu")
            for j, sid in enumerate(ids):
                computed[int(sid)] = sparse[j]
        filled += len(missing)
        with ShardWriter(root, meta, i) as w:
            for sid in range(first, end):
                if sid in computed:
                    sparse = computed[sid]
                else:
                    mm, j = latest[sid]
                    rec = mm[j]
                    sparse = SparseLogits(torch.from_numpy(np.array(rec["idx"], np.int64)),
                                          torch.from_numpy(np.array(rec["val"])),
                                          torch.from_numpy(np.array(rec["lse"])))
                w.add(sid, sparse)
            w.finish()
    print(f"[dump rank {topo.dp_rank}] {filled} sample(s) never trained on were filled from the final model",
          flush=True)
    topo.barrier()
    if topo.dp_rank == 0:
        write_manifest(root, meta)
        info = {"source": "dump_logits", "samples_from_training": len(latest),
                "samples_from_final_model": meta.n_samples - len(latest)}
        (root / "dump_info.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        for f in (root / ".dump").glob("*"):
            f.unlink()
        (root / ".dump").rmdir()
        log(f"[dump] store complete: {root} ({len(latest)} samples from training, "
            f"{meta.n_samples - len(latest)} from the final model)")
    topo.barrier()
