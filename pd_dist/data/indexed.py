"""The Megatron indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``): reader and streaming writer.

This is the format Megatron-LM's, Megatron-DeepSpeed's and NeMo's ``preprocess_data.py`` write, and the
one megatron-core's ``megatron.core.datasets.indexed_dataset.IndexedDataset`` reads. pd-dist prepares
its own data in it, so a prepared shard opens with megatron-core, and a Megatron-made dataset trains
here as it is.

``.bin`` is the token ids of every sequence, back to back, in one dtype. ``.idx`` is, little-endian::

    9 bytes   b"MMIDIDX\\x00\\x00"
    u64       version (1)
    u8        dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    u64       S, the number of sequences
    u64       D, the number of entries of the document index
    i32[S]    sequence lengths (tokens)
    i64[S]    sequence pointers (byte offset of each sequence in .bin)
    i64[D]    document index: document d is sequences [index[d], index[d + 1]); index[0] = 0,
              index[D - 1] = S
    (i8[S]    sequence modes, multimodal datasets only: not read here)

pd-dist writes one sequence per document (``preprocess_data.py`` without sentence splitting), so the
document index is 0, 1, ..., S. Everything here is pure: no process groups, no tokenizer.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_FIXED = len(HEADER) + 8 + 1 + 8 + 8


class IndexedFormatError(ValueError):
    """A ``.bin``/``.idx`` pair that is not a consistent Megatron indexed dataset. One line naming the
    file and what is wrong."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype Megatron reads that holds every id of a ``vocab_size`` vocabulary."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 31:
        return np.dtype(np.int32)
    raise ValueError(f"a vocabulary of {vocab_size} ids does not fit the indexed format's int32")


def max_id(dtype: np.dtype) -> int:
    """The largest token id ``dtype`` can hold (floating dtypes hold none: ids are integers)."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        return -1
    return int(np.iinfo(dtype).max)


@dataclass(frozen=True)
class Index:
    """A parsed ``.idx``. ``lengths``/``pointers`` per sequence, ``doc_index`` as in the file."""
    path: Path
    dtype: np.dtype
    lengths: np.ndarray
    pointers: np.ndarray
    doc_index: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    @property
    def n_docs(self) -> int:
        return len(self.doc_index) - 1

    def doc_token_offsets(self) -> np.ndarray:
        """Token offset of each document's start in the ``.bin`` stream, plus the end: [n_docs + 1]."""
        seq_starts = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        return seq_starts[self.doc_index]


def read_index(prefix: str | os.PathLike, bin_size: int | None = None) -> Index:
    """Parse and check ``PREFIX.idx``. With ``bin_size`` (the ``.bin`` length in bytes, read from disk
    when None) it must describe that file exactly: contiguous sequences that end at its last byte."""
    idx_path = Path(f"{prefix}.idx")
    bin_path = Path(f"{prefix}.bin")
    try:
        raw = idx_path.read_bytes()
        if bin_size is None:
            bin_size = bin_path.stat().st_size
    except FileNotFoundError as e:
        raise IndexedFormatError(f"{e.filename}: no such file (an indexed dataset is PREFIX.bin + "
                                 "PREFIX.idx; give the prefix)") from None
    except OSError as e:
        raise IndexedFormatError(f"{e.filename}: cannot read ({e.strerror})") from None

    def bad(what: str):
        return IndexedFormatError(f"{idx_path}: {what}")

    if len(raw) < _FIXED or raw[:len(HEADER)] != HEADER:
        raise bad("not a Megatron indexed dataset index (bad header)")
    o = len(HEADER)
    (version,) = struct.unpack_from("<Q", raw, o)
    if version != VERSION:
        raise bad(f"index version {version}, only version {VERSION} is read")
    code = raw[o + 8]
    if code not in DTYPES:
        raise bad(f"unknown dtype code {code}")
    dtype = np.dtype(DTYPES[code])
    n_seq, n_doc = struct.unpack_from("<QQ", raw, o + 9)
    need = _FIXED + n_seq * 4 + n_seq * 8 + n_doc * 8
    if n_doc < 1 or len(raw) < need or len(raw) > need + n_seq:
        raise bad(f"its size {len(raw)} B does not fit {n_seq} sequences and {n_doc} document-index entries")
    o = _FIXED
    lengths = np.frombuffer(raw, np.int32, n_seq, o)
    pointers = np.frombuffer(raw, np.int64, n_seq, o + 4 * n_seq)
    doc_index = np.frombuffer(raw, np.int64, n_doc, o + 12 * n_seq)
    if n_seq and lengths.min() < 0:
        raise bad("a sequence length is negative")
    expect = np.zeros(n_seq, np.int64)
    if n_seq:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=expect[1:])
    if not np.array_equal(pointers, expect):
        i = int(np.flatnonzero(pointers != expect)[0])
        raise bad(f"sequence {i} points at byte {int(pointers[i])}, but the sequences before it end at "
                  f"{int(expect[i])} (not written back to back)")
    if doc_index[0] != 0 or doc_index[-1] != n_seq or (n_doc > 1 and np.any(np.diff(doc_index) < 0)):
        raise bad(f"the document index is not 0 .. {n_seq} in order")
    total = int(lengths.sum(dtype=np.int64)) * dtype.itemsize
    if total != bin_size:
        raise IndexedFormatError(f"{bin_path}: {bin_size} B, but {idx_path} describes {total} B of "
                                 f"{dtype.name} tokens: the .idx does not match its .bin")
    return Index(idx_path, dtype, lengths, pointers, doc_index)


