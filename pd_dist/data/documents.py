"""Documents of a raw source, cut into units of work, read in a fixed order in bounded memory.

A source's documents have one order: its files sorted (a directory is walked, a glob expanded, both
sorted), rows in file order. That order is cut into *units* that depend only on the files and
``data.shard_bytes``, never on how many workers or ranks prepare them, so each unit becomes one shard
of the same bytes whoever writes it:

- ``.jsonl``/``.json`` (JSON lines): byte ranges of ``shard_bytes``; a unit holds the lines that start
  in its range, so a worker seeks to its range and reads nothing else;
- ``.jsonl.gz``/``.jsonl.zst`` (and ``.json.*``), a ``.json`` holding one JSON array: one unit per file
  (a compressed stream cannot be entered in the middle); the array is read whole, so use JSON lines
  for large data;
- ``.parquet``: runs of row groups of about ``shard_bytes`` (uncompressed);
- ``.txt``/``.text``/``.md`` (one document per file): runs of files of about ``shard_bytes``;
- a Hugging Face ``save_to_disk`` directory: row ranges of about ``shard_bytes``; its ``text_field``
  column is text, or, without one, an ``input_ids`` column is taken as tokens already;
- the embedded corpus: one unit.

Every reader yields documents (a ``str``, or an int64 array of token ids) and raises
:class:`DataError` naming the file and line or row for bad input. Empty documents are skipped.
"""
from __future__ import annotations

import glob
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

Document = Union[str, np.ndarray]
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
COMPRESSED = {".gz": "gzip", ".zst": "zstd"}


class DataError(ValueError):
    """Bad input data: one line naming the file and, where it applies, the line or row."""


def file_kind(path: Path) -> Optional[str]:
    """'json', 'json.gz', 'json.zst', 'parquet', 'text', 'hf' (a save_to_disk directory) or None."""
    if path.is_dir():
        return "hf" if (path / "state.json").is_file() and (path / "dataset_info.json").is_file() else None
    name = path.name.lower()
    for suffix, codec in COMPRESSED.items():
        if name.endswith(suffix) and name[:-len(suffix)].endswith(JSON_SUFFIXES):
            return f"json.{suffix[1:]}"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


SUPPORTED = ".jsonl, .json, .jsonl.gz, .jsonl.zst, .parquet, .txt, .text, .md, a Hugging Face save_to_disk directory"


def expand_files(patterns: list[str], key: str) -> list[Path]:
    """Files, globs and directories to a sorted, de-duplicated file list (directories walked; a
    save_to_disk directory kept whole). Anything that matches nothing, or a file of an unsupported
    type named directly, is a DataError naming it."""
    out: list[Path] = []
    for pat in patterns:
        matches = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else [pat]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise DataError(f"{key}: {pat} matches no file or directory")
        for m in matches:
            p = Path(m)
            if p.is_dir() and file_kind(p) is None:
                found = []
                for dirpath, dirnames, filenames in os.walk(p):
                    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                    here = Path(dirpath)
                    if file_kind(here) == "hf":
                        found.append(here)
                        dirnames[:] = []
                        continue
                    found += [here / f for f in sorted(filenames)
                              if not f.startswith(".") and file_kind(here / f) is not None]
                if not found:
                    raise DataError(f"{key}: directory {p} holds no file of a supported type ({SUPPORTED})")
                out += sorted(found)  # by path: a directory's files and datasets in one order
            elif file_kind(p) is None:
                raise DataError(f"{key}: {p} is not of a supported type ({SUPPORTED})")
            else:
                out.append(p)
    seen, unique = set(), []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(p)
    return unique


# ------------------------------------------------------------------------------------------ units
@dataclass(frozen=True)
class Unit:
    """One unit of preparation work: a fixed slice of a source's documents. ``size`` is its input in
    bytes (for progress)."""
    kind: str                     # embedded | json | json.gz | json.zst | json-array | parquet | text | hf
    files: tuple[str, ...] = ()
    start: int = 0                # json: byte range; parquet: row groups; hf: rows
    end: int = 0
    size: int = 0
    text_field: str = "text"

    def describe(self) -> str:
        if self.kind == "embedded":
            return "the embedded corpus"
        what = {"json": "bytes", "parquet": "row groups", "hf": "rows"}.get(self.kind)
        name = self.files[0] if len(self.files) == 1 else f"{self.files[0]} .. {self.files[-1]}"
        return f"{name} ({what} {self.start}..{self.end})" if what else name


