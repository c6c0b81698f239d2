"""The offline teacher-logits store (pd_dist.store): fidelity, access, integrity, compatibility, workers."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pd_dist.core.logits import SignalSpec, SparseLogits, target_probs, truncate
from pd_dist.store import (FORMAT_VERSION, LogitsStore, ShardWriter, StoreError, StoreMeta, open_for_training,
                           shard_done, shard_ranges, store_info, tv_bound, value_tolerance, verify_store,
                           write_manifest)
from pd_dist.store.codec import decode_block, default_encoding, encode_block, mass_tolerance
from pd_dist.store.format import HEADER, TABLE_DTYPE, parse_shard

T, V, K, N, SHARD = 32, 640, 24, 10, 4  # 3 shards: 4, 4, 2 samples
TEACHER = {"name": "tiny", "config_hash": "c0ffee", "weights_hash": "beef"}


def make_meta(**kw) -> StoreMeta:
    d = dict(teacher=dict(TEACHER), tokenizer_hash="tok1", data_fingerprint="fp1", seq_len=T, vocab_size=V,
             top_p=0.95, top_k=K, n_samples=N, shard_size=SHARD)
    d.update(kw)
    return StoreMeta(**d)


def full_logits(kind: str, n: int, seed: int, tokens: int = T, vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":  # randn * 3: wide distributions, top-k bound
        return torch.randn(n, tokens, vocab, generator=g) * 3
    if kind == "peaked":  # a trained LM: a few tokens carry most of the mass
        x = torch.randn(n, tokens, vocab, generator=g) * 2
        hot = torch.randint(0, vocab, (n, tokens, 3), generator=g)
        boost = torch.rand(n, tokens, 3, generator=g) * torch.tensor([14.0, 10.0, 6.0])
        return x.scatter_add(-1, hot, boost)
    if kind == "zipf":  # r-th largest probability ~ r^-s
        s = torch.empty(n, tokens, 1).uniform_(1.0, 2.5, generator=g)
        u = torch.rand(n, tokens, vocab, generator=g).clamp_min(1e-30)
        return u.log().mul(-s)
    raise ValueError(kind)


def stored(full: torch.Tensor, top_p: float, top_k: int) -> SparseLogits:
    """What a generation job writes: the truncation, carrying the full-vocabulary logsumexp."""
    sp = truncate(full, top_p, top_k)
    return SparseLogits(sp.indices, sp.values, torch.logsumexp(full, -1).float())


def write_store(root: Path, full: torch.Tensor, meta: StoreMeta, compress: bool = True) -> Path:
    for i, (a, b) in enumerate(shard_ranges(meta.n_samples, meta.shard_size)):
        with ShardWriter(root, meta, i, compress=compress) as w:
            for s in range(a, b):
                w.add(s, stored(full[s], meta.top_p, meta.top_k))
            w.finish()
    write_manifest(root, meta)
    return root


def tv(a: SparseLogits, b: SparseLogits, tau: float) -> torch.Tensor:
    return 0.5 * (target_probs(a, tau).double() - target_probs(b, tau).double()).abs().sum(-1)


@pytest.fixture(scope="module")
def gauss_full():
    return full_logits("gauss", N, seed=1)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, gauss_full):
    return write_store(tmp_path_factory.mktemp("store"), gauss_full, make_meta())


def _copy_store(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------ fidelity
def test_tolerance_constants():
    enc = default_encoding()
    assert tv_bound(enc, 1.0) <= 1e-3
    assert value_tolerance(enc) < 2e-3
    # the bound at small temperature is larger, ~ 1/tau: documented, not held to 1e-3
    assert 9e-3 < tv_bound(enc, 0.1) < 1e-2
    assert tv_bound(default_encoding("exact"), 0.1) == 0.0


@pytest.mark.parametrize("kind", ["gauss", "peaked", "zipf"])
def test_round_trip(tmp_path, kind):
    full = full_logits(kind, N, seed=2)
    root = write_store(tmp_path / kind, full, make_meta())
    store = LogitsStore(root)
    assert len(store) == N and store.meta.encoding["name"] == "qgap"
    enc = default_encoding()
    for s in range(N):
        sp = store.get(s)
        lse = sp.lse
        ref = truncate(full[s], 0.95, K)
        assert sp.values.shape == (T, K) and sp.values.dtype == torch.float32 and sp.indices.dtype == torch.int64
        assert torch.equal(sp.indices, ref.indices)  # lossless, same (value) order
        assert torch.equal(sp.mask, ref.mask)
        m = ref.mask
        assert (sp.values[m] - ref.values[m]).abs().max() <= value_tolerance(enc)
        assert torch.equal(sp.values[:, 0], ref.values[:, 0])  # the max logit is exact
        assert torch.equal(lse, torch.logsumexp(full[s], -1))  # lse exact (fp32 bits)
        for tau in (1.0, 2.0, 0.5, 0.1):
            assert tv(sp, ref, tau).max() <= tv_bound(enc, tau), (kind, tau)
        assert tv(sp, ref, 1.0).max() <= 1e-3


def test_tv_bound_many_tokens():
    """Codec-level check on more tokens (Gaussian, peaked, Zipf; k=100, top_p=1), including tau=0.1."""
    enc = default_encoding()
    worst = {}
    for kind in ("gauss", "peaked", "zipf"):
        full = full_logits(kind, 1, seed=3, tokens=2048, vocab=2000)[0]
        for p, k in ((0.95, 100), (1.0, 100)):
            ref = truncate(full, p, k)
            raw, n_kept = encode_block(ref.values.numpy(), ref.indices.numpy(),
                                       torch.logsumexp(full, -1).numpy(), 2000, enc)
            vals, idx, _lse, counts = decode_block(raw, 2048, k, enc)
            assert n_kept == int(ref.counts().sum()) and np.array_equal(counts, ref.counts().numpy())
            dec = SparseLogits(torch.from_numpy(idx), torch.from_numpy(vals))
            assert torch.equal(dec.indices, ref.indices)
            for tau in (1.0, 0.1):
                t = tv(dec, ref, tau).max().item()
                worst[(kind, p, tau)] = t
                assert t <= tv_bound(enc, tau)
    assert max(v for (_, _, tau), v in worst.items() if tau == 1.0) <= 1e-3


@pytest.mark.parametrize("layout", ["index", "value"])
@pytest.mark.parametrize("name", ["qgap", "exact"])
def test_both_block_layouts(layout, name):
    """Each layout round-trips (incl. ties in the quantized gaps, empty rows, k_out prefixes)."""
    from pd_dist.store.codec import zstd_compressor, zstd_decompressor

    enc = default_encoding(name)
    full = full_logits("gauss", 1, seed=8, tokens=256, vocab=300)[0]
    full[5] = float("-inf")  # an all -inf row: nothing kept
    full[6, :4] = 7.0  # exactly tied logits
    full[7, :3] = torch.tensor([5.0, 5.0 - 2 ** -10, 5.0 - 2 ** -11])  # equal once quantized
    ref = truncate(full, 0.95, 40)
    assert ref.counts()[5] == 0
    lse = torch.logsumexp(full, -1)
    for zc in (None, zstd_compressor(3)):
        raw, n = encode_block(ref.values.numpy(), ref.indices.numpy(), lse.numpy(), 300, enc, zc, layout)
        assert (raw[14] & 0x80 != 0) == (layout == "value")  # the header flags byte
        for k_out in (40, 5, 1):
            vals, idx, l2, counts = decode_block(raw, 256, 40, enc, k_out, zstd_decompressor(), 300)
            assert np.array_equal(idx, ref.indices[:, :k_out].numpy())
            assert np.array_equal(counts, ref.counts().numpy())
            assert np.array_equal(l2.view(np.uint32), lse.numpy().view(np.uint32))
            m = ref.mask[:, :k_out].numpy()
            assert np.array_equal(vals > -np.inf, m)
            err = np.abs(vals[m] - ref.values[:, :k_out].numpy()[m]).max()
            assert err <= value_tolerance(enc)
            if name == "exact":
                assert np.array_equal(vals, ref.values[:, :k_out].numpy())


def test_exact_encoding_is_lossless(tmp_path):
    full = full_logits("zipf", N, seed=4)
    meta = make_meta(encoding={"name": "exact"})
    store = LogitsStore(write_store(tmp_path, full, meta))
    for s in range(N):
        sp = store.get(s)
        lse = sp.lse
        ref = truncate(full[s], 0.95, K)
        assert torch.equal(sp.values, ref.values) and torch.equal(sp.indices, ref.indices)


def test_encoder_rejects_bad_input(tmp_path):
    meta = make_meta()
    full = full_logits("gauss", 1, seed=5)[0]
    ref = stored(full, 0.95, K)
    with ShardWriter(tmp_path, meta, 0) as w:
        with pytest.raises(ValueError, match="expected sample 0"):
            w.add(1, ref)
        with pytest.raises(ValueError, match="shape"):
            w.add(0, stored(full, 0.95, K - 1))
        with pytest.raises(ValueError, match="no lse"):
            w.add(0, ref.without_lse())
        unsorted = SparseLogits(ref.indices.flip(-1).contiguous(), ref.values.flip(-1).contiguous(), ref.lse)
        with pytest.raises(ValueError):
            w.add(0, unsorted)
        with pytest.raises(ValueError, match="256"):
            w.add(0, SparseLogits(ref.indices, ref.values + 300, ref.lse))
        for bad in (float("nan"), float("inf"), float("-inf")):  # what the decoder would refuse
            lse = ref.lse.clone()
            lse[3] = bad
            with pytest.raises(ValueError, match="lse must be finite"):
                w.add(0, SparseLogits(ref.indices, ref.values, lse))
        w.add(0, ref)
        with pytest.raises(StoreError, match="finish after 1 of 4"):
            w.finish()
        w.abort()
    assert not shard_done(tmp_path, meta, 0)


# ------------------------------------------------------------------------------------------- access
def test_random_access_and_batch(store_dir, gauss_full):
    store = LogitsStore(store_dir)
    order = np.random.default_rng(0).permutation(N)
    seq = {s: store.get(s) for s in range(N)}
    for s in order:
        sp = store.get(int(s))
        assert torch.equal(sp.values, seq[s].values) and torch.equal(sp.indices, seq[s].indices)
    ids = [7, 2, 9, 2, 0]
    bsp = store.get_batch(np.array(ids))
    blse = bsp.lse
    assert bsp.values.shape == (5, T, K) and blse.shape == (5, T)
    for b, s in enumerate(ids):
        assert torch.equal(bsp.values[b], seq[s].values) and torch.equal(bsp.indices[b], seq[s].indices)
        assert torch.equal(blse[b], seq[s].lse)
    with pytest.raises(IndexError):
        store.get(N)


def test_sequential_iteration(store_dir):
    store = LogitsStore(store_dir)
    got = list(store)
    assert [i for i, _ in got] == list(range(N))
    for i, sp in got:
        ref = store.get(i)
        assert torch.equal(sp.values, ref.values) and torch.equal(sp.lse, ref.lse)


def test_shards_and_manifest(store_dir):
    assert shard_ranges(N, SHARD) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(8, 4) == [(0, 4), (4, 8)] and shard_ranges(0, 4) == []
    man = json.loads((store_dir / "manifest.json").read_text())
    assert man["format_version"] == FORMAT_VERSION
    assert [(s["first"], s["end"]) for s in man["shards"]] == [(0, 4), (4, 8), (8, 10)]
    for s in man["shards"]:
        p = store_dir / s["file"]
        assert p.stat().st_size == s["bytes"] and len(s["sha256"]) == 64
    for key in ("teacher", "tokenizer_hash", "data_fingerprint", "seq_len", "vocab_size", "top_p", "top_k",
                "encoding", "n_samples", "shard_size"):
        assert key in man
    assert man["encoding"]["name"] == "qgap" and man["encoding"]["step_log2"] == -8
    assert verify_store(store_dir) == []
    info = store_info(store_dir)
    assert info["n_shards"] == 3 and info["tokens"] == N * T
    assert sum(info["kept_per_token"]["hist"]) == N * T
    assert 0 < info["bytes_per_token"] < info["naive_bytes_per_token"]
    assert info["kept_per_token"]["p50"] <= K


def test_deterministic_bytes(tmp_path, gauss_full):
    a = write_store(tmp_path / "a", gauss_full, make_meta())
    b = write_store(tmp_path / "b", gauss_full, make_meta())
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert fa == fb and len(fa) == 4  # manifest + 3 shards, no temp files left
    for rel in fa:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_uncompressed_shards_read_back(tmp_path, gauss_full):
    root = write_store(tmp_path, gauss_full, make_meta(), compress=False)
    store = LogitsStore(root)
    ref = LogitsStore(write_store(tmp_path / "z", gauss_full, make_meta()))
    for s in range(N):
        assert torch.equal(store.get(s).values, ref.get(s).values)
    assert verify_store(root) == []


# ---------------------------------------------------------------------------------------- integrity
def _block_span(path: Path, j: int) -> tuple[int, int]:
    buf = path.read_bytes()
    lay = parse_shard(buf, len(buf), str(path))
    row = lay.table[j]
    return int(row["offset"]), int(row["nbytes"])


def test_corrupted_byte(tmp_path, store_dir):
    root = _copy_store(store_dir, tmp_path / "c")
    path = root / "shards" / "shard-00001.bin"
    off, n = _block_span(path, 1)  # sample 5
    data = bytearray(path.read_bytes())
    data[off + n // 2] ^= 0x40
    path.write_bytes(bytes(data))
    store = LogitsStore(root)  # sizes unchanged: opening does not hash
    store.get(4)  # the neighbour is fine
    with pytest.raises(StoreError) as ei:
        store.get(5)
    msg = str(ei.value)
    assert "shard-00001.bin" in msg and "sample 5" in msg and "checksum" in msg
    with pytest.raises(StoreError, match="shard-00001.bin"):
        store.get_batch([0, 5])
    faults = verify_store(root)
    assert any("shard-00001.bin" in f and "sha256" in f for f in faults)
    assert any("shard-00001.bin" in f and "sample 5" in f for f in faults)
    with pytest.raises(StoreError, match="shard-00001.bin.*sha256"):
        LogitsStore(root, verify=True)


def test_corrupted_table(tmp_path, store_dir):
    root = _copy_store(store_dir, tmp_path / "c")
    path = root / "shards" / "shard-00000.bin"
    data = bytearray(path.read_bytes())
    data[-32 - (SHARD * TABLE_DTYPE.itemsize + (K + 1) * 8) + 3] ^= 1  # inside the sample table
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as ei:
        LogitsStore(root).get(2)
    assert "shard-00000.bin" in str(ei.value) and "sample 2" in str(ei.value)
    assert any("shard-00000.bin" in f for f in verify_store(root))


def test_truncated_shard(tmp_path, store_dir):
    root = _copy_store(store_dir, tmp_path / "t")
    path = root / "shards" / "shard-00002.bin"
    size = path.stat().st_size
    store = LogitsStore(root)  # opened before the damage: caught on first read of that shard
    with open(path, "r+b") as fh:
        fh.truncate(size - 50)
    with pytest.raises(StoreError) as ei:
        store.get(9)
    assert "shard-00002.bin" in str(ei.value) and "sample 9" in str(ei.value)
    with pytest.raises(StoreError, match="shard-00002.bin"):
        LogitsStore(root)
    assert any("shard-00002.bin" in f for f in verify_store(root))
    # truncated while mapped: reported, not a SIGBUS
    root2 = _copy_store(store_dir, tmp_path / "t2")
    store2 = LogitsStore(root2)
    store2.get(8)
    with open(root2 / "shards" / "shard-00002.bin", "r+b") as fh:
        fh.truncate(HEADER.size + 8)
    with pytest.raises(StoreError) as ei:
        store2.get(9)
    assert "shard-00002.bin" in str(ei.value) and "sample 9" in str(ei.value)
    # a shard truncated to within its blocks is not a complete shard either
    with open(path, "r+b") as fh:
        fh.truncate(HEADER.size + 10)
    assert not shard_done(root, make_meta(), 2)


def test_missing_shard(tmp_path, store_dir, gauss_full):
    root = _copy_store(store_dir, tmp_path / "m")
    (root / "shards" / "shard-00001.bin").unlink()
    with pytest.raises(StoreError) as ei:
        LogitsStore(root)
    assert "shard-00001.bin" in str(ei.value) and "4..7" in str(ei.value)
    assert any("shard-00001.bin" in f and "missing" in f for f in verify_store(root))
    # write_manifest refuses while a shard is missing
    meta = make_meta()
    fresh = tmp_path / "fresh"
    for i in (0, 2):
        a, b = shard_ranges(N, SHARD)[i]
        with ShardWriter(fresh, meta, i) as w:
            for s in range(a, b):
                w.add(s, stored(gauss_full[s], 0.95, K))
            w.finish()
    with pytest.raises(StoreError) as ei:
        write_manifest(fresh, meta)
    assert "shard-00001.bin" in str(ei.value) and "missing" in str(ei.value)
    assert not (fresh / "manifest.json").exists()
    with pytest.raises(StoreError, match="no manifest"):
        LogitsStore(fresh)


def test_temp_files_never_complete(tmp_path, gauss_full):
    meta = make_meta()
    w = ShardWriter(tmp_path, meta, 1)
    w.add(4, stored(gauss_full[4], 0.95, K))
    assert not shard_done(tmp_path, meta, 1)
    assert not (tmp_path / "shards" / "shard-00001.bin").exists()
    w.abort()
    assert not shard_done(tmp_path, meta, 1)
    assert list((tmp_path / "shards").iterdir()) == []
    # an exception inside the context manager discards the partial shard
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, meta, 1) as w:
            w.add(4, stored(gauss_full[4], 0.95, K))
            raise RuntimeError("teacher crashed")
    assert list((tmp_path / "shards").iterdir()) == []
    with ShardWriter(tmp_path, meta, 1) as w:
        for s in range(4, 8):
            w.add(s, stored(gauss_full[s], 0.95, K))
            assert not shard_done(tmp_path, meta, 1)
        entry = w.finish()
    assert shard_done(tmp_path, meta, 1)
    assert entry["file"] == "shards/shard-00001.bin" and (entry["first"], entry["end"]) == (4, 8)
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["shard-00001.bin"]
    # a shard written for another store (other teacher / truncation) does not count as done
    assert not shard_done(tmp_path, make_meta(top_p=0.9), 1)
    assert not shard_done(tmp_path, make_meta(teacher={**TEACHER, "weights_hash": "other"}), 1)


# ------------------------------------------------------------------------------------ compatibility
RUN = dict(data_fingerprint="fp1", tokenizer_hash="tok1", seq_len=T, vocab_size=V, top_p=0.95, top_k=K)


def run_kw(**over) -> dict:
    """RUN (with ``over``) as check_compatible / open_for_training take it: the truncation as a SignalSpec."""
    d = {**RUN, **over}
    return {**{k: v for k, v in d.items() if k not in ("top_p", "top_k")},
            "signal": SignalSpec.of("top_p_k", top_p=d["top_p"], top_k=d["top_k"])}


@pytest.mark.parametrize("field,value,needle", [
    ("data_fingerprint", "fp2", "data fingerprint"),
    ("tokenizer_hash", "tok2", "tokenizer"),
    ("seq_len", 2 * T, "seq_len"),
    ("vocab_size", V + 1, "vocab_size"),
    ("top_k", K + 1, "top_k"),
    ("top_p", 0.99, "top_p"),
])
def test_check_compatible_refuses(store_dir, field, value, needle):
    store = LogitsStore(store_dir)
    with pytest.raises(StoreError, match=needle):
        store.check_compatible(**run_kw(**{field: value}))
    with pytest.raises(StoreError, match=needle):
        open_for_training(store_dir, **run_kw(**{field: value}))


def test_check_compatible_accepts_wider(store_dir):
    store = LogitsStore(store_dir)
    store.check_compatible(**run_kw())
    store.check_compatible(**run_kw(top_k=10))
    store.check_compatible(**run_kw(top_p=0.8, top_k=5))
    with pytest.raises(StoreError, match="top_k"):
        store.get(0, top_k=K + 1)
    with pytest.raises(StoreError, match="top_p"):
        store.get(0, top_p=1.0)


@pytest.mark.parametrize("encoding", ["qgap", "exact"])
def test_retruncation_matches_truncate(tmp_path, encoding):
    n = 4
    full = torch.cat([full_logits("zipf", 2, seed=6, tokens=64), full_logits("peaked", 2, seed=7, tokens=64)])
    meta = make_meta(seq_len=64, n_samples=n, top_k=50, encoding=default_encoding(encoding))
    root = write_store(tmp_path, full, meta)
    store = LogitsStore(root)
    enc = default_encoding(encoding)
    boundary = 0
    for p, k in ((0.95, 50), (0.95, 20), (0.95, 1), (0.9, 50), (0.8, 20), (0.5, 5), (0.3, 50)):
        bsp = store.get_batch(range(n), top_p=p, top_k=k)
        for s in range(n):
            ref = truncate(full[s], p, k)
            got = bsp[s]
            assert got.values.shape == (64, k)
            same = (got.indices == ref.indices).all(-1) & (got.mask == ref.mask).all(-1)
            if encoding == "exact" or p == 0.95:
                assert same.all(), (p, k)  # same top-p: a prefix of the stored order; exact values: exact
            else:
                # qgap: the top-p decision may differ only for the boundary entry, and only where the exact
                # mass before it is within mass_tolerance of p
                for t in torch.nonzero(~same).flatten().tolist():
                    lse = torch.logsumexp(full[s, t], -1).double()
                    pr = torch.exp(truncate(full[s, t], 1.0, k).values.double() - lse)
                    before = torch.cumsum(pr, 0) - pr
                    j = int(min(got.counts()[t], ref.counts()[t]))
                    assert abs(got.counts()[t] - ref.counts()[t]) == 1
                    assert torch.equal(got.indices[t, :j], ref.indices[t, :j])
                    assert abs(before[j].item() - p) <= mass_tolerance(enc)
                    boundary += 1
            m = ref.mask & got.mask
            assert (got.values[m] - ref.values[m]).abs().max() <= value_tolerance(enc)
    assert boundary <= 3  # rare: needs the mass to land within ~2e-3 of p


def test_open_for_training_defaults(store_dir, gauss_full):
    store = open_for_training(store_dir, **run_kw(top_p=0.9, top_k=8))
    sp = store.get(3)
    lse = sp.lse
    assert sp.values.shape == (T, 8)
    ref = truncate(gauss_full[3], 0.9, 8)
    assert (sp.indices == ref.indices).float().mean() > 0.99
    bsp = store.get_batch([3])
    assert torch.equal(bsp.values[0], sp.values)


def test_the_offline_loader_hands_over_micro_batches_with_their_lse(store_dir):
    """A planned micro-batch comes out of the DataLoader (batch_size=None: no collation) as the
    StoredMicroBatch it was made, its SparseLogits keeping the stored lse."""
    from pd_dist.signals.sources import StoredMicroBatch, _StoredMicroBatches

    store = open_for_training(store_dir, **run_kw(top_p=0.9, top_k=8))
    plan = [np.array([3, 1]), np.array([0, 2])]
    loader = torch.utils.data.DataLoader(_StoredMicroBatches(plan, store), batch_size=None, shuffle=False,
                                         num_workers=1)  # as StoredLogits reads it: through a worker
    for ids, got in zip(plan, loader):
        assert isinstance(got, StoredMicroBatch) and got.ids.tolist() == ids.tolist()
        want = store.get_batch(ids)
        assert got.teacher.lse is not None and torch.equal(got.teacher.lse, want.lse)
        assert torch.equal(got.teacher.values, want.values) and torch.equal(got.teacher.indices, want.indices)


# ------------------------------------------------------------------------------------------ workers
class _DS(torch.utils.data.Dataset):
    def __init__(self, store):
        self.store = store

    def __len__(self):
        return len(self.store)

    def __getitem__(self, i):
        sp = self.store.get(i)
        lse = sp.lse
        return i, os.getpid(), sp.indices, sp.values, lse


def test_pickle_and_dataloader_workers(store_dir):
    store = LogitsStore(store_dir)
    ref = {i: store.get(i) for i in range(N)}  # parent has shards mapped before forking
    clone = pickle.loads(pickle.dumps(store))
    assert torch.equal(clone.get(6).values, ref[6].values)
    dl = torch.utils.data.DataLoader(_DS(store), batch_size=3, num_workers=2, shuffle=False,
                                     multiprocessing_context="fork")
    pids = set()
    seen = []
    for ids, pid, idx, vals, lse in dl:
        pids.update(pid.tolist())
        for b, i in enumerate(ids.tolist()):
            seen.append(i)
            assert torch.equal(idx[b], ref[i].indices) and torch.equal(vals[b], ref[i].values)
            assert torch.equal(lse[b], ref[i].lse)
    assert sorted(seen) == list(range(N))
    assert os.getpid() not in pids and len(pids) == 2


# ------------------------------------------------------------------------------------- wrong shapes
def _edit_manifest(root: Path, edit) -> None:
    """Apply ``edit`` to the manifest's JSON, keeping meta_digest valid (the metadata is not touched)."""
    path = root / "manifest.json"
    man = json.loads(path.read_text())
    path.write_text(json.dumps(edit(man)))


