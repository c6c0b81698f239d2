"""Data preparation of local files, packing, fingerprint and the sampler."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pd_dist.core.configlib import build
from pd_dist.data import DataConfig, DataError, GlobalBatchSampler, PackedDataset, embedded_corpus_files, prepare_data

WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex jolly bakers".split()


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(30, 80)))) for _ in range(n)]


def _cfg(files, **kw):
    base = {"source": "files", "files": [str(f) for f in files], "vocab_size": 300, "seq_len": 16,
            "val_samples": 2}
    base.update(kw)
    return build(DataConfig, base, "data")


@pytest.fixture
def corpus(tmp_path):
    docs = _docs(60)
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[:30])))
    txt = tmp_path / "b.txt"
    txt.write_text(docs[30])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs[31:]}), tmp_path / "c.parquet")
    return docs, [jl, txt, tmp_path / "c.parquet"]


def test_prepare_packs_every_token_once(tmp_path, corpus):
    docs, files = corpus
    out = prepare_data(_cfg(files), tmp_path / "prep", log=lambda *_: None)
    ds = PackedDataset(out)
    from pd_dist.data import load_tokenizer

    tok = load_tokenizer(ds.tokenizer_dir)
    eos = tok.eos_token_id
    # Independent re-tokenization: document by document, each followed by EOS, in file order.
    expect = []
    for d in docs:
        expect += tok(d, add_special_tokens=False)["input_ids"] + [eos]
    assert np.array_equal(ds.stream(), np.asarray(expect))
    L = ds.seq_len
    assert ds.n_train + ds.n_val == (len(expect) - 1) // L
    # Windows overlap by one token: targets of sample i are inputs shifted by one, and consecutive
    # samples tile the stream, so every token after the first is a target exactly once.
    s0, s1 = ds.sample(0), ds.sample(1)
    assert len(s0) == L + 1 and s0[-1] == s1[0]
    assert np.array_equal(np.concatenate([ds.sample(i)[1:] for i in range(3)]), np.asarray(expect[1:3 * L + 1]))
    assert tok.decode(expect[:20]).split()[0] == docs[0].split()[0]


def test_prepared_data_is_reused_and_fingerprinted(tmp_path, corpus):
    _, files = corpus
    out = prepare_data(_cfg(files), tmp_path / "p", log=lambda *_: None)
    fp = PackedDataset(out).fingerprint
    shard = next(out.glob("src-*/shard-00000.bin"))
    mtime = shard.stat().st_mtime_ns
    prepare_data(_cfg(files), tmp_path / "p", log=lambda *_: None)
    assert shard.stat().st_mtime_ns == mtime, "identical inputs must reuse the preparation"
    again = prepare_data(_cfg(files), tmp_path / "q", log=lambda *_: None)
    assert PackedDataset(again).fingerprint == fp, "preparation must be deterministic"
    other = prepare_data(_cfg(files, seq_len=8), tmp_path / "p", log=lambda *_: None)
    assert PackedDataset(other).fingerprint != fp


def test_local_tokenizer_path_is_used(tmp_path, corpus):
    _, files = corpus
    first = prepare_data(_cfg(files), tmp_path / "a", log=lambda *_: None)
    second = prepare_data(_cfg(files, tokenizer=str(first / "tokenizer"), vocab_size=999), tmp_path / "b",
                          log=lambda *_: None)
    a, b = PackedDataset(first), PackedDataset(second)
    assert a.meta["tokenizer_hash"] == b.meta["tokenizer_hash"]
    assert np.array_equal(a.stream(), b.stream())


def test_bad_inputs_are_reported(tmp_path, corpus):
    _, files = corpus
    with pytest.raises(DataError, match="nope.jsonl"):
        prepare_data(_cfg([tmp_path / "nope.jsonl"]), tmp_path / "x", log=lambda *_: None)
    with pytest.raises(DataError, match="a.jsonl, line 1: no field 'body'"):
        prepare_data(_cfg(files[:1], text_field="body"), tmp_path / "y", log=lambda *_: None)
    with pytest.raises(ValueError, match="data.val_samples"):
        prepare_data(_cfg(files[1:2], val_samples=10_000), tmp_path / "z", log=lambda *_: None)


def test_truncated_token_file_is_refused(tmp_path, corpus):
    _, files = corpus
    out = prepare_data(_cfg(files), tmp_path / "p", log=lambda *_: None)
    shard = next(out.glob("src-*/shard-00000.bin"))
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(ValueError, match="prepare the data again"):
        PackedDataset(out)


def test_embedded_corpus_is_the_stdlib():
    files = embedded_corpus_files()
    names = {p.name for p in files}
    assert "topics.py" in names and "argparse.py" in names and len(files) > 200
    assert not any("site-packages" in str(p) for p in files)


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_sampler_shards_the_same_global_batch(dp):
    s = GlobalBatchSampler(n_samples=37, global_batch=8, seed=3)
    for step in range(12):
        parts = [s.micro_batches(step, r, dp, micro_batch=2) for r in range(dp)]
        joined = np.concatenate([np.concatenate(p) for p in parts])
        assert np.array_equal(joined, s.global_batch_ids(step))
        assert all(len(mb) == 2 for p in parts for mb in p)


def test_sampler_is_an_epoch_permutation_and_deterministic():
    s = GlobalBatchSampler(n_samples=40, global_batch=8, seed=5)
    first_epoch = np.concatenate([s.global_batch_ids(k) for k in range(5)])
    assert sorted(first_epoch.tolist()) == list(range(40))
    second = np.concatenate([s.global_batch_ids(k) for k in range(5, 10)])
    assert sorted(second.tolist()) == list(range(40)) and not np.array_equal(first_epoch, second)
    # Position is a function of the step alone: a fresh sampler (a resumed run) agrees.
    assert np.array_equal(GlobalBatchSampler(40, 8, 5).global_batch_ids(7), s.global_batch_ids(7))
    # Epoch boundary inside a batch (37 samples, batch 8).
    t = GlobalBatchSampler(37, 8, 1)
    ids = np.concatenate([t.global_batch_ids(k) for k in range(9)])  # 72 samples: epoch 0 and part of 1
    assert sorted(ids[:37].tolist()) == list(range(37))
    assert len(set(ids[37:].tolist())) == 72 - 37


def test_sampler_state_checks():
    s = GlobalBatchSampler(40, 8, 5)
    st = s.state(3)
    assert st["samples_consumed"] == 24
    s.check_state(st)
    with pytest.raises(ValueError, match="global_batch=8"):
        GlobalBatchSampler(40, 16, 5).check_state(st)
