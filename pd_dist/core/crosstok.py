"""Teacher and student with different tokenizers: positions aligned in byte space, and the teacher's
vocabulary projected onto the student's.

Both tokenizers cut the same document's bytes into consecutive, non-empty tokens. Student position i
(after its token i) predicts the token that starts at byte ``student_ends[i]``; teacher position j at
``teacher_ends[j]``. Where ``student_ends[i] == teacher_ends[j]`` both predict what follows the same
prefix of bytes, so the teacher's next-token distribution at j, projected onto the student's vocabulary,
is a target for the student at i (:func:`align_positions`). The other student positions end inside a
teacher token: the teacher has no distribution for them, and they train on the LM loss alone.

The projection (:func:`vocab_projection`) sends each teacher token to the longest student token that its
bytes begin with: the student token a student would most often emit first for that text. It is exact
where the two vocabularies share the token's string (the common case for BPEs trained on similar text)
and an approximation otherwise: the student's next token is then only the first piece of what the
teacher predicts, so the projected mass is right and its spread over the student's continuations is
not modelled. Teacher tokens with no byte string (special tokens other than EOS) map nowhere, and the
mass on them is reported by :func:`project_probs`, not dropped silently. Universal logit distillation
(Boizard et al., 2024) needs no map at all, comparing sorted probabilities instead (distill.loss uld,
pd_dist.core.losses); it is the alternative to measure this projection against.

Everything here is a pure function of numpy arrays, byte strings or tensors. :func:`project_signal`
is the torch form of :func:`project_probs` for a teacher signal: its result is an ordinary
SparseLogits over the student's vocabulary, so every KD loss applies to it unchanged.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch

from pd_dist.core.logits import SparseLogits, target_probs


def byte_ends(token_bytes: Sequence[bytes]) -> np.ndarray:
    """int64 [n]: the byte offset where each token of a tokenization ends (cumulative lengths). Every
    token must cover at least one byte (ValueError naming the first that does not)."""
    lens = np.fromiter((len(b) for b in token_bytes), np.int64, len(token_bytes))
    if len(lens) and lens.min() < 1:
        i = int(np.argmin(lens))
        raise ValueError(f"token {i} covers no bytes ({token_bytes[i]!r}): every token of an aligned "
                         "tokenization must cover at least one byte")
    return np.cumsum(lens)


def align_positions(student_ends: np.ndarray, teacher_ends: np.ndarray) -> np.ndarray:
    """int64 [len(student_ends)]: for each student position, the teacher position whose prefix ends at
    the same byte, or -1 where none does. Both arrays strictly increasing (byte_ends of the same text)."""
    s = np.asarray(student_ends, np.int64)
    t = np.asarray(teacher_ends, np.int64)
    for name, e in (("student_ends", s), ("teacher_ends", t)):
        if e.ndim != 1 or (len(e) > 1 and (np.diff(e) <= 0).any()):
            raise ValueError(f"{name} must be one strictly increasing row of byte offsets")
    if not len(t):
        return np.full(len(s), -1, np.int64)
    j = np.searchsorted(t, s)
    hit = (j < len(t)) & (t[np.minimum(j, len(t) - 1)] == s)
    return np.where(hit, j, -1).astype(np.int64)


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """The GPT-2 byte-level alphabet, character -> byte (the inverse of its bytes_to_unicode)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def byte_level_token_bytes(vocab: dict[str, int], special: Sequence[str] = ()) -> list[Optional[bytes]]:
    """Each token id's bytes for a byte-level BPE vocabulary (token string -> id, as
    ``tokenizer.get_vocab()`` gives), None for the ``special`` tokens. ValueError, naming the token, for
    a string outside the byte-level alphabet (not a byte-level BPE)."""
    dec = _byte_level_decoder()
    out: list[Optional[bytes]] = [None] * (max(vocab.values()) + 1 if vocab else 0)
    specials = set(special)
    for tok, i in vocab.items():
        if tok in specials:
            continue
        try:
            out[i] = bytes(dec[ch] for ch in tok)
        except KeyError:
            raise ValueError(f"token {i} ({tok!r}) is not in the byte-level alphabet: cross-tokenizer "
                             "alignment needs byte-level tokenizers") from None
    return out


