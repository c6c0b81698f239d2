"""The teacher signal of each micro-batch, wherever it comes from: one source class per `distill.mode`.

The trainer holds one :class:`SignalSource` and asks it for the signal of every micro-batch it runs,
training and evaluation alike: ``source.signal(sample_ids, input_ids)`` returns the teacher's sparse
logits of those samples ([B, T, k] SparseLogits) or None (LM only, or no stored logits for held-out
samples). The trainer never asks which source it holds. The sources:

| mode      | class             | where the logits come from                                          |
|-----------|-------------------|---------------------------------------------------------------------|
| none      | NoTeacher         | nowhere (LM-only pre-training)                                      |
| colocated | ColocatedTeacher  | a frozen teacher in this process (pd_dist.teacher.inference)               |
| online    | OnlineTeacher     | a teacher replica on its own ranks, prefetched over the bridge      |
| offline   | StoredLogits      | a logits store on disk, read ahead in DataLoader workers            |

Every source gives the run's signal (distill.signal: top-p-k logits, or the sampled or head-and-tail
log weights of pd_dist.core.logits), the same values whichever source it is.

Sources that can read ahead are given the rank's training plan (:class:`pd_dist.data.MicroBatchPlan`)
once; a request for the next planned micro-batch is served from what was read ahead, any other request
(evaluation) directly. Adding a way to feed the signal (a remote HTTP teacher, say) is one subclass
here, registered under a new `distill.mode` value; adding a kind of signal (what of the teacher's
distribution is kept) is one `SignalSpec` kind in pd_dist.core.logits, which every source then carries.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Optional, get_args

import numpy as np
import torch
import torch.nn as nn

from pd_dist.cluster.bridge import PeerError
from pd_dist.cluster.topology import Topology
from pd_dist.config import DistillMode, ExperimentConfig
from pd_dist.core.logits import SparseLogits
from pd_dist.core.runtime import model_dtype
from pd_dist.data import PackedDataset
from pd_dist.signals.online_client import PrefetchingTeacher, TeacherClient
from pd_dist.store import StoreError, open_for_training
from pd_dist.store.library import is_window_store, library_stores, open_source_store
from pd_dist.teacher.crosstok import CrossTokenizer, CrossTokenizerStore, alignment_figures
from pd_dist.teacher.document import context_teacher, teacher_held_out_loss
from pd_dist.teacher.inference import FrozenTeacher
from pd_dist.teacher.specs import signal_spec, wire_spec
from pd_dist.teacher.stores import SpoolReader
from pd_dist.teacher.val_loss import read_store_teacher_eval, read_teacher_val_loss


@dataclass
class SourceContext:
    """What a source may need to build itself. `teacher()` obtains the teacher model (loading it, or
    pre-training the default one); it is only called by sources that run a teacher in this process.
    `topo` is None outside a launched job (``pd-dist eval``): the colocated and offline sources need
    none, the online one does. `pair`: with distill.cross_tokenizer, the tokenizer pair (its teacher
    side, ``pair.align.teacher``, is the data prepared with the teacher's tokenizer); None otherwise."""
    cfg: ExperimentConfig
    topo: Optional[Topology]
    data: PackedDataset
    device: torch.device
    teacher: Callable[[], nn.Module]
    log: Callable[[str], None] = print
    pair: Optional[CrossTokenizer] = None


class SignalSource:
    """Teacher signal for micro-batches. Subclasses implement :meth:`_fetch`."""
    mode: ClassVar[str]
    has_signal: ClassVar[bool] = True  # False only for LM-only training (alpha is then 0)
    wait_metric: ClassVar[Optional[str]] = None  # perf scalar: share of the step spent obtaining signals

    def __init__(self):
        self._spent = 0.0
        self._plan: Sequence[np.ndarray] = ()
        self._cursor = 0
        # distill.cross_tokenizer (set by build_source): whether the signal is projected (map) or not (uld),
        # and the alignment figures [positions, aligned, mapped mass] since the last scalars() and in all
        self.cross_merge: Optional[bool] = None
        self.cross_summary: dict = {}
        self._align_step = np.zeros(3)
        self._align_run = np.zeros(3)

    @classmethod
    def build(cls, ctx: SourceContext) -> "SignalSource":
        return cls()

    def plan(self, micro_batches: Sequence[np.ndarray]) -> None:
        """The sample ids of every training micro-batch this rank will run, in order."""
        self._plan, self._cursor = micro_batches, 0

    def signal(self, ids: np.ndarray, input_ids: torch.Tensor) -> Optional[SparseLogits]:
        """The teacher's sparse logits for samples `ids` (tokens `input_ids` [B, T]), or None."""
        t0 = time.perf_counter()
        planned = self._cursor < len(self._plan) and np.array_equal(self._plan[self._cursor], ids)
        if planned:
            self._cursor += 1
        out = self._fetch(ids, input_ids, planned)
        self._spent += time.perf_counter() - t0
        if self.cross_merge is not None and planned:
            fig = alignment_figures(out, self.cross_merge)
            if fig is not None:
                self._align_step += fig
                self._align_run += fig
        return out

    def _fetch(self, ids: np.ndarray, input_ids: torch.Tensor, planned: bool) -> Optional[SparseLogits]:
        raise NotImplementedError

    @property
    def waited_s(self) -> float:
        """Seconds the caller has spent obtaining signals so far (what `wait_metric` reports)."""
        return self._spent

    def scalars(self) -> dict[str, float]:
        """Extra per-step scalars of this source (TensorBoard): across tokenizers, the fraction of the
        student positions trained since the last call that took a teacher signal (kd/aligned_frac) and
        the mean teacher mass they mapped (kd/mapped_mass, map only)."""
        if self.cross_merge is None or not self._align_step[0]:
            return {}
        n, hit, mass = self._align_step
        self._align_step = np.zeros(3)
        out = {"kd/aligned_frac": hit / n}
        if self.cross_merge and hit:
            out["kd/mapped_mass"] = mass / hit
        return out

    def summary(self) -> dict:
        """What summary.json records of this source: across tokenizers, the pair and the run's alignment
        figures; {} otherwise."""
        if self.cross_merge is None:
            return {}
        n, hit, mass = self._align_run
        return {"cross_tokenizer": dict(self.cross_summary, aligned_frac=hit / n if n else None,
                                        mapped_mass=mass / hit if hit and self.cross_merge else None)}

    def describe(self) -> Optional[str]:
        """One line for the console at start, or None."""
        return None

    def teacher_val_loss(self) -> Optional[float]:
        """The teacher's own loss on the run's held-out samples (the yardstick the student's val_loss is
        read against), where the source can know it; None otherwise."""
        return None

    def close(self, finished: bool = False) -> None:
        """Release what the source holds (and tell a remote teacher this student is done; ``finished``:
        the run trained to its last step, so a teacher writing through to a store may complete it)."""


SOURCES: dict[str, type[SignalSource]] = {}


def register(cls: type[SignalSource]) -> type[SignalSource]:
    if cls.mode not in get_args(DistillMode):
        raise TypeError(f"{cls.__name__}.mode {cls.mode!r} is not a distill.mode value "
                        f"({', '.join(get_args(DistillMode))}): add it to config.DistillMode")
    SOURCES[cls.mode] = cls
    return cls


def build_source(ctx: SourceContext) -> SignalSource:
    """The source for `ctx.cfg.distill.mode`."""
    source = SOURCES[ctx.cfg.distill.mode].build(ctx)
    how = ctx.cfg.distill.cross_tokenizer
    if how != "off" and source.has_signal:
        source.cross_merge = how == "map"
        source.cross_summary = dict(ctx.pair.summary) if ctx.pair is not None else {"how": how}
    return source


@register
class NoTeacher(SignalSource):
    """LM-only training: no teacher signal at all."""
    mode = "none"
    has_signal = False

    def _fetch(self, ids, input_ids, planned):
        return None


@register
class ColocatedTeacher(SignalSource):
    """A frozen teacher in the student's own process, run forward on each micro-batch as it trains."""
    mode = "colocated"
    wait_metric = "perf/teacher_time_frac"

    def __init__(self, teacher: FrozenTeacher, data: PackedDataset, micro_batch: int):
        super().__init__()
        self.teacher, self.data, self.micro_batch = teacher, data, micro_batch
        self._windows = 0  # tokens asked of a window-context teacher (a document teacher counts its own)

    @property
    def _reader(self):
        """The teacher that runs the forwards: a FrozenTeacher (window context) or a DocumentTeacher (also
        the one a cross-tokenizer teacher wraps)."""
        return getattr(self.teacher, "teacher", self.teacher)

    @property
    def teacher_shape(self):
        """The teacher's Shape (pd_dist.core.flops), for the compute figures."""
        from pd_dist.core.flops import shape_of_hf

        return shape_of_hf(getattr(self._reader, "frozen", self._reader).model.config)

    @property
    def teacher_context(self) -> int:
        return int(getattr(self._reader, "T", 0) or self.data.seq_len)

    @property
    def teacher_tokens(self) -> float:
        """Tokens the teacher has run forward in this process so far (document context: with the chunk
        prefixes it reads before each span)."""
        return float(getattr(self._reader, "read_tokens", self._windows))

    @classmethod
    def build(cls, ctx: SourceContext) -> "ColocatedTeacher":
        cfg = ctx.cfg
        tdata = ctx.pair.align.teacher if ctx.pair is not None else ctx.data  # what the teacher reads
        frozen = FrozenTeacher(ctx.teacher(), ctx.device, model_dtype(cfg.train.precision), signal_spec(cfg),
                               cfg.train.loss_chunk_size, document_eos=tdata.document_eos(cfg.data.document_mask))
        return cls(context_teacher(cfg, frozen, ctx.data, ctx.pair), ctx.data, cfg.train.micro_batch_size)

    def _fetch(self, ids, input_ids, planned):
        self._windows += input_ids.numel()
        return self.teacher(input_ids, ids)

    def scalars(self):
        out = super().scalars()
        if hasattr(self.teacher, "context_overhead"):
            out["teacher/context_overhead"] = self.teacher.context_overhead
        return out

    def teacher_val_loss(self):
        return teacher_held_out_loss(self.teacher, self.data, self.micro_batch)


@register
class OnlineTeacher(SignalSource):
    """A teacher replica on its own ranks: requests go `distill.prefetch` micro-batches ahead along the
    plan, so the teacher computes the next ones while this one trains; answers carry the sample ids."""
    mode = "online"
    wait_metric = "perf/teacher_wait_frac"

    def __init__(self, client: TeacherClient, data: PackedDataset, prefetch: int,
                 spools: Optional[Callable[[], SpoolReader]] = None, log: Callable[[str], None] = print):
        super().__init__()
        self.client, self.data, self.prefetch = client, data, prefetch
        self.ahead: Optional[PrefetchingTeacher] = None
        # topology.teacher_failover with distill.write_through: when every replica is lost, what the
        # teachers kept in their spools answers instead (opened then)
        self.open_spools, self.spools, self.log = spools, None, log

    @classmethod
    def build(cls, ctx: SourceContext) -> "OnlineTeacher":
        cfg, spools = ctx.cfg, None
        if cfg.topology.teacher_failover and cfg.distill.write_through:
            root, width = Path(cfg.distill.write_through), signal_spec(cfg).width(ctx.data.vocab_size)
            spools = lambda: SpoolReader(root, ctx.data.seq_len, width)  # noqa: E731
        return cls(TeacherClient(ctx.topo, wire_spec(cfg, ctx.data)), ctx.data, cfg.distill.prefetch, spools,
                   log=lambda line: print(line, flush=True))

    def teacher_val_loss(self):
        return read_teacher_val_loss(self.client.topo, self.client.peer)

    def _tokens(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.data.batch(ids))[:, :-1]

    def plan(self, micro_batches):
        super().plan(micro_batches)
        self.ahead = PrefetchingTeacher(self.client, iter(micro_batches), self._tokens, self.prefetch)

    def _fetch(self, ids, input_ids, planned):
        if self.spools is None:
            try:
                if planned:
                    return self.ahead.next(ids)
                return self.client.result(self.client.submit(ids, input_ids.cpu()))  # behind what is in flight
            except PeerError as e:
                if self.open_spools is None or self.client.replicas_alive() > 0:
                    raise
                self._to_spools(e)
        missing = self.spools.missing(ids)
        if missing:
            if not planned:
                return None  # held-out samples nobody asked a teacher for: evaluation without KD figures
            raise PeerError(f"{self.lost}; the write-through spools in {self.spools.root} lack samples "
                            f"{missing[:8]}") from None
        return self.spools.get_batch(ids)

    def _to_spools(self, err: PeerError) -> None:
        self.lost = str(err)
        self.spools = self.open_spools()
        self.client.abandon()
        self.log(f"pd-dist: {self.client.me_desc}: every teacher replica is lost ({self.lost.split(': ')[-1]}); "
                 f"continuing from the write-through spools in {self.spools.root} ({len(self.spools)} samples)")

    @property
    def waited_s(self) -> float:
        return self.client.wait_time  # blocked on answers, not the (asynchronous) sends

    def scalars(self):
        out = dict(super().scalars(), **{"comm/bytes_per_token": self.client.spec.bytes_per_token()})
        if self.client.failover:
            out["teacher/replicas_alive"] = self.client.replicas_alive()
        return out

    def close(self, finished: bool = False):
        self.client.close(finished)


class DocumentStoreWindows:
    """The run's training windows read from a library of document stores (format 3, pd_dist.store.library):
    sample i is source s's stream positions [start, start + seq_len) (PackedDataset.window), cut from s's
    store. Every sample, held-out ones included, has its signal."""

    def __init__(self, root: Path, stores: list, data: PackedDataset):
        self.root, self.stores, self.data = Path(root), stores, data
        self.meta = stores[0].meta

    @classmethod
    def open(cls, root, data: PackedDataset, signal, teacher_seq_len: Optional[int]) -> "DocumentStoreWindows":
        stores = [open_source_store(root, fingerprint=e["fingerprint"], label=e["label"],
                                    tokenizer_hash=data.meta["tokenizer_hash"], vocab_size=data.vocab_size,
                                    signal=signal, teacher_seq_len=teacher_seq_len) for e in data.sources]
        chunks = {s.meta.teacher_seq_len for s in stores}
        if len(chunks) > 1:
            raise StoreError(f"the document stores of {root} for this run's sources were read in chunks of "
                             f"{sorted(chunks)} tokens: one run reads one teacher_seq_len")
        return cls(root, stores, data)

    def __len__(self) -> int:
        return self.data.n_train + self.data.n_val

    def describe(self) -> str:
        m = self.meta
        return (f"offline logits: document stores in {self.root} ({len(self.stores)} source(s), teacher chunks of "
                f"{m.teacher_seq_len}, stored top-{m.top_p}-{m.top_k}, used top-{self.stores[0].default_top_p}-"
                f"{self.stores[0].default_top_k}, read at seq_len {self.data.seq_len})")

    def get_batch(self, ids) -> SparseLogits:
        """[B, seq_len, k] of the samples ``ids``, in their order."""
        L = self.data.seq_len
        parts = self.data.by_source(ids, lambda s, starts: self.stores[s].get_spans(starts, L))
        return SparseLogits.cat([p.reshape(1, *p.shape) for p in parts])


class _StoredMicroBatches(torch.utils.data.Dataset):
    """Item j: the stored logits of the plan's micro-batch j (read in DataLoader workers, each mapping
    the store itself, so decoding and re-truncation run ahead of the step that needs them)."""

    def __init__(self, plan: Sequence[np.ndarray], store):
        self.plan, self.store = plan, store

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, j: int) -> "StoredMicroBatch":
        ids = self.plan[j]
        return StoredMicroBatch(torch.from_numpy(ids), self.store.get_batch(ids))


