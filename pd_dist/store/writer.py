"""Writing a teacher-logits store: one ShardWriter per shard (resumable generation), then the manifest."""
from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from pd_dist.core.logits import SparseLogits
from pd_dist.store.codec import CodecError, encode_block, zstd_compressor
from pd_dist.store.format import (sha256_file, CODEC_BLOCK, FOOTER, FOOTER_MAGIC, MANIFEST, TABLE_DTYPE, StoreError,
                     StoreMeta, check_layout, manifest_bytes, manifest_dict, pack_header, parse_shard, shard_name,
                     shard_path, shard_range, shard_ranges)
from pd_dist.store.reader import check_shard, unexpected_shards


class ShardWriter:
    """Writes shard ``shard_index`` of a store: ``add`` its samples in order, then ``finish``.

    The data goes to a hidden temporary file (``shards/.shard-XXXXX.bin.<pid>.tmp``) that is renamed
    onto ``shards/shard-XXXXX.bin`` by ``finish`` (after fsync), so a complete-looking shard is always
    complete. Usable as a context manager (``abort`` on an exception).
    """

    def __init__(self, root, meta: StoreMeta, shard_index: int, compress: bool = True):
        self.root = Path(root)
        self.meta = meta.resolved()
        if not 0 <= shard_index < self.meta.n_shards:
            raise ValueError(f"shard_index {shard_index} out of range: the store has {self.meta.n_shards} shards")
        self.index = shard_index
        self.first, self.end = shard_range(self.meta.n_samples, self.meta.shard_size, shard_index)
        self.compress = bool(compress)
        self._enc = self.meta.value_encoding
        self._zc = zstd_compressor(self.meta.encoding["zstd_level"]) if self.compress else None
        self.final = shard_path(self.root, shard_index)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.parent / f".{self.final.name}.{os.getpid()}.tmp"
        self._fh = open(self.tmp, "wb")
        self._sha = hashlib.sha256()
        self._pos = 0
        self._table = np.zeros(self.end - self.first, TABLE_DTYPE)
        self._hist = np.zeros(self.meta.width + 1, np.uint64)
        self._next = self.first
        self._done = False
        self._write(pack_header(self.meta, shard_index, self.first, self.end))

    def _write(self, b: bytes) -> None:
        self._fh.write(b)
        self._sha.update(b)
        self._pos += len(b)

    def add(self, sample_id: int, sparse: SparseLogits) -> None:
        """Append sample ``sample_id`` (must be the next one): sparse [seq_len, width] as the store's signal
        forms it: for top-p-k ``truncate(logits, top_p, top_k, keep_lse=True)``, carrying its
        full-vocabulary logsumexp; for a drawn signal (sampled, head_tail) its log weights (no lse)."""
        if self._done or self._fh is None:
            raise StoreError(f"{self.final}: writer is closed")
        if sample_id != self._next:
            raise ValueError(f"{self.final}: expected sample {self._next}, got {sample_id} (samples "
                             f"{self.first}..{self.end - 1} must be added in order)")
        T, k = self.meta.seq_len, self.meta.width
        if tuple(sparse.values.shape) != (T, k):
            raise ValueError(f"sample {sample_id}: sparse logits have shape {tuple(sparse.values.shape)}, "
                             f"the store holds [seq_len, width] = [{T}, {k}]")
        vals = sparse.values.detach().to("cpu", torch.float32).numpy()
        idx = sparse.indices.detach().cpu().numpy()
        if self.meta.signal:
            # A drawn signal is normalized: no full-vocabulary lse; the per-token max stands in for it
            # (the lse stream is then zeros).
            lse = np.where(vals[:, 0] > float("-inf"), vals[:, 0], np.float32(0.0))
        elif sparse.lse is None:
            raise ValueError(f"sample {sample_id}: the sparse logits carry no lse (truncate with "
                             "keep_lse=True): a store keeps each token's full-vocabulary logsumexp")
        else:
            lse = sparse.lse.detach().to("cpu", torch.float32).numpy()
        try:
            data, n_kept = encode_block(vals, idx, lse, self.meta.vocab_size, self._enc, self._zc)
        except CodecError as e:
            raise ValueError(f"sample {sample_id}: {e}") from None
        codec = CODEC_BLOCK
        row = self._table[sample_id - self.first]
        row["offset"], row["nbytes"], row["crc"] = self._pos, len(data), zlib.crc32(data)
        row["n_kept"], row["codec"] = n_kept, codec
        counts = (vals > float("-inf")).sum(1)
        self._hist += np.bincount(counts, minlength=k + 1).astype(np.uint64)
        self._write(data)
        self._next += 1

    def finish(self) -> dict:
        """Write the table and footer, fsync, rename into place. Returns the manifest entry."""
        if self._done:
            raise StoreError(f"{self.final}: finish called twice")
        if self._next != self.end:
            raise StoreError(f"{self.final}: finish after {self._next - self.first} of "
                             f"{self.end - self.first} samples (next expected: {self._next})")
        trailer = self._table.tobytes() + self._hist.astype("<u8").tobytes()
        t_off = self._pos
        self._write(trailer)
        header = pack_header(self.meta, self.index, self.first, self.end)
        self._write(FOOTER.pack(t_off, self.end - self.first, self.meta.width, zlib.crc32(trailer),
                                zlib.crc32(header), FOOTER_MAGIC))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        os.replace(self.tmp, self.final)
        _fsync_dir(self.final.parent)
        self._done = True
        return {"index": self.index, "file": shard_name(self.index), "first": self.first, "end": self.end,
                "bytes": self._pos, "sha256": self._sha.hexdigest()}

    def abort(self) -> None:
        """Discard the partial shard (the temporary file); a finished shard is left alone."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if not self._done:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
        self._done = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.abort()
            raise StoreError(f"{self.final}: ShardWriter left without finish(); the shard was discarded")
        return False

    def __del__(self):
        try:
            if self._fh is not None:
                self.abort()
        except Exception:
            pass


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_layout(path: Path, meta: StoreMeta, index: int):
    """The shard's parsed layout (header, table, footer), checked against ``meta``."""
    import mmap

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise StoreError(f"{path}: empty file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            lay = parse_shard(mm, size, str(path))
            check_layout(lay, meta, index, str(path))
    return lay


def shard_done(root, meta: StoreMeta, shard_index: int) -> bool:
    """True if shard ``shard_index`` is present, complete, written for this ``meta`` and sound by the
    check verify makes (reader.check_shard: header, table, footer, every sample's crc32 and block, the
    histogram), so a rerun of the generation rewrites a shard that is damaged rather than counting it
    done. A file that cannot be read is not done either."""
    try:
        return not check_shard(root, meta.resolved(), shard_index).faults
    except OSError:
        return False


def write_manifest(root, meta: StoreMeta) -> Path:
    """Check every shard (present, complete, written for ``meta``), hash it, and write manifest.json
    atomically. Raises StoreError naming the missing or bad shards."""
    root = Path(root)
    meta = meta.resolved()
    ranges = shard_ranges(meta.n_samples, meta.shard_size)
    faults, shards = [], []
    hist = np.zeros(meta.width + 1, np.uint64)
    n_kept = 0
    for i, (first, end) in enumerate(ranges):
        path = shard_path(root, i)
        if not path.is_file():
            faults.append(f"{path}: missing (samples {first}..{end - 1})")
            continue
        try:
            lay = _read_layout(path, meta, i)
        except StoreError as e:
            faults.append(f"{e} (samples {first}..{end - 1})")
            continue
        hist += lay.hist
        n_kept += int(lay.table["n_kept"].sum())
        shards.append({"index": i, "file": shard_name(i), "first": first, "end": end,
                       "bytes": lay.size, "sha256": sha256_file(path)})
    for p in unexpected_shards(root, len(ranges)):
        faults.append(f"{p}: unexpected shard file (the store has {len(ranges)} shards)")
    if faults:
        raise StoreError("cannot write the manifest:\n  " + "\n  ".join(faults))
    if int(hist.sum()) != meta.n_samples * meta.seq_len:
        raise StoreError("shard histograms do not add up to n_samples * seq_len tokens")
    d = manifest_dict(meta, shards, hist, n_kept)
    root.mkdir(parents=True, exist_ok=True)
    out = root / MANIFEST
    tmp = root / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_bytes(manifest_bytes(d))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    _fsync_dir(root)
    return out