def vocab_projection(teacher_bytes: Sequence[Optional[bytes]],
                     student_bytes: Sequence[Optional[bytes]]) -> tuple[np.ndarray, np.ndarray]:
    """(target, exact): int64 [V_teacher], the student token each teacher token maps to (the longest
    student token its bytes begin with; -1 for a teacher token with no bytes, or none of whose prefixes
    is a student token), and bool [V_teacher], whether that student token is the teacher token's whole
    string."""
    index: dict[bytes, int] = {}
    for i, b in enumerate(student_bytes):
        if b:
            index.setdefault(b, i)  # a duplicate string keeps its lowest id
    longest = max((len(b) for b in index), default=0)
    target = np.full(len(teacher_bytes), -1, np.int64)
    exact = np.zeros(len(teacher_bytes), bool)
    for t, b in enumerate(teacher_bytes):
        if not b:
            continue
        for n in range(min(len(b), longest), 0, -1):
            s = index.get(b[:n])
            if s is not None:
                target[t], exact[t] = s, n == len(b)
                break
    return target, exact


def project_probs(indices: np.ndarray, probs: np.ndarray, target: np.ndarray,
                  width: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sparse teacher distribution per row (``indices``/``probs`` [N, k], teacher ids and their
    probabilities; 0 for empty slots) projected through ``target`` (vocab_projection): returns
    (student ids [N, w], probabilities [N, w], unmapped mass [N]). Probabilities that map to the same
    student token are summed; each row's entries are sorted by probability, descending, and padded
    with id 0 and probability 0; ``w`` = ``width`` or the most distinct ids of any row. Mass is kept:
    each row's projected sum plus its unmapped mass equals its input sum (float64 arithmetic)."""
    idx = np.asarray(indices, np.int64)
    p = np.asarray(probs, np.float64)
    if idx.shape != p.shape or idx.ndim != 2:
        raise ValueError(f"indices and probs must be [N, k] of one shape, got {idx.shape} and {p.shape}")
    if len(idx) and (idx.min() < 0 or idx.max() >= len(target)):
        raise ValueError(f"teacher ids must lie in [0, {len(target)}), got {idx.min()}..{idx.max()}")
    mapped = np.asarray(target, np.int64)[idx]
    lost = np.where(mapped < 0, p, 0.0).sum(axis=1)
    rows = []
    for r in range(len(idx)):
        keep = (mapped[r] >= 0) & (p[r] > 0)
        ids, inv = np.unique(mapped[r][keep], return_inverse=True)
        mass = np.bincount(inv, weights=p[r][keep], minlength=len(ids))
        order = np.argsort(-mass, kind="stable")
        rows.append((ids[order], mass[order]))
    w = width if width is not None else max((len(i) for i, _ in rows), default=0)
    out_i = np.zeros((len(rows), w), np.int64)
    out_p = np.zeros((len(rows), w), np.float64)
    for r, (ids, mass) in enumerate(rows):
        if len(ids) > w:
            raise ValueError(f"row {r} maps to {len(ids)} student ids, more than width {w}")
        out_i[r, :len(ids)], out_p[r, :len(ids)] = ids, mass
    return out_i, out_p, lost


def project_signal(sig: SparseLogits, target: torch.Tensor, temperature: float) -> tuple[SparseLogits, torch.Tensor]:
    """The teacher signal ``sig`` ([..., k], teacher ids) as a signal over the student's vocabulary.

    Its kept entries' probabilities at ``temperature`` (target_probs) are sent to ``target[id]``
    (vocab_projection; -1: nowhere) and summed per student id. Returns (SparseLogits [..., k] with
    values log p' sorted descending, -inf and index 0 in empty slots, no lse; and the mapped mass
    [...], float32: sum of p', so 1 minus the mass on teacher tokens that map nowhere, 0 for a row with
    nothing kept). A KD loss at temperature 1 on the result targets p' renormalised over the student
    ids, the teacher's distribution given that its next token maps somewhere. At most k student ids
    per row (teacher ids only merge), so nothing is cut."""
    k = sig.k
    lead = sig.values.shape[:-1]
    p = target_probs(sig, temperature).to(torch.float64).reshape(-1, k)
    tgt = torch.as_tensor(target, dtype=torch.int64, device=sig.indices.device)[sig.indices.reshape(-1, k)]
    ok = (tgt >= 0) & (p > 0)
    # Within each row (k entries, never more than k student ids): sort by student id so equal ids sit
    # together, sum each run, then order the sums by mass, descending (ties: lower id first, as
    # project_probs). Everything stays [N, k]: no sort or unique over all rows at once.
    big = int(tgt.max()) + 1 if tgt.numel() else 1
    key, order = torch.where(ok, tgt, torch.full_like(tgt, big)).sort(dim=-1, stable=True)
    pk = torch.where(ok, p, torch.zeros_like(p)).gather(-1, order)
    new = torch.ones_like(key, dtype=torch.bool)
    new[:, 1:] = key[:, 1:] != key[:, :-1]
    group = new.long().cumsum(-1) - 1
    mass = torch.zeros_like(pk).scatter_add_(1, group, pk)
    ids = torch.zeros_like(key).scatter_(1, group, key)
    mass, by_mass = mass.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, by_mass)
    kept = mass > 0
    idx = torch.where(kept, ids, torch.zeros_like(ids))
    val = torch.where(kept, mass.clamp_min(1e-300).log(), torch.full_like(mass, float("-inf"))).to(torch.float32)
    return (SparseLogits(idx.reshape(*lead, k), val.reshape(*lead, k)),
            mass.sum(-1).to(torch.float32).reshape(lead))


