"""Sample-block codec of the teacher-logits store: one training sample's top-p-k logits <-> bytes.

A sample is ``SparseLogits`` of shape [T, k] (T = seq_len tokens; per token c_t <= k kept entries first,
sorted by value descending, then (-inf, 0) padding) plus the full-vocabulary logsumexp ``lse`` [T] (fp32).
Only kept entries are stored. A block is a header followed by six streams; each stream is a sequence of
unsigned integers split into byte planes (most significant plane first, each plane contiguous), stored as
a zstd frame (magicless, no checksum: the shard's crc32 covers the block) when that is smaller::

    header   ``<4sI6BB6I``: tag b"PDS2", n_kept (sum of c_t), byte planes of each stream, flags (bit i:
             stream i is zstd-compressed; bit 7: value-order layout), stored byte length of each stream
    counts   [T]       c_t
    max      [T]       fp32 bit pattern of the per-token max kept logit m_t (exact), 4 planes
    lse      [T]       lse_t exactly: zigzag(ord(lse_t) - ord(m_t)), ord = the monotone map of fp32 bit
                       patterns to integers, so the difference is small and the high planes are zeros
    idx, gap, tie      the kept entries, in one of two layouts (the encoder writes both and keeps the
                       smaller block; the flag says which):

Every kept value is represented by its non-negative integer gap to the token's max, G_tj, which is
non-decreasing along the value order: encoding ``qgap``: G = rint((m_t - v_tj) / step), step =
2^step_log2 (default 2^-8); encoding ``exact``: G = ord(m_t) - ord(v_tj) (lossless fp32); encoding
``counts`` (sampled signals of n draws, whose values are the fp32 log(c / n) of
pd_dist.core.logits.count_log_weights): G = c_max,t - c_tj, the difference of draw counts (lossless: the
decoder reads c_max,t back from the exact m_t and gives the same fp32 values). A drawn signal keeps no
full-vocabulary normalizer, so its writer passes lse = m_t and the lse stream is zeros.

* index-order layout (usually smaller on trained teachers, whose kept sets cluster on frequent tokens):
  per token the entries sorted by ascending index; ``idx`` [n_kept] = the first index, then
  idx_j - idx_(j-1) - 1; ``gap`` [n_kept] = G per entry; ``tie`` [n_kept] = the entry's rank among the
  entries of its token with the same G, in the exact teacher (value-descending) order (almost always 0).
  Decoding sorts each token's entries by (G, tie rank), which restores exactly the stored teacher order.
  Ascending indices cost ~log2(V / c) bits each instead of log2(V); the value order they lose is carried
  by the gaps themselves, and only equal gaps need the tie stream.
* value-order layout (smaller when kept indices look random, e.g. very peaked or synthetic teachers):
  ``idx`` [n_kept] = the indices in teacher order, ``gap`` [n_kept - tokens with c_t > 0] = G_tj -
  G_t(j-1) for the entries after each token's max (G_t0 = 0 is implicit), ``tie`` empty.

Either way the decoded order is the teacher's order, so re-truncation to a smaller top-k takes the same
prefix pd_dist.core.logits.truncate would, even among entries whose quantized values are equal. Decoding is
vectorized numpy over the whole block: scatter into [T, k] through the prefix mask ``arange(k) < c_t``,
cumsums, and for the index-order layout one row-wise sort of packed (gap, tie, index) int64 keys.

Fidelity of ``qgap`` (step s = 2^-8 by default). Decoded v'_tj = fl32(m_t - G_tj * s); G * s is exact (a
power-of-two step), so v'_tj - v_tj = (g_tj - G_tj s) + rounding with |g - G s| <= s/2 and the fp32
rounding <= ulp/2 <= 2^-16 (the writer refuses |logit| >= 256 for this encoding, so |v'| < 512); the max
entry is exact. At temperature tau the kept distribution is p_j ∝ exp(v_j / tau), so
log p'_j - log p_j = e_j / tau - log(Z' / Z) with e_j = v'_j - v_j confined to an interval of width
w = s + 2^-15 (the max, e = 0, is inside it). Two distributions whose log-ratio lies in an interval of
width W differ in total variation by at most tanh(W / 4) (the extreme case puts all the mass at the two
ends of the interval). Hence per token

    TV <= tanh((2^-8 + 2^-15) / (4 tau)) = 9.84e-4 at tau = 1,   9.84e-3 at tau = 0.1,   (~0.98e-3 / tau)

which :func:`tv_bound` returns; tests check it empirically on Gaussian, peaked and Zipf-like logits at
several temperatures. Kept values are within s/2 + 2^-16 = 1.97e-3 of the originals (absolute), the
per-token max and lse are exact (fp32 bits) and the indices are lossless. Re-truncation to a smaller top-p
recomputes p_j = exp(v'_j - lse) with the exact lse, so the decoded prefix masses are within a relative
e^(s/2 + 2^-16) - 1 = 1.97e-3 (:func:`mass_tolerance`) of the exact ones: its decision can differ from
truncate() on the full logits only for the boundary entry, and only when the exact mass before that entry
is within 1.97e-3 of the asked top_p. With encoding ``exact`` it is identical.
"""
from __future__ import annotations

