"""A teacher tokenizer and a student tokenizer as a pair, for distillation across tokenizers: each
checked for what byte-space alignment needs, the teacher-to-student vocabulary projection built once per
pair and cached, the fraction of student positions that align measured on sample text, and
:class:`StreamAlignment`, which finds for any student window of the prepared data the teacher positions
it aligns with in the same data prepared with the teacher's tokenizer. The alignment and projection
themselves are pd_dist.core.crosstok's."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pd_dist.core.crosstok import align_positions, byte_ends, byte_level_token_bytes, vocab_projection

PAIR_DIR = "tokenizer_pairs"  # under the cache root (the prepared data's directory)
PAIR_VERSION = 2  # in the cache file's name: 2 maps the teacher's EOS to the student's
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


def checked_pair(teacher_dir, student_dir) -> tuple:
    """(teacher tokenizer, student tokenizer, teacher token bytes, student token bytes) of the tokenizers
    saved in the two directories, each checked (checked_token_bytes)."""
    from pd_dist.data.prepare import load_tokenizer

    t_tok, s_tok = load_tokenizer(teacher_dir), load_tokenizer(student_dir)
    return t_tok, s_tok, checked_token_bytes(t_tok, "the teacher's"), checked_token_bytes(s_tok, "the student's")


def pair_projection(teacher_dir, student_dir, cache_root, log=lambda *_: None, checked=None) -> Projection:
    """The projection of the tokenizers saved in ``teacher_dir`` and ``student_dir``, built once and kept
    in ``<cache_root>/tokenizer_pairs/<teacher hash>-<student hash>.npz`` (written whole, then renamed,
    with a JSON summary beside it); later calls load it. Both tokenizers are checked first
    (checked_pair; ``checked``: its result, when the caller has it already)."""
    from pd_dist.models import tokenizer_hash

    th, sh = tokenizer_hash(teacher_dir), tokenizer_hash(student_dir)
    path = Path(cache_root) / PAIR_DIR / f"{th}-{sh}-v{PAIR_VERSION}.npz"
    if path.is_file():
        with np.load(path) as z:
            return Projection(z["target"], z["exact"], th, sh, path)
    t_tok, s_tok, teacher, student = checked or checked_pair(teacher_dir, student_dir)
    target, exact = vocab_projection(teacher, student)
    if t_tok.eos_token_id is not None and s_tok.eos_token_id is not None:  # end of document is one event
        target[t_tok.eos_token_id], exact[t_tok.eos_token_id] = s_tok.eos_token_id, True
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


def byte_lengths(table: Sequence[Optional[bytes]], vocab_size: int) -> np.ndarray:
    """int64 [vocab_size]: each id's byte length, 1 for a special token (EOS ends every prepared
    document: one virtual byte, the same event in both tokenizations) and for ids past the table."""
    out = np.ones(max(vocab_size, len(table)), np.int64)
    for i, b in enumerate(table):
        if b:
            out[i] = len(b)
    return out


class StreamAlignment:
    """The run's data prepared twice, with the student's tokenizer (``student``) and the teacher's
    (``teacher``): the same sources, documents and order, so document d of a source is the same text in
    both. For a student window it gives the teacher stream positions each student position aligns with
    (equal byte prefixes of the document; pd_dist.core.crosstok), so a teacher in document context, or
    a document store written from ``teacher``, can answer for it. ``student_len``/``teacher_len``: byte
    lengths per id (byte_lengths). A document whose bytes differ between the two is an error naming it."""

    def __init__(self, student, teacher, student_len: np.ndarray, teacher_len: np.ndarray):
        if len(student.sources) != len(teacher.sources):
            raise TokenizerPairError(f"the student's data has {len(student.sources)} source(s), the teacher's "
                                     f"{len(teacher.sources)}: prepare both from one data section")
        self.student, self.teacher = student, teacher
        self.student_len, self.teacher_len = student_len, teacher_len
        self._checked: set[int] = set()

    def _indexes(self, source: int):
        si, ti = self.student.document_index(source), self.teacher.document_index(source)
        if source not in self._checked:
            if si.n_docs != ti.n_docs:
                raise TokenizerPairError(
                    f"source {self.student.sources[source]['label']}: {si.n_docs:,} documents in the student's "
                    f"data, {ti.n_docs:,} in the teacher's: not the same text")
            self._checked.add(source)
        return si, ti

    def span(self, source: int, start: int, length: int) -> tuple[int, int, np.ndarray]:
        """For the student stream positions [start, start + length) of ``source``: (t0, n, aligned),
        where the teacher positions they align with lie in the teacher stream's [t0, t0 + n) and
        ``aligned`` [length] gives each student position's teacher position minus t0, or -1 (no teacher
        prefix ends where it does). n is 0 when nothing aligns."""
        si, ti = self._indexes(source)
        s_stream, t_stream = self.student.streams[source], self.teacher.streams[source]
        aligned = np.full(length, -1, np.int64)
        b = start + length
        first, last = si.document_of([start, b - 1])
        for d in range(int(first), int(last) + 1):
            ds, de = int(si.starts[d]), int(si.starts[d + 1])
            lo, hi = max(start, ds), min(b, de)
            s_end = np.cumsum(self.student_len[s_stream.read(ds, hi - ds)])
            tds, tde = int(ti.starts[d]), int(ti.starts[d + 1])
            want = int(s_end[-1])  # teacher tokens are read until their bytes reach the student's
            n = min(tde - tds, (hi - ds) + 16)
            while True:
                t_end = np.cumsum(self.teacher_len[t_stream.read(tds, n)])
                if t_end[-1] >= want or n == tde - tds:
                    break
                n = min(tde - tds, 2 * n)
            if hi == de and (n != tde - tds or int(t_end[-1]) != want):
                if n != tde - tds:  # the teacher's document is longer: read it whole for the message
                    t_end = np.cumsum(self.teacher_len[t_stream.read(tds, tde - tds)])
                raise TokenizerPairError(
                    f"source {self.student.sources[source]['label']}, document {d}: {want:,} bytes as the "
                    f"student's data holds it, {int(t_end[-1]):,} as the teacher's: the two were not prepared "
                    "from the same text, or a tokenizer does not round-trip it")
            got = align_positions(s_end[lo - ds:], t_end)
            aligned[lo - start:hi - start] = np.where(got >= 0, got + tds, -1)
        hit = aligned >= 0
        if not hit.any():
            return 0, 0, aligned
        t0 = int(aligned[hit].min())
        return t0, int(aligned[hit].max()) - t0 + 1, np.where(hit, aligned - t0, -1)


def sample_texts(data_cfg, chars: int = 200_000) -> list[str]:
    """The first documents of each text source of ``data_cfg`` (DataConfig), about ``chars`` characters
    in all, read without preparing anything: what the dry run measures a pair on."""
    from pd_dist.data.documents import unit_sample
    from pd_dist.data.prepare import resolve_sources, source_units

    sources = [s for s in resolve_sources(data_cfg) if s.kind != "indexed"]
    out: list[str] = []
    for s in sources:
        budget = chars // max(len(sources), 1)
        for u in source_units(data_cfg, s):
            got = list(unit_sample(u, budget))
            out += got
            budget -= sum(len(t) for t in got)
            if budget <= 0:
                break
    return out


def describe_pair(cfg, chars: int = 200_000) -> str:
    """The dry run's lines for distill.cross_tokenizer: both tokenizers, the share of the teacher's
    vocabulary the student's holds exactly, and the aligned fraction measured on a sample of the data's
    text against distill.min_aligned_frac. The student's tokenizer is data.tokenizer, or the one already
    prepared in the data directory; a tokenizer still to be trained is said so."""
    from pd_dist.models import tokenizer_hash

    d = cfg.distill
    t_dir = Path(cfg.teacher.path)
    s_dir = Path(cfg.data.tokenizer) if cfg.data.tokenizer else \
        (Path(cfg.data.dir) if cfg.data.dir else Path(cfg.output_dir) / "data") / "tokenizer"
    head = f"tokenizers ({d.cross_tokenizer}): teacher {t_dir}"
    if not (s_dir / "tokenizer.json").is_file():
        return (head + f" -> student: trained when the data is prepared (data.tokenizer null), so the aligned "
                f"fraction is measured at start (distill.min_aligned_frac {d.min_aligned_frac:g})")
    t_tok, s_tok, t_tab, s_tab = checked_pair(t_dir, s_dir)
    target, exact = vocab_projection(t_tab, s_tab)
    texts = sample_texts(cfg.data, chars)
    frac = aligned_fraction(texts, t_tok, s_tok, t_tab, s_tab)
    verdict = "ok" if frac >= d.min_aligned_frac else "BELOW: the run will refuse to start"
    return (f"{head} ({tokenizer_hash(t_dir)}, vocab {len(t_tab):,}) -> student {s_dir} ({tokenizer_hash(s_dir)}, "
            f"vocab {len(s_tab):,})\n  {exact.mean():.1%} of the teacher's tokens are student tokens exactly, "
            f"{(target >= 0).mean():.1%} map somewhere; {frac:.1%} of the student's positions align on "
            f"{len(texts):,} documents ({sum(len(t) for t in texts):,} characters) of the data: "
            f"distill.min_aligned_frac {d.min_aligned_frac:g}: {verdict}")
