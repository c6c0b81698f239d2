"""A teacher with another tokenizer than the student's (distill.cross_tokenizer map or uld): its signal,
in its own vocabulary and at its own positions, turned into the student's.

The run's data is prepared twice, with each tokenizer (run.teacher_view_data): the same documents in the
same order. :class:`CrossTokenizer` holds the pair (pd_dist.data.tokenizer_pair: the byte lengths of
both vocabularies, the cached teacher-to-student projection) and, for a student window, asks a teacher
for the span of its own stream that the window's aligned positions fall in, then forms the student's
signal ([B, seq_len, k] over the student's vocabulary; empty rows where nothing aligns, which train on
the LM loss alone). Whoever computes the teacher's signal is interchangeable:

- :class:`CrossTokenizerTeacher`, a DocumentTeacher over the teacher's data (colocated, and a teacher
  rank serving online students: the wire then carries the student's signal, as with one tokenizer);
- :class:`CrossTokenizerStore`, the library of document stores written from the teacher's data
  (offline: it maps in the DataLoader workers, off the step's path).

All three agree to float rounding, since a document-context signal depends only on the document and the
position in it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from pd_dist.core.crosstok import student_signal
from pd_dist.core.logits import SparseLogits
from pd_dist.data import PackedDataset
from pd_dist.data.tokenizer_pair import (StreamAlignment, TokenizerPairError, byte_lengths, checked_pair,
                                         pair_projection)

# fetch(source, starts, lengths) -> the teacher's signal [n_i, k] of each teacher stream span
Fetch = Callable[[int, list, list], list]
SAMPLE_WINDOWS = 64  # windows the aligned fraction is measured on at start


@dataclass
class CrossTokenizer:
    """The pair as a run uses it: ``align`` (student windows to teacher stream positions), ``target``
    (teacher id -> student id, -1: nowhere), ``merge`` (map: True, projected probabilities summed per
    student id; uld: False, the teacher's own probabilities kept entry by entry), ``temperature`` (tau,
    applied when forming the student's log probabilities), ``width`` (k of the signal), ``summary``
    (the pair's figures for the console and summary.json)."""
    align: StreamAlignment
    target: np.ndarray
    merge: bool
    temperature: float
    width: int
    summary: dict

    @classmethod
    def build(cls, cfg, student: PackedDataset, teacher: PackedDataset, log=lambda *_: None) -> "CrossTokenizer":
        """The pair of ``student`` (the run's data) and ``teacher`` (the same data prepared with the
        teacher's tokenizer), checked: both tokenizers byte-level and lossless, one EOS convention, and at
        least distill.min_aligned_frac of the student's positions aligned on a sample of windows
        (TokenizerPairError in one line otherwise)."""
        d = cfg.distill
        checked = checked_pair(teacher.tokenizer_dir, student.tokenizer_dir)
        t_tok, s_tok, t_tab, s_tab = checked
        if (t_tok.eos_token_id is None) != (s_tok.eos_token_id is None):
            who = "teacher's" if t_tok.eos_token_id is None else "student's"
            raise TokenizerPairError(f"the {who} tokenizer has no EOS token and the other has: their prepared "
                                     "documents end differently, so they cannot be aligned")
        t_len, s_len = byte_lengths(t_tab, teacher.vocab_size), byte_lengths(s_tab, student.vocab_size)
        proj = pair_projection(teacher.tokenizer_dir, student.tokenizer_dir, student.path, log, checked)
        spec = d.signal_spec(0)
        pair = cls(StreamAlignment(student, teacher, s_len, t_len), proj.target, d.cross_tokenizer == "map",
                   float(d.temperature), spec.width(teacher.vocab_size), {})
        frac = pair.sample_aligned_fraction()
        s = proj.summary()
        pair.summary = dict(s, how=d.cross_tokenizer, student_vocab=int(student.vocab_size),
                            sample_aligned_frac=frac, sample_windows=min(SAMPLE_WINDOWS, len(pair)))
        log(f"[tokenizers] teacher {s['teacher_tokenizer']} (vocab {s['teacher_vocab']:,}) -> student "
            f"{s['student_tokenizer']} (vocab {student.vocab_size:,}), {d.cross_tokenizer}: {frac:.1%} of student "
            f"positions aligned on {pair.summary['sample_windows']} windows; {s['mapped']:,} teacher tokens "
            f"mapped, {s['exact_frac']:.1%} exactly")
        if frac < d.min_aligned_frac:
            raise TokenizerPairError(f"only {frac:.1%} of the student's positions align with a teacher position "
                                     f"(distill.min_aligned_frac {d.min_aligned_frac:g}): the tokenizers cut this "
                                     "text too differently to distil across them")
        return pair

    def __len__(self) -> int:
        return self.align.student.n_train + self.align.student.n_val

    def sample_aligned_fraction(self, windows: int = SAMPLE_WINDOWS) -> float:
        """The fraction of student positions with an aligned teacher position over ``windows`` windows
        spread evenly over the data."""
        data = self.align.student
        ids = np.unique(np.linspace(0, len(self) - 1, min(windows, len(self))).astype(np.int64))
        hit = total = 0
        for i in ids:
            s, a = data.window(int(i))
            _, _, aligned = self.align.span(s, a, data.seq_len)
            hit += int((aligned >= 0).sum())
            total += len(aligned)
        return hit / max(total, 1)

    def signals(self, ids, fetch: Fetch) -> SparseLogits:
        """The student's signal [B, seq_len, k] of the student samples ``ids``, the teacher's asked of
        ``fetch`` (one call per source, for the teacher spans of that source's samples)."""
        data = self.align.student
        L = data.seq_len
        spans = [None] * len(ids)
        for j, i in enumerate(np.asarray(ids).reshape(-1)):
            s, a = data.window(int(i))
            spans[j] = (s,) + self.align.span(s, a, L)
        got: list = [None] * len(spans)
        for s in sorted({sp[0] for sp in spans}):
            js = [j for j, sp in enumerate(spans) if sp[0] == s and sp[2] > 0]
            if js:
                for j, sig in zip(js, fetch(s, [spans[j][1] for j in js], [spans[j][2] for j in js])):
                    got[j] = sig
        rows = []
        for j, (_, _, n, aligned) in enumerate(spans):
            if got[j] is None:  # nothing of this window aligns: LM only
                rows.append(SparseLogits(torch.zeros(L, self.width, dtype=torch.int64),
                                         torch.full((L, self.width), float("-inf"))))
                continue
            sig = got[j]
            out, _, _ = student_signal(SparseLogits(sig.indices[:n], sig.values[:n]), torch.from_numpy(aligned),
                                       torch.from_numpy(self.target), self.temperature, merge=self.merge)
            rows.append(out)
        return SparseLogits.cat([r.reshape(1, *r.shape) for r in rows])


class CrossTokenizerTeacher:
    """A DocumentTeacher over the teacher's data answering for the student's windows, called as a
    teacher is (``teacher(input_ids, sample_ids)``): colocated, and on a teacher rank for its online
    students."""

    def __init__(self, teacher, pair: CrossTokenizer):
        self.teacher, self.pair = teacher, pair
        self.T = teacher.T

    @property
    def context_overhead(self) -> float:
        return self.teacher.context_overhead

    def _fetch(self, source: int, starts: list, lengths: list) -> list:
        sig = self.teacher.spans(source, starts, lengths)
        return [SparseLogits(sig.indices[j], sig.values[j]) for j in range(len(starts))]

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, sample_ids=None) -> SparseLogits:
        if sample_ids is None:
            raise ValueError("a teacher with another tokenizer answers by sample id: it reads the text itself")
        return self.pair.signals(sample_ids, self._fetch).to(input_ids.device)

    def val_loss(self, *_) -> Optional[float]:
        """None: the teacher's loss per teacher token is not the student's per student token."""
        return None


class CrossTokenizerStore:
    """The student's windows read from a library of document stores written from the teacher's data
    (``windows``: signals.sources.DocumentStoreWindows over it), mapped for the student in whatever
    process reads it (the offline loader's workers)."""

    def __init__(self, windows, pair: CrossTokenizer):
        self.windows, self.pair = windows, pair
        self.root = windows.root

    def __len__(self) -> int:
        return len(self.pair)

    def describe(self) -> str:
        return self.windows.describe() + f"; teacher vocabulary mapped to the student's ({self.pair.summary['how']})"

    def _fetch(self, source: int, starts: list, lengths: list) -> list:
        store = self.windows.stores[source]
        return [store.get_spans([a], n)[0] for a, n in zip(starts, lengths)]

    def get_batch(self, ids) -> SparseLogits:
        return self.pair.signals(ids, self._fetch)


def alignment_figures(sig: Optional[SparseLogits], merge: bool) -> Optional[tuple[float, float, float]]:
    """(positions, aligned positions, mapped mass summed over aligned positions) of a student signal
    formed here: a row is aligned when it keeps an entry; under map its probabilities sum to the mass
    that mapped (log p' values). None for no signal; the mass is NaN under uld (no map)."""
    if sig is None:
        return None
    hit = sig.mask.any(-1)
    mass = float(torch.where(hit, sig.values.float().exp().sum(-1), 0.0).sum()) if merge else float("nan")
    return float(hit.numel()), float(hit.sum()), mass