import math
import struct

import numpy as np

_NEG_INF = float("-inf")
BLOCK_TAG = b"PDS2"
_HDR = struct.Struct("<4sI6BB6I")
HEADER_BYTES = _HDR.size
N_STREAMS = 6  # counts, max, lse, idx, gap, tie
LAYOUT_VALUE = 1 << 7  # header flag: the block uses the value-order layout

DEFAULT_STEP_LOG2 = -8  # quantization step 2^-8 of the gap to the per-token max
QGAP_MAX_ABS_LOGIT = 256.0  # |logit| bound under which the fp32 rounding of a decoded value is <= 2^-16
_MIN_COMPRESS = 32  # streams shorter than this are stored raw

ENCODINGS = ("qgap", "exact", "counts")


class CodecError(ValueError):
    """A block that cannot be encoded (bad input) or decoded (corrupt, inconsistent)."""


def default_encoding(name: str = "qgap", samples: int | None = None) -> dict:
    if name == "qgap":
        return {"name": "qgap", "step_log2": DEFAULT_STEP_LOG2}
    if name == "exact":
        return {"name": "exact"}
    if name == "counts":
        return {"name": "counts", "samples": samples}
    raise ValueError(f"unknown value encoding {name!r}; known: {', '.join(ENCODINGS)}")


def check_encoding(enc: dict) -> None:
    name = enc.get("name")
    if name == "qgap":
        s = enc.get("step_log2")
        if isinstance(s, bool) or not isinstance(s, int) or not -20 <= s <= 0:
            raise ValueError(f"encoding qgap needs an integer step_log2 in [-20, 0], got {s!r}")
        extra = set(enc) - {"name", "step_log2"}
    elif name == "exact":
        extra = set(enc) - {"name"}
    elif name == "counts":
        n = enc.get("samples")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < 1 << 24:
            raise ValueError(f"encoding counts needs an integer samples in [1, 2^24), got {n!r}")
        extra = set(enc) - {"name", "samples"}
    else:
        raise ValueError(f"unknown value encoding {name!r}; known: {', '.join(ENCODINGS)}")
    if extra:
        raise ValueError(f"encoding {name}: unknown parameters {sorted(extra)}")


def _rounding_slack() -> float:
    # fp32 rounding of m - G*s: |result| < 256 + s/2 < 512, where ulp <= 2^-15, so the error is <= 2^-16
    # (plus < 2^-40 from forming the gap in float64, absorbed here)
    return 2.0 ** -16 + 2.0 ** -40


def value_tolerance(enc: dict) -> float:
    """Max |decoded - original| of a kept value (0 for ``exact`` and ``counts``)."""
    if enc["name"] != "qgap":
        return 0.0
    return 2.0 ** enc["step_log2"] / 2 + _rounding_slack()


def tv_bound(enc: dict, temperature: float = 1.0) -> float:
    """Guaranteed per-token total variation between softmax(kept / tau) before and after encoding."""
    if enc["name"] != "qgap":
        return 0.0
    width = 2.0 ** enc["step_log2"] + 2 * _rounding_slack()
    return math.tanh(width / (4.0 * float(temperature)))


