"""Damaged and forged stores, generated rather than hand-picked: blocks forged with valid checksums (NaN,
+-inf, negative, out-of-vocabulary or repeated indices) are refused by the decoder and reported by verify;
every byte region of a small store is corrupted (bit flips at many offsets, truncations, deletions) and the
completeness check names exactly the damaged shards, whose rewrite restores the store byte for byte."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pd_dist.logits import truncate
from pd_dist.store import LogitsStore, StoreError, shard_ranges, verify_store, write_manifest
from pd_dist.store.codec import (_HDR, HEADER_BYTES, LAYOUT_VALUE, N_STREAMS, CodecError, _f32_ord, _from_planes,
                                 _pack, _unzigzag, _zigzag, decode_block, default_encoding, encode_block,
                                 zstd_compressor, zstd_decompressor)
from pd_dist.store.format import FOOTER, FOOTER_MAGIC, HEADER, TABLE_DTYPE, parse_shard

from test_store import K, N, T, V, full_logits, make_meta, write_store

U64 = np.uint64


# ------------------------------------------------------------------------------------ forged blocks
def _streams(raw: bytes) -> tuple[list[np.ndarray], int, int]:
    """A block's six streams as uint64 arrays, its n_kept and its layout flag (the decoder's first steps)."""
    h = _HDR.unpack_from(raw, 0)
    n_kept, planes, flags, lens = h[1], h[2:8], h[8], h[9:15]
    out, pos, zd = [], HEADER_BYTES, zstd_decompressor()
    for i in range(N_STREAMS):
        seg = raw[pos:pos + lens[i]]
        pos += lens[i]
        if flags >> i & 1:
            seg = zd.decompress(seg, max_output_size=1 << 24)
        n = len(seg) // planes[i]
        out.append(_from_planes(seg, n, planes[i], np.uint64))
    return out, n_kept, flags & LAYOUT_VALUE


def _repack(streams: list[np.ndarray], n_kept: int, layout_flag: int) -> bytes:
    return _pack([(np.asarray(x, U64), len(x)) for x in streams], n_kept, layout_flag, zstd_compressor(3))


def _f32_bits(x: float) -> int:
    return int(np.array([x], np.float32).view(np.uint32)[0])


def _ord(bits) -> int:
    return int(_f32_ord(np.array([bits], np.uint32).view(np.float32))[0])


def _forge(raw: bytes, kind: str, rng: np.random.Generator, vocab: int) -> tuple[bytes, int]:
    """``raw`` with one token's entry made into ``kind``, streams re-packed (the block is well formed and
    any checksum computed over it agrees). Returns (forged block, token)."""
    s, n_kept, value_layout = _streams(raw)
    counts = s[0].astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    kept2 = np.flatnonzero(counts >= 2)
    t = int(rng.choice(kept2))
    j = int(starts[t]) + int(rng.integers(1, counts[t]))  # an entry after the token's first
    if kind in ("nan", "+inf", "-inf", "lse-nan"):
        # the token's max (stored as fp32 bits) or its lse (stored as ord(lse) - ord(max)), the other kept
        lse_ord = _ord(s[1][t]) + int(_unzigzag(s[2][t:t + 1])[0])
        if kind == "lse-nan":
            lse_ord = _ord(_f32_bits(float("nan")))
        else:
            s[1][t] = _f32_bits({"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}[kind])
        s[2][t] = _zigzag(np.array([lse_ord - _ord(s[1][t])]))[0]
    elif kind == "negative":
        if value_layout:
            s[3][j] = U64((1 << 64) - int(rng.integers(1, 1000)))  # 8 byte planes: a negative int64
        else:
            s[3][j] = U64((1 << 64) - 1)
    elif kind == "beyond-vocab":
        s[3][j] = U64(vocab + int(rng.integers(0, 1000)))
    elif kind == "duplicate":  # only the value-order layout can say it (index deltas are >= 0)
        s[3][j] = s[3][j - 1]
    else:
        raise ValueError(kind)
    return _repack(s, n_kept, value_layout), t


FORGERIES = ["nan", "+inf", "-inf", "lse-nan", "negative", "beyond-vocab", "duplicate"]
NEEDLE = {"nan": "not finite", "+inf": "not finite", "-inf": "not finite", "lse-nan": "lse",
          "negative": "out", "beyond-vocab": "out", "duplicate": "kept twice"}


def _cases(n: int):
    """(encoding, layout, forgery, seed): every forgery in every layout it can be said in, n seeds each."""
    for name in ("qgap", "exact"):
        for layout in ("index", "value"):
            for kind in FORGERIES:
                if kind == "duplicate" and layout == "index":
                    continue
                for seed in range(n):
                    yield name, layout, kind, seed


@pytest.mark.parametrize("name,layout,kind,seed", list(_cases(4)))
def test_decoder_refuses_forged_blocks(name, layout, kind, seed):
    rng = np.random.default_rng(seed * 131 + FORGERIES.index(kind))
    enc = default_encoding(name)
    full = full_logits("peaked", 1, seed=100 + seed)[0]
    ref = truncate(full, 0.95, K)
    lse = torch.logsumexp(full, -1).numpy()
    raw, _ = encode_block(ref.values.numpy(), ref.indices.numpy(), lse, V, enc, zstd_compressor(3), layout)
    decode_block(_repack(*_streams(raw)), T, K, enc, zd=zstd_decompressor(), vocab_size=V)  # re-packing is sound
    forged, t = _forge(raw, kind, rng, V)
    with pytest.raises(CodecError) as e:
        decode_block(forged, T, K, enc, zd=zstd_decompressor(), vocab_size=V)
    assert NEEDLE[kind] in str(e.value) and f"token {t}:" in str(e.value), str(e.value)


def _replace_block(path: Path, j: int, block: bytes) -> None:
    """Rewrite shard ``path`` with its block ``j`` replaced, table, trailer and footer checksums recomputed:
    what a buggy or forging writer leaves."""
    buf = path.read_bytes()
    lay = parse_shard(buf, len(buf), str(path))
    blocks = [buf[int(r["offset"]):int(r["offset"]) + int(r["nbytes"])] for r in lay.table]
    blocks[j] = block
    table = lay.table.copy()
    pos = HEADER.size
    for i, b in enumerate(blocks):
        table[i]["offset"], table[i]["nbytes"], table[i]["crc"] = pos, len(b), zlib.crc32(b)
        pos += len(b)
    trailer = table.tobytes() + lay.hist.astype("<u8").tobytes()
    header = buf[:HEADER.size]
    path.write_bytes(header + b"".join(blocks) + trailer +
                     FOOTER.pack(pos, len(blocks), lay.k, zlib.crc32(trailer), zlib.crc32(header), FOOTER_MAGIC))


@pytest.mark.parametrize("layout", ["index", "value"])
def test_forged_blocks_are_reported_by_verify_and_the_reader(tmp_path, layout):
    """Each forgery written into a store by a forging writer (table crc32, footer and manifest sha256 all
    recomputed): verify names the shard and the sample, the reader refuses it naming the sample."""
    meta = make_meta()
    full = full_logits("peaked", N, seed=7)
    enc = meta.resolved().value_encoding
    for n, kind in enumerate(k for k in FORGERIES if not (k == "duplicate" and layout == "index")):
        rng = np.random.default_rng(n)
        root = write_store(tmp_path / f"{layout}-{kind}", full, meta)
        sid = int(rng.integers(0, N))
        shard, j = sid // meta.shard_size, sid % meta.shard_size
        ref = truncate(full[sid], 0.95, K)
        raw, _ = encode_block(ref.values.numpy(), ref.indices.numpy(), torch.logsumexp(full[sid], -1).numpy(),
                              V, enc, zstd_compressor(3), layout)
        forged, _t = _forge(raw, kind, rng, V)
        path = root / "shards" / f"shard-{shard:05d}.bin"
        _replace_block(path, j, forged)
        write_manifest(root, meta)  # sizes and sha256 agree with the forged shard
        faults = verify_store(root)
        assert len(faults) == 1, (kind, faults)
        assert path.name in faults[0] and f"sample {sid}:" in faults[0] and NEEDLE[kind] in faults[0], faults
        store = LogitsStore(root)
        with pytest.raises(StoreError) as e:
            store.get(sid)
        assert path.name in str(e.value) and f"sample {sid}:" in str(e.value) and "\n" not in str(e.value)
        for other in range(N):
            if other != sid:
                store.get(other)