class IndexedWriter:
    """Write ``PREFIX.bin``/``PREFIX.idx`` one document at a time, in bounded memory (the ``.idx`` arrays
    are 12 B a document). Both files are written under ``.tmp`` names and renamed into place by
    :meth:`finish` (``.bin`` first, ``.idx`` last), so an interrupted write never looks complete.
    The sha256 of each file is computed as it is written."""

    def __init__(self, prefix: str | os.PathLike, dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"dtype {self.dtype} has no code in the indexed format")
        self._bin = open(f"{self.prefix}.bin.tmp", "wb")
        self._hash = hashlib.sha256()
        self._lengths: list[np.ndarray] = []
        self.n_tokens = 0

    def add_documents(self, docs: list[np.ndarray]) -> None:
        """Append documents (each a 1-D array of ids, already in ``dtype``) as one sequence each."""
        if not docs:
            return
        blob = np.concatenate(docs).astype(self.dtype, copy=False).tobytes()
        self._bin.write(blob)
        self._hash.update(blob)
        lengths = np.fromiter((len(d) for d in docs), np.int64, len(docs))
        if lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a document longer than 2^31 - 1 tokens does not fit the indexed format")
        self._lengths.append(lengths)
        self.n_tokens += int(lengths.sum())

    def finish(self) -> dict:
        """Write the ``.idx``, rename both into place; returns sizes and digests."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        idx = index_bytes(self.dtype, lengths, np.arange(len(lengths) + 1, dtype=np.int64))
        _write_synced(f"{self.prefix}.idx.tmp", idx)
        os.replace(f"{self.prefix}.bin.tmp", f"{self.prefix}.bin")
        os.replace(f"{self.prefix}.idx.tmp", f"{self.prefix}.idx")
        return {"n_docs": len(lengths), "n_tokens": self.n_tokens, "bin_bytes": self.n_tokens * self.dtype.itemsize,
                "bin_sha256": self._hash.hexdigest(), "idx_sha256": hashlib.sha256(idx).hexdigest()}

    def abort(self) -> None:
        self._bin.close()
        for suffix in (".bin.tmp", ".idx.tmp"):
            try:
                os.unlink(self.prefix + suffix)
            except FileNotFoundError:
                pass


def index_bytes(dtype, lengths: np.ndarray, doc_index: np.ndarray) -> bytes:
    """The ``.idx`` contents for sequences of ``lengths`` written back to back, with ``doc_index``."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, np.int64)
    n = len(lengths)
    pointers = np.zeros(n, np.int64)
    if n:
        np.cumsum(lengths[:-1] * dtype.itemsize, out=pointers[1:])
    return b"".join([HEADER, struct.pack("<Q", VERSION), struct.pack("<B", CODES[dtype]),
                     struct.pack("<QQ", n, len(doc_index)), lengths.astype(np.int32).tobytes(), pointers.tobytes(),
                     np.asarray(doc_index, np.int64).tobytes()])


def _write_synced(path: str, blob: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())


def truncate_shard(prefix: str | os.PathLike, n_docs: int) -> None:
    """Keep only the first ``n_docs`` documents of ``PREFIX.bin``/``.idx`` (in place)."""
    idx = read_index(prefix)
    if not 0 <= n_docs <= idx.n_docs:
        raise ValueError(f"{prefix}: cannot keep {n_docs} of {idx.n_docs} documents")
    n_seq = int(idx.doc_index[n_docs])
    lengths = idx.lengths[:n_seq].astype(np.int64)
    _write_synced(f"{prefix}.idx.tmp", index_bytes(idx.dtype, lengths, idx.doc_index[:n_docs + 1]))
    os.truncate(f"{prefix}.bin", int(lengths.sum()) * idx.dtype.itemsize)
    os.replace(f"{prefix}.idx.tmp", f"{prefix}.idx")