def mass_tolerance(enc: dict) -> float:
    """Bound on |decoded - exact| prefix mass sum_j exp(v_j - lse) (a prefix mass is <= 1)."""
    return math.expm1(value_tolerance(enc))


# ------------------------------------------------------------------------------------ bit helpers
def _first(rows: np.ndarray) -> int:
    """The first position where the boolean array ``rows`` is true."""
    return int(np.argmax(rows))


def _bad_lse(lse: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Tokens whose lse no writer forms: NaN, +inf, or -inf where entries are kept (a token whose logits
    are all -inf keeps nothing and has lse -inf)."""
    return np.isnan(lse) | (lse == np.inf) | ((lse == -np.inf) & (counts > 0))


_I31 = 1 << 31


def _f32_ord(x: np.ndarray) -> np.ndarray:
    """fp32 -> int64, monotone in the float order and a bijection on bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.int64)
    return np.where(u >= _I31, _I31 - 1 - u, u)


def _ord_f32(o: np.ndarray) -> np.ndarray:
    o = np.asarray(o, dtype=np.int64)
    return np.where(o < 0, _I31 - 1 - o, o).astype(np.uint32).view(np.float32)


def _zigzag(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.int64)
    return ((x << 1) ^ (x >> 63)).astype(np.uint64)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.uint64)
    return ((z >> np.uint64(1)).astype(np.int64)) ^ -((z & np.uint64(1)).astype(np.int64))


def _nplanes(maxval: int) -> int:
    return max(1, (int(maxval).bit_length() + 7) // 8)


def _to_planes(x: np.ndarray, planes: int) -> bytes:
    """Unsigned ints -> ``planes`` byte planes, most significant first."""
    if x.size == 0:
        return b""
    b = x.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - planes:]
    return np.ascontiguousarray(b.T).tobytes()


def _from_planes(buf: bytes, n: int, planes: int, dtype=np.int64) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype)
    p = np.frombuffer(buf, np.uint8, n * planes).reshape(planes, n)
    if planes == 1:
        return p[0].astype(dtype)
    if planes <= 7:
        acc = p[0].astype(np.int64)
        for i in range(1, planes):
            acc <<= 8
            acc |= p[i]
        return acc.astype(dtype, copy=False)
    wide = np.ascontiguousarray(p.T).view(">u8").reshape(n)
    return wide.astype(dtype)


def zstd_compressor(level: int):
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(
        level, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_checksum=0, write_content_size=0,
        write_dict_id=0, threads=0)
    return zstandard.ZstdCompressor(compression_params=params)


def zstd_decompressor():
    import zstandard

    return zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS)


_COUNT_TABLES: dict[int, np.ndarray] = {}


def _count_table(n: int) -> np.ndarray:
    """fp32 log(c / n), c = 0..n: pd_dist.core.logits.count_log_weights, the values sample_signal forms."""
    t = _COUNT_TABLES.get(n)
    if t is None:
        from pd_dist.core.logits import count_log_weights

        t = _COUNT_TABLES[n] = count_log_weights(n).numpy()
    return t


def _counts_of(values: np.ndarray, n: int) -> np.ndarray:
    """The draw counts c whose fp32 log(c / n) are ``values`` exactly; CodecError for any other value."""
    table = _count_table(n)
    c = np.clip(np.searchsorted(table, values), 1, n)
    if not np.array_equal(table[c], values):
        raise CodecError(f"encoding counts: values must be log(c / {n}) of a draw count c in 1..{n} "
                         "(a sampled signal of that many draws)")
    return c.astype(np.int64)


