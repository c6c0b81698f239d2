"""Offline teacher-logits generation: every rank is a teacher rank writing its own shards of the store.

Shards are assigned round-robin (shard i to rank i mod world) and each is a fixed range of sample
ids run in fixed micro-batches, so its bytes do not depend on which rank wrote it or when. A shard is
written under a temporary name and renamed when complete; rerunning the same command after an
interruption skips complete shards and redoes the rest, and the manifest (written last, by rank 0)
makes the store byte-identical to an uninterrupted run's. Over a finished store, a rerun checks every
shard as `pd-dist store verify` does (each rank its own shards) and rewrites exactly the damaged ones
and the manifest, saying which in one line; a sound store is left as it is.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pd_dist.config import ExperimentConfig
from pd_dist.data import PackedDataset
from pd_dist.teacher.inference import FrozenTeacher, held_out_batches
from pd_dist.core.monitor import fmt_duration
from pd_dist.core.runtime import device, model_dtype
from pd_dist.models import ModelConfig, build_model
from pd_dist.teacher.specs import teacher_store_meta
from pd_dist.teacher.val_loss import write_store_teacher_eval
from pd_dist.teacher.stores import complete_store, describe_repair, store_state
from pd_dist.store import StoreFaults, StoreMeta, shard_ranges
from pd_dist.store.format import MANIFEST
from pd_dist.store.reader import _load_manifest, other_inputs
from pd_dist.store.format import StoreError
from pd_dist.store.library import is_window_store, library_metas, source_store_dir
from pd_dist.core.logits import SparseLogits
from pd_dist.teacher.document import DocumentTeacher, teacher_held_out_loss
from pd_dist.teacher.specs import document_store_meta, stored_signal, teacher_identity
from pd_dist.cluster.topology import Topology


class Progress:
    """Per-rank progress files in the store directory; rank 0 prints the sum over ranks with an ETA."""

    def __init__(self, root: Path, rank: int, world: int, total_tokens: int, log, every_s: float = 10.0):
        self.dir = root / ".progress"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world, self.total, self.log, self.every_s = rank, world, total_tokens, log, every_s
        self.done = 0
        self.t0 = self.last = time.perf_counter()
        self.base = None

    def add(self, tokens: int) -> None:
        self.done += tokens
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        tmp = self.dir / f".rank{self.rank}.tmp"
        tmp.write_text(json.dumps({"done": self.done}))
        os.replace(tmp, self.dir / f"rank{self.rank}.json")
        if self.rank == 0:
            total_done = 0
            for r in range(self.world):
                try:
                    total_done += json.loads((self.dir / f"rank{r}.json").read_text())["done"]
                except (OSError, ValueError, KeyError):
                    pass
            rate = total_done / max(now - self.t0, 1e-9)
            self.log(f"[generate] {total_done:,}/{self.total:,} tokens this run | {rate:,.0f} tok/s over "
                     f"{self.world} rank(s) | ETA {fmt_duration((self.total - total_done) / max(rate, 1e-9))}")


def run_generation(cfg: ExperimentConfig, topo: Topology, data: PackedDataset, weights: ModelConfig,
                   log=print) -> Path:
    """Write (or repair) distill.store with the teacher at ``weights`` over every rank of ``topo``: each
    rank writes the damaged or missing shards of its own, rank 0 the manifest and the teacher's held-out
    loss. Called by the orchestration (pd_dist.run.generate_store) with ready weights."""
    if cfg.distill.teacher_context == "document":
        return run_document_generation(cfg, topo, data, weights, log)
    root = Path(cfg.distill.store)
    say = log if topo.dp_rank == 0 else (lambda *_: None)
    meta = teacher_store_meta(cfg, data, weights)
    n_shards = meta.n_shards
    mine = [i for i in range(n_shards) if i % topo.dp_size == topo.dp_rank]
    finished = os.path.lexists(root / MANIFEST)  # a finished store: what is rewritten is a repair
    damage, manifest_bad = _shards_to_write(root, meta, mine, topo)
    todo_all = set(damage.shards)
    if not todo_all and not manifest_bad:
        say(f"[generate] {root} is complete already")
        return root
    todo = [i for i in mine if i in todo_all]
    model = build_model(weights, data.vocab_size, seed=cfg.train.seed)
    teacher = FrozenTeacher(model, device(), model_dtype(cfg.train.precision), meta.signal_spec,
                            cfg.train.loss_chunk_size, keep_lse=True, document_eos=data.document_eos(meta.document_mask))
    micro = cfg.generate.micro_batch_size or cfg.train.micro_batch_size
    ranges = shard_ranges(meta.n_samples, meta.shard_size)
    total = sum((ranges[i][1] - ranges[i][0]) * meta.seq_len for i in todo_all)
    found = f", {len(todo_all)} damaged" if finished and todo_all else ""
    say(f"[generate] {meta.n_samples} samples x {meta.seq_len} tokens, {meta.signal_spec.describe()}, "
        f"{n_shards} shards ({n_shards - len(todo_all)} complete already{found}) over {topo.dp_size} rank(s) "
        f"-> {root}")
    progress = Progress(root, topo.dp_rank, topo.dp_size, total, say)

    t0 = time.perf_counter()
    complete_store(root, meta, data, teacher, micro, source="generate", fill_from="the teacher", log=say,
                   rank=topo.dp_rank, ranks=topo.dp_size, barrier=topo.barrier, shards=todo_all,
                   compress=cfg.generate.compress, on_tokens=progress.add, info=False)
    el = time.perf_counter() - t0
    if todo:
        toks = progress.done
        print(f"[generate rank {topo.dp_rank}] wrote {len(todo)} shard(s), {toks:,} tokens in {el:.1f}s "
              f"({toks / max(el, 1e-9):,.0f} tok/s)", flush=True)
    if topo.dp_rank == 0:
        # The teacher's own held-out loss, which runs trained from this store report beside theirs.
        write_store_teacher_eval(root, data, teacher.val_loss(held_out_batches(data, micro)))
        if finished:
            say(f"[generate] repaired {root}: rewrote {describe_repair(damage)}")
        else:
            say(f"[generate] store complete: {root} (pd-dist store info {root})")
        closing_fidelity([root], data, cfg.generate.fidelity_positions, say, weights.path)
    topo.barrier()
    return root


def closing_fidelity(roots: list[Path], data: PackedDataset, positions: int, say, teacher: Optional[str]) -> None:
    """The generation job's closing line per store: the stored signal against the teacher's full
    distribution on ``positions`` sampled positions (teacher.fidelity.store_fidelity, with the job's own
    ``teacher`` directory), beside its bytes per token; a line saying why where it cannot be measured."""
    if positions <= 0:
        return
    from pd_dist.teacher.fidelity import store_fidelity

    for root in roots:
        try:
            store_fidelity(root, data, positions, log=lambda line: say(f"[generate] {line}"), teacher=teacher)
        except StoreError as e:
            say(f"[generate] fidelity not measured: {e}")


def _shards_to_write(root: Path, meta: StoreMeta, mine: list[int], topo: Topology) -> tuple[StoreFaults, bool]:
    """What no rank finds sound, agreed by every rank: each rank checks its own shards in full
    (store_state: the check verify makes); returns this rank's StoreFaults with ``shards`` and ``missing``
    made those of all ranks (``shards``: the shards to write; the fault texts are this rank's), and
    whether the manifest must be rewritten. Raises StoreError on every rank for a store of other inputs
    or stray shard files."""
    faults = store_state(root, meta, shards=mine)
    n = meta.n_shards
    flags = torch.zeros(n + 1, dtype=torch.int64)
    for i in faults.shards:  # 1: missing, 2: damaged, 3: intact but written for other inputs
        flags[i] = 1 if i in faults.missing else 3 if i in faults.foreign else 2
    flags[n] = len(faults.manifest)
    if topo.backend == "nccl":
        flags = flags.to(device())
    flags = topo.all_reduce_sum(flags).cpu()
    if (flags[:n] == 3).any() and not faults.manifest_ours:
        raise other_inputs(root)
    faults.shards = {i: faults.shards.get(i, []) for i in range(n) if flags[i]}
    faults.missing = {i for i in faults.shards if flags[i] == 1}
    return faults, bool(flags[n])


class SourceRecords:
    """One source's token stream as the records of a document store (``record`` positions each): what
    write_shard reads a record's tokens from (the last record is padded with its last token)."""

    def __init__(self, data: PackedDataset, source: int, record: int):
        self.stream, self.record = data.streams[source], record

    def batch(self, ids) -> np.ndarray:
        out = np.empty((len(ids), self.record + 1), np.int64)
        for j, r in enumerate(np.asarray(ids).tolist()):
            a = r * self.record
            n = min(self.record + 1, self.stream.n_tokens - a)
            out[j, :n] = self.stream.read(a, n)
            out[j, n:] = out[j, n - 1]
        return out


def document_fill(teacher: DocumentTeacher, source: int, record: int, n_tokens: int):
    """write_shard's fill for a document store: the signal of records ``ids`` (stream positions
    [r * record, (r + 1) * record)); the last record's positions past the stream repeat its last one.
    Consecutive records are asked for as one span, so a chunk they share is run once (only the first
    record's chunk prefix is extra)."""
    def fill(tokens: torch.Tensor, ids: np.ndarray) -> SparseLogits:
        ids = [int(r) for r in ids]
        runs, parts = [], []
        for r in ids:
            if runs and r == runs[-1][1]:
                runs[-1][1] = r + 1
            else:
                runs.append([r, r + 1])
        for lo, hi in runs:
            a, b = lo * record, min(hi * record, n_tokens)
            got = teacher.spans(source, [a], b - a)[0]
            if b - a < (hi - lo) * record:  # the stream's last record: pad with its last position
                pad = torch.arange((hi - lo) * record).clamp_max(b - a - 1)
                got = got[pad]
            parts.append(got.reshape(hi - lo, record))
        return SparseLogits.cat(parts)
    return fill


def library_chunk(lib: Path):
    """The chunk (teacher_seq_len) the stores already in the library ``lib`` were read in, so a run adding
    sources at another data.seq_len keeps the library one definition; None for an empty library."""
    chunks = {m.teacher_seq_len for _, m in library_metas(lib) if m}
    if len(chunks) > 1:
        raise StoreError(f"distill.store {lib} holds document stores read in chunks of {sorted(chunks)}: set "
                         "distill.teacher_seq_len")
    return chunks.pop() if chunks else None


def checked_library_chunk(lib: Path, key: str, chunk: Optional[int] = None, asks: str = "") -> Optional[int]:
    """The chunk the stores already in the library ``lib`` (config key ``key``) were read in
    (library_chunk; None for an empty library), after refusing, in one line, a window store where the
    library belongs and, when ``chunk`` is given, a library read in another chunk (``asks``: what asks
    for ``chunk``, for the message)."""
    if is_window_store(lib):
        raise StoreError(f"{key} {lib} holds a window store: name another directory for the document stores "
                         "(distill.teacher_context document)")
    have = library_chunk(lib)
    if have is not None and chunk is not None and have != chunk:
        raise StoreError(f"{key} {lib}: its document stores were read in chunks of {have} tokens, {asks}: a "
                         "library holds one definition; name another directory")
    return have


def source_store(cfg: ExperimentConfig, data: PackedDataset, source: int, teacher: dict, teacher_seq_len: int,
                 lib: Path) -> tuple[Path, StoreMeta]:
    """(directory, meta) of the library ``lib``'s store for ``data``'s source ``source``: the meta a run of
    ``cfg`` writes (document_store_meta) or, for a store already there, that store's own (how it is laid
    out, record and shard sizes, does not change what it holds, so it is kept as it is). StoreError, in
    one line, for a store there written with other settings (teacher, signal, chunk)."""
    e = data.sources[source]
    meta = document_store_meta(cfg, data, source, teacher, teacher_seq_len)
    root = source_store_dir(lib, e["fingerprint"])
    if (root / MANIFEST).is_file():
        _, have = _load_manifest(root)
        layout = {"seq_len", "n_samples", "shard_size", "source"}
        diff = [k for k, v in meta.to_dict().items() if have.to_dict().get(k) != v and k not in layout]
        if diff:
            raise StoreError(f"{root}: the document store of source {e['label']} was written with other "
                             f"{', '.join(diff)}: remove it or name another distill.store")
        meta = have
    return root, meta


def run_document_generation(cfg: ExperimentConfig, topo: Topology, data: PackedDataset, weights: ModelConfig,
                            log=print) -> Path:
    """Complete the library distill.store with a document store (format 3) for each of the data's sources
    that it lacks (a source's store already there, from any run over the same tokens, is checked and kept);
    every rank writes its share of each source's shards. Rank 0 leaves the teacher's held-out loss (read
    in document context) in the library for runs over this data."""
    lib = Path(cfg.distill.store)
    say = log if topo.dp_rank == 0 else (lambda *_: None)
    want = cfg.distill.teacher_seq_len
    have = checked_library_chunk(lib, "distill.store", want, f"the run asks distill.teacher_seq_len={want}")
    T = want or have or data.seq_len  # unset: the library's own chunk, else data.seq_len
    micro = cfg.generate.micro_batch_size or cfg.train.micro_batch_size
    ident = teacher_identity(cfg, weights)
    g = cfg.generate
    loaded: list[DocumentTeacher] = []

    def teacher() -> DocumentTeacher:  # built once, when a store needs writing or for the held-out loss
        if not loaded:
            model = build_model(weights, data.vocab_size, seed=cfg.train.seed)
            loaded.append(DocumentTeacher(FrozenTeacher(model, device(), model_dtype(cfg.train.precision),
                                                        stored_signal(cfg), cfg.train.loss_chunk_size, keep_lse=True),
                                          data, T, micro))
        return loaded[0]

    written = []  # the stores this job wrote or repaired (the closing fidelity lines)
    for s, e in enumerate(data.sources):
        root, meta = source_store(cfg, data, s, ident, T, lib)
        N, R = meta.n_tokens, meta.seq_len  # a kept store's own record size
        mine = [i for i in range(meta.n_shards) if i % topo.dp_size == topo.dp_rank]
        damage, manifest_bad = _shards_to_write(root, meta, mine, topo)
        if not damage.shards and not manifest_bad:
            say(f"[generate] source {e['label']}: {root} is complete already (kept)")
            continue
        total = sum(min(N, hi * R) - lo * R for lo, hi in (shard_ranges(meta.n_samples, meta.shard_size)[i]
                                                           for i in damage.shards))
        say(f"[generate] source {e['label']}: {N:,} tokens in {data.document_index(s).n_docs:,} documents, "
            f"read in chunks of {T}, {meta.n_shards} shard(s) of {meta.shard_size} records of {R} tokens "
            f"({meta.n_shards - len(damage.shards)} complete already) over {topo.dp_size} rank(s) -> {root}")
        progress = Progress(root, topo.dp_rank, topo.dp_size, total, say)
        t0 = time.perf_counter()
        complete_store(root, meta, SourceRecords(data, s, R), document_fill(teacher(), s, R, N), micro,
                       source="generate", fill_from="the teacher", log=say, rank=topo.dp_rank, ranks=topo.dp_size,
                       barrier=topo.barrier, shards=set(damage.shards), compress=g.compress,
                       on_tokens=progress.add, info=False)
        el = time.perf_counter() - t0
        written.append(root)
        say(f"[generate] source {e['label']} complete: {root} ({progress.done:,} tokens in {el:.1f}s on rank 0, "
            f"teacher context overhead {teacher().context_overhead:.3f}x)")
    if topo.dp_rank == 0:
        write_store_teacher_eval(lib, data, teacher_held_out_loss(teacher(), data, micro))
        say(f"[generate] document stores complete: {lib} ({len(data.sources)} source(s))")
        closing_fidelity(written, data, cfg.generate.fidelity_positions, say, weights.path)
    topo.barrier()
    return lib
