"""Signals spooled to disk as they are produced, then turned into an ordinary teacher-logits store.

Two producers use it:

* `distill.dump_logits` (:class:`LogitsDump`, a step hook of the trainer: pd_dist.train.hooks): an
  LM-only run writes its own truncated logits as it trains, so a teacher's pre-training pays for the
  logits (the paper's second source of offline logits). These are the logits of a *moving* model: each
  sample's entry comes from the model as it was at the step that trained on it (the last such step when
  a sample is seen more than once). Samples the run never reached are filled at the end from the final
  model.
* `distill.write_through` (:class:`WriteThrough`): an online teacher replica keeps every signal it
  serves, so later runs (another student, a sweep point, a rerun) train offline from the store with no
  teacher cost. The teacher is frozen and deterministic, so a sample served more than once (by a
  resumed run, or to evaluation) has the same signal each time; it is written once. Samples nobody
  asked for are filled at the end by the same teacher. In document context (distill.teacher_context
  document) the spooled windows are cut into the records of each source's document store
  (:class:`DocumentRecords`), and the records no spooled window covers are filled by the teacher.

Each rank appends fixed-size records (sample id, step, indices, values, lse) to its own spool file
(``<store>/.spool/<name>.bin``; a record cut short by a crash is dropped when the file is reopened, so a
resumed run appends whole records). At the end the ranks build the shards round-robin from all spools,
each under a temporary name renamed when complete, and the first rank writes the manifest: the store is
the same format with the same checks and tools as a generated one.
"""
from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from pd_dist.cluster.topology import Topology
from pd_dist.config import ExperimentConfig
from pd_dist.core.logits import SparseLogits
from pd_dist.core.runtime import device
from pd_dist.data import PackedDataset
from pd_dist.models import ModelConfig, build_model, model_identity
from pd_dist.store import (ShardWriter, StoreError, StoreFaults, StoreMeta, shard_done, shard_ranges, store_faults,
                           write_manifest)
from pd_dist.store.format import shard_name
from pd_dist.store.reader import other_inputs
from pd_dist.teacher.inference import FrozenTeacher, sparse_logits_from_hidden
from pd_dist.teacher.specs import store_meta, stored_signal

SPOOL_DIR = ".spool"


def record_dtype(seq_len: int, k: int) -> np.dtype:
    return np.dtype([("sample", "<i8"), ("step", "<i8"), ("idx", "<i4", (seq_len, k)),
                     ("val", "<f4", (seq_len, k)), ("lse", "<f4", (seq_len,))])


class Spool:
    """One rank's append-only file of (sample id, step, signal) records of width ``width``."""

    def __init__(self, root: Path, name: str, seq_len: int, width: int):
        self.dir = Path(root) / SPOOL_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = record_dtype(seq_len, width)
        self.path = self.dir / f"{name}.bin"
        size = self.path.stat().st_size if self.path.exists() else 0
        if size % self.dtype.itemsize:  # the last record was cut short by a crash: drop it
            with open(self.path, "r+b") as fh:
                fh.truncate(size - size % self.dtype.itemsize)
        self.fh = open(self.path, "ab")

    def add(self, step: int, ids: np.ndarray, sig: SparseLogits) -> None:
        """The signals of samples ``ids`` ([B, T, width]; lse kept when present, else 0)."""
        rec = np.zeros(len(ids), self.dtype)
        rec["sample"] = ids
        rec["step"] = step
        rec["idx"] = sig.indices.to("cpu", torch.int32).numpy()
        rec["val"] = sig.values.to("cpu", torch.float32).numpy()
        if sig.lse is not None:
            rec["lse"] = sig.lse.to("cpu", torch.float32).numpy()
        self.fh.write(rec.tobytes())

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