@dataclass
class StoredMicroBatch:
    """What the offline loader hands over per planned micro-batch: the sample ids (int64 [B]) and their
    stored signal, lse included where the store keeps it (a DataLoader with batch_size=None passes it
    through as it is)."""
    ids: torch.Tensor
    teacher: SparseLogits


@register
class StoredLogits(SignalSource):
    """A teacher-logits store written earlier (launch/generate_logits.py), re-truncated on load to the
    run's top-p-k when it was stored wider; planned micro-batches are decoded ahead in workers."""
    mode = "offline"
    wait_metric = "perf/data_wait_frac"

    def __init__(self, store, data: PackedDataset, workers: int):
        super().__init__()
        self.store, self.data, self.workers = store, data, workers
        self._loader = None

    @classmethod
    def build(cls, ctx: SourceContext) -> "StoredLogits":
        d, data = ctx.cfg.distill, ctx.data
        if ctx.pair is not None:  # a library written from the data as the teacher tokenizes it
            windows = DocumentStoreWindows.open(d.store, ctx.pair.align.teacher, signal_spec(ctx.cfg),
                                                d.teacher_seq_len)
            return cls(CrossTokenizerStore(windows, ctx.pair), data, ctx.cfg.data.loader_workers)
        if d.teacher_context == "document":
            return cls(DocumentStoreWindows.open(d.store, data, signal_spec(ctx.cfg), d.teacher_seq_len), data,
                       ctx.cfg.data.loader_workers)
        if library_stores(d.store) and not is_window_store(d.store):
            raise StoreError(f"distill.store {d.store} is a library of document stores (format 3): set "
                             "distill.teacher_context document to train from it")
        store = open_for_training(d.store, data_fingerprint=data.fingerprint,
                                  tokenizer_hash=data.meta["tokenizer_hash"], seq_len=data.seq_len,
                                  vocab_size=data.vocab_size, signal=signal_spec(ctx.cfg),
                                  document_mask=ctx.cfg.data.document_mask)
        return cls(store, data, ctx.cfg.data.loader_workers)

    def describe(self):
        if isinstance(self.store, (DocumentStoreWindows, CrossTokenizerStore)):
            return self.store.describe()
        m = self.store.meta
        if m.signal:
            return f"offline signal: {self.store.root} ({len(self.store)} samples, {m.signal_spec.describe()})"
        return (f"offline logits: {self.store.root} ({len(self.store)} samples, stored top-{m.top_p}-"
                f"{m.top_k}, used top-{self.store.default_top_p}-{self.store.default_top_k})")

    def teacher_val_loss(self):
        if isinstance(self.store, CrossTokenizerStore):
            return None  # the teacher's loss per teacher token is not comparable with the student's
        return read_store_teacher_eval(self.store.root, self.data)

    def _fetch(self, ids, input_ids, planned):
        if planned:
            if self._loader is None:
                self._loader = iter(torch.utils.data.DataLoader(
                    _StoredMicroBatches(self._plan, self.store), batch_size=None, shuffle=False,
                    num_workers=self.workers, prefetch_factor=4 if self.workers else None))
            got = next(self._loader)
            if not np.array_equal(got.ids.numpy(), ids):
                raise RuntimeError(f"offline loader out of step with the training plan: it gave samples "
                                   f"{got.ids.tolist()[:8]}, the plan asks for {list(ids)[:8]}")
            return got.teacher
        if int(np.max(ids)) >= len(self.store):
            return None  # the store holds no logits for these (held-out) samples
        return self.store.get_batch(ids)

    def close(self, finished: bool = False):
        self._loader = None