def _set(man, dotted, value, delete=False):
    node = man
    *head, last = dotted.split(".")
    for part in head:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if delete:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return man


@pytest.mark.parametrize("edit,needle", [
    (lambda m: [m], "must be a JSON object, got list"),
    (lambda m: None, "must be a JSON object, got NoneType"),
    (lambda m: _set(m, "shards", None), "field 'shards' must be a list, got NoneType"),
    (lambda m: _set(m, "shards.1", "shard-00001.bin"), "field shards[1] must be an object, got str"),
    (lambda m: _set(m, "shards.0.bytes", None, delete=True), "field shards[0].bytes is missing"),
    (lambda m: _set(m, "shards.2.bytes", "12"), "field shards[2].bytes must be a non-negative integer, got '12'"),
    (lambda m: _set(m, "shards.0.first", -1), "shards[0].first must be a non-negative integer"),
    (lambda m: _set(m, "shards.0.sha256", 5), "shards[0].sha256 must be a string"),
    (lambda m: _set(m, "stats", None, delete=True), "field 'stats' must be an object, got NoneType"),
    (lambda m: _set(m, "stats.kept_hist", None, delete=True), "field stats.kept_hist is missing"),
    (lambda m: _set(m, "stats.kept_hist", [1, "2"]), "stats.kept_hist must be a list of integers"),
    (lambda m: _set(m, "stats.tokens", 1.5), "stats.tokens must be an integer, got 1.5"),
    (lambda m: _set(m, "teacher", None, delete=True), "manifest lacks ['teacher']"),
    (lambda m: _set(m, "seq_len", 1e400), "invalid store metadata"),  # JSON Infinity: int() overflows
])
def test_manifest_of_the_wrong_shape_names_the_field(tmp_path, store_dir, edit, needle):
    root = _copy_store(store_dir, tmp_path / "m")
    _edit_manifest(root, edit)
    for call in (lambda: LogitsStore(root), lambda: store_info(root)):
        with pytest.raises(StoreError) as e:
            call()
        assert needle in str(e.value) and "manifest.json" in str(e.value)
    faults = verify_store(root)  # a fault found, not a crash
    assert len(faults) == 1 and needle in faults[0]