class LogitsDump:
    """distill.dump_logits as a step hook of the trainer (the interface of pd_dist.train.hooks.StepHook):
    this rank's spool of the run's own logits, and the store made of all ranks' spools at the end.

    ``head_output`` (run inside the student's forward, without grad) truncates the student's logits to
    the store's signal (teacher.specs.stored_signal: the stored top-p-k) chunk by chunk with their
    logsumexp; ``on_micro_batch`` appends them to ``<distill.store>/.spool/rank<dp rank>.bin`` under the
    step ``on_step`` announced (the spool is opened at the first step, so a run refused before training
    leaves no file). ``close(finished)`` closes the spool and, when the run finished (its student
    exported to ``export_dir``), builds the store over the data-parallel ranks (:func:`finish_dump`,
    collective: every rank's trainer closes its hook)."""

    def __init__(self, cfg: ExperimentConfig, topo: Topology, data: PackedDataset, export_dir: Path,
                 log: Callable[[str], None] = print):
        self.cfg, self.topo, self.data, self.export_dir, self.log = cfg, topo, data, Path(export_dir), log
        self.signal = stored_signal(cfg)
        if self.signal.drawn:  # the config refuses it; a drawn signal would need the sample ids here
            raise ValueError(f"distill.dump_logits keeps a top-p-k signal, not {self.signal.describe()}")
        self.spool: Optional[Spool] = None
        self.step = 0

    def head_output(self, hidden: torch.Tensor, head_weight: torch.Tensor) -> SparseLogits:
        """The student's own logits as they are now, truncated (one more chunked head pass)."""
        return sparse_logits_from_hidden(hidden, head_weight, self.signal, self.cfg.train.loss_chunk_size,
                                         keep_lse=True)

    def on_step(self, step: int) -> None:
        if self.spool is None:
            self.spool = Spool(Path(self.cfg.distill.store), f"rank{self.topo.dp_rank:05d}", self.data.seq_len,
                               self.signal.width(self.data.vocab_size))
        self.step = step

    def on_micro_batch(self, ids: np.ndarray, output) -> None:
        self.spool.add(self.step, ids, output.head_output)

    def close(self, finished: bool) -> None:
        if self.spool is not None:
            self.spool.close()
        if finished:
            (Path(self.cfg.distill.store) / SPOOL_DIR).mkdir(parents=True, exist_ok=True)
            finish_dump(self.cfg, self.topo, self.data, self.export_dir, log=self.log)


class WriteThrough:
    """A teacher's answer function that also spools what it answers (distill.write_through).

    ``fn(tokens, sample_ids)`` is the teacher; ``wrapped(tokens, ids)`` returns its answer unchanged and
    queues it for a background thread that appends it to this replica's spool, so the disk write
    overlaps the next forward. Padding forwards (ids None) are not kept."""

    def __init__(self, fn: Callable[..., SparseLogits], root: Path, name: str, seq_len: int, width: int):
        self.fn = fn
        self.spool = Spool(root, name, seq_len, width)
        self.kept = 0
        self._q: queue.Queue = queue.Queue(maxsize=8)
        self._failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._write, name="pd-write-through", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._failure:
                continue
            try:
                ids, sig = item
                self.spool.add(0, ids, sig.to("cpu"))
                self.kept += len(ids)
            except BaseException as e:  # re-raised on the serving thread
                self._failure.append(e)

    def __call__(self, tokens: torch.Tensor, ids=None) -> SparseLogits:
        if self._failure:
            raise RuntimeError(f"write-through to {self.spool.path} failed: {self._failure[0]}") from self._failure[0]
        out = self.fn(tokens, ids)
        if ids is not None:
            self._q.put((np.asarray(ids, np.int64).copy(), out))
        return out

    def close(self) -> None:
        """Write what is queued and close the spool (raises what the writer hit)."""
        self._q.put(None)
        self._thread.join()
        self.spool.close()
        if self._failure:
            raise RuntimeError(f"write-through to {self.spool.path} failed: {self._failure[0]}") from self._failure[0]


def latest_records(spool_dir: Path, dtype: np.dtype) -> dict[int, tuple[np.memmap, int]]:
    """sample id -> (spool, record index) of the latest step that produced it."""
    best: dict[int, tuple[int, int, np.memmap, int]] = {}
    for f in sorted(spool_dir.glob("*.bin")):
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


