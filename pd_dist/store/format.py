"""On-disk layout of the teacher-logits store: manifest, shard header, sample table and footer.

A store holds one teacher signal per token (StoreMeta.signal, pd_dist.core.logits.SignalSpec): top-p-k
truncated logits (the default; the only kind of format version 1), or a drawn signal (sampled,
head_tail) whose values are log weights. Version 2 added the signal; a version-1 store reads as
top-p-k, and a top-p-k store's metadata digest is the same in both versions.

A store is a directory::

    manifest.json               written last (atomically) by write_manifest(); deterministic JSON
    shards/shard-00000.bin      samples [0, shard_size)
    shards/shard-00001.bin      ...

Shard file (little-endian)::

    header  64 B   magic b"PDLSHRD\\0", format version u32, shard index u32, first u64, end u64,
                   seq_len u32, k u32 (stored width), vocab_size u32, flags u32 (0), meta digest 16 B
    blocks         one block per sample id first..end-1, in order (pd_dist.store.codec: a header and
                   six streams, each a zstd frame when that is smaller)
    table   n x 24 B  per sample: offset u64, nbytes u32, crc32 u32 (of the stored bytes),
                   n_kept u32, codec u8 (0: the codec's block format), 3 pad bytes
    hist    (k+1) x u64  histogram of kept entries per token over the shard
    footer  32 B   table offset u64, n u32, k u32, crc32(table + hist) u32, crc32(header) u32,
                   magic b"PDLSEND\\0"

Reading one sample touches the footer and table once per shard (checked against their crc32) and then
only that sample's bytes, which are checked against the sample's crc32 on every read.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from pd_dist.core.logits import SignalSpec
from pd_dist.store.codec import check_encoding, default_encoding

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2, 3)  # 1: top-p-k only, no `signal` in the manifest; 3: document-keyed
DOCUMENT_FORMAT_VERSION = 3
SOURCE_STORE_PREFIX = "source-"  # a document store library: one store per source, source-<fingerprint[:16]>
FORMAT_NAME = "pd-dist-teacher-logits"
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
DEFAULT_ZSTD_LEVEL = 10

HEADER = struct.Struct("<8sIIQQIIII16s")
HEADER_MAGIC = b"PDLSHRD\0"
FOOTER = struct.Struct("<QIIII8s")
FOOTER_MAGIC = b"PDLSEND\0"
TABLE_DTYPE = np.dtype([("offset", "<u8"), ("nbytes", "<u4"), ("crc", "<u4"), ("n_kept", "<u4"),
                        ("codec", "u1"), ("pad", "u1", (3,))])
CODEC_BLOCK = 0
assert HEADER.size == 64 and FOOTER.size == 32 and TABLE_DTYPE.itemsize == 24


class StoreError(RuntimeError):
    """A store that is missing, corrupt, incomplete or incompatible with the run."""


class ForeignShardError(StoreError):
    """An intact shard (header, table and footer check out) written for another store: other teacher,
    data, truncation, signal or encoding (its header's metadata digest is not the manifest's)."""


@dataclass
class StoreMeta:
    """What a store holds, besides its shards: written to manifest.json and hashed into every shard."""
    teacher: dict  # {"name": str, "config_hash": str, "weights_hash": str}
    tokenizer_hash: str
    data_fingerprint: str
    seq_len: int
    vocab_size: int
    top_p: float
    top_k: int
    n_samples: int
    shard_size: int  # samples per shard (the last one may be shorter)
    encoding: dict = field(default_factory=dict)  # value encoding: name + params (+ zstd_level)
    # The teacher signal in the manifest's form (SignalSpec.store_fields): {} for top-p-k (top_p, top_k
    # above); else {"kind", **SignalSpec.params()}, with top_p, top_k the head truncation (for a signal
    # without one, as format 2 wrote it: top_p 1 and top_k its width). Build it from a spec with
    # StoreMeta.for_signal; read it back with signal_spec.
    signal: dict = field(default_factory=dict)
    # data.document_mask of the teacher's forward (each document of a window attended to on its own).
    # Absent from the manifest (and its digest) when false: a store written before it reads as false.
    document_mask: bool = False
    # distill.teacher_context: "window" (a sample is a training window of data_fingerprint's dataset) or
    # "document" (format 3: one source's token stream, data_fingerprint the source's fingerprint, a
    # "sample" a record of seq_len consecutive stream positions, n_tokens the stream's length, each
    # position's signal read in document context with chunks of teacher_seq_len). Absent when window.
    context: str = "window"
    teacher_seq_len: int = 0
    n_tokens: int = 0
    source: str = ""  # the source's label when it was written (for messages; not compared)

    @property
    def format_version(self) -> int:
        """The format this meta's store is written in: 3 for a document store, else 2."""
        return DOCUMENT_FORMAT_VERSION if self.context == "document" else FORMAT_VERSION

    @classmethod
    def for_signal(cls, spec: SignalSpec, **fields) -> "StoreMeta":
        """The meta of a store holding ``spec`` (its top_p, top_k and signal fields derived from it);
        ``fields``: the rest (teacher, tokenizer_hash, data_fingerprint, seq_len, vocab_size, n_samples,
        shard_size, encoding)."""
        if not isinstance(spec, SignalSpec):
            raise ValueError(f"StoreMeta.for_signal needs a SignalSpec, got {spec!r}")
        top_p, top_k, signal = spec.store_fields()
        return cls(top_p=top_p, top_k=top_k, signal=signal, **fields)

    @property
    def signal_spec(self) -> SignalSpec:
        """The stored signal as a SignalSpec (SignalSpec.from_store of the manifest's fields)."""
        return SignalSpec.from_store(self.top_p, self.top_k, self.signal)

    @property
    def width(self) -> int:
        """Stored entries per token: the signal's width (for top-p-k k = min(top_k, vocab_size), as
        pd_dist.core.logits.truncate; the draws for sampled; the head plus the draws for head_tail)."""
        return self.signal_spec.width(self.vocab_size)

    @property
    def value_encoding(self) -> dict:
        """The value codec's parameters: the encoding without the container's zstd level."""
        return {k: v for k, v in self.encoding.items() if k != "zstd_level"}

    @property
    def n_shards(self) -> int:
        return n_shards(self.n_samples, self.shard_size)

    def resolved(self) -> "StoreMeta":
        """A validated copy with the encoding filled from the defaults where empty."""
        sig = dict(self.signal) if self.signal else {}
        if sig.get("kind") == "top_p_k" and set(sig) == {"kind"}:
            sig = {}
        if self.encoding:
            enc = dict(self.encoding)
        elif sig.get("kind") == "sampled":  # counts are exact and small integers
            enc = default_encoding("counts", samples=sig.get("samples"))
        else:
            enc = default_encoding()
        if "zstd_level" not in enc:
            enc["zstd_level"] = DEFAULT_ZSTD_LEVEL
        m = StoreMeta(teacher=dict(self.teacher), tokenizer_hash=str(self.tokenizer_hash),
                      data_fingerprint=str(self.data_fingerprint), seq_len=int(self.seq_len),
                      vocab_size=int(self.vocab_size), top_p=float(self.top_p), top_k=int(self.top_k),
                      n_samples=int(self.n_samples), shard_size=int(self.shard_size), encoding=enc,
                      signal=sig, document_mask=self.document_mask, context=str(self.context),
                      teacher_seq_len=int(self.teacher_seq_len), n_tokens=int(self.n_tokens), source=str(self.source))
        m.validate()
        return m

    def validate(self) -> None:
        t = self.teacher
        if not isinstance(t, dict) or set(t) != {"name", "config_hash", "weights_hash"} or \
                not all(isinstance(v, str) for v in t.values()):
            raise ValueError(f"StoreMeta.teacher must be {{'name', 'config_hash', 'weights_hash'}} strings, got {t!r}")
        for name in ("seq_len", "vocab_size", "top_k", "shard_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"StoreMeta.{name} must be an integer >= 1, got {v!r}")
        if self.n_samples < 0:
            raise ValueError(f"StoreMeta.n_samples must be >= 0, got {self.n_samples!r}")
        if not (0.0 < self.top_p <= 1.0) or not math.isfinite(self.top_p):
            raise ValueError(f"StoreMeta.top_p must be in (0, 1], got {self.top_p!r}")
        if self.vocab_size >= 1 << 32:
            raise ValueError("StoreMeta.vocab_size must be < 2^32")
        check_encoding(self.value_encoding)
        self._validate_signal()
        if not isinstance(self.document_mask, bool):
            raise ValueError(f"StoreMeta.document_mask must be true or false, got {self.document_mask!r}")
        if self.context not in ("window", "document"):
            raise ValueError(f"StoreMeta.context must be window or document, got {self.context!r}")
        if self.context == "document":
            if self.teacher_seq_len < 1 or self.n_tokens < 1:
                raise ValueError(f"a document store needs teacher_seq_len and n_tokens >= 1, got "
                                 f"{self.teacher_seq_len}, {self.n_tokens}")
            if self.n_samples != -(-self.n_tokens // self.seq_len):
                raise ValueError(f"a document store of {self.n_tokens} tokens in records of {self.seq_len} has "
                                 f"{-(-self.n_tokens // self.seq_len)} records, got n_samples={self.n_samples}")
            if self.document_mask or self.signal:
                raise ValueError("a document store holds a top-p-k signal read per document (no document_mask)")
        elif self.teacher_seq_len or self.n_tokens or self.source:
            raise ValueError("teacher_seq_len, n_tokens and source belong to document stores")
        lvl = self.encoding.get("zstd_level", DEFAULT_ZSTD_LEVEL)
        if isinstance(lvl, bool) or not isinstance(lvl, int) or not 1 <= lvl <= 22:
            raise ValueError(f"encoding zstd_level must be an integer in [1, 22], got {lvl!r}")

    def _validate_signal(self) -> None:
        sig = self.signal
        if not isinstance(sig, dict):
            raise ValueError(f"StoreMeta.signal must be an object, got {sig!r}")
        if not sig:
            if self.value_encoding["name"] == "counts":
                raise ValueError("encoding counts holds sampled signals only (StoreMeta.signal is top-p-k)")
            return
        kind = sig.get("kind")
        if kind not in SignalSpec.kinds() or kind == "top_p_k":
            raise ValueError(f"StoreMeta.signal kind must be one of {', '.join(k for k in SignalSpec.kinds() if k != 'top_p_k')} "
                             f"(top-p-k is an empty signal), got {kind!r}")
        try:
            spec = self.signal_spec  # validates the values
        except TypeError as e:
            raise ValueError(f"StoreMeta.signal {kind}: {e}, got {sig!r}") from None
        want = {"kind", *spec.params()}
        if set(sig) != want:
            raise ValueError(f"StoreMeta.signal {kind} needs exactly {sorted(want)}, got {sorted(sig)}")
        if spec.params() != {k: sig[k] for k in spec.params()}:
            raise ValueError(f"StoreMeta.signal parameters must be {spec.params()!r}'s types, got {sig!r}")
        fields = spec.store_fields()
        if (self.top_p, self.top_k) != fields[:2]:
            raise ValueError(f"a {kind} store of {spec.describe()} has top_p={fields[0]} and top_k={fields[1]}, "
                             f"got top_p={self.top_p}, top_k={self.top_k}")
        enc = self.value_encoding
        if kind == "sampled":
            if enc["name"] == "qgap":
                raise ValueError("a sampled store needs encoding counts (or exact): qgap would round its weights")
            if enc["name"] == "counts" and enc["samples"] != spec.samples:
                raise ValueError(f"encoding counts has samples={enc['samples']}, the signal draws {spec.samples}")
        elif enc["name"] == "counts":
            raise ValueError(f"encoding counts holds sampled signals only, not {kind}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["signal"]:
            del d["signal"]  # top-p-k: the metadata (and its digest) of format version 1
        if not d["document_mask"]:
            del d["document_mask"]  # off: the metadata (and its digest) of a store that predates it
        if d["context"] == "window":
            for k in ("context", "teacher_seq_len", "n_tokens", "source"):
                del d[k]  # a window store: the metadata (and digest) of format 2
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StoreMeta":
        names = ("teacher", "tokenizer_hash", "data_fingerprint", "seq_len", "vocab_size", "top_p",
                 "top_k", "n_samples", "shard_size", "encoding")
        missing = [n for n in names if n not in d]
        if missing:
            raise StoreError(f"manifest lacks {missing}")
        return cls(**{n: d[n] for n in names}, signal=d.get("signal") or {},
                   document_mask=d.get("document_mask", False), context=d.get("context", "window"),
                   teacher_seq_len=d.get("teacher_seq_len", 0), n_tokens=d.get("n_tokens", 0),
                   source=d.get("source", ""))

    def digest(self) -> str:
        """sha256 of the canonical JSON of the resolved meta (identifies what the shards were written for)."""
        blob = json.dumps(self.resolved().to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 4 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for b in iter(lambda: fh.read(1 << 22), b""):
            h.update(b)
    return h.hexdigest()


def shard_ranges(n_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """(first, end) sample ids of each shard index."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(s, min(s + shard_size, n_samples)) for s in range(0, n_samples, shard_size)]


def n_shards(n_samples: int, shard_size: int) -> int:
    """The number of shards of ``n_samples`` samples, ``shard_size`` each (the last one may be shorter),
    computed without listing them (a manifest's counts are checked before anything is allocated)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return -(-n_samples // shard_size)


def shard_range(n_samples: int, shard_size: int, index: int) -> tuple[int, int]:
    """(first, end) sample ids of shard ``index``: ``shard_ranges(n_samples, shard_size)[index]``."""
    if not 0 <= index < n_shards(n_samples, shard_size):
        raise ValueError(f"shard index {index} out of range: {n_samples} samples make "
                         f"{n_shards(n_samples, shard_size)} shards of {shard_size}")
    first = index * shard_size
    return first, min(first + shard_size, n_samples)


def min_shard_bytes(n: int, k: int) -> int:
    """A lower bound on the size of a shard file of ``n`` samples of width ``k``: its header, sample table,
    histogram and footer (the blocks are not counted)."""
    return HEADER.size + n * TABLE_DTYPE.itemsize + (k + 1) * 8 + FOOTER.size


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:05d}.bin"


def shard_path(root, index: int) -> Path:
    return Path(root) / shard_name(index)


def pack_header(meta: StoreMeta, index: int, first: int, end: int) -> bytes:
    return HEADER.pack(HEADER_MAGIC, meta.format_version, index, first, end, meta.seq_len, meta.width,
                       meta.vocab_size, 0, bytes.fromhex(meta.digest())[:16])


@dataclass
class ShardLayout:
    """Parsed header + trailer of a shard file (no sample data)."""
    index: int
    first: int
    end: int
    seq_len: int
    k: int
    vocab_size: int
    digest16: bytes
    table: np.ndarray  # TABLE_DTYPE [end - first]
    hist: np.ndarray  # uint64 [k + 1]
    size: int


def parse_shard(buf, size: int, what: str) -> ShardLayout:
    """Parse and check a shard's header, table and footer from a buffer of the whole file.

    Raises StoreError (prefixed by ``what``) for anything inconsistent: bad magic, truncation, crc."""
    if size < HEADER.size + FOOTER.size:
        raise StoreError(f"{what}: file is truncated ({size} bytes)")
    magic, ver, index, first, end, seq_len, k, vocab, _flags, dig = HEADER.unpack_from(buf, 0)
    if magic != HEADER_MAGIC:
        raise StoreError(f"{what}: not a pd-dist logits shard (bad header magic)")
    if ver not in READABLE_VERSIONS:
        raise StoreError(f"{what}: shard format version {ver}, this code reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    t_off, n, fk, t_crc, h_crc, fmagic = FOOTER.unpack_from(buf, size - FOOTER.size)
    if fmagic != FOOTER_MAGIC:
        raise StoreError(f"{what}: file is truncated or corrupt (no footer)")
    if h_crc != zlib.crc32(bytes(buf[:HEADER.size])):
        raise StoreError(f"{what}: header checksum mismatch")
    if n != end - first or fk != k:
        raise StoreError(f"{what}: footer disagrees with header")
    t_len = n * TABLE_DTYPE.itemsize + (k + 1) * 8
    if t_off + t_len + FOOTER.size != size or t_off < HEADER.size:
        raise StoreError(f"{what}: file is truncated or corrupt (table out of place)")
    trailer = bytes(buf[t_off:t_off + t_len])
    if zlib.crc32(trailer) != t_crc:
        raise StoreError(f"{what}: sample table checksum mismatch")
    table = np.frombuffer(trailer, TABLE_DTYPE, n).copy()
    hist = np.frombuffer(trailer, "<u8", k + 1, n * TABLE_DTYPE.itemsize).copy()
    if n:
        ends = table["offset"].astype(np.int64) + table["nbytes"]
        if table["offset"][0] != HEADER.size or (table["offset"][1:] != ends[:-1]).any() or ends[-1] != t_off:
            raise StoreError(f"{what}: sample table is inconsistent")
    return ShardLayout(index, first, end, seq_len, k, vocab, dig, table, hist, size)


def check_layout(lay: ShardLayout, meta: StoreMeta, index: int, what: str) -> None:
    """Raises ForeignShardError when the parsed shard was written for another store than ``meta``,
    StoreError when it is not shard ``index`` of ``meta``'s store."""
    if lay.digest16 != bytes.fromhex(meta.digest())[:16]:
        raise ForeignShardError(f"{what}: shard was written for a different store (teacher, data, "
                                "truncation, signal or encoding differ)")
    first, end = shard_range(meta.n_samples, meta.shard_size, index)
    got = (lay.index, lay.first, lay.end, lay.seq_len, lay.k, lay.vocab_size)
    want = (index, first, end, meta.seq_len, meta.width, meta.vocab_size)
    if got != want:
        raise StoreError(f"{what}: shard header (index, first, end, seq_len, k, vocab) = {got}, "
                         f"expected {want}")


def manifest_bytes(d: dict) -> bytes:
    """The bytes of manifest.json holding ``d`` (deterministic: sorted keys, one space of indent)."""
    return (json.dumps(d, sort_keys=True, indent=1) + "\n").encode()


def manifest_dict(meta: StoreMeta, shards: list[dict], hist, n_kept: int,
                  version: Optional[int] = None) -> dict:
    """The manifest of a store of ``meta`` (resolved) whose shards have the entries ``shards`` (index,
    file, first, end, bytes, sha256), kept-entries histogram ``hist`` and ``n_kept`` kept entries in all:
    what write_manifest writes (format ``version``: a version-1 store's manifest is checked as written)."""
    d = meta.to_dict()
    d.update({"format": FORMAT_NAME, "format_version": version or meta.format_version, "meta_digest": meta.digest(),
              "shards": shards,
              "stats": {"tokens": meta.n_tokens or meta.n_samples * meta.seq_len, "kept_entries": int(n_kept),
                        "kept_hist": [int(x) for x in hist],
                        "shard_bytes": int(sum(s["bytes"] for s in shards))}})
    return d
