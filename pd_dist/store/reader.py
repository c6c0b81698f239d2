"""Reading a teacher-logits store: random access, streaming, re-truncation, verification, statistics."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import mmap
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from pd_dist.core.logits import TOP_P_EPS, SignalSpec, SparseLogits, top_p_keep
from pd_dist.store.codec import CodecError, decode_block, mass_tolerance, tv_bound, value_tolerance, zstd_decompressor
from pd_dist.store.format import (sha256_file, CODEC_BLOCK, FORMAT_NAME, MANIFEST, READABLE_VERSIONS, SHARD_DIR,
                     ForeignShardError, ShardLayout, StoreError, StoreMeta, check_layout, manifest_bytes,
                     manifest_dict, min_shard_bytes, parse_shard, shard_name, shard_path, shard_range)

_NEG_INF = float("-inf")
_P_EPS = TOP_P_EPS  # top_p values closer than this are the same truncation


def _absent(e: OSError) -> bool:
    """An OSError that says no file is behind the name (absent, a path through a non-directory, a dangling
    or looping link), as opposed to one that could not be read (EACCES, EIO)."""
    return isinstance(e, FileNotFoundError) or e.errno in (errno.ENOTDIR, errno.ELOOP)


def _cannot_read(path: Path, e: OSError) -> "StoreCheckError":
    return StoreCheckError(f"{path}: could not read ({e.strerror or e})")


def _read_manifest(root: Path) -> tuple[dict, bytes]:
    """manifest.json parsed (a JSON object) and its bytes. StoreError (one line, naming the file) for a
    missing or unparseable one; StoreCheckError when it cannot be read (permissions, I/O)."""
    path = root / MANIFEST
    try:
        text = path.read_bytes()
    except OSError as e:
        if _absent(e) or isinstance(e, IsADirectoryError):
            raise StoreError(f"{path}: no manifest (not a logits store, or its generation did not finish: "
                             "write_manifest() writes it once every shard is done)") from None
        raise _cannot_read(path, e) from None
    try:
        man = json.loads(text.decode())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise StoreError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(man, dict):
        raise StoreError(f"{path}: the manifest must be a JSON object, got {type(man).__name__}")
    return man, text


def _manifest_meta(man: dict, path: Path) -> StoreMeta:
    """The manifest's metadata, resolved and checked against its meta_digest; StoreError naming the file
    and what is wrong."""
    if man.get("format") != FORMAT_NAME:
        raise StoreError(f"{path}: not a pd-dist logits store manifest")
    version = man.get("format_version")
    if version not in READABLE_VERSIONS:
        raise StoreError(f"{path}: store format version {version!r}, this code reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    if version == 1 and "signal" in man:
        raise StoreError(f"{path}: a format-version-1 manifest has no signal field (top-p-k only)")
    try:
        meta = StoreMeta.from_dict(man).resolved()
    except StoreError as e:  # a metadata field is missing
        raise StoreError(f"{path}: {e}") from None
    except (ValueError, TypeError, OverflowError, AttributeError) as e:
        raise StoreError(f"{path}: invalid store metadata ({e})") from None
    if (version == 3) != (meta.context == "document"):
        raise StoreError(f"{path}: format version {version} with context {meta.context} (version 3 is the "
                         "document-keyed store, and only it)")
    if man.get("meta_digest") != meta.digest():
        raise StoreError(f"{path}: meta_digest does not match the manifest's metadata (edited manifest?)")
    return meta


def _load_manifest(root: Path) -> tuple[dict, StoreMeta]:
    """manifest.json and its metadata, the shape of its shard list and stats checked (what the writer
    writes), its counts checked against each other before anything is sized from them: StoreError naming
    the file and the field (StoreCheckError when the file cannot be read)."""
    man, meta, _raw = _load_manifest_bytes(root)
    return man, meta


def _load_manifest_bytes(root: Path) -> tuple[dict, StoreMeta, bytes]:
    """_load_manifest, and the manifest's bytes."""
    path = root / MANIFEST
    man, raw = _read_manifest(root)
    meta = _manifest_meta(man, path)
    _check_manifest_fields(man, path)
    shards = man["shards"]
    if len(shards) != meta.n_shards:
        raise StoreError(f"{path}: {len(shards)} shards listed, n_samples={meta.n_samples} and "
                         f"shard_size={meta.shard_size} make {meta.n_shards}")
    for i, s in enumerate(shards):
        a, b = shard_range(meta.n_samples, meta.shard_size, i)
        if (s["index"], s["file"], s["first"], s["end"]) != (i, shard_name(i), a, b):
            raise StoreError(f"{path}: shard list does not match n_samples={meta.n_samples}, "
                             f"shard_size={meta.shard_size} (shards[{i}])")
        if s["bytes"] < min_shard_bytes(b - a, meta.width):
            raise StoreError(f"{path}: manifest field shards[{i}].bytes = {s['bytes']} is less than a shard of "
                             f"{b - a} samples of width {meta.width} takes "
                             f"({min_shard_bytes(b - a, meta.width)})")
    return man, meta, raw


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_count(v) -> bool:
    return _is_int(v) and v >= 0