class DocumentRecords:
    """The records of one source's document store (``record`` positions each, ``n_tokens`` in its
    stream) that spooled training windows cover, assembled from those windows: what a write-through
    teacher in document context kept. In document context a position's signal is the same in every
    window that holds it, so a record is whole when the windows over all its positions were served.

    ``latest``: sample id -> (spool, record index), as latest_records gives for the served windows
    (``data.seq_len`` positions each). ``spooled()``: record id -> (self, record id), what
    complete_store and write_shard read (``self[r]``: that record's idx/val/lse; the stream's last
    record repeats its last position past the stream, as generation writes it)."""

    def __init__(self, latest: dict, data: PackedDataset, source: int, record: int, n_tokens: int):
        self.L, self.R, self.N = data.seq_len, int(record), int(n_tokens)
        self.windows: dict[int, tuple[np.memmap, int]] = {}  # window index in the stream -> spool record
        n = data.n_train + data.n_val
        for sid, where in latest.items():
            if 0 <= sid < n:
                s, start = data.window(sid)
                if s == source:
                    self.windows[start // self.L] = where

    def _span(self, r: int) -> tuple[int, int]:
        return r * self.R, min((r + 1) * self.R, self.N)

    def covered(self) -> list[int]:
        """The records every position of which a spooled window holds."""
        out = []
        for r in range(-(-self.N // self.R)):
            a, b = self._span(r)
            if all(w in self.windows for w in range(a // self.L, (b - 1) // self.L + 1)):
                out.append(r)
        return out

    def spooled(self) -> dict[int, tuple["DocumentRecords", int]]:
        return {r: (self, r) for r in self.covered()}

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        a, b = self._span(int(r))
        parts = {k: [] for k in ("idx", "val", "lse")}
        for w in range(a // self.L, (b - 1) // self.L + 1):
            mm, j = self.windows[w]
            lo, hi = max(a, w * self.L) - w * self.L, min(b, (w + 1) * self.L) - w * self.L
            for k in parts:
                parts[k].append(np.asarray(mm[j][k][lo:hi]))
        out = {k: np.concatenate(v) for k, v in parts.items()}
        if b - a < self.R:  # the stream's last record: its last position repeated, as generation pads it
            pad = np.minimum(np.arange(self.R), b - a - 1)
            out = {k: v[pad] for k, v in out.items()}
        return out


def write_shard(root: Path, meta: StoreMeta, index: int, data: PackedDataset,
                fill: Callable[[torch.Tensor, np.ndarray], SparseLogits], micro_batch: int,
                spooled: Optional[dict] = None, compress: bool = True,
                on_tokens: Callable[[int], None] = lambda n: None) -> int:
    """Write shard ``index`` of the store: each sample's signal from ``spooled`` (sample id -> (spool,
    record), see latest_records) where a spool holds it, else from ``fill(tokens, sample_ids)``, run in
    fixed micro-batches over the samples no spool holds (so a shard with no spools has the same
    micro-batches, and bytes, whoever writes it). Returns how many samples were filled.

    Encoding and writing run on a background thread (zstd and most of numpy release the GIL), so on a
    GPU the next forward overlaps the previous micro-batch's encoding."""
    spooled = spooled or {}
    first, end = shard_ranges(meta.n_samples, meta.shard_size)[index]
    missing = [sid for sid in range(first, end) if sid not in spooled]
    jobs: queue.Queue = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    with ShardWriter(root, meta, index, compress=compress) as w:
        cursor = [first]  # the next sample id to write: spooled ones are written as the cursor passes them

        def spooled_until(stop: int) -> None:
            while cursor[0] < stop:
                mm, j = spooled[cursor[0]]
                rec = mm[j]
                w.add(cursor[0], SparseLogits(torch.from_numpy(np.array(rec["idx"], np.int64)),
                                              torch.from_numpy(np.array(rec["val"])),
                                              torch.from_numpy(np.array(rec["lse"]))))
                cursor[0] += 1
                on_tokens(meta.seq_len)

        def writer():
            while True:
                item = jobs.get()
                if item is None:
                    return
                if failure:
                    continue  # drain: the producer stops at its next put
                ids, sparse = item
                try:
                    for j, sid in enumerate(ids):
                        spooled_until(int(sid))
                        w.add(int(sid), sparse[j])
                        cursor[0] = int(sid) + 1
                    on_tokens(len(ids) * meta.seq_len)
                except BaseException as e:  # re-raised on the producer's thread
                    failure.append(e)

        thread = threading.Thread(target=writer, name=f"pd-store-writer-{index}", daemon=True)
        thread.start()
        try:
            for b in range(0, len(missing), micro_batch):
                if failure:
                    break
                ids = np.asarray(missing[b:b + micro_batch], dtype=np.int64)
                jobs.put((ids, fill(torch.from_numpy(data.batch(ids))[:, :-1], ids).to("cpu")))
        finally:
            jobs.put(None)
            thread.join()
        if failure:
            raise failure[0]
        spooled_until(end)
        w.finish()
    return len(missing)


def complete_store(root: Path, meta: StoreMeta, data: PackedDataset,
                   fill: Callable[[torch.Tensor, np.ndarray], SparseLogits], micro_batch: int, source: str,
                   fill_from: str, log=print, rank: int = 0, ranks: int = 1,
                   barrier: Callable[[], None] = lambda: None, shards: Optional[set[int]] = None,
                   compress: bool = True, on_tokens: Callable[[int], None] = lambda n: None,
                   info: bool = True, spooled: Optional[dict] = None) -> None:
    """The one way a store is completed, by generation, write-through and dump alike: this rank writes
    its shards (round-robin over ``ranks`` ranks) of ``shards`` (default: those not complete yet), each
    from the spools under ``root`` and, for the samples no spool holds, from ``fill``; then, after
    ``barrier``, rank 0 writes the manifest, ``<source>_info.json`` (``info``) and clears what the run
    left behind (spools, temporary shards, progress files). ``spooled``: the records already produced
    (record id -> (records, index), as latest_records gives), instead of reading ``root``'s own spools
    (a document store completed from spooled windows: DocumentRecords)."""
    root = Path(root)
    spool_dir = root / SPOOL_DIR
    if spooled is not None:
        latest = spooled
    else:
        latest = latest_records(spool_dir, record_dtype(meta.seq_len, meta.width)) if spool_dir.is_dir() else {}
    todo = [i for i in range(rank, meta.n_shards, ranks)
            if (i in shards if shards is not None else not shard_done(root, meta, i))]
    filled = sum(write_shard(root, meta, i, data, fill, micro_batch, latest, compress, on_tokens) for i in todo)
    if info:
        print(f"[{source} rank {rank}] {filled} sample(s) not in the spools were filled from {fill_from}",
              flush=True)
    barrier()
    if rank == 0:
        write_manifest(root, meta)
        if info:
            kept = sum(1 for s in latest if s < meta.n_samples)
            (root / f"{source}_info.json").write_text(json.dumps(
                {"source": source, "samples_from_spools": kept, "samples_filled": meta.n_samples - kept,
                 "filled_from": fill_from}, indent=1, sort_keys=True) + "\n")
            log(f"[{source}] store complete: {root} ({kept} samples from the spools, "
                f"{meta.n_samples - kept} filled from {fill_from})")
        for d, pattern in ((spool_dir, "*"), (root / "shards", ".*.tmp"), (root / ".progress", "*")):
            if d.is_dir():
                for f in d.glob(pattern):
                    f.unlink()
                if d != root / "shards":
                    d.rmdir()
    barrier()


class SpoolReader:
    """The signals in a store directory's spools, by sample id (what a write-through teacher kept before
    the store was completed): the students' last resort when every teacher replica is lost."""

    def __init__(self, root: Path, seq_len: int, width: int):
        self.root = Path(root)
        self.latest = latest_records(self.root / SPOOL_DIR, record_dtype(seq_len, width))

    def __len__(self) -> int:
        return len(self.latest)

    def missing(self, ids) -> list[int]:
        return [int(i) for i in ids if int(i) not in self.latest]

    def get_batch(self, ids) -> SparseLogits:
        """[B, seq_len, width] signals of ``ids`` (KeyError for one no spool holds)."""
        recs = [self.latest[int(i)] for i in ids]
        idx = np.stack([np.asarray(mm[j]["idx"], np.int64) for mm, j in recs])
        val = np.stack([np.asarray(mm[j]["val"]) for mm, j in recs])
        return SparseLogits(torch.from_numpy(idx), torch.from_numpy(val))


def store_state(root: Path, meta: StoreMeta, shards=None) -> StoreFaults:
    """What a teacher run finds in its store directory ``root`` for ``meta``: store_faults with the run's
    meta (the check verify makes), so ``.shards`` are the shards it (re)writes (missing or damaged) and
    ``.manifest`` says whether the manifest is missing or damaged; ``.sound``: nothing to do.

    A manifest that does not parse or lacks fields is damaged, not a refusal: the shards are then checked
    one by one for ``meta``. Raises StoreError (one line) when the directory holds a store for other
    inputs (an intact manifest says so, or, with no intact manifest of this store, an intact shard does),
    or shard files that no shard index of the store names (write_manifest would refuse them); and
    StoreCheckError when a file is there but cannot be read. ``shards``: check only these in full (see
    store_faults; the caller then decides the refusals for the shards of other inputs itself)."""
    faults = store_faults(root, meta, shards)
    refuse_strays(faults)
    if shards is None and faults.foreign and not faults.manifest_ours:
        raise other_inputs(root)
    return faults


def refuse_strays(faults: StoreFaults) -> None:
    """StoreError (one line) for shard files that are no shard of the store."""
    if faults.extra:
        more = f" (and {len(faults.extra) - 1} more)" if len(faults.extra) > 1 else ""
        raise StoreError(f"{faults.extra[0]}{more}: remove it, then rerun")


def store_is_complete(root: Path, meta: StoreMeta) -> bool:
    """True when ``root`` holds a finished, sound store for ``meta`` (store_state: every shard and the
    manifest pass the check verify makes); StoreError when it holds one for other inputs (which a run
    must not overwrite)."""
    return store_state(Path(root), meta).sound


def describe_repair(faults: StoreFaults) -> str:
    """What a run rewrites of a finished store that store_state found damaged, for one line: the damaged
    shards by name (missing ones marked) and the manifest."""
    names = [Path(shard_name(i)).name + (" (missing)" if i in faults.missing else "")
             for i in sorted(faults.shards)]
    if len(names) > 8:
        names = names[:8] + [f"and {len(names) - 8} more"]
    if not names:
        return "the damaged manifest (its shards are sound)"
    return f"{len(faults.shards)} damaged shard(s) ({', '.join(names)}) and the manifest"


def finish_dump(cfg: ExperimentConfig, topo: Topology, data: PackedDataset, export_dir: Path,
                log: Callable[[str], None] = print) -> None:
    """distill.dump_logits: turn the run's spools into a store; samples never trained on come from the
    exported final model."""
    final = FrozenTeacher(build_model(ModelConfig(path=str(export_dir)), data.vocab_size, seed=0), device(),
                          torch.float32, stored_signal(cfg), cfg.train.loss_chunk_size, keep_lse=True,
                          document_eos=data.document_eos(cfg.data.document_mask))
    ident = model_identity(export_dir, f"{cfg.output_dir} during training (moving model, "
                                       f"{cfg.train.steps} steps; dump_logits)")
    complete_store(Path(cfg.distill.store), store_meta(cfg, data, ident), data, final,
                cfg.generate.micro_batch_size or cfg.train.micro_batch_size, source="dump",
                fill_from="the final model", log=log, rank=topo.dp_rank, ranks=topo.dp_size, barrier=topo.barrier)
