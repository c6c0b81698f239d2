"""Preparing data: raw text streamed into Megatron-format token shards, in bounded memory, by worker
processes on every rank; indexed datasets checked as they are; a blend composed over both.

A prepared directory holds::

    meta.json             the dataset: its sources, weights, sample counts, fingerprint (written last)
    tokenizer/            the Hugging Face fast tokenizer every source is in
    src-NAME-KEY/         one per raw-text source: shard-00000.bin/.idx (Megatron indexed format, one
                          sequence per document, each ending in EOS), shard-00000.json (what the shard
                          holds, written when it is complete), manifest.json (written last)
    indexed-KEY.json      one per indexed source: its checked size, largest id and digest

A source's documents are cut into units (:mod:`.documents`) that depend only on its files and
``data.shard_bytes``; unit i becomes shard i. Ranks take units round-robin, and each rank's worker
processes tokenize them, so the shards' bytes are the same for any worker or rank count. A shard is
written under temporary names and renamed when complete; a rerun after an interruption (even kill -9)
keeps the complete shards and redoes the rest. Nothing is held but the documents of the batch being
tokenized. ``data.max_chars`` on a text source is applied in document order by rank 0 alone, which
reads no further than the cap.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from pd_dist.data.config import DataConfig
from pd_dist.data.corpus import EMBEDDED_MAX_CHARS, embedded_corpus_files
from pd_dist.data.documents import DataError, Unit, expand_files, plan_units, read_unit, unit_sample
from pd_dist.data.indexed import IndexedFormatError, IndexedWriter, max_id, read_index, token_dtype, truncate_shard

EOS = "<|endoftext|>"
META_VERSION = 2
BLEND_PERIOD = 10_000      # the blend's schedule repeats every this many samples (weights to 1e-4)
STALL_S = 3600.0           # a rank waiting this long for a peer's shard with no progress gives up
PROGRESS_EVERY_S = 10.0
Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------- sources
@dataclass
class Source:
    """One resolved source: what it is, where, its weight, and its text cap (0: none)."""
    index: int
    kind: str                     # embedded | files | indexed
    label: str
    weight: float = 1.0
    files: list[Path] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    cap: int = 0

    @property
    def name(self) -> str:
        base = "embedded" if self.kind == "embedded" else Path(self.label.rstrip("/*")).name or "source"
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[:40]

    def stamp(self) -> list:
        """What the source's content depends on, cheaply: every input's path, size and mtime."""
        if self.kind == "embedded":
            return [str(p) for p in embedded_corpus_files()]
        paths = [Path(f"{p}{s}") for p in self.prefixes for s in (".bin", ".idx")] if self.kind == "indexed" \
            else [q for p in self.files for q in ([p] if p.is_file() else sorted(p.rglob("*")))]
        out = []
        for q in paths:
            if q.is_file():
                st = q.stat()
                out.append([str(q.resolve()), st.st_size, st.st_mtime_ns])
        return out


def _auto_kind(path: str) -> str:
    if path == "embedded":
        return "embedded"
    if os.path.isfile(f"{path}.idx") or os.path.isfile(f"{path}.bin"):
        return "indexed"
    return "files"


def resolve_sources(cfg: DataConfig) -> list[Source]:
    """The configured sources, their inputs found and checked (a DataError names what is missing)."""
    if cfg.source == "blend":
        entries = [(e.path, e.weight, e.kind if e.kind != "auto" else _auto_kind(e.path), f"data.blend[{i}]")
                   for i, e in enumerate(cfg.blend)]
    elif cfg.source == "files":
        entries = [(", ".join(cfg.files), 1.0, "files", "data.files")]
    elif cfg.source == "indexed":
        entries = [(", ".join(cfg.prefixes), 1.0, "indexed", "data.prefixes")]
    else:
        entries = [("embedded", 1.0, "embedded", "data.source")]
    out = []
    for i, (label, weight, kind, key) in enumerate(entries):
        src = Source(i, kind, label, weight)
        if kind == "files":
            src.files = expand_files(cfg.files if cfg.source == "files" else [label], key)
        elif kind == "indexed":
            src.prefixes = cfg.prefixes if cfg.source == "indexed" else [label]
            for p in src.prefixes:
                for suffix in (".bin", ".idx"):
                    if not os.path.isfile(p + suffix):
                        raise DataError(f"{key}: {p}{suffix} does not exist (an indexed dataset is PREFIX.bin + "
                                        "PREFIX.idx; give the prefix)")
        if kind != "indexed":
            src.cap = cfg.max_chars if cfg.max_chars is not None else (EMBEDDED_MAX_CHARS if kind == "embedded" else 0)
        out.append(src)
    if any(s.kind == "indexed" for s in out) and not cfg.tokenizer:
        raise DataError("data.tokenizer: indexed data needs the tokenizer its ids came from")
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _dir_digest(path: str) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


# -------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts, vocab_size: int, out_dir: Path) -> None:
    """Byte-level BPE (GPT-2 style) trained on ``texts`` (any iterable), saved as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    fast.save_pretrained(str(out_dir))


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _tokenizer_key(cfg: DataConfig, sources: list[Source]) -> str:
    if cfg.tokenizer:
        if not (Path(cfg.tokenizer) / "tokenizer_config.json").is_file() and \
                not (Path(cfg.tokenizer) / "tokenizer.json").is_file():
            raise DataError(f"data.tokenizer: {cfg.tokenizer} is not a Hugging Face tokenizer directory")
        return _digest({"given": _dir_digest(cfg.tokenizer)})
    return _digest({"train": [[s.kind, s.stamp(), s.cap] for s in sources], "vocab": cfg.vocab_size,
                    "chars": cfg.tokenizer_train_chars, "text_field": cfg.text_field, "shard_bytes": cfg.shard_bytes})