_COUNT, _STR = (_is_count, "a non-negative integer"), (lambda v: isinstance(v, str), "a string")
_INT = (_is_int, "an integer")
_SHARD_FIELDS = {"index": _COUNT, "file": _STR, "first": _COUNT, "end": _COUNT, "bytes": _COUNT, "sha256": _STR}
_STATS_FIELDS = {"tokens": _INT, "kept_entries": _INT, "shard_bytes": _INT,
                 "kept_hist": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v), "a list of integers")}


def _check_fields(obj, fields: dict, where: str, path: Path, label: Optional[str] = None) -> None:
    """``obj`` is an object holding each of ``fields`` (name -> (check, what it must be)); else a
    StoreError naming the field (``where``.name; ``label`` names the object itself)."""
    if not isinstance(obj, dict):
        raise StoreError(f"{path}: manifest field {label or where} must be an object, got {type(obj).__name__}")
    for name, (ok, what) in fields.items():
        if name not in obj:
            raise StoreError(f"{path}: manifest field {where}.{name} is missing")
        if not ok(obj[name]):
            raise StoreError(f"{path}: manifest field {where}.{name} must be {what}, got {obj[name]!r}")


def _check_manifest_fields(man: dict, path: Path) -> None:
    """The shape of the manifest's shard list and stats (what the writer writes): StoreError naming the
    field, so valid JSON of the wrong shape never surfaces as an AttributeError or KeyError later."""
    shards = man.get("shards")
    if not isinstance(shards, list):
        raise StoreError(f"{path}: manifest field 'shards' must be a list, got {type(shards).__name__}")
    for i, entry in enumerate(shards):
        _check_fields(entry, _SHARD_FIELDS, f"shards[{i}]", path)
    _check_fields(man.get("stats"), _STATS_FIELDS, "stats", path, label="'stats'")


class _Shard:
    """An open (memory-mapped) shard of this process."""

    __slots__ = ("path", "mm", "layout", "offsets", "nbytes", "crcs", "codecs")

    def __init__(self, path: Path, mm, layout: ShardLayout):
        self.path, self.mm, self.layout = path, mm, layout
        t = layout.table
        self.offsets = t["offset"].astype(np.int64).tolist()
        self.nbytes = t["nbytes"].astype(np.int64).tolist()
        self.crcs = t["crc"].astype(np.int64).tolist()
        self.codecs = t["codec"].astype(np.int64).tolist()


