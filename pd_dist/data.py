"""Data: corpus loading, tokenizer training, packing into a memory-mapped token array, and the sampler.

A prepared dataset is a directory holding ``tokenizer/`` (a Hugging Face fast tokenizer), ``tokens.bin``
(the whole token stream, uint16 or uint32) and ``meta.json`` (sizes and the data fingerprint). Sample i
is the window ``tokens[i*seq_len : i*seq_len + seq_len + 1]``: inputs are its first seq_len tokens and
targets its last seq_len, so every token of the stream is predicted exactly once. The last
``val_samples`` samples are held out for evaluation.

The embedded default corpus is the running Python's own standard library: its sources (code, docstrings,
comments) and pydoc's topic documentation. Real text nobody here wrote, present on every machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Literal, Optional

import numpy as np

from .configlib import check_choices, doc, fail

EOS = "<|endoftext|>"
FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
           ".parquet": "parquet"}
MANIFEST_VERSION = 1


@dataclass
class DataConfig:
    """Where the training text comes from and how it becomes fixed-length samples."""
    source: Literal["embedded", "files"] = field(default="embedded", metadata=doc(
        "'embedded' (the Python standard library's sources and docs) or 'files' (see `files`)"))
    files: list[str] = field(default_factory=list, metadata=doc(
        "local .txt/.md (one document per file), .jsonl/.json or .parquet (one document per row) files"))
    text_field: str = field(default="text", metadata=doc("column holding the text in jsonl/parquet"))
    max_chars: int = field(default=6_000_000, metadata=doc(
        "stop reading documents after this many characters (0 = no limit)"))
    tokenizer: Optional[str] = field(default=None, metadata=doc(
        "local Hugging Face tokenizer directory; null trains a byte-level BPE on the corpus"))
    vocab_size: int = field(default=8192, metadata=doc("vocabulary size of the trained BPE tokenizer"))
    seq_len: int = field(default=256, metadata=doc("tokens per training sample"))
    val_samples: int = field(default=32, metadata=doc("samples held out at the end for evaluation"))
    loader_workers: int = field(default=2, metadata=doc(
        "offline mode: DataLoader worker processes reading the logits store ahead of the step"))
    dir: Optional[str] = field(default=None, metadata=doc(
        "prepared-data directory (default: <output_dir>/data); reused when its inputs match"))

    def validate(self, prefix: str) -> None:
        check_choices(self, prefix)
        if self.source == "files":
            if not self.files:
                fail(f"{prefix}.files", self.files, "must list at least one file when source is 'files'")
            for f in self.files:
                if Path(f).suffix.lower() not in FORMATS:
                    fail(f"{prefix}.files", f, "file types allowed: " + ", ".join(sorted(FORMATS)))
        elif self.files:
            fail(f"{prefix}.files", self.files, "is only read when data.source is 'files'")
        if self.max_chars < 0:
            fail(f"{prefix}.max_chars", self.max_chars, "must be >= 0")
        if not 256 < self.vocab_size <= 1 << 24:
            fail(f"{prefix}.vocab_size", self.vocab_size, "must be in (256, 16777216]")
        if self.seq_len < 2:
            fail(f"{prefix}.seq_len", self.seq_len, "must be >= 2")
        if self.val_samples < 1:
            fail(f"{prefix}.val_samples", self.val_samples, "must be >= 1")
        if self.loader_workers < 0:
            fail(f"{prefix}.loader_workers", self.loader_workers, "must be >= 0")


# ----------------------------------------------------------------------------------------- corpus
def embedded_corpus_files() -> list[Path]:
    """Standard-library sources, sorted, without tests, site-packages or generated tables."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "ensurepip",
                 "turtledemo", "tkinter", "encodings"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                out.append(Path(dirpath) / name)
    docs = root / "pydoc_data" / "topics.py"
    # pydoc's topics (the language reference, as text) lead, so a small max_chars still gets prose.
    out = [p for p in out if p != docs]
    return ([docs] if docs.is_file() else []) + out


def _embedded_documents(max_chars: int):
    total = 0
    for p in embedded_corpus_files():
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if p.name == "topics.py":  # the module is one dict of documentation strings: yield the prose
            ns: dict = {}
            exec(compile(text, str(p), "exec"), ns)  # stdlib file, data only
            for key in sorted(ns["topics"]):
                yield ns["topics"][key]
                total += len(ns["topics"][key])
                if max_chars and total >= max_chars:
                    return
            continue
        yield text
        total += len(text)
        if max_chars and total >= max_chars:
            return