def _ensure_tokenizer(cfg: DataConfig, sources: list[Source], units: dict[int, list[Unit]], out: Path,
                      key: str, log: Log) -> None:
    tok_dir = out / "tokenizer"
    if _read_json(tok_dir / "pd_dist_source.json").get("key") == key:
        return
    tmp = out / f".tokenizer.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    if cfg.tokenizer:
        load_tokenizer(cfg.tokenizer).save_pretrained(str(tmp))
        if not (tmp / "tokenizer.json").is_file():
            raise DataError(f"data.tokenizer: {cfg.tokenizer} has no fast tokenizer (tokenizer.json)")
    else:
        text = [s for s in sources if s.kind != "indexed"]
        n_units = sum(len(units[s.index]) for s in text)
        if not n_units:
            raise DataError("data.tokenizer: the data is tokenized already; name the tokenizer it was made with")
        per_unit = max(1, cfg.tokenizer_train_chars // n_units)
        seen = [0, 0]

        def source_sample(s: Source):
            if not s.cap:  # an even spread: the first documents of every unit
                for u in units[s.index]:
                    yield from unit_sample(u, per_unit)
                return
            # A capped source is sampled in document order, never past its cap.
            budget, taken = min(s.cap, per_unit * len(units[s.index])), 0
            for u in units[s.index]:
                for doc in unit_sample(u, budget - taken):
                    yield doc
                    taken += len(doc)
                if taken >= budget:
                    return

        def sample():
            for s in text:
                for doc in source_sample(s):
                    seen[0] += 1
                    seen[1] += len(doc)
                    yield doc

        train_tokenizer(sample(), cfg.vocab_size, tmp)
        if seen[0] == 0:
            raise DataError("the corpus is empty (no document with text)")
        log(f"[data] trained a byte-level BPE tokenizer, vocab {cfg.vocab_size}, on a sample of {seen[0]:,} "
            f"documents, {seen[1] / 1e6:.1f}M characters (data.tokenizer_train_chars) ({time.time() - t0:.0f}s)")
    (tmp / "pd_dist_source.json").write_text(json.dumps({"key": key}))
    shutil.rmtree(tok_dir, ignore_errors=True)
    os.replace(tmp, tok_dir)


# ------------------------------------------------------------------------------------------ worker
_TOKENIZER: dict = {}


def _init_worker() -> None:
    # One core per worker: parallelism comes from the worker processes, not from the Rust thread pool.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode(tok_file: str, texts: list[str]) -> list[list[int]]:
    tok = _TOKENIZER.get(tok_file)
    if tok is None:
        from tokenizers import Tokenizer

        tok = _TOKENIZER[tok_file] = Tokenizer.from_file(tok_file)
    # encode_batch_fast skips the character offsets nobody here reads (the same ids, ~40% faster).
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


@dataclass(frozen=True)
class Task:
    """Unit ``index`` of a source, to be written as ``src_dir/shard-{index}``."""
    src_dir: str
    index: int
    unit: Unit
    tok_file: str
    dtype: str
    eos: int                      # -1: the tokenizer has none
    vocab_size: int
    cap: int = 0                  # a capped source: stop after the document reaching it; report each
                                  # document's characters (rank 0 cuts the source in order)

    @property
    def prefix(self) -> str:
        return os.path.join(self.src_dir, f"shard-{self.index:05d}")


def prepare_unit(task: Task) -> dict:
    """Read, tokenize and write one unit as a shard; returns its record (also written beside it)."""
    dtype = np.dtype(task.dtype)
    writer = IndexedWriter(task.prefix, dtype)
    doc_chars: list[int] = []
    chars = docs_read = 0
    cut = False
    batch: list = []
    batch_chars = 0
    eos = [task.eos] if task.eos >= 0 else []

    def flush():
        nonlocal batch, batch_chars
        texts = [d for d in batch if isinstance(d, str)]
        encoded = iter(_encode(task.tok_file, texts)) if texts else iter(())
        arrays = []
        for d in batch:
            ids = next(encoded) + eos if isinstance(d, str) else (d.tolist() + eos)
            arrays.append(np.asarray(ids, dtype=dtype))
        writer.add_documents(arrays)
        batch, batch_chars = [], 0

    try:
        for doc in read_unit(task.unit, task.vocab_size):
            if task.cap and chars >= task.cap:
                cut = True  # a document beyond the cap exists
                break
            n = len(doc) if isinstance(doc, str) else 0
            chars += n
            docs_read += 1
            if task.cap:
                doc_chars.append(n)
            batch.append(doc)
            batch_chars += n + (len(doc) if not isinstance(doc, str) else 0)
            if batch_chars >= 1 << 20 or len(batch) >= 2048:
                flush()
        flush()
        record = writer.finish()
    except BaseException:
        writer.abort()
        raise
    record.update(unit=dataclasses.asdict(task.unit), chars=chars, cut=cut)
    _write_json(Path(task.prefix + ".json"), record)
    if task.cap:
        record["doc_chars"] = doc_chars
    return record


def _record_ok(task: Task) -> Optional[dict]:
    """The record of a complete shard for this task (a rerun keeps it), or None."""
    rec = _read_json(Path(task.prefix + ".json"))
    if rec.get("unit") != json.loads(json.dumps(dataclasses.asdict(task.unit))):
        return None
    try:
        if os.path.getsize(task.prefix + ".bin") != rec["bin_bytes"] or not os.path.isfile(task.prefix + ".idx"):
            return None
    except (OSError, KeyError):
        return None
    return rec


# --------------------------------------------------------------------------------------- running
class _Progress:
    def __init__(self, total_bytes: int, total_shards: int, log: Log, who: str):
        self.total, self.shards, self.log, self.who = total_bytes, total_shards, log, who
        self.done_bytes = self.done_shards = 0
        self.t0 = self.last = time.time()

    def add(self, nbytes: int, final: bool = False) -> None:
        from pd_dist.core.monitor import fmt_duration

        self.done_bytes += nbytes
        self.done_shards += 1
        now = time.time()
        if now - self.last < PROGRESS_EVERY_S and not final and self.done_shards < self.shards:
            return
        self.last = now
        rate = self.done_bytes / max(now - self.t0, 1e-9)
        eta = (self.total - self.done_bytes) / rate if rate > 0 else float("inf")
        self.log(f"[data]{self.who} {self.done_shards}/{self.shards} shards, {self.done_bytes / 1e6:,.0f} of "
                 f"{self.total / 1e6:,.0f} MB read, {rate / 1e6:.1f} MB/s, ETA {fmt_duration(eta)}")


def _run_tasks(tasks: list[Task], workers: int, on_done: Callable[[Task, dict], bool]) -> None:
    """Run tasks on ``workers`` processes (in this process when 1), results taken in task order;
    ``on_done`` returning False stops submitting (what was started is finished and returned)."""
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            if not on_done(t, prepare_unit(t)):
                return
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited threads, locks or CUDA state
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker) as pool:
        pending: deque = deque()
        todo = iter(tasks)
        more = True
        while True:
            while more and len(pending) < 2 * workers:
                t = next(todo, None)
                if t is None:
                    more = False
                    break
                pending.append((t, pool.apply_async(prepare_unit, (t,))))
            if not pending:
                return
            t, res = pending.popleft()
            if not on_done(t, res.get()):
                more = False
                for t2, r2 in pending:
                    r2.wait()
                    on_done(t2, None)
                return