def _verify_cli(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pd_dist.cli", "store", "verify", str(path)],
                          capture_output=True, text=True)


def test_store_verify_exit_codes(tmp_path, store_dir):
    assert _verify_cli(store_dir).returncode == 0
    bad = _copy_store(store_dir, tmp_path / "bad")
    _edit_manifest(bad, lambda m: _set(m, "stats.kept_entries", 0))
    r = _verify_cli(bad)
    assert r.returncode == 1 and "stats disagree" in r.stdout
    r = _verify_cli(tmp_path / "nowhere")
    assert r.returncode == 2 and "not a directory" in r.stderr
    (tmp_path / "empty").mkdir()
    r = _verify_cli(tmp_path / "empty")
    assert r.returncode == 2 and "no manifest" in r.stderr
    if os.geteuid() != 0:  # root reads anything: an unreadable shard cannot be made here as root
        locked = _copy_store(store_dir, tmp_path / "locked")
        (locked / "shards" / "shard-00000.bin").chmod(0)
        r = _verify_cli(locked)
        assert r.returncode == 2 and "could not read" in r.stderr


def test_generation_rerun_rechecks_shard_checksums(tmp_path, gauss_full):
    meta = make_meta()
    root = write_store(tmp_path / "s", gauss_full, meta)
    assert all(shard_done(root, meta, i) for i in range(3))
    path = root / "shards" / "shard-00001.bin"
    off, n = _block_span(path, 2)  # sample 6: header, table and footer still parse
    data = bytearray(path.read_bytes())
    data[off + n // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert [shard_done(root, meta, i) for i in range(3)] == [True, False, True]


def test_a_format_version_1_store_still_reads():
    """tests/data/store_v1 was written before the format gained drawn signals (version 2): it opens as a
    top-p-k store, verifies, decodes within the qgap tolerance of the logits it was written from, and
    serves narrower truncations."""
    from pd_dist.store import store_info, verify_store

    root = Path(__file__).parent / "data" / "store_v1"
    full = torch.randn(6, 16, 96, generator=torch.Generator().manual_seed(11)) * 3
    assert verify_store(root) == []
    info = store_info(root)
    assert info["format_version"] == 1 and info["signal"]["kind"] == "top_p_k" and info["top_k"] == 12
    store = open_for_training(root, data_fingerprint="fp-v1", tokenizer_hash="tok-v1", seq_len=16,
                              vocab_size=96, signal=SignalSpec.of("top_p_k", top_p=0.9, top_k=12))
    for s in range(6):
        ref = truncate(full[s], 0.9, 12, keep_lse=True)
        got = store.get(s)
        assert torch.equal(got.indices, ref.indices) and torch.equal(got.lse, ref.lse)
        m = ref.mask
        assert (got.values[m] - ref.values[m]).abs().max() <= store.value_tolerance()
        assert torch.equal(store.get(s, top_k=5).indices, ref.indices[:, :5])
