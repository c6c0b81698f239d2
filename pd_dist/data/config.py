"""The data section of an experiment config: where the text comes from, and how it becomes samples."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from pd_dist.core.configlib import check_choices, doc, fail

MAX_VOCAB = 1 << 24
MAX_COUNT = 1 << 31  # sizes and counts beyond int32 are typos, not configs


@dataclass
class SourceConfig:
    """One source of a blend (``data.blend``)."""
    path: str = field(default="", metadata=doc(
        "'embedded', a file, glob or directory of raw text (as data.files), a Hugging Face save_to_disk "
        "directory, or a Megatron indexed dataset prefix (PREFIX.bin + PREFIX.idx)"))
    weight: float = field(default=1.0, metadata=doc(
        "share of the training samples drawn from this source, relative to the others' weights (> 0)"))
    kind: Literal["auto", "embedded", "files", "indexed"] = field(default="auto", metadata=doc(
        "auto: 'embedded' for that name, 'indexed' when PATH.idx and PATH.bin exist, else 'files'"))

    def validate(self, prefix: str) -> None:
        check_choices(self, prefix)
        if not self.path.strip():
            fail(f"{prefix}.path", self.path, "must name a source")
        if self.kind == "embedded" and self.path != "embedded":
            fail(f"{prefix}.path", self.path, "kind 'embedded' takes the path 'embedded'")
        if not (math.isfinite(self.weight) and 0 < self.weight <= 1e6):
            fail(f"{prefix}.weight", self.weight, "must be a number in (0, 1e6]")


@dataclass
class DataConfig:
    """Where the training text comes from and how it becomes fixed-length samples."""
    source: Literal["embedded", "files", "indexed", "blend"] = field(default="embedded", metadata=doc(
        "'embedded' (the Python standard library's sources and docs), 'files' (raw text: `files`), "
        "'indexed' (Megatron .bin/.idx made by Megatron-LM, Megatron-DeepSpeed or NeMo: `prefixes`) or "
        "'blend' (several sources mixed by weight: `blend`)"))
    files: list[str] = field(default_factory=list, metadata=doc(
        "source 'files': files, globs and directories of .jsonl/.json (one document per line), "
        ".jsonl.gz/.jsonl.zst, .parquet (one per row), .txt/.md (one per file), and Hugging Face "
        "save_to_disk directories (a text column, or `input_ids` already tokenized)"))
    prefixes: list[str] = field(default_factory=list, metadata=doc(
        "source 'indexed': Megatron indexed dataset prefixes (PREFIX.bin + PREFIX.idx), read as they are, "
        "concatenated in order; needs `tokenizer` (the one the ids came from)"))
    blend: list[SourceConfig] = field(default_factory=list, metadata=doc(
        "source 'blend': [{path, weight, kind}], each any source kind; samples are interleaved so that "
        "every source's share of any 1,000 consecutive samples follows its weight"))
    text_field: str = field(default="text", metadata=doc("column holding the text in jsonl/parquet/save_to_disk"))
    max_chars: Optional[int] = field(default=None, metadata=doc(
        "cap on the characters read from each text source (whole documents, in order; what a cap cuts is "
        "printed and recorded); null: 6,000,000 for the embedded corpus, no cap for other sources; 0: no cap",
        int_bits=63))
    tokenizer: Optional[str] = field(default=None, metadata=doc(
        "local Hugging Face tokenizer directory; null trains a byte-level BPE on a sample of the corpus"))
    vocab_size: int = field(default=8192, metadata=doc("vocabulary size of the trained BPE tokenizer"))
    tokenizer_train_chars: int = field(default=50_000_000, metadata=doc(
        "characters of the corpus the BPE is trained on (spread evenly over the preparation shards)",
        int_bits=63))
    seq_len: int = field(default=256, metadata=doc("tokens per training sample"))
    document_mask: bool = field(default=False, metadata=doc(
        "attend only within each document of a packed sample (documents end with the tokenizer's EOS), "
        "with position ids restarting at each document (the Llama 3 recipe), for the student and every "
        "teacher forward; off (the paper's setting): each sample is attended causally as one sequence. "
        "A teacher-logits store records it, and a resume must keep it"))
    val_samples: int = field(default=32, metadata=doc(
        "samples held out at the end for evaluation (split over a blend's sources by weight)"))
    loader_workers: int = field(default=2, metadata=doc(
        "offline mode: DataLoader worker processes reading the logits store ahead of the step"))
    prepare_workers: int = field(default=0, metadata=doc(
        "tokenizer processes preparing the data (0: the host's cores, shared by the ranks on it)"))
    shard_bytes: int = field(default=32 << 20, metadata=doc(
        "input bytes per preparation shard: the unit of parallel work and of resuming an interrupted "
        "preparation", int_bits=63))
    dir: Optional[str] = field(default=None, metadata=doc(
        "prepared-data directory (default: <output_dir>/data); reused when its inputs match"))

    def validate(self, prefix: str) -> None:
        check_choices(self, prefix)
        wants = {"files": "files", "indexed": "prefixes", "blend": "blend"}
        for src, key in wants.items():
            given = getattr(self, key)
            if self.source == src and not given:
                fail(f"{prefix}.{key}", given, f"must list at least one entry when data.source is '{src}'")
            if self.source != src and given:
                fail(f"{prefix}.{key}", given, f"is only read when data.source is '{src}'")
        for i, f in enumerate(self.files + self.prefixes):
            if not isinstance(f, str) or not f.strip():
                fail(f"{prefix}.{'files' if i < len(self.files) else 'prefixes'}", f, "entries must be paths")
        for i, s in enumerate(self.blend):
            s.validate(f"{prefix}.blend[{i}]")
        if self.source == "indexed" and not self.tokenizer:
            fail(f"{prefix}.tokenizer", self.tokenizer,
                 "must name the tokenizer the indexed data was made with (data.source 'indexed')")
        if not self.text_field.strip():
            fail(f"{prefix}.text_field", self.text_field, "must name a column")
        if self.source == "indexed" and self.max_chars:
            fail(f"{prefix}.max_chars", self.max_chars, "caps text sources; indexed data is read whole")
        if self.max_chars is not None and not 0 <= self.max_chars < 1 << 53:
            fail(f"{prefix}.max_chars", self.max_chars, "must be null or in [0, 2^53)")
        if not 256 < self.vocab_size <= MAX_VOCAB:
            fail(f"{prefix}.vocab_size", self.vocab_size, f"must be in (256, {MAX_VOCAB}]")
        if not 10_000 <= self.tokenizer_train_chars < 1 << 40:
            fail(f"{prefix}.tokenizer_train_chars", self.tokenizer_train_chars, "must be in [10000, 2^40)")
        if not 2 <= self.seq_len < MAX_COUNT:
            fail(f"{prefix}.seq_len", self.seq_len, "must be in [2, 2^31)")
        if not 1 <= self.val_samples < MAX_COUNT:
            fail(f"{prefix}.val_samples", self.val_samples, "must be in [1, 2^31)")
        if not 0 <= self.loader_workers <= 256:
            fail(f"{prefix}.loader_workers", self.loader_workers, "must be in [0, 256]")
        if not 0 <= self.prepare_workers <= 1024:
            fail(f"{prefix}.prepare_workers", self.prepare_workers, "must be in [0, 1024]")
        if not 4096 <= self.shard_bytes < 1 << 40:
            fail(f"{prefix}.shard_bytes", self.shard_bytes, "must be in [4096, 2^40)")
