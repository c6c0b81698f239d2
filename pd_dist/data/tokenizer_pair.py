"""A teacher tokenizer and a student tokenizer as a pair, for distillation across tokenizers: each
checked for what byte-space alignment needs, the teacher-to-student vocabulary projection built once per
pair and cached, and the fraction of student positions that align measured on sample text. The
alignment and projection themselves are pd_dist.core.crosstok's."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pd_dist.core.crosstok import align_positions, byte_ends, byte_level_token_bytes, vocab_projection

PAIR_DIR = "tokenizer_pairs"  # under the cache root (the prepared data's directory)
ROUND_TRIP_SAMPLE = "Distillation, déjà vu: 3 tokens\tand\n  spaces — ✓ 数据\n"


class TokenizerPairError(ValueError):
    """A tokenizer that cannot be aligned in byte space, in one line naming it and why."""


def checked_token_bytes(tokenizer, label: str, sample: str = ROUND_TRIP_SAMPLE) -> list[Optional[bytes]]:
    """The byte string of each of ``tokenizer``'s ids (None for its special tokens), after checking that
    it is byte-level and that its tokens of ``sample`` rebuild the sample's UTF-8 bytes exactly (what
    alignment relies on). TokenizerPairError, naming ``label``, otherwise."""
    try:
        table = byte_level_token_bytes(tokenizer.get_vocab(), tokenizer.all_special_tokens)
    except ValueError as e:
        raise TokenizerPairError(f"{label} tokenizer: {e}") from None
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    got = b"".join(table[i] or b"" for i in ids)
    want = sample.encode()
    if got != want:
        at = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
        raise TokenizerPairError(f"{label} tokenizer: its tokens do not rebuild the text they encode (first "
                                 f"difference at byte {at} of a {len(want)}-byte sample): byte-space alignment "
                                 "needs a lossless byte-level tokenizer")
    return table


@dataclass
class Projection:
    """The teacher-to-student vocabulary projection of one tokenizer pair (core.crosstok.vocab_projection):
    ``target`` [V_teacher] student id or -1, ``exact`` [V_teacher]; the pair's hashes and its cache file."""
    target: np.ndarray
    exact: np.ndarray
    teacher_hash: str
    student_hash: str
    path: Path

    def summary(self) -> dict:
        mapped = self.target >= 0
        return {"teacher_tokenizer": self.teacher_hash, "student_tokenizer": self.student_hash,
                "teacher_vocab": int(len(self.target)), "mapped": int(mapped.sum()),
                "exact": int(self.exact.sum()), "exact_frac": float(self.exact.mean()) if len(self.exact) else 0.0}


def pair_projection(teacher_dir, student_dir, cache_root, log=lambda *_: None) -> Projection:
    """The projection of the tokenizers saved in ``teacher_dir`` and ``student_dir``, built once and kept
    in ``<cache_root>/tokenizer_pairs/<teacher hash>-<student hash>.npz`` (written whole, then renamed,
    with a JSON summary beside it); later calls load it. Both tokenizers are checked first
    (checked_token_bytes)."""
    from pd_dist.data.prepare import load_tokenizer
    from pd_dist.models import tokenizer_hash

    th, sh = tokenizer_hash(teacher_dir), tokenizer_hash(student_dir)
    path = Path(cache_root) / PAIR_DIR / f"{th}-{sh}.npz"
    if path.is_file():
        with np.load(path) as z:
            return Projection(z["target"], z["exact"], th, sh, path)
    teacher = checked_token_bytes(load_tokenizer(teacher_dir), "the teacher's")
    student = checked_token_bytes(load_tokenizer(student_dir), "the student's")
    target, exact = vocab_projection(teacher, student)
    proj = Projection(target, exact, th, sh, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, target=target, exact=exact)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(proj.summary(), indent=1, sort_keys=True) + "\n")
    s = proj.summary()
    log(f"[tokenizers] projection {th} -> {sh}: {s['mapped']:,} of {s['teacher_vocab']:,} teacher tokens mapped, "
        f"{s['exact_frac']:.1%} exact ({path})")
    return proj


def aligned_fraction(texts: Sequence[str], teacher, student, teacher_bytes: Sequence[Optional[bytes]],
                     student_bytes: Sequence[Optional[bytes]]) -> float:
    """The fraction of the student's positions over ``texts`` (each tokenized alone, without special
    tokens) whose prefix ends where a teacher prefix ends: the positions that can take the teacher's
    signal. 0.0 for no tokens."""
    aligned = total = 0
    for text in texts:
        s = student(text, add_special_tokens=False)["input_ids"]
        t = teacher(text, add_special_tokens=False)["input_ids"]
        if not s:
            continue
        got = align_positions(byte_ends([student_bytes[i] for i in s]), byte_ends([teacher_bytes[i] for i in t]))
        aligned += int((got >= 0).sum())
        total += len(s)
    return aligned / total if total else 0.0
