"""Offline teacher-logits store: top-p-k teacher logits per training sample, written once by a teacher
pass and read every step by distillation runs (random access, memory-mapped, checksummed, compressed).

Layout and fidelity: see :mod:`pd_dist.store.format` (files) and :mod:`pd_dist.store.codec` (sample
blocks and the quantization bound). Typical use::

    meta = StoreMeta.for_signal(SignalSpec.of("top_p_k", top_p=0.95, top_k=50), teacher={...},
                                tokenizer_hash=..., data_fingerprint=..., seq_len=256, vocab_size=V,
                                n_samples=N, shard_size=256)
    for i in range(meta.n_shards):
        if shard_done(root, meta, i):
            continue                      # resumable generation
        with ShardWriter(root, meta, i) as w:
            for sid in range(*shard_ranges(N, 256)[i]):
                logits = teacher(...)                       # [seq_len, V]
                w.add(sid, truncate(logits, 0.95, 50), torch.logsumexp(logits.float(), -1))
            w.finish()
    write_manifest(root, meta)

    store = open_for_training(root, data_fingerprint=..., tokenizer_hash=..., seq_len=256,
                              vocab_size=V, signal=SignalSpec.of("top_p_k", top_p=0.95, top_k=20))
                                                    # re-truncates 50 -> 20 on load
    sparse, lse = store.get_batch(ids)
"""
from pd_dist.store.codec import mass_tolerance, tv_bound, value_tolerance
from pd_dist.store.format import FORMAT_VERSION, StoreError, StoreMeta, shard_ranges
from pd_dist.store.reader import (LogitsStore, StoreCheckError, StoreFaults, open_for_training, store_faults, store_info,
                     verify_store)
from pd_dist.store.writer import ShardWriter, shard_done, write_manifest

__all__ = ["FORMAT_VERSION", "LogitsStore", "ShardWriter", "StoreCheckError", "StoreError", "StoreFaults",
           "StoreMeta", "mass_tolerance", "open_for_training", "shard_done", "shard_ranges", "store_faults",
           "store_info", "tv_bound", "value_tolerance", "verify_store", "write_manifest"]