def iter_documents(cfg: DataConfig, cache_dir: Path):
    """Documents of the configured corpus, in a fixed order. Files go through `datasets`."""
    if cfg.source == "embedded":
        yield from _embedded_documents(cfg.max_chars)
        return
    import datasets

    total = 0
    for f in cfg.files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        fmt = FORMATS[path.suffix.lower()]
        kwargs = {"sample_by": "document"} if fmt == "text" else {}
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train",
                                   cache_dir=str(cache_dir / "hf_cache"), **kwargs)
        column = "text" if fmt == "text" else cfg.text_field
        if column not in ds.column_names:
            raise ValueError(f"{path}: no column '{column}' (columns: {ds.column_names}); set data.text_field")
        for row in ds:
            text = row[column]
            if not text:
                continue
            yield text
            total += len(text)
            if cfg.max_chars and total >= cfg.max_chars:
                return


# -------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: list[str], vocab_size: int, out_dir: Path) -> None:
    """Byte-level BPE (GPT-2 style) trained on the corpus, saved as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    fast.save_pretrained(str(out_dir))


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# ---------------------------------------------------------------------------------------- prepare
def _inputs_key(cfg: DataConfig) -> str:
    """What the prepared data depends on; a prepared dir is reused only when this matches."""
    files = [(f, os.path.getsize(f), int(os.path.getmtime(f))) for f in cfg.files] \
        if cfg.source == "files" else [str(p) for p in embedded_corpus_files()]
    tok = None
    if cfg.tokenizer:
        from .models import tokenizer_hash
        tok = tokenizer_hash(cfg.tokenizer)
    blob = json.dumps({"source": cfg.source, "files": files, "text_field": cfg.text_field,
                       "max_chars": cfg.max_chars, "tokenizer": tok,
                       "vocab_size": None if cfg.tokenizer else cfg.vocab_size,
                       "seq_len": cfg.seq_len, "val_samples": cfg.val_samples,
                       "version": MANIFEST_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_data(cfg: DataConfig, out_dir: str | os.PathLike, log=print) -> Path:
    """Tokenize and pack the corpus into ``out_dir`` unless an identical preparation is there."""
    from .models import tokenizer_hash

    out = Path(out_dir)
    key = _inputs_key(cfg)
    meta_path = out / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("inputs_key") == key:
            return out
        log(f"[data] {out} was prepared from other inputs; preparing again")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    docs = list(iter_documents(cfg, out))
    if not docs:
        raise ValueError("the corpus is empty")
    n_chars = sum(len(d) for d in docs)
    log(f"[data] {len(docs)} documents, {n_chars / 1e6:.1f}M characters")
    tok_dir = out / "tokenizer"
    if cfg.tokenizer:
        load_tokenizer(cfg.tokenizer).save_pretrained(str(tok_dir))
    else:
        train_tokenizer(docs, cfg.vocab_size, tok_dir)
        log(f"[data] trained a byte-level BPE tokenizer, vocab {cfg.vocab_size} ({time.time() - t0:.0f}s)")
    tokenizer = load_tokenizer(tok_dir)
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    # Encode with the Rust backend in batches (multithreaded); documents are separated by EOS.
    backend = tokenizer.backend_tokenizer
    tmp = out / "tokens.bin.tmp"
    digest = hashlib.sha256()
    n_tokens = 0
    with open(tmp, "wb") as fh:
        for i in range(0, len(docs), 256):
            encs = backend.encode_batch(docs[i:i + 256], add_special_tokens=False)
            for e in encs:
                ids = e.ids + ([eos] if eos is not None else [])
                arr = np.asarray(ids, dtype=dtype)
                fh.write(arr.tobytes())
                digest.update(arr.tobytes())
                n_tokens += len(arr)
    n_samples = (n_tokens - 1) // cfg.seq_len
    if n_samples <= cfg.val_samples:
        raise ValueError(f"the corpus gives {n_samples} samples of {cfg.seq_len} tokens, not more than "
                         f"data.val_samples={cfg.val_samples}; add text or lower data.seq_len")
    os.replace(tmp, out / "tokens.bin")
    tok_hash = tokenizer_hash(tok_dir)
    fingerprint = hashlib.sha256(
        f"{tok_hash}:{digest.hexdigest()}:{cfg.seq_len}".encode()).hexdigest()[:32]
    meta = {"version": MANIFEST_VERSION, "inputs_key": key, "fingerprint": fingerprint,
            "tokenizer_hash": tok_hash, "vocab_size": vocab, "dtype": np.dtype(dtype).name,
            "n_tokens": n_tokens, "seq_len": cfg.seq_len, "n_samples": n_samples,
            "n_val": cfg.val_samples, "n_train": n_samples - cfg.val_samples, "n_docs": len(docs)}
    tmp_meta = out / "meta.json.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, meta_path)
    log(f"[data] {n_tokens / 1e6:.2f}M tokens -> {n_samples} samples of {cfg.seq_len} "
        f"({time.time() - t0:.0f}s) in {out}")
    return out


# ----------------------------------------------------------------------------------------- access
class PackedDataset:
    """Read-only view of a prepared directory; samples come from a memory map (no copy of the file)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.seq_len = self.meta["seq_len"]
        self.tokens = np.memmap(self.path / "tokens.bin", dtype=self.meta["dtype"], mode="r")
        if len(self.tokens) != self.meta["n_tokens"]:
            raise ValueError(f"{self.path}/tokens.bin holds {len(self.tokens)} tokens, meta.json says "
                             f"{self.meta['n_tokens']}: prepare the data again")
        self.n_train = self.meta["n_train"]
        self.n_val = self.meta["n_val"]
        self.fingerprint = self.meta["fingerprint"]
        self.vocab_size = self.meta["vocab_size"]

    def __getstate__(self):  # DataLoader workers reopen the memory map instead of copying it
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def sample(self, i: int) -> np.ndarray:
        """Sample i (0 <= i < n_train + n_val): seq_len + 1 tokens, int64."""
        s = i * self.seq_len
        return np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64)

    def batch(self, ids) -> np.ndarray:
        return np.stack([self.sample(int(i)) for i in ids])

    def val_ids(self) -> np.ndarray:
        return np.arange(self.n_train, self.n_train + self.n_val)


