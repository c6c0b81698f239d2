"""What this run's teacher produces, in each of its forms: the signal (a SignalSpec: distill.signal and
its parameters), the wire (a WireSpec, what a teacher replica and its students agree on), and a store
(a StoreMeta, what generation, write-through and dump_logits write)."""
from __future__ import annotations

from pathlib import Path

import torch

from pd_dist.cluster.bridge import WireSpec
from pd_dist.config import ExperimentConfig
from pd_dist.core.logits import SignalSpec
from pd_dist.data import PackedDataset
from pd_dist.models import ModelConfig, model_identity
from pd_dist.store import StoreMeta
from pd_dist.store.codec import default_encoding


def signal_spec(cfg: ExperimentConfig) -> SignalSpec:
    """The run's teacher signal (distill.signal and its parameters; draws keyed by train.seed)."""
    return cfg.distill.signal_spec(cfg.train.seed)


def wire_spec(cfg: ExperimentConfig, data: PackedDataset) -> WireSpec:
    """What a teacher replica and its students agree on (checked by the bridge's handshake): besides
    shapes and truncation, the signal's kind and the parameters of its draws, so a student and a teacher
    that disagree on the signal fail the handshake, and the dataset's sample count, which bounds the
    sample ids a teacher serves."""
    d = cfg.distill
    dtype = d.wire_dtype if d.wire_dtype != "auto" else ("bf16" if torch.cuda.is_available() else "fp32")
    return WireSpec(vocab_size=data.vocab_size, tokenizer_hash=data.meta["tokenizer_hash"],
                    seq_len=data.seq_len, signal=signal_spec(cfg), value_dtype=dtype,
                    micro_batch=cfg.train.micro_batch_size, n_samples=data.n_train + data.n_val,
                    document_mask=cfg.data.document_mask,
                    document_chunk=(d.teacher_seq_len or data.seq_len) if d.teacher_context == "document" else 0,
                    cross_tokenizer="" if d.cross_tokenizer == "off" else d.cross_tokenizer)


def stored_signal(cfg: ExperimentConfig) -> SignalSpec:
    """The signal a store written by a run of `cfg` holds: a drawn signal as the run draws it (it cannot
    be narrowed later); top-p-k at generate.top_p/top_k (each defaulting to distill's)."""
    sig = signal_spec(cfg)
    if sig.drawn:
        return sig
    top_p, top_k = cfg.stored_truncation()
    return SignalSpec.of(sig.kind, top_p=top_p, top_k=top_k)


def store_meta(cfg: ExperimentConfig, data: PackedDataset, teacher: dict) -> StoreMeta:
    """The store a run of `cfg` writes (generation, or dump_logits): the run's signal; for top-p-k at
    truncation generate.top_p/top_k (default: distill's); the training samples plus the held-out ones
    when generate.include_val; data.document_mask (the teacher's forward depends on it)."""
    g = cfg.generate
    return StoreMeta.for_signal(stored_signal(cfg), teacher=teacher, tokenizer_hash=data.meta["tokenizer_hash"],
                                data_fingerprint=data.fingerprint, seq_len=data.seq_len, vocab_size=data.vocab_size,
                                n_samples=data.n_train + (data.n_val if g.include_val else 0),
                                shard_size=g.shard_size,
                                encoding={} if g.encoding == "auto" else default_encoding(g.encoding),
                                document_mask=cfg.data.document_mask).resolved()


def teacher_identity(cfg: ExperimentConfig, weights: ModelConfig) -> dict:
    """The teacher a store records: its weights (``weights.path``, hashed: read once per caller) and name."""
    return model_identity(Path(weights.path), cfg.teacher.path or f"{cfg.teacher.preset} "
                          f"(pre-trained by pd-dist, {cfg.teacher.pretrain_steps} steps)")


def teacher_store_meta(cfg: ExperimentConfig, data: PackedDataset, weights: ModelConfig) -> StoreMeta:
    """The store this run's teacher writes (the generation job, or distill.write_through): the run's
    signal, identified by the teacher's weights (teacher_identity)."""
    return store_meta(cfg, data, teacher_identity(cfg, weights))


def document_store_meta(cfg: ExperimentConfig, data: PackedDataset, source: int, teacher: dict,
                        teacher_seq_len: int) -> StoreMeta:
    """The document store (format 3) of ``data``'s source ``source``: its whole token stream in records of
    generate.record_tokens positions, read in chunks of ``teacher_seq_len``, the run's stored signal."""
    g, e = cfg.generate, data.sources[source]
    n, record = int(data.streams[source].n_tokens), g.record_tokens
    return StoreMeta.for_signal(
        stored_signal(cfg), teacher=teacher, tokenizer_hash=data.meta["tokenizer_hash"],
        data_fingerprint=e["fingerprint"], seq_len=record, vocab_size=data.vocab_size, n_samples=-(-n // record),
        shard_size=g.shard_size, encoding={} if g.encoding == "auto" else default_encoding(g.encoding),
        context="document", teacher_seq_len=teacher_seq_len, n_tokens=n, source=e["label"]).resolved()