# --------------------------------------------------------------------------------------- prepare
def _read_json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text())
        return out if isinstance(out, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def inputs_key(cfg: DataConfig, sources: list[Source]) -> str:
    """What a prepared directory depends on; it is reused only when this matches."""
    return _digest({"version": META_VERSION, "sources": [[s.kind, s.stamp(), s.weight, s.cap] for s in sources],
                    "text_field": cfg.text_field, "shard_bytes": cfg.shard_bytes,
                    "tokenizer": _tokenizer_key(cfg, sources), "seq_len": cfg.seq_len,
                    "val_samples": cfg.val_samples})


def is_prepared(out_dir, key: str) -> bool:
    return _read_json(Path(out_dir) / "meta.json").get("inputs_key") == key


class _Peers:
    """Ranks preparing together meet on the file system (the data directory is shared): each rank
    writes its failure, if any, where the others look while they wait."""

    def __init__(self, out: Path, key: str, rank: int, world: int):
        self.out, self.key, self.rank, self.world = out, key, rank, world
        self.t0 = time.time()
        self._err(rank).unlink(missing_ok=True)

    def _err(self, r: int) -> Path:
        return self.out / f".prepare-error-{self.key}-rank{r}"

    def fail(self, message: str) -> None:
        if self.world > 1:
            self.out.mkdir(parents=True, exist_ok=True)
            self._err(self.rank).write_text(message)

    def wait(self, ready: Callable[[], bool], progress: Callable[[], int], what: str) -> None:
        last, mark = progress(), time.time()
        while not ready():
            for r in range(self.world):
                p = self._err(r)
                if r != self.rank and p.is_file() and p.stat().st_mtime >= self.t0 - 1:
                    raise DataError(f"data preparation failed on rank {r}: {p.read_text().strip()}")
            now_progress = progress()
            if now_progress != last:
                last, mark = now_progress, time.time()
            elif time.time() - mark > STALL_S:
                raise DataError(f"waited {STALL_S:.0f} s for {what} with no progress: is a preparing rank gone?")
            time.sleep(0.5)


def prepare_data(cfg: DataConfig, out_dir: str | os.PathLike, log: Log = print, rank: int = 0, world: int = 1,
                 workers: int = 1) -> Path:
    """Prepare (or reuse) ``cfg``'s data in ``out_dir``; every rank of a preparing group calls this with
    its ``rank`` and the group's ``world``, and returns once the whole directory is complete."""
    out = Path(out_dir)
    sources = resolve_sources(cfg)
    key = inputs_key(cfg, sources)
    if is_prepared(out, key):
        return out
    out.mkdir(parents=True, exist_ok=True)
    peers = _Peers(out, key, rank, world)
    try:
        _prepare(cfg, out, sources, key, log, peers, workers)
    except BaseException as e:
        peers.fail(f"{type(e).__name__}: {e}" if not isinstance(e, DataError) else str(e))
        raise
    return out


def source_units(cfg: DataConfig, s: Source) -> list[Unit]:
    """The units a text source is read in: the embedded corpus as one, files planned in shards."""
    if s.kind == "embedded":
        return [Unit("embedded", size=sum(p.stat().st_size for p in embedded_corpus_files()))]
    return plan_units(s.files, cfg.shard_bytes, cfg.text_field)


def _prepare(cfg: DataConfig, out: Path, sources: list[Source], key: str, log: Log, peers: _Peers,
             workers: int) -> None:
    rank, world = peers.rank, peers.world
    who = f" rank {rank}:" if world > 1 else ""
    t0 = time.time()
    units = {s.index: source_units(cfg, s) for s in sources if s.kind != "indexed"}
    tok_key = _tokenizer_key(cfg, sources)
    if rank == 0:
        _ensure_tokenizer(cfg, sources, units, out, tok_key, log)
    else:
        peers.wait(lambda: _read_json(out / "tokenizer" / "pd_dist_source.json").get("key") == tok_key,
                   lambda: 0, "rank 0's tokenizer")
    from pd_dist.models import tokenizer_hash

    tok_dir = out / "tokenizer"
    tokenizer = load_tokenizer(tok_dir)
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    tok_hash = tokenizer_hash(tok_dir)
    dtype = token_dtype(vocab)

    # Raw-text sources: the tasks, and which of them this rank runs.
    plans: dict[int, tuple[Path, list[Task], str]] = {}
    for s in sources:
        if s.kind == "indexed":
            continue
        src_key = _digest({"kind": s.kind, "stamp": s.stamp(), "text_field": cfg.text_field, "cap": s.cap,
                           "shard_bytes": cfg.shard_bytes, "tokenizer": tok_hash, "version": META_VERSION})
        src_dir = out / f"src-{s.name}-{src_key}"
        src_dir.mkdir(exist_ok=True)
        tasks = [Task(str(src_dir), i, u, str(tok_dir / "tokenizer.json"), dtype.name,
                      -1 if eos is None else int(eos), vocab, s.cap) for i, u in enumerate(units[s.index])]
        if _read_json(src_dir / "manifest.json").get("key") == src_key:
            tasks = []
        plans[s.index] = (src_dir, tasks, src_key)
    free = [t for s in sources if s.index in plans and not s.cap for t in plans[s.index][1]]
    mine = [t for i, t in enumerate(free) if i % world == rank]
    todo = [t for t in mine if _record_ok(t) is None]
    n_workers = max(1, workers)
    if todo:
        kept = len(mine) - len(todo)
        log(f"[data]{who} tokenizing {len(todo)} shard(s) of {sum(t.unit.size for t in todo) / 1e6:,.0f} MB with "
            f"{min(n_workers, len(todo))} worker process(es)" + (f"; {kept} complete already" if kept else ""))
        progress = _Progress(sum(t.unit.size for t in todo), len(todo), log, who)
        _run_tasks(todo, n_workers, lambda t, rec: progress.add(t.unit.size) or True)
    cut_info: dict[int, dict] = {}
    if rank == 0:
        for s in sources:
            if s.index in plans and s.cap and plans[s.index][1]:
                cut_info[s.index] = _prepare_capped(s, plans[s.index][1], n_workers, log)
    # Rank 0 completes every source once all shards exist; the other ranks wait for it.
    if rank != 0:
        peers.wait(lambda: is_prepared(out, key), lambda: _count_records(plans), "rank 0 to complete the data")
        return
    # A record is written last, once its shard is in place (and checked in full when the source completes).
    peers.wait(lambda: all(os.path.exists(t.prefix + ".json") for t in free), lambda: _count_records(plans),
               "the other ranks' shards")
    entries = []
    for s in sources:
        if s.kind == "indexed":
            entries.append(_check_indexed(s, out, vocab, tok_hash, log))
        else:
            src_dir, tasks, src_key = plans[s.index]
            entries.append(_complete_source(s, src_dir, tasks, src_key, cut_info.get(s.index), log))
    meta = _compose(cfg, sources, entries, key, tok_hash, vocab, dtype, out)
    _write_json(out / "meta.json", meta)
    _log_dataset(meta, log, time.time() - t0)


def _count_records(plans) -> int:
    return sum(len(list(Path(p[0]).glob("shard-*.json"))) for p in plans.values())


def _prepare_capped(s: Source, tasks: list[Task], workers: int, log: Log) -> dict:
    """A capped text source, in document order: stop once the cap is reached, cut the shard that
    reaches it after the document that reaches it, drop the shards after it."""
    total = 0
    state = {"kept": [], "cut": False, "chars": 0, "docs": 0}

    def done(t: Task, rec: Optional[dict]) -> bool:
        nonlocal total
        if rec is None or state["cut"]:  # started before the cap was known to be reached
            _remove_shard(t.prefix)
            return False
        chars = np.asarray(rec.pop("doc_chars"), np.int64)
        before = total
        total += int(chars.sum())
        if total < s.cap and not rec["cut"]:
            state["kept"].append(t)
            state["docs"] += len(chars)
            return True
        k = int(np.searchsorted(np.cumsum(chars) + before, s.cap, side="left")) + 1 if total >= s.cap else len(chars)
        k = min(k, len(chars))
        more = k < len(chars) or rec["cut"] or t is not tasks[-1]
        if k < len(chars):
            truncate_shard(t.prefix, k)
            rec2 = _read_json(Path(t.prefix + ".json"))
            rec2.update(indexed_record(t.prefix), chars=int(chars[:k].sum()), cut=True)
            _write_json(Path(t.prefix + ".json"), rec2)
        state["kept"].append(t)
        state["docs"] += k
        state["chars"] = before + int(chars[:k].sum())
        state["cut"] = more
        return False

    _run_tasks(tasks, workers, done)
    for t in tasks[len(state["kept"]):]:
        _remove_shard(t.prefix)
    if not state["cut"]:
        return {"tasks": state["kept"]}
    log(f"[data] data.max_chars={s.cap:,} cut {s.label} after {state['docs']:,} documents "
        f"({state['chars']:,} characters); the rest of it is not used")
    return {"tasks": state["kept"], "truncated": {"max_chars": s.cap, "documents": state["docs"],
                                                  "characters": state["chars"]}}


def indexed_record(prefix: str) -> dict:
    """Sizes and digests of a written shard, read back from disk."""
    idx = read_index(prefix)
    h = hashlib.sha256()
    with open(prefix + ".bin", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return {"n_docs": idx.n_docs, "n_tokens": idx.n_tokens, "bin_bytes": idx.n_tokens * idx.dtype.itemsize,
            "bin_sha256": h.hexdigest(), "idx_sha256": hashlib.sha256(Path(prefix + ".idx").read_bytes()).hexdigest()}


def _remove_shard(prefix: str) -> None:
    for suffix in (".bin", ".idx", ".json"):
        try:
            os.unlink(prefix + suffix)
        except FileNotFoundError:
            pass


def _complete_source(s: Source, src_dir: Path, tasks: list[Task], src_key: str, cut: Optional[dict],
                     log: Log) -> dict:
    manifest_path = src_dir / "manifest.json"
    manifest = _read_json(manifest_path)
    if manifest.get("key") != src_key:
        if cut is not None:
            tasks = cut["tasks"]
        shards = []
        for t in tasks:
            rec = _record_ok(t)
            if rec is None:
                raise DataError(f"{t.prefix}.bin is missing or incomplete after preparation")
            if not rec["n_docs"]:
                continue  # a unit without documents (Megatron's reader cannot map an empty file)
            shards.append({"name": Path(t.prefix).name, **{k: rec[k] for k in (
                "n_docs", "n_tokens", "bin_bytes", "bin_sha256", "idx_sha256", "chars")}})
        if not shards:
            raise DataError(f"{s.label}: the source is empty (no document with text)")
        manifest = {"key": src_key, "kind": s.kind, "label": s.label, "dtype": tasks[0].dtype,
                    "n_docs": sum(sh["n_docs"] for sh in shards), "n_tokens": sum(sh["n_tokens"] for sh in shards),
                    "n_chars": sum(sh["chars"] for sh in shards), "shards": shards,
                    "truncated": (cut or {}).get("truncated"),
                    "fingerprint": _digest([sh["bin_sha256"] for sh in shards] + [sh["idx_sha256"] for sh in shards])}
        _write_json(manifest_path, manifest)
    return {"kind": s.kind, "label": s.label, "weight": s.weight, "dir": src_dir.name,
            "prefixes": [sh["name"] for sh in manifest["shards"]],
            "shard_tokens": [sh["n_tokens"] for sh in manifest["shards"]], "dtype": manifest["dtype"],
            "n_docs": manifest["n_docs"], "n_tokens": manifest["n_tokens"], "n_chars": manifest["n_chars"],
            "fingerprint": manifest["fingerprint"], "truncated": manifest.get("truncated")}


def _check_indexed(s: Source, out: Path, vocab: int, tok_hash: str, log: Log) -> dict:
    """An indexed source is read as it is: each prefix's .idx must match its .bin, its dtype must hold
    the vocabulary, and every id must be inside it (checked once, remembered by size and mtime)."""
    stamp_key = _digest({"stamp": s.stamp(), "vocab": vocab})
    cache = out / f"indexed-{stamp_key}.json"
    info = _read_json(cache)
    if info.get("key") != stamp_key:
        shard_tokens, digests, n_docs = [], [], 0
        t0 = time.time()
        for p in s.prefixes:
            try:
                idx = read_index(p)
            except IndexedFormatError as e:
                raise DataError(str(e)) from None
            if max_id(idx.dtype) < 0:
                raise DataError(f"{p}.idx: dtype {idx.dtype.name} does not hold token ids")
            if max_id(idx.dtype) < vocab - 1 and idx.dtype.itemsize < 2:
                raise DataError(f"{p}.idx: dtype {idx.dtype.name} holds ids up to {max_id(idx.dtype)}, too small "
                                f"for the tokenizer's vocabulary of {vocab}")
            h = hashlib.sha256()
            tokens = np.memmap(p + ".bin", dtype=idx.dtype, mode="r") if idx.n_tokens else np.zeros(0, idx.dtype)
            step = 1 << 24
            for a in range(0, len(tokens), step):
                block = np.asarray(tokens[a:a + step])
                lo, hi = int(block.min()), int(block.max())
                if lo < 0 or hi >= vocab:
                    j = int(np.flatnonzero((block < 0) | (block >= vocab))[0])
                    raise DataError(f"{p}.bin: token id {int(block[j])} at token {a + j} is outside the tokenizer's "
                                    f"vocabulary of {vocab} (data.tokenizer must be the one the data was made with)")
                h.update(block.tobytes())
            del tokens
            shard_tokens.append(idx.n_tokens)
            n_docs += idx.n_docs
            digests.append([h.hexdigest(), hashlib.sha256(Path(p + ".idx").read_bytes()).hexdigest(),
                            idx.dtype.name])
        if not sum(shard_tokens):
            raise DataError(f"{s.label}: the indexed data holds no tokens")
        info = {"key": stamp_key, "prefixes": [os.path.abspath(p) for p in s.prefixes], "shard_tokens": shard_tokens,
                "dtypes": [d[2] for d in digests], "n_docs": n_docs, "fingerprint": _digest(digests),
                "stamp": s.stamp()}
        _write_json(cache, info)
        log(f"[data] checked {s.label}: {sum(shard_tokens):,} tokens in {n_docs:,} documents, every id inside the "
            f"vocabulary ({time.time() - t0:.0f}s)")
    return {"kind": "indexed", "label": s.label, "weight": s.weight, "dir": None, "prefixes": info["prefixes"],
            "shard_tokens": info["shard_tokens"], "dtypes": info["dtypes"], "n_docs": info["n_docs"],
            "n_tokens": sum(info["shard_tokens"]), "n_chars": None, "fingerprint": info["fingerprint"],
            "stamp": info["stamp"], "truncated": None}


def blend_counts(weights: list[float], total: int = BLEND_PERIOD, at_least_one: bool = True) -> list[int]:
    """Integer shares of ``total`` proportional to ``weights`` (largest remainder), summing to ``total``;
    with ``at_least_one`` no share is 0 (a source with a weight is drawn from)."""
    w = np.asarray(weights, np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    if at_least_one:
        counts = np.maximum(counts, 1)
        while counts.sum() > total:  # only when tiny weights were raised to 1
            counts[int(np.argmax(counts))] -= 1
    rem = exact - np.floor(exact)
    for i in np.argsort(-rem, kind="stable")[:total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def _compose(cfg: DataConfig, sources: list[Source], entries: list[dict], key: str, tok_hash: str, vocab: int,
             dtype, out: Path) -> dict:
    L = cfg.seq_len
    counts = blend_counts([e["weight"] for e in entries])
    val = blend_counts([e["weight"] for e in entries], cfg.val_samples, at_least_one=False)
    for e, c, v in zip(entries, counts, val):
        n = (e["n_tokens"] - 1) // L
        if n <= v:
            raise DataError(f"{e['label']}: gives {n} samples of {L} tokens, not more than the {v} held out "
                            f"(data.val_samples={cfg.val_samples}); add text or lower data.seq_len")
        e.update(n_samples=n, n_val=v, n_train=n - v, blend_count=c, share=c / BLEND_PERIOD)
    fingerprint = hashlib.sha256(json.dumps(
        {"tokenizer": tok_hash, "seq_len": L, "sources": [[e["fingerprint"], e["blend_count"], e["n_val"]]
                                                          for e in entries]}, sort_keys=True).encode()).hexdigest()[:32]
    n_train = sum(e["n_train"] for e in entries)
    n_val = sum(e["n_val"] for e in entries)
    return {"version": META_VERSION, "inputs_key": key, "fingerprint": fingerprint, "tokenizer_hash": tok_hash,
            "vocab_size": vocab, "dtype": np.dtype(dtype).name, "seq_len": L, "n_train": n_train, "n_val": n_val,
            "n_samples": n_train + n_val, "n_tokens": sum(e["n_tokens"] for e in entries),
            "n_docs": sum(e["n_docs"] for e in entries), "blend_period": BLEND_PERIOD, "sources": entries,
            "truncated": [dict(e["truncated"], source=e["label"]) for e in entries if e.get("truncated")]}


def _log_dataset(meta: dict, log: Log, seconds: float) -> None:
    for e in meta["sources"]:
        mix = f", weight {e['weight']:g} -> {100 * e['share']:.2f}% of samples" if len(meta["sources"]) > 1 else ""
        what = "the embedded corpus" if e["kind"] == "embedded" else f"{e['kind']} {e['label']}"
        log(f"[data] {what}: {e['n_docs']:,} documents, {e['n_tokens'] / 1e6:.2f}M tokens, "
            f"{e['n_samples']:,} samples ({e['n_val']} held out){mix}")
    log(f"[data] {meta['n_tokens'] / 1e6:.2f}M tokens -> {meta['n_samples']:,} samples of {meta['seq_len']} "
        f"({seconds:.0f}s)")