class GlobalBatchSampler:
    """Deterministic global batches over the training samples, independent of the data-parallel size.

    The global batch for optimizer step s is a fixed slice of an epoch-seeded permutation, so a run on
    one rank and on N ranks see the same samples per step, and the position is just the step. Rank r
    of dp takes the r-th contiguous share of the global batch, cut into micro-batches.
    """

    def __init__(self, n_samples: int, global_batch: int, seed: int):
        if n_samples < 1:
            raise ValueError("no training samples")
        self.n, self.global_batch, self.seed = n_samples, global_batch, seed
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def global_batch_ids(self, step: int) -> np.ndarray:
        start = step * self.global_batch
        out = np.empty(self.global_batch, dtype=np.int64)
        for j in range(self.global_batch):
            pos = start + j
            out[j] = self._permutation(pos // self.n)[pos % self.n]
        return out

    def micro_batches(self, step: int, dp_rank: int, dp_size: int, micro_batch: int) -> list[np.ndarray]:
        ids = self.global_batch_ids(step)
        share = self.global_batch // dp_size
        mine = ids[dp_rank * share:(dp_rank + 1) * share]
        return [mine[i:i + micro_batch] for i in range(0, share, micro_batch)]

    def state(self, step: int) -> dict:
        return {"samples_consumed": step * self.global_batch, "global_batch": self.global_batch,
                "seed": self.seed, "n_samples": self.n}

    def check_state(self, state: dict) -> None:
        for k in ("global_batch", "seed", "n_samples"):
            if state.get(k) != getattr(self, {"global_batch": "global_batch", "seed": "seed",
                                              "n_samples": "n"}[k]):
                raise ValueError(f"checkpoint data position was saved with {k}={state.get(k)}, this run "
                                 f"has {getattr(self, 'n' if k == 'n_samples' else k)}: resuming would "
                                 "not continue the same data order")


class MicroBatchPlan(Sequence):
    """Every training micro-batch one data-parallel rank runs from ``start_step`` to ``stop_step``, in
    order, as an indexable sequence computed on demand (nothing materialized): item j is the sample
    ids of the j-th micro-batch. What prefetching teacher-signal sources read ahead along."""

    def __init__(self, sampler: GlobalBatchSampler, start_step: int, stop_step: int, dp_rank: int,
                 dp_size: int, micro_batch: int):
        if sampler.global_batch % (micro_batch * dp_size):
            raise ValueError(f"global batch {sampler.global_batch} is not a multiple of micro_batch x dp = "
                             f"{micro_batch} x {dp_size}")
        self.sampler, self.start, self.stop = sampler, start_step, max(start_step, stop_step)
        self.dp_rank, self.dp_size, self.micro = dp_rank, dp_size, micro_batch
        self.per_step = sampler.global_batch // (micro_batch * dp_size)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.per_step

    def __getitem__(self, j: int) -> np.ndarray:
        if not 0 <= j < len(self):
            raise IndexError(f"micro-batch {j} outside the plan of {len(self)}")
        step, m = divmod(j, self.per_step)
        return self.sampler.micro_batches(self.start + step, self.dp_rank, self.dp_size, self.micro)[m]
