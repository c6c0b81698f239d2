"""Reading prepared data: samples as windows over each source's token stream, and the blended sampler.

Sample i of a source is the window ``stream[i*seq_len : i*seq_len + seq_len + 1]`` of its token stream
(every shard's documents, each ending in EOS, back to back): inputs are its first seq_len tokens and
targets its last seq_len, so every token of the stream is predicted exactly once. A source's last
``n_val`` samples are held out. The dataset numbers samples flat: first every source's training
samples (source by source), then every source's held-out ones, so one source alone is numbered as its
windows are.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from pd_dist.data.documents import DataError
from pd_dist.data.prepare import META_VERSION

if TYPE_CHECKING:
    from pd_dist.data.spans import DocumentIndex

OPEN_SHARDS = 64  # memory maps kept open per source (each holds a file descriptor)


class TokenStream:
    """One source's shards as one token stream, memory-mapped lazily (no copy, bounded open files)."""

    def __init__(self, prefixes: list[str], shard_tokens: list[int], dtypes: list[str], label: str):
        self.prefixes, self.label = prefixes, label
        self.dtypes = [np.dtype(d) for d in dtypes]
        self.starts = np.concatenate([[0], np.cumsum(shard_tokens, dtype=np.int64)])
        self.n_tokens = int(self.starts[-1])
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        for p, n, dt in zip(prefixes, shard_tokens, self.dtypes):
            try:
                size = os.path.getsize(p + ".bin")
            except OSError:
                raise DataError(f"{p}.bin: missing ({label}): prepare the data again") from None
            if size != n * dt.itemsize:
                raise DataError(f"{p}.bin holds {size // dt.itemsize} tokens, the data's meta.json says {n} "
                                f"({label}): the file changed since it was prepared; prepare the data again")

    def _shard(self, k: int) -> np.ndarray:
        m = self._open.get(k)
        if m is None:
            n = int(self.starts[k + 1] - self.starts[k])
            m = np.memmap(self.prefixes[k] + ".bin", dtype=self.dtypes[k], mode="r", shape=(n,)) if n else \
                np.zeros(0, self.dtypes[k])
            self._open[k] = m
            if len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(k)
        return m

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the stream as int64, across shard boundaries."""
        out = np.empty(n, np.int64)
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        got = 0
        while got < n:
            a = start + got - int(self.starts[k])
            piece = self._shard(k)[a:a + n - got]
            out[got:got + len(piece)] = piece
            got += len(piece)
            k += 1
        return out


class PackedDataset:
    """Read-only view of a prepared directory (see :mod:`.prepare`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
        except FileNotFoundError:
            raise DataError(f"{self.path}/meta.json: no prepared data here (an interrupted preparation never "
                            "writes it): prepare the data") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}/meta.json: unreadable ({e}): prepare the data again") from None
        if self.meta.get("version") != META_VERSION:
            raise DataError(f"{self.path}: prepared by an older pd-dist (format {self.meta.get('version')}, now "
                            f"{META_VERSION}): prepare the data again")
        m = self.meta
        self.seq_len = m["seq_len"]
        self.n_train, self.n_val = m["n_train"], m["n_val"]
        self.fingerprint = m["fingerprint"]
        self.vocab_size = m["vocab_size"]
        self.sources = m["sources"]
        self.streams = []
        for e in self.sources:
            base = self.path / e["dir"] if e["dir"] else None
            prefixes = [str(base / p) for p in e["prefixes"]] if base else e["prefixes"]
            dtypes = e.get("dtypes") or [e["dtype"]] * len(prefixes)
            self.streams.append(TokenStream(prefixes, e["shard_tokens"], dtypes, e["label"]))
        self._train_off = np.concatenate([[0], np.cumsum([e["n_train"] for e in self.sources])])
        self._val_off = np.concatenate([[0], np.cumsum([e["n_val"] for e in self.sources])])

    def __getstate__(self):  # DataLoader workers reopen the memory maps instead of copying them
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def document_eos(self, document_mask: bool) -> Optional[int]:
        """With data.document_mask, the EOS id that ends every document of the token streams (the
        tokenizer's): where the model's attention is cut within a window. None when the mask is off."""
        if not document_mask:
            return None
        from pd_dist.data.prepare import load_tokenizer

        eos = load_tokenizer(self.tokenizer_dir).eos_token_id
        if eos is None:
            raise DataError(f"{self.tokenizer_dir}: the tokenizer has no EOS token, so its documents have no "
                            "boundaries to mask at: set data.document_mask false")
        return int(eos)

    def locate(self, i: int) -> tuple[int, int]:
        """(source, window) of flat sample id ``i``."""
        if 0 <= i < self.n_train:
            s = int(np.searchsorted(self._train_off, i, side="right")) - 1
            return s, i - int(self._train_off[s])
        j = i - self.n_train
        if not 0 <= j < self.n_val:
            raise IndexError(f"sample {i} outside the dataset's {self.n_train + self.n_val}")
        s = int(np.searchsorted(self._val_off, j, side="right")) - 1
        return s, self.sources[s]["n_train"] + j - int(self._val_off[s])

    def window(self, i: int) -> tuple[int, int]:
        """(source, first stream position) of flat sample id ``i``: its inputs are that source's stream
        positions [start, start + seq_len)."""
        s, w = self.locate(int(i))
        return s, w * self.seq_len

    def by_source(self, ids, fn) -> list:
        """``fn(source, starts)`` once per source of the samples ``ids`` (``starts``: their first stream
        positions, PackedDataset.window), its per-start results put back in the samples' order."""
        where = [self.window(int(i)) for i in np.asarray(ids).reshape(-1)]
        out: list = [None] * len(where)
        for s in sorted({w[0] for w in where}):
            js = [j for j, w in enumerate(where) if w[0] == s]
            got = fn(s, [where[j][1] for j in js])
            for n, j in enumerate(js):
                out[j] = got[n]
        return out

    def document_index(self, source: int) -> "DocumentIndex":
        """The documents of a source's token stream (read from its shards' .idx once, then kept)."""
        from pd_dist.data.spans import DocumentIndex

        cache = self.__dict__.setdefault("_doc_index", {})
        if source not in cache:
            st = self.streams[source]
            cache[source] = DocumentIndex(st.prefixes, [int(n) for n in np.diff(st.starts)])
        return cache[source]

    def sample(self, i: int) -> np.ndarray:
        """Sample i (0 <= i < n_train + n_val): seq_len + 1 tokens, int64."""
        s, w = self.locate(int(i))
        return self.streams[s].read(w * self.seq_len, self.seq_len + 1)

    def batch(self, ids) -> np.ndarray:
        return np.stack([self.sample(int(i)) for i in ids])

    def val_ids(self) -> np.ndarray:
        return np.arange(self.n_train, self.n_train + self.n_val)

    def stream(self, source: int = 0) -> np.ndarray:
        """A source's whole token stream (for tests and tools; it is read into memory)."""
        st = self.streams[source]
        return st.read(0, st.n_tokens)

    def sampler(self, global_batch: int, seed: int) -> "GlobalBatchSampler":
        """The run's data order over this dataset's training samples (its blend, if any)."""
        blend = [(e["n_train"], e["blend_count"]) for e in self.sources] if len(self.sources) > 1 else None
        return GlobalBatchSampler(self.n_train, global_batch, seed, blend=blend)

    def describe_blend(self) -> str:
        return ", ".join(f"{e['label']} {100 * e['share']:.2f}%" for e in self.sources)