def plan_units(files: list[Path], shard_bytes: int, text_field: str) -> list[Unit]:
    """Cut the documents of ``files`` (in order) into units independent of workers and ranks."""
    units: list[Unit] = []
    texts: list[str] = []
    text_bytes = 0

    def flush_texts():
        nonlocal texts, text_bytes
        if texts:
            units.append(Unit("text", tuple(texts), size=text_bytes, text_field=text_field))
            texts, text_bytes = [], 0

    for p in files:
        kind = file_kind(p)
        if kind != "text":
            flush_texts()
        try:
            if kind == "text":
                texts.append(str(p))
                text_bytes += p.stat().st_size
                if text_bytes >= shard_bytes:
                    flush_texts()
            elif kind == "json":
                size = p.stat().st_size
                if _first_char(p) == "[":
                    units.append(Unit("json-array", (str(p),), 0, size, size, text_field))
                    continue
                for a in range(0, max(size, 1), shard_bytes):
                    units.append(Unit("json", (str(p),), a, min(a + shard_bytes, size), min(shard_bytes, size - a),
                                      text_field))
            elif kind in ("json.gz", "json.zst"):
                units.append(Unit(kind, (str(p),), size=p.stat().st_size, text_field=text_field))
            elif kind == "parquet":
                units += _parquet_units(p, shard_bytes, text_field)
            elif kind == "hf":
                units += _hf_units(p, shard_bytes, text_field)
        except OSError as e:
            raise DataError(f"{p}: cannot read ({e.strerror or e})") from None
    flush_texts()
    return units


def _first_char(p: Path) -> str:
    with open(p, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1].decode("latin-1")


def _parquet_units(p: Path, shard_bytes: int, text_field: str) -> list[Unit]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(p).metadata
    except Exception as e:  # pyarrow raises its own error types for a damaged file
        raise DataError(f"{p}: not a readable parquet file ({e})") from None
    units, first, acc = [], 0, 0
    for g in range(meta.num_row_groups):
        acc += meta.row_group(g).total_byte_size
        if acc >= shard_bytes or g == meta.num_row_groups - 1:
            units.append(Unit("parquet", (str(p),), first, g + 1, acc, text_field))
            first, acc = g + 1, 0
    return units