class LogitsStore:
    """Read-only view of a teacher-logits store directory.

    Shards are memory-mapped lazily, per process, on first use (at most ``max_open_shards`` at a time);
    pickling drops them, and a forked child notices the new pid and maps its own, so a store can be
    handed to torch DataLoader workers (fork or spawn). ``verify=True`` checks every shard's sha256
    against the manifest up front (reads the whole store); every read checks the sample's crc32.
    """

    def __init__(self, root, verify: bool = False, max_open_shards: int = 64):
        self.root = Path(root)
        self.max_open_shards = int(max_open_shards)
        self.manifest, self.meta = _load_manifest(self.root)
        self.n_shards = len(self.manifest["shards"])
        self.k = self.meta.width
        self._enc = self.meta.value_encoding
        self.default_top_p: float | None = None
        self.default_top_k: int | None = None
        missing, bad_size = [], []
        for s in self.manifest["shards"]:
            p = self.root / s["file"]
            try:
                size = p.stat().st_size
            except OSError as e:
                if not _absent(e):
                    raise _cannot_read(p, e) from None
                missing.append(f"{p} (samples {s['first']}..{s['end'] - 1})")
                continue
            if size != s["bytes"]:
                bad_size.append(f"{p} has {size} bytes, the manifest says {s['bytes']} (samples "
                                f"{s['first']}..{s['end'] - 1})")
        if missing or bad_size:
            raise StoreError(f"store {self.root} is incomplete or damaged:\n  " + "\n  ".join(
                [f"missing shard {m}" for m in missing] + [f"truncated/changed shard {b}" for b in bad_size]))
        if verify:
            faults = []
            for s in self.manifest["shards"]:
                p = self.root / s["file"]
                try:
                    sha = sha256_file(p)
                except OSError as e:
                    raise _cannot_read(p, e) from None
                if sha != s["sha256"]:
                    faults.append(f"{p}: sha256 mismatch (samples {s['first']}..{s['end'] - 1})")
            if faults:
                raise StoreError(f"store {self.root} failed verification:\n  " + "\n  ".join(faults))
        self._reset()

    # ---------------------------------------------------------------- process-local state (fork/pickle)
    def _reset(self) -> None:
        self._pid = os.getpid()
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._zd = None

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_open"], d["_zd"], d["_pid"] = None, None, None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._reset()

    def _shard(self, index: int, sample_id: int) -> _Shard:
        if self._pid != os.getpid():
            self._reset()  # forked: do not share mappings / decompressor state with the parent
        sh = self._open.get(index)
        if sh is not None:
            self._open.move_to_end(index)
            return sh
        entry = self.manifest["shards"][index]
        path = self.root / entry["file"]
        what = f"{path} (reading sample {sample_id})"
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size != entry["bytes"]:
                    raise StoreError(f"{what}: file has {size} bytes, the manifest says {entry['bytes']} "
                                     "(truncated or replaced)")
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise StoreError(f"{what}: shard file is missing") from None
        except OSError as e:
            raise StoreError(f"{what}: cannot open ({e})") from None
        lay = parse_shard(mm, size, what)
        check_layout(lay, self.meta, index, what)
        sh = _Shard(path, mm, lay)
        self._open[index] = sh
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)  # unreferenced mmaps are closed by the GC
        return sh

    def _raw_block(self, sample_id: int) -> bytes:
        if not 0 <= sample_id < self.meta.n_samples:
            raise IndexError(f"sample id {sample_id} out of range [0, {self.meta.n_samples})")
        index = sample_id // self.meta.shard_size
        sh = self._shard(index, sample_id)
        j = sample_id - index * self.meta.shard_size
        off, n = sh.offsets[j], sh.nbytes[j]
        try:  # a file truncated under a live mapping would SIGBUS on access: check its size first (~1 us)
            size = os.stat(sh.path).st_size
        except OSError:
            size = -1
        if size != sh.layout.size:
            self._open.pop(index, None)
            raise StoreError(f"{sh.path}: sample {sample_id}: the shard file changed or disappeared while "
                             f"open ({size} bytes, was {sh.layout.size})")
        data = sh.mm[off:off + n]
        if len(data) != n:
            raise StoreError(f"{sh.path}: sample {sample_id}: block is cut short (file truncated)")
        crc = zlib.crc32(data)
        if crc != sh.crcs[j]:
            raise StoreError(f"{sh.path}: sample {sample_id}: checksum mismatch (crc32 {crc:08x}, table "
                             f"says {sh.crcs[j]:08x}): the shard is corrupt")
        if sh.codecs[j] != CODEC_BLOCK:
            raise StoreError(f"{sh.path}: sample {sample_id}: unknown block codec {sh.codecs[j]}")
        return data

    # ----------------------------------------------------------------------------------- checks
    def __len__(self) -> int:
        return self.meta.n_samples

    def check_compatible(self, *, data_fingerprint, tokenizer_hash, seq_len, vocab_size,
                         signal: SignalSpec, document_mask: bool = False) -> None:
        """Refuse (StoreError) a store that was not made for this run's data and ``signal``.

        Data fingerprint, tokenizer, seq_len and vocabulary must match, and the stored signal must be
        able to serve the asked one (SignalSpec.cannot_serve): a top-p-k store truncated at least as wide
        as asked (store top_k >= top_k and store top_p >= top_p) is re-truncated on load; a drawn signal
        (sampled, head_tail) cannot be re-drawn, so the store must hold the same kind with the same draws
        (samples, temperature, seed) and, for head_tail, the same head truncation. data.document_mask
        must match: the teacher's forward depends on it."""
        if not isinstance(signal, SignalSpec):
            raise ValueError(f"check_compatible: signal must be a SignalSpec, got {signal!r}")
        m, where = self.meta, f"teacher-logits store {self.root}"
        problems = []
        if m.data_fingerprint != data_fingerprint:
            problems.append(f"it was generated for data fingerprint {m.data_fingerprint}, the run's data "
                            f"has {data_fingerprint} (different corpus, blend of sources, tokenization or seq_len)")
        if m.tokenizer_hash != tokenizer_hash:
            problems.append(f"its tokenizer hash is {m.tokenizer_hash}, the run's is {tokenizer_hash}")
        if m.seq_len != seq_len:
            problems.append(f"its seq_len is {m.seq_len}, the run's is {seq_len}")
        if m.vocab_size != vocab_size:
            problems.append(f"its vocab_size is {m.vocab_size}, the run's is {vocab_size}")
        if m.document_mask != bool(document_mask):
            problems.append(f"it was generated with data.document_mask={str(m.document_mask).lower()}, the run "
                            f"has data.document_mask={str(bool(document_mask)).lower()}")
        why = m.signal_spec.cannot_serve(signal, int(vocab_size))
        if why:
            problems.extend(why.split("; "))
        if problems:
            raise StoreError(f"{where} cannot be used for this run:\n  - " + "\n  - ".join(problems))

    def _resolve(self, top_p, top_k) -> tuple[float, int]:
        if self.meta.signal:  # a drawn signal is read whole
            if (top_p is not None and abs(float(top_p) - self.meta.top_p) > _P_EPS) or \
                    (top_k is not None and int(top_k) != self.meta.top_k):
                raise StoreError(f"the store {self.root} holds the {self.meta.signal['kind']} signal, which "
                                 f"cannot be re-truncated (asked top_p={top_p}, top_k={top_k})")
            return self.meta.top_p, self.k
        p = self.default_top_p if top_p is None else top_p
        kk = self.default_top_k if top_k is None else top_k
        p = self.meta.top_p if p is None else float(p)
        kk = self.k if kk is None else min(int(kk), self.meta.vocab_size)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {p}")
        if kk < 1:
            raise ValueError(f"top_k must be >= 1, got {kk}")
        if kk > self.k:
            raise StoreError(f"asked top_k={kk} but the store {self.root} keeps only {self.k} per token")
        if p > self.meta.top_p + _P_EPS:
            raise StoreError(f"asked top_p={p} but the store {self.root} was truncated at top_p={self.meta.top_p}")
        return p, kk

    # ------------------------------------------------------------------------------------ reads
    def _decode_into(self, raw: bytes, sample_id: int, p: float, kk: int, vals_out: np.ndarray,
                     idx_out: np.ndarray, lse_out: np.ndarray) -> None:
        if self._zd is None:
            self._zd = zstd_decompressor()
        try:
            vals, idx, lse, _counts = decode_block(raw, self.meta.seq_len, self.k, self._enc, k_out=kk,
                                                   zd=self._zd, vocab_size=self.meta.vocab_size)
        except CodecError as e:
            index = sample_id // self.meta.shard_size
            raise StoreError(f"{self.root / shard_name(index)}: sample {sample_id}: undecodable block "
                             f"({e})") from None
        if p < self.meta.top_p - _P_EPS:
            # Re-apply top-p with the exact full-vocabulary normalizer: the same rule truncate() uses.
            finite = vals > _NEG_INF
            keep = top_p_keep(torch.from_numpy(vals), torch.from_numpy(lse), p).numpy()
            drop = finite & ~keep
            if drop.any():
                vals[drop] = _NEG_INF
                idx[drop] = 0
        vals_out[...] = vals
        idx_out[...] = idx
        lse_out[...] = lse

    def get(self, sample_id: int, top_p: float | None = None, top_k: int | None = None) -> SparseLogits:
        """Sample ``sample_id``: SparseLogits [seq_len, k'] carrying the full-vocabulary lse [seq_len]
        (none for a drawn signal, whose values are normalized log weights).

        ``top_p`` / ``top_k`` (default: the store's, or the ones set by open_for_training) may be
        narrower than the store's; k' = top_k (min with the vocabulary)."""
        p, kk = self._resolve(top_p, top_k)
        raw = self._raw_block(int(sample_id))  # first: its shard's header agrees with the manifest's sizes
        T = self.meta.seq_len
        vals = np.empty((T, kk), np.float32)
        idx = np.empty((T, kk), np.int64)
        lse = np.empty(T, np.float32)
        self._decode_into(raw, int(sample_id), p, kk, vals, idx, lse)
        return SparseLogits(torch.from_numpy(idx), torch.from_numpy(vals), self._lse(lse))

    def _lse(self, lse: np.ndarray) -> Optional[torch.Tensor]:
        return None if self.meta.signal else torch.from_numpy(lse)  # a drawn signal keeps no normalizer

    def get_batch(self, ids, top_p: float | None = None, top_k: int | None = None) -> SparseLogits:
        """Samples ``ids`` stacked: SparseLogits [B, seq_len, k'] with lse [B, seq_len]."""
        p, kk = self._resolve(top_p, top_k)
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        raws = [self._raw_block(i) for i in ids]  # first: their shards' headers agree with the manifest
        T = self.meta.seq_len
        vals = np.empty((len(ids), T, kk), np.float32)
        idx = np.empty((len(ids), T, kk), np.int64)
        lse = np.empty((len(ids), T), np.float32)
        for b, (i, raw) in enumerate(zip(ids, raws)):
            self._decode_into(raw, i, p, kk, vals[b], idx[b], lse[b])
        return SparseLogits(torch.from_numpy(idx), torch.from_numpy(vals), self._lse(lse))

    def get_spans(self, starts, length: int, top_p: float | None = None,
                  top_k: int | None = None) -> SparseLogits:
        """A document store (format 3): the signal at stream positions [start, start + length) for each
        of ``starts``, stacked: SparseLogits [B, length, k'] with lse. Each span is cut from the records
        (seq_len positions each) that hold it."""
        if self.meta.context != "document":
            raise StoreError(f"{self.root} is a window store (format {self.manifest['format_version']}): its "
                             "samples are read by sample id, not stream position")
        p, kk = self._resolve(top_p, top_k)
        R, N = self.meta.seq_len, self.meta.n_tokens
        starts = [int(a) for a in (starts.tolist() if hasattr(starts, "tolist") else starts)]
        vals = np.empty((len(starts), length, kk), np.float32)
        idx = np.empty((len(starts), length, kk), np.int64)
        lse = np.empty((len(starts), length), np.float32)
        rv, ri, rl = np.empty((R, kk), np.float32), np.empty((R, kk), np.int64), np.empty(R, np.float32)
        for b, a in enumerate(starts):
            if not 0 <= a and a + length <= N:
                raise IndexError(f"span [{a}, {a + length}) outside the stream's {N} tokens "
                                 f"(store {self.root}, source {self.meta.source})")
            for r in range(a // R, (a + length - 1) // R + 1):
                self._decode_into(self._raw_block(r), r, p, kk, rv, ri, rl)
                lo, hi = max(a, r * R), min(a + length, (r + 1) * R)
                vals[b, lo - a:hi - a], idx[b, lo - a:hi - a] = rv[lo - r * R:hi - r * R], ri[lo - r * R:hi - r * R]
                lse[b, lo - a:hi - a] = rl[lo - r * R:hi - r * R]
        return SparseLogits(torch.from_numpy(idx), torch.from_numpy(vals), self._lse(lse))

    def __getitem__(self, sample_id: int):
        return self.get(sample_id)

    def __iter__(self):
        """(sample_id, SparseLogits with lse) for every sample, in order."""
        for i in range(self.meta.n_samples):
            yield i, self.get(i)

    def close(self) -> None:
        self._open.clear()

    def __repr__(self) -> str:
        m = self.meta
        return (f"LogitsStore({str(self.root)!r}, n_samples={m.n_samples}, seq_len={m.seq_len}, "
                f"vocab={m.vocab_size}, signal={m.signal_spec.describe()!r}, encoding={m.encoding})")

    # ------------------------------------------------------------------------------- fidelity
    def value_tolerance(self) -> float:
        return value_tolerance(self._enc)

    def tv_bound(self, temperature: float = 1.0) -> float:
        return tv_bound(self._enc, temperature)

    def mass_tolerance(self) -> float:
        return mass_tolerance(self._enc)


def open_for_training(root, *, data_fingerprint, tokenizer_hash, seq_len, vocab_size, signal: SignalSpec,
                      verify: bool = False, document_mask: bool = False) -> LogitsStore:
    """Open a store for a run: check_compatible, then make get/get_batch/iteration default to the
    run's ``signal``: a wider top-p-k store is re-truncated on load to its (top_p, top_k); a drawn
    signal is read whole."""
    store = LogitsStore(root, verify=verify)
    store.check_compatible(data_fingerprint=data_fingerprint, tokenizer_hash=tokenizer_hash,
                           seq_len=seq_len, vocab_size=vocab_size, signal=signal, document_mask=document_mask)
    if not store.meta.signal:
        top_p, top_k = signal.truncation()
        store.default_top_p = float(top_p)
        store.default_top_k = min(int(top_k), int(vocab_size))
    return store


@dataclass
class ShardCheck:
    """What :func:`check_shard` found in one shard file."""
    faults: list[str]  # empty: the shard is sound
    missing: bool = False  # no file behind the name
    foreign: bool = False  # intact, but written for another store (ForeignShardError)
    size: int = 0
    sha256: str = ""
    hist: Optional[np.ndarray] = None  # kept entries per token over the shard (a sound shard)
    n_kept: int = 0

    def entry(self, meta: StoreMeta, index: int) -> dict:
        """The shard's manifest entry (what ShardWriter.finish returns)."""
        first, end = shard_range(meta.n_samples, meta.shard_size, index)
        return {"index": index, "file": shard_name(index), "first": first, "end": end, "bytes": self.size,
                "sha256": self.sha256}


def check_shard(root, meta: StoreMeta, index: int, zd=None) -> ShardCheck:
    """The one check of shard file ``index`` of a store of ``meta`` (resolved), shared by verify, a
    rerun's completeness check and shard_done: present (a name with no file behind it is missing), header,
    table and footer consistent and written for ``meta``, then every sample's crc32, codec and block
    (decoded in full, as the reader would: decode_block refuses what no writer writes), its kept count
    against the table, and the shard's histogram against the blocks. Faults name the file and samples.

    Raises OSError when the file is there but cannot be read (EACCES, EIO): that says nothing of it."""
    path = shard_path(root, index)
    first, end = shard_range(meta.n_samples, meta.shard_size, index)
    span = f"samples {first}..{end - 1}"
    try:
        fh = open(path, "rb")
    except OSError as e:
        if not _absent(e):
            raise
        return ShardCheck([f"{path}: missing shard ({span})"], missing=True)
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return ShardCheck([f"{path}: empty file ({span})"], size=0, sha256=hashlib.sha256().hexdigest())
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            check = ShardCheck([], size=size, sha256=hashlib.sha256(mm).hexdigest())
            try:
                lay = parse_shard(mm, size, str(path))
                check_layout(lay, meta, index, str(path))
            except StoreError as e:
                check.faults.append(f"{e} ({span})")
                check.foreign = isinstance(e, ForeignShardError)
                return check
            enc = meta.value_encoding
            hist = np.zeros(lay.k + 1, np.int64)
            for j, row in enumerate(lay.table):
                sid = first + j
                data = mm[int(row["offset"]):int(row["offset"]) + int(row["nbytes"])]
                if zlib.crc32(data) != int(row["crc"]):
                    check.faults.append(f"{path}: sample {sid}: checksum mismatch")
                    continue
                try:
                    if row["codec"] != CODEC_BLOCK:
                        raise CodecError(f"unknown block codec {row['codec']}")
                    if zd is None:
                        zd = zstd_decompressor()
                    counts = decode_block(data, meta.seq_len, meta.width, enc, zd=zd,
                                          vocab_size=meta.vocab_size)[3]
                except CodecError as e:
                    check.faults.append(f"{path}: sample {sid}: undecodable block ({e})")
                    continue
                if int(counts.sum()) != int(row["n_kept"]):
                    check.faults.append(f"{path}: sample {sid}: kept count disagrees with the table")
                hist += np.bincount(counts, minlength=lay.k + 1)
    if not check.faults:
        if not np.array_equal(hist, lay.hist.astype(np.int64)):
            check.faults.append(f"{path}: the shard's kept-entries histogram disagrees with its samples")
        check.hist, check.n_kept = hist, int(hist @ np.arange(lay.k + 1))
    return check


@dataclass
class StoreFaults:
    """What :func:`store_faults` found, attributed to what a rerun of the generation rewrites.

    ``shards``: shard index -> the faults of that shard file itself (missing, empty, truncated, a bad
    header, table or footer, a sample whose crc32 or block is bad; with a size or sha256 that disagrees
    with the manifest listed first): the shards to rewrite. ``missing``, ``foreign``: those of them with
    no file, and those intact but written for another store. ``manifest``: faults of manifest.json while
    the shards it lists are sound (missing, unparseable, of the wrong shape, a size, sha256 or statistic
    that disagrees with its sound shards). ``extra``: files in shards/ that are no shard of the store.
    ``manifest_ours``: the manifest's metadata is intact (its meta_digest agrees) and the store's."""
    shards: dict[int, list[str]] = field(default_factory=dict)
    missing: set[int] = field(default_factory=set)
    foreign: set[int] = field(default_factory=set)
    manifest: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    manifest_ours: bool = False

    @property
    def sound(self) -> bool:
        return not (self.shards or self.manifest or self.extra)

    def all(self) -> list[str]:
        """Every fault: the shards' in shard order, the extra files', then the manifest's."""
        return [f for i in sorted(self.shards) for f in self.shards[i]] + self.extra + self.manifest


class StoreCheckError(StoreError):
    """The check could not run (no such store directory, no manifest, a file that cannot be read)."""


def unexpected_shards(root, n: int) -> list[Path]:
    """Files in ``root``/shards named like a shard (shard-*.bin) that are none of the ``n`` shards."""
    sdir = Path(root) / SHARD_DIR
    if not sdir.is_dir():
        return []
    out = []
    for p in sorted(sdir.glob("shard-*.bin")):
        digits = p.name[len("shard-"):-len(".bin")]
        if not (digits.isdigit() and int(digits) < n and p.name == Path(shard_name(int(digits))).name):
            out.append(p)
    return out


def store_faults(root, meta: Optional[StoreMeta] = None,
                 shards: Optional[Iterable[int]] = None) -> StoreFaults:
    """Check a store and attribute what is wrong (StoreFaults).

    Without ``meta`` (verify): the store the manifest describes; a manifest that cannot be loaded is the
    one fault found. With ``meta`` (a teacher run over its store directory): the store of ``meta``; a
    missing or damaged manifest is a fault of the manifest and every shard is checked for ``meta``. A
    manifest whose metadata is intact but not ``meta``'s raises StoreError (a store for other inputs).
    ``shards``: check only these shard files in full (the ranks of a generation share the work); the
    others' manifest entries are taken as they are and their histograms read from their tables, and the
    stats are checked only when those all read. Raises StoreCheckError when a file cannot be read."""
    root = Path(root)
    path = root / MANIFEST
    out = StoreFaults()
    man = raw = None
    try:
        man, mmeta, raw = _load_manifest_bytes(root)
    except StoreCheckError:
        raise
    except StoreError as e:
        if meta is None:
            out.manifest.append(str(e))
            return out
        out.manifest.append(str(e))
        mmeta = _intact_meta(root)
        if mmeta is not None and mmeta.digest() != meta.digest():
            raise other_inputs(root) from None
    if meta is None:
        meta = mmeta
    else:
        meta = meta.resolved()
        if man is not None and mmeta.digest() != meta.digest():
            raise other_inputs(root)
    out.manifest_ours = man is not None
    n = meta.n_shards
    todo = set(range(n)) if shards is None else {int(i) for i in shards}
    entries, hist, n_kept, stats_ok = [], None, 0, True  # hist: sized by the shards, not the manifest
    zd = zstd_decompressor()
    for i in range(n):
        listed = man["shards"][i] if man is not None else None
        if i not in todo:  # another rank checks it in full: its trailer for the statistics
            entries.append(listed)
            h = _trailer_hist(root, meta, i) if man is not None else None
            if h is None:
                stats_ok = False
            else:
                hist = h if hist is None else hist + h
                n_kept += int(h @ np.arange(h.size))
            continue
        try:
            c = check_shard(root, meta, i, zd)
        except OSError as e:
            raise _cannot_read(shard_path(root, i), e) from None
        against = []
        if listed is not None and not c.missing:
            p, span = shard_path(root, i), f"samples {listed['first']}..{listed['end'] - 1}"
            if c.size != listed["bytes"]:
                against.append(f"{p}: {c.size} bytes, the manifest says {listed['bytes']} ({span})")
            if c.sha256 != listed["sha256"]:
                against.append(f"{p}: sha256 mismatch with the manifest ({span})")
        entries.append(c.entry(meta, i))
        if c.faults:
            out.shards[i] = against + c.faults
            if c.missing:
                out.missing.add(i)
            if c.foreign:
                out.foreign.add(i)
            stats_ok = False
            continue
        out.manifest += against
        hist = c.hist if hist is None else hist + c.hist
        n_kept += c.n_kept
    out.extra = [f"{p}: unexpected shard file (the store has {n} shards)" for p in unexpected_shards(root, n)]
    if man is not None and stats_ok and not out.manifest:
        if hist is None:  # no shard: a store of no samples
            hist = np.zeros(min(meta.width + 1, len(man["stats"]["kept_hist"])), np.int64)
        want = manifest_dict(meta, entries, hist, n_kept, version=man["format_version"])
        if man["stats"] != want["stats"]:
            out.manifest.append(f"{path}: stats disagree with the shards")
        elif raw != manifest_bytes(want):
            keys = sorted(k for k in set(man) | set(want) if man.get(k) != want.get(k)) or ["its layout"]
            out.manifest.append(f"{path}: not what write_manifest writes for its shards and metadata (differs "
                                f"in {', '.join(keys)})")
    return out


def _intact_meta(root: Path) -> Optional[StoreMeta]:
    """The metadata of a manifest that does not load as a whole, when that part is intact (parses and
    agrees with its meta_digest); else None."""
    try:
        return _manifest_meta(_read_manifest(root)[0], root / MANIFEST)
    except StoreError:
        return None


def other_inputs(root: Path) -> StoreError:
    """The refusal of a directory that holds a store for other inputs than the run's."""
    return StoreError(f"{root} already holds a store for other inputs (teacher, data or signal differ); "
                      "choose another directory or remove it")


def _trailer_hist(root: Path, meta: StoreMeta, index: int) -> Optional[np.ndarray]:
    """The histogram in shard ``index``'s table (its header, table and footer checked, no block read);
    None when it does not read."""
    path = shard_path(root, index)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                return None
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                lay = parse_shard(mm, size, str(path))
                check_layout(lay, meta, index, str(path))
    except (OSError, StoreError):
        return None
    return lay.hist.astype(np.int64)


def verify_store(root) -> list[str]:
    """Full check: manifest consistency, every shard's size and sha256, header/table/footer, every
    sample's crc32 and decodability, each shard's histogram, the stats, and no stray shard files
    (store_faults). Returns fault descriptions (empty list = the store is sound); raises
    StoreCheckError when it could not check (no directory, no manifest, a file that cannot be read)."""
    root = Path(root)
    try:
        if not root.is_dir():
            raise StoreCheckError(f"{root}: not a directory")
        if not (root / MANIFEST).is_file():
            raise StoreCheckError(f"{root / MANIFEST}: no manifest (not a logits store, or its generation "
                                  "did not finish)")
        return store_faults(root).all()
    except OSError as e:  # permissions, I/O errors: the check could not run, which says nothing of the store
        raise StoreCheckError(f"{root}: could not read ({e})") from None


def _percentile_from_hist(hist: np.ndarray, q: float) -> int:
    c = np.cumsum(hist)
    if c[-1] == 0:
        return 0
    return int(np.searchsorted(c, q / 100.0 * c[-1], side="left"))


def store_info(root) -> dict:
    """Summary from the manifest: identity, truncation, encoding, sizes, bytes per token / per kept entry
    (ours and the naive int32 index + fp16 value + 1-byte count layout), kept-entries distribution."""
    root = Path(root)
    man, meta = _load_manifest(root)
    try:
        manifest_bytes = (root / MANIFEST).stat().st_size
    except OSError as e:
        raise _cannot_read(root / MANIFEST, e) from None
    st = man["stats"]
    hist = np.asarray(st["kept_hist"], np.int64)
    tokens = int(st["tokens"])
    kept = int(st["kept_entries"])
    shard_bytes = int(st["shard_bytes"])
    total = shard_bytes + manifest_bytes
    naive = 6 * kept + tokens
    enc = meta.value_encoding
    return {
        "root": str(root), "format_version": man["format_version"], "teacher": meta.teacher,
        "tokenizer_hash": meta.tokenizer_hash, "data_fingerprint": meta.data_fingerprint,
        "seq_len": meta.seq_len, "vocab_size": meta.vocab_size, "top_p": meta.top_p, "top_k": meta.top_k,
        "document_mask": meta.document_mask,
        **({"context": "document", "source": meta.source, "teacher_seq_len": meta.teacher_seq_len,
            "record_tokens": meta.seq_len} if meta.context == "document" else {}),
        "signal": {"kind": meta.signal_spec.kind, **meta.signal_spec.params(), "width": meta.width,
                   "describe": meta.signal_spec.describe()},
        "encoding": meta.encoding, "n_samples": meta.n_samples, "shard_size": meta.shard_size,
        "n_shards": len(man["shards"]), "tokens": tokens, "kept_entries": kept,
        "total_bytes": total, "shard_bytes": shard_bytes,
        "bytes_per_token": total / tokens if tokens else math.nan,
        "bytes_per_kept_entry": total / kept if kept else math.nan,
        "naive_bytes_per_token": naive / tokens if tokens else math.nan,
        "ratio_vs_naive": total / naive if naive else math.nan,
        "kept_per_token": {"mean": kept / tokens if tokens else math.nan,
                           **{f"p{q}": _percentile_from_hist(hist, q) for q in (1, 10, 50, 90, 99)},
                           "min": int(np.nonzero(hist)[0][0]) if hist.sum() else 0,
                           "max": int(np.nonzero(hist)[0][-1]) if hist.sum() else 0,
                           "hist": [int(x) for x in hist]},
        "tv_bound_tau1": tv_bound(enc, 1.0), "value_tolerance": value_tolerance(enc),
    }