def blend_schedule(counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The source of each position of one blend period (``sum(counts)`` positions), and how many of
    that source's samples precede it in the period.

    Each position goes to the source furthest behind its share, counts[s] * (q + 1) / period - taken_s
    (ties to the lower index): every source stays within one sample of its exact share at every
    prefix, so any window of consecutive samples holds each source's share to within 2 (measured
    for the shipped tests: within 1 for windows of 1,000), and each period ends with exact counts."""
    counts_a = np.asarray(counts, np.int64)
    period = int(counts_a.sum())
    taken = np.zeros(len(counts_a), np.int64)
    src = np.empty(period, np.int32)
    rank = np.empty(period, np.int64)
    for q in range(period):
        s = int(np.argmax(counts_a * (q + 1) - taken * period))
        src[q], rank[q] = s, taken[s]
        taken[s] += 1
    assert np.array_equal(taken, counts_a)
    return src, rank


class GlobalBatchSampler:
    """Deterministic global batches over the training samples, independent of the data-parallel size.

    The global batch for optimizer step s is positions [s*B, (s+1)*B) of the run's sample order, so a
    run on one rank and on N ranks see the same samples per step, and the position is just the step.
    Rank r of dp takes the r-th contiguous share of the global batch, cut into micro-batches.

    One source: position p is sample perm_e[p mod n] of the epoch-seeded permutation (e = p // n). A
    blend (``blend``: (training samples, count per period) per source): position p belongs to source
    ``schedule[p mod period]``; that source's j-th draw is its own epoch-seeded permutation's, so a
    small source repeats in its own epochs while the others continue, and the mix is a function of
    the position alone (any dp size, any resume).
    """

    def __init__(self, n_samples: int, global_batch: int, seed: int,
                 blend: Optional[list[tuple[int, int]]] = None):
        if n_samples < 1:
            raise ValueError("no training samples")
        self.n, self.global_batch, self.seed = n_samples, global_batch, seed
        self.blend = [tuple(map(int, b)) for b in blend] if blend else None
        if self.blend:
            if sum(b[0] for b in self.blend) != n_samples or any(b[0] < 1 for b in self.blend):
                raise ValueError(f"blend {self.blend} does not cover {n_samples} training samples")
            self._src, self._rank = blend_schedule([b[1] for b in self.blend])
            self._period = len(self._src)
            self._offsets = np.concatenate([[0], np.cumsum([b[0] for b in self.blend])])
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def _permutation(self, source: int, n: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            # Source 0 keeps the single-source order: a corpus alone and first in a blend agree.
            entropy = [self.seed, epoch] if source == 0 else [self.seed, epoch, source]
            cached = (epoch, np.random.default_rng(entropy).permutation(n))
            self._perms[source] = cached
        return cached[1]

    def position_ids(self, start: int, count: int) -> np.ndarray:
        """The sample ids at positions [start, start + count) of the run's order."""
        out = np.empty(count, dtype=np.int64)
        for j in range(count):
            pos = start + j
            if self.blend is None:
                out[j] = self._permutation(0, self.n, pos // self.n)[pos % self.n]
                continue
            k, q = divmod(pos, self._period)
            s = int(self._src[q])
            n_s, c_s = self.blend[s]
            draw = k * c_s + int(self._rank[q])
            out[j] = self._offsets[s] + self._permutation(s, n_s, draw // n_s)[draw % n_s]
        return out

    def mix(self, positions: int) -> list[int]:
        """How many of positions [0, positions) each source holds (closed form over the period)."""
        if self.blend is None:
            return [int(positions)]
        k, r = divmod(int(positions), self._period)
        head = np.bincount(self._src[:r], minlength=len(self.blend))
        return [k * b[1] + int(h) for b, h in zip(self.blend, head)]

    def source_of(self, ids: np.ndarray) -> np.ndarray:
        """The blend source of each training sample id (all 0 for one source)."""
        if self.blend is None:
            return np.zeros(len(ids), np.int64)
        return np.searchsorted(self._offsets, ids, side="right") - 1

    def global_batch_ids(self, step: int) -> np.ndarray:
        return self.position_ids(step * self.global_batch, self.global_batch)

    def micro_batches(self, step: int, dp_rank: int, dp_size: int, micro_batch: int) -> list[np.ndarray]:
        ids = self.global_batch_ids(step)
        share = self.global_batch // dp_size
        mine = ids[dp_rank * share:(dp_rank + 1) * share]
        return [mine[i:i + micro_batch] for i in range(0, share, micro_batch)]

    def state(self, step: int) -> dict:
        out = {"samples_consumed": step * self.global_batch, "global_batch": self.global_batch,
               "seed": self.seed, "n_samples": self.n}
        if self.blend:
            out["blend"] = [list(b) for b in self.blend]
        return out

    def check_state(self, state: dict) -> None:
        mine = self.state(0)
        for k in ("global_batch", "seed", "n_samples", "blend"):
            if state.get(k) != mine.get(k):
                raise ValueError(f"checkpoint data position was saved with {k}={state.get(k)}, this run "
                                 f"has {mine.get(k)}: resuming would not continue the same data order")


class MicroBatchPlan(Sequence):
    """Every training micro-batch one data-parallel rank runs from ``start_step`` to ``stop_step``, in
    order, as an indexable sequence computed on demand (nothing materialized): item j is the sample
    ids of the j-th micro-batch. What prefetching teacher-signal sources read ahead along."""

    def __init__(self, sampler: GlobalBatchSampler, start_step: int, stop_step: int, dp_rank: int,
                 dp_size: int, micro_batch: int):
        if sampler.global_batch % (micro_batch * dp_size):
            raise ValueError(f"global batch {sampler.global_batch} is not a multiple of micro_batch x dp = "
                             f"{micro_batch} x {dp_size}")
        self.sampler, self.start, self.stop = sampler, start_step, max(start_step, stop_step)
        self.dp_rank, self.dp_size, self.micro = dp_rank, dp_size, micro_batch
        self.per_step = sampler.global_batch // (micro_batch * dp_size)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.per_step

    def __getitem__(self, j: int) -> np.ndarray:
        if not 0 <= j < len(self):
            raise IndexError(f"micro-batch {j} outside the plan of {len(self)}")
        step, m = divmod(j, self.per_step)
        return self.sampler.micro_batches(self.start + step, self.dp_rank, self.dp_size, self.micro)[m]