def _hf_dataset(p: Path):
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # datasets raises several types for a bad directory
        raise DataError(f"{p}: not a readable save_to_disk dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{p}: a DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    return ds


def _hf_units(p: Path, shard_bytes: int, text_field: str) -> list[Unit]:
    ds = _hf_dataset(p)
    _hf_column(ds, p, text_field)
    n = len(ds)
    size = sum(f.stat().st_size for f in p.rglob("*.arrow")) or 1
    rows = max(1, int(n * shard_bytes / size))
    return [Unit("hf", (str(p),), a, min(a + rows, n), int(size * (min(a + rows, n) - a) / max(n, 1)), text_field)
            for a in range(0, n, rows)]


def _hf_column(ds, p: Path, text_field: str) -> str:
    if text_field in ds.column_names:
        return text_field
    if "input_ids" in ds.column_names:
        return "input_ids"
    raise DataError(f"{p}: no column '{text_field}' and no 'input_ids' (columns: {ds.column_names}); "
                    "set data.text_field")


# ---------------------------------------------------------------------------------------- reading
def read_unit(unit: Unit, vocab_size: int = 0) -> Iterator[Document]:
    """The unit's documents in order. Pre-tokenized documents are checked against ``vocab_size``."""
    if unit.kind == "embedded":
        from pd_dist.data.corpus import embedded_documents

        yield from embedded_documents()
    elif unit.kind == "json":
        yield from _read_json_range(unit)
    elif unit.kind in ("json.gz", "json.zst"):
        yield from _read_json_stream(unit)
    elif unit.kind == "json-array":
        yield from _read_json_array(unit)
    elif unit.kind == "text":
        for f in unit.files:
            try:
                with open(f, encoding="utf-8") as fh:
                    text = fh.read()
            except UnicodeDecodeError as e:
                raise DataError(f"{f}: not UTF-8 text (byte {e.start})") from None
            except OSError as e:
                raise DataError(f"{f}: cannot read ({e.strerror or e})") from None
            if text:
                yield text
    elif unit.kind == "parquet":
        yield from _read_parquet(unit)
    elif unit.kind == "hf":
        yield from _read_hf(unit, vocab_size)
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


def _document(obj, where: str, field_name: str) -> str:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a JSON {type(obj).__name__}, not an object with a '{field_name}' field")
    if field_name not in obj:
        raise DataError(f"{where}: no field '{field_name}' (fields: {sorted(obj)[:8]}); set data.text_field")
    text = obj[field_name]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{field_name}' is a {type(text).__name__}, not a string")
    return text


def _line_number(path: str, offset: int) -> int:
    """1-based line number of the line starting at byte ``offset`` (counted only for an error)."""
    n = 1
    with open(path, "rb") as fh:
        left = offset
        while left > 0:
            block = fh.read(min(left, 1 << 20))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def _parse_line(line: bytes, path: str, offset: int, text_field: str) -> str:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        raise DataError(f"{path}, line {_line_number(path, offset)}: not valid JSON ({msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get(text_field), str):
        return obj[text_field]
    return _document(obj, f"{path}, line {_line_number(path, offset)}", text_field)


def _read_json_range(unit: Unit) -> Iterator[str]:
    path = unit.files[0]
    try:
        fh = open(path, "rb", buffering=1 << 20)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with fh:
        if unit.start > 0:
            fh.seek(unit.start - 1)
            fh.readline()  # the line holding byte start-1 belongs to the unit before
        pos = fh.tell()
        while pos < unit.end:
            line = fh.readline()
            if not line:
                break
            if line.strip():
                text = _parse_line(line, path, pos, unit.text_field)
                if text:
                    yield text
            pos += len(line)


def _open_stream(path: str, kind: str):
    raw = open(path, "rb")
    if kind == "json.gz":
        import gzip

        return gzip.open(raw)
    import zstandard

    return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)


def _read_json_stream(unit: Unit) -> Iterator[str]:
    path = unit.files[0]
    try:
        stream = _open_stream(path, unit.kind)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    n = 0
    try:
        with io.BufferedReader(stream, 1 << 20) if unit.kind == "json.zst" else stream as fh:
            for line in fh:
                n += 1
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (ValueError, UnicodeDecodeError) as e:
                    raise DataError(f"{path}, line {n}: not valid JSON ({getattr(e, 'msg', e)})") from None
                text = _document(obj, f"{path}, line {n}", unit.text_field)
                if text:
                    yield text
    except DataError:
        raise
    except Exception as e:  # gzip.BadGzipFile, zstandard.ZstdError, EOFError, OSError
        raise DataError(f"{path}, line {n + 1}: cannot decompress ({type(e).__name__}: {e})") from None


def _read_json_array(unit: Unit) -> Iterator[str]:
    path = unit.files[0]
    try:
        with open(path, "rb") as fh:
            rows = json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        where = f", line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise DataError(f"{path}{where}: not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: a JSON file must hold one array of objects, or JSON lines")
    for i, obj in enumerate(rows):
        text = _document(obj, f"{path}, item {i}", unit.text_field)
        if text:
            yield text


def _read_parquet(unit: Unit) -> Iterator[str]:
    import pyarrow.parquet as pq

    path = unit.files[0]
    pf = pq.ParquetFile(path)
    if unit.text_field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column '{unit.text_field}' (columns: {pf.schema_arrow.names}); "
                        "set data.text_field")
    row = sum(pf.metadata.row_group(g).num_rows for g in range(unit.start))
    for g in range(unit.start, unit.end):
        col = pf.read_row_group(g, columns=[unit.text_field]).column(0)
        for v in col.to_pylist():
            row += 1
            if v is None:
                continue
            if not isinstance(v, str):
                raise DataError(f"{path}, row {row - 1}: column '{unit.text_field}' is a "
                                f"{type(v).__name__}, not a string")
            if v:
                yield v


def _read_hf(unit: Unit, vocab_size: int) -> Iterator[Document]:
    path = Path(unit.files[0])
    ds = _hf_dataset(path)
    column = _hf_column(ds, path, unit.text_field)
    step = 1024
    for a in range(unit.start, unit.end, step):
        rows = ds[a:min(a + step, unit.end)][column]
        for i, v in enumerate(rows):
            if v is None:
                continue
            if column == "input_ids":
                ids = np.asarray(v)
                if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
                    raise DataError(f"{path}, row {a + i}: input_ids is not a list of integers")
                ids = ids.astype(np.int64)
                if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                    bad = int(ids.max() if ids.max() >= vocab_size else ids.min())
                    raise DataError(f"{path}, row {a + i}: token id {bad} is outside the tokenizer's "
                                    f"vocabulary of {vocab_size}")
                if ids.size:
                    yield ids
            elif not isinstance(v, str):
                raise DataError(f"{path}, row {a + i}: column '{column}' is a {type(v).__name__}, not a string")
            elif v:
                yield v


def unit_sample(unit: Unit, chars: int) -> Iterator[str]:
    """The unit's first text documents up to ``chars`` characters (the document that crosses the
    bound included): a bounded sample for training a tokenizer."""
    total = 0
    for doc in read_unit(unit):
        if not isinstance(doc, str):
            return
        yield doc
        total += len(doc)
        if total >= chars:
            return