# ---------------------------------------------------------------------------------------- encode
def encode_block(values: np.ndarray, indices: np.ndarray, lse: np.ndarray, vocab_size: int, enc: dict,
                 zc=None, layout: str | None = None) -> tuple[bytes, int]:
    """Encode one sample ([T, k] fp32 values sorted descending with -inf padding, int64 indices, fp32
    lse [T]); ``zc`` a :func:`zstd_compressor` or None; ``layout`` 'index' / 'value' forces one (default:
    the smaller). Returns (block bytes, number of kept entries)."""
    values = np.ascontiguousarray(values, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0 (equal values)
    indices = np.asarray(indices, dtype=np.int64)
    T, k = values.shape
    mask = values > _NEG_INF
    counts = mask.sum(1)
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise CodecError("kept entries must come first in each row (dropped entries are -inf at the end)")
    kv = values[mask]
    if not np.isfinite(kv).all():
        raise CodecError("kept values must be finite (no NaN / +inf)")
    if ((values[:, 1:] > values[:, :-1]) & mask[:, 1:]).any():
        raise CodecError("kept values must be sorted descending within each row")
    ki = indices[mask]
    if ki.size and (ki.min() < 0 or ki.max() >= vocab_size):
        raise CodecError(f"indices must be in [0, {vocab_size})")
    lse = np.ascontiguousarray(lse, dtype=np.float32).reshape(T)
    bad = _bad_lse(lse, counts)
    if bad.any():
        raise CodecError(f"lse must be finite where a token keeps entries (-inf only where none is kept): "
                         f"token {_first(bad)} has {lse[bad][0]}")
    vmax = np.where(counts > 0, values[:, 0], np.float32(0.0)).astype(np.float32)

    # integer gap to the max, non-decreasing along the value order
    if enc["name"] == "qgap":
        if kv.size and np.abs(kv).max() >= QGAP_MAX_ABS_LOGIT:
            raise CodecError(f"encoding qgap needs |logit| < {QGAP_MAX_ABS_LOGIT:g} (got "
                             f"{np.abs(kv).max():g}); use encoding 'exact'")
        gaps = vmax[:, None].astype(np.float64) - np.where(mask, values, vmax[:, None]).astype(np.float64)
        G = np.rint(gaps * 2.0 ** -enc["step_log2"]).astype(np.int64)
    elif enc["name"] == "counts":
        c = _counts_of(np.where(mask, values, vmax[:, None]), enc["samples"])
        G = c[:, :1] - c
    else:
        G = _f32_ord(vmax)[:, None] - _f32_ord(np.where(mask, values, vmax[:, None]))
    # rank among equal gaps, in value order: position minus the start of its run of equal G
    col = np.arange(k)
    start = np.ones((T, k), bool)
    start[:, 1:] = G[:, 1:] != G[:, :-1]
    tie = col - np.maximum.accumulate(np.where(start, col, 0), axis=1)
    # to ascending index order (padding last)
    order = np.argsort(np.where(mask, indices, np.int64(1) << 40), axis=1, kind="stable")
    idx_s = np.take_along_axis(indices, order, 1)
    d = np.diff(idx_s, axis=1, prepend=np.int64(-1)) - 1  # first: idx itself; then delta - 1
    if (d[mask] < 0).any():
        raise CodecError("kept indices must be distinct within a token")
    d_k = d[mask]
    g_k = np.take_along_axis(G, order, 1)[mask]
    t_k = np.take_along_axis(tie, order, 1)[mask]
    lse_d = _zigzag(_f32_ord(lse) - _f32_ord(vmax))
    n_kept = int(counts.sum())
    head = [(counts, T), (vmax.view(np.uint32), T), (lse_d, T)]
    # layout "index order" (above) and layout "value order": indices as they are, gap deltas along the
    # value order for the entries after the max, no tie stream. The smaller block is kept (value order
    # wins when kept indices are close to uniformly random, e.g. very peaked or synthetic teachers).
    rest = mask.copy()
    rest[:, 0] = False
    dg = np.diff(G, axis=1)[rest[:, 1:]]
    blocks = []
    if layout in (None, "index"):
        blocks.append(_pack(head + [(d_k, n_kept), (g_k, n_kept), (t_k, n_kept)], n_kept, 0, zc))
    if layout in (None, "value"):
        blocks.append(_pack(head + [(ki, n_kept), (dg, dg.size), (np.zeros(0, np.int64), 0)], n_kept,
                            LAYOUT_VALUE, zc))
    if not blocks:
        raise ValueError(f"layout must be None, 'index' or 'value', got {layout!r}")
    return min(blocks, key=len), n_kept


def _pack(streams, n_kept: int, flags: int, zc) -> bytes:
    planes, lens, parts = [], [], []
    for i, (x, n) in enumerate(streams):
        p = 4 if i == 1 else _nplanes(int(x.max()) if n else 0)
        raw = _to_planes(x, p)
        if zc is not None and len(raw) >= _MIN_COMPRESS:
            z = zc.compress(raw)
            if len(z) < len(raw):
                raw = z
                flags |= 1 << i
        planes.append(p)
        lens.append(len(raw))
        parts.append(raw)
    return _HDR.pack(BLOCK_TAG, n_kept, *planes, flags, *lens) + b"".join(parts)


# ---------------------------------------------------------------------------------------- decode
def decode_block(buf, T: int, k: int, enc: dict, k_out: int | None = None, zd=None,
                 vocab_size: int | None = None):
    """Inverse of :func:`encode_block`; ``zd`` a :func:`zstd_decompressor` (made if needed). Returns
    (values fp32 [T, k_out], indices int64 [T, k_out], lse fp32 [T], counts int64 [T]); ``k_out`` (<= k)
    keeps only the first k_out entries (in value order) per token.

    Raises CodecError for a block that is corrupt or that :func:`encode_block` would not have written,
    whatever checksum it carries: stream lengths or kept counts that disagree, an index outside
    [0, vocab_size) or kept twice in a token, a kept value or an lse that is not finite (NaN, +-inf), kept
    values out of descending order. The message names the token; the caller names the sample."""
    k_out = k if k_out is None else k_out
    if len(buf) < HEADER_BYTES:
        raise CodecError("block too short")
    h = _HDR.unpack_from(buf, 0)
    tag, n_kept, planes, flags, lens = h[0], h[1], h[2:8], h[8], h[9:15]
    if tag != BLOCK_TAG or not all(1 <= p <= 8 for p in planes) or planes[1] != 4:
        raise CodecError("bad block header")
    if HEADER_BYTES + sum(lens) != len(buf):
        raise CodecError("block length disagrees with its header")
    value_layout = bool(flags & LAYOUT_VALUE)
    sizes = [T, T, T, n_kept, n_kept, n_kept]
    out, pos = [], HEADER_BYTES
    for i in range(N_STREAMS):
        seg = buf[pos:pos + lens[i]]
        pos += lens[i]
        want = sizes[i] * planes[i]
        if flags >> i & 1:
            if zd is None:
                zd = zstd_decompressor()
            try:
                seg = zd.decompress(seg, max_output_size=want)
            except Exception as e:  # zstandard.ZstdError
                raise CodecError(f"stream {i}: cannot decompress ({e})") from None
        if len(seg) != want:
            raise CodecError(f"stream {i}: {len(seg)} bytes, expected {want}")
        out.append(_from_planes(seg, sizes[i], planes[i], np.uint32 if i == 1 else np.int64))
        if i == 0:
            counts = out[0]
            if T and (counts.min() < 0 or counts.max() > k or int(counts.sum()) != n_kept):
                raise CodecError("inconsistent kept counts")
            if value_layout:  # gap deltas for the entries after each token's max; no tie stream
                sizes[4], sizes[5] = n_kept - int(np.count_nonzero(counts)), 0
    _, vmax_bits, lse_d, s_idx, s_gap, s_tie = out
    vmax = vmax_bits.view(np.float32)
    lse = _ord_f32(_f32_ord(vmax) + _unzigzag(lse_d.astype(np.uint64)))
    if planes[4] == 8 and s_gap.size and s_gap.min() < 0:
        raise CodecError("gaps out of range")
    bad = _bad_lse(lse, counts)
    if bad.any():
        raise CodecError(f"token {_first(bad)}: lse {lse[bad][0]} (NaN, +inf, or -inf with entries kept)")
    vocab_lim = vocab_size or 1 << 40
    col = np.arange(k)
    mask = col < counts[:, None]
    mo = mask[:, :k_out]
    if value_layout:
        idx = np.zeros((T, k), np.int64)
        idx[mask] = s_idx  # 8 byte planes can hold negative int64
        bad = mask & ((idx < 0) | (idx >= vocab_lim))
        if bad.any():
            t = _first(bad.any(1))
            raise CodecError(f"token {t}: index {idx[t][bad[t]][0]} outside the vocabulary [0, {vocab_lim})")
        # distinct within a token: sort each row, padding as distinct negative numbers
        srt = np.sort(np.where(mask, idx, -1 - col), axis=1)
        dup = srt[:, 1:] == srt[:, :-1]
        if dup.any():
            t = _first(dup.any(1))
            raise CodecError(f"token {t}: index {srt[t, 1:][dup[t]][0]} is kept twice")
        idx = idx[:, :k_out]
        rest = mask.copy()
        rest[:, 0] = False
        Q = np.zeros((T, k), np.int64)
        Q[rest] = s_gap
        Gv = np.cumsum(Q[:, :k_out], axis=1)
    else:
        # each delta is >= 0 (distinct, ascending indices) and < the vocabulary, so the cumsum cannot wrap
        bad = (s_idx < 0) | (s_idx >= vocab_lim)
        if bad.any():
            e = _first(bad)
            t = int(np.searchsorted(np.cumsum(counts), e, side="right"))
            raise CodecError(f"token {t}: index delta {int(s_idx[e])} out of range [0, {vocab_lim}) (kept "
                             "indices are distinct and in the vocabulary)")
        D = np.zeros((T, k), np.int64)
        D[mask] = s_idx + 1
        idx_s = np.cumsum(D, axis=1) - 1  # ascending indices; padding repeats the last kept index
        last = int(idx_s[:, -1].max()) if T else 0
        if last >= vocab_lim:
            t = _first(idx_s[:, -1] >= vocab_lim)
            raise CodecError(f"token {t}: index {int(idx_s[t, -1])} outside the vocabulary [0, {vocab_lim})")
        if n_kept and (s_tie.min() < 0 or s_tie.max() > k):
            raise CodecError("tie ranks out of range")
        # Sort each token's entries by (gap, tie rank): pack gap | tie | index into one int64 and sort
        # the rows (cheaper than argsort + gathers); the index bits come back out of the sorted keys.
        ib = max(1, last.bit_length())
        tb = max(1, int(k).bit_length())
        gmax = int(s_gap.max()) if n_kept else 0
        if gmax.bit_length() + tb + ib <= 62:
            packed = np.zeros((T, k), np.int64)
            packed[mask] = (s_gap << (tb + ib)) | (s_tie << ib)
            packed = np.where(mask, packed | idx_s, np.iinfo(np.int64).max)
            packed.sort(axis=1)
            top = packed[:, :k_out]
            idx = np.where(mo, top & ((1 << ib) - 1), 0)
            Gv = top >> (tb + ib)
        else:  # very wide gaps (encoding exact): argsort on (gap, tie), then gather
            key = np.full((T, k), np.iinfo(np.int64).max, np.int64)
            key[mask] = s_gap * (k + 1) + s_tie
            order = np.argsort(key, axis=1)[:, :k_out]
            idx = np.where(mo, np.take_along_axis(idx_s, order, 1), 0)
            Gv = np.take_along_axis(key, order, 1) // (k + 1)
    if enc["name"] == "qgap":
        vals = vmax[:, None] - Gv.astype(np.float32) * np.float32(2.0 ** enc["step_log2"])
    elif enc["name"] == "counts":
        table = _count_table(enc["samples"])
        c = _counts_of(vmax[:, None], enc["samples"]) - np.where(mo, Gv, 0)
        if (c[mo] < 1).any():
            raise CodecError("draw counts out of range")
        vals = table[np.clip(c, 0, enc["samples"])]
    else:
        vals = _ord_f32(_f32_ord(vmax)[:, None] - np.where(mo, Gv, 0))
    bad = mo & ~np.isfinite(vals)
    if bad.any():
        t = _first(bad.any(1))
        raise CodecError(f"token {t}: kept value {vals[t][bad[t]][0]} is not finite")
    if (mo[:, 1:] & (vals[:, 1:] > vals[:, :-1])).any():
        raise CodecError(f"token {_first((mo[:, 1:] & (vals[:, 1:] > vals[:, :-1])).any(1))}: kept values "
                         "are not sorted descending")
    vals = np.where(mo, vals, np.float32(_NEG_INF)).astype(np.float32, copy=False)
    return vals, idx, lse, counts