def student_signal(teacher_sig: SparseLogits, aligned: torch.Tensor, target: torch.Tensor,
                   temperature: float, merge: bool = True) -> tuple[SparseLogits, torch.Tensor, torch.Tensor]:
    """The teacher's signal for one tokenized text ([T_teacher, k], teacher ids) as the student's, per
    student position: ``aligned`` [T_student] (align_positions: the teacher position whose prefix ends
    where the student's does, or -1). Returns (SparseLogits [T_student, k] over the student's vocabulary,
    empty where the position does not align, so a KD loss gives it 0; the aligned mask [T_student]; the
    mapped mass [T_student], 0 where not aligned), the projection as in project_signal.

    ``merge`` False (universal logit distillation, which reads sorted probabilities only): each row keeps
    the teacher's own probabilities at ``temperature``, entry by entry (log p, sorted as the teacher
    kept them), with each id replaced by its projection (0 where it maps nowhere), so the ids still name
    the teacher's top-1 in the student's vocabulary for the agreement figure."""
    a = torch.as_tensor(aligned, dtype=torch.int64, device=teacher_sig.indices.device)
    if a.dim() != 1:
        raise ValueError(f"aligned must be one row of teacher positions, got shape {tuple(a.shape)}")
    if len(a) and int(a.max()) >= teacher_sig.values.shape[0]:
        raise ValueError(f"aligned names teacher position {int(a.max())}, the signal has "
                         f"{teacher_sig.values.shape[0]}")
    mask = a >= 0
    rows = SparseLogits(teacher_sig.indices[a.clamp_min(0)], teacher_sig.values[a.clamp_min(0)])
    if merge:
        out, mapped = project_signal(rows, target, temperature)
    else:
        p = target_probs(rows, temperature)
        tgt = torch.as_tensor(target, dtype=torch.int64, device=rows.indices.device)[rows.indices]
        mapped = torch.where(tgt >= 0, p, torch.zeros_like(p)).sum(-1).to(torch.float32)
        out = SparseLogits(tgt.clamp_min(0), torch.where(p > 0, p.log(), torch.full_like(p, float("-inf")))
                           .to(torch.float32))
    values = torch.where(mask.unsqueeze(-1), out.values, torch.full_like(out.values, float("-inf")))
    indices = torch.where(mask.unsqueeze(-1), out.indices, torch.zeros_like(out.indices))
    return SparseLogits(indices, values), mask, torch.where(mask, mapped, torch.zeros_like(mapped))
