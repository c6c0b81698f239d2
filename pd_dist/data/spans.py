"""Where a token sits in its document, and what a teacher in `document` context reads to predict from it.

In `distill.teacher_context: document` a token's teacher signal depends only on its source, its
document and its offset in that document: the teacher reads each document from its start in consecutive
chunks of ``teacher_seq_len`` tokens, each chunk a sequence of its own (positions from 0), never across a
document boundary. The signal at a stream position p (the distribution over the token after p) is the
teacher's output at p's place in p's chunk, having read the chunk from its start up to p.

So the teacher's work for any span [a, b) of a source's token stream is a list of *pieces*: for every
chunk the span touches, the chunk's start up to min(chunk end, b). Pieces are pure functions of the
document boundaries, so every mode (generation, colocated, online) computes the same signal for a
token, whatever window, packing or order the student trains on.
"""
from __future__ import annotations

import numpy as np

from pd_dist.data.indexed import read_index


class DocumentIndex:
    """The documents of one source's token stream: ``starts`` [n_docs + 1] (int64), each document's
    first stream position and, last, the stream's length. Read from the shards' ``.idx`` files (the
    Megatron document index), so indexed data keeps its own document boundaries."""

    def __init__(self, prefixes: list[str], shard_tokens: list[int]):
        parts, base = [np.zeros(1, np.int64)], 0
        for p, n in zip(prefixes, shard_tokens):
            offs = read_index(p).doc_token_offsets()
            if int(offs[-1]) != int(n):
                raise ValueError(f"{p}.idx describes {int(offs[-1])} tokens, the data's meta.json says {n}")
            parts.append(offs[1:] + base)
            base += int(n)
        self.starts = np.concatenate(parts)
        self.n_tokens = base

    @classmethod
    def from_starts(cls, starts) -> "DocumentIndex":
        """An index of known document starts (tests, tools): ``starts`` begins at 0 and ends at the
        stream's length, strictly increasing."""
        s = np.asarray(starts, np.int64)
        if len(s) < 2 or s[0] != 0 or np.any(np.diff(s) <= 0):
            raise ValueError(f"document starts must begin at 0 and increase strictly, got {s[:8].tolist()}")
        self = cls.__new__(cls)
        self.starts, self.n_tokens = s, int(s[-1])
        return self

    @property
    def n_docs(self) -> int:
        return len(self.starts) - 1

    def document_of(self, positions) -> np.ndarray:
        """The document holding each stream position."""
        return np.searchsorted(self.starts, np.asarray(positions, np.int64), side="right") - 1

    def pieces(self, a: int, b: int, chunk: int) -> np.ndarray:
        """The teacher's reads for the stream span [a, b): int64 [n, 2] rows (start, stop), in stream
        order, one per chunk the span touches: the chunk's start up to min(chunk end, b). Every piece
        holds at most ``chunk`` tokens, and the last ``min(stop, b) - max(start, a)`` of them are the
        span's positions it covers."""
        if not 0 <= a < b <= self.n_tokens:
            raise ValueError(f"span [{a}, {b}) outside the stream's {self.n_tokens} tokens")
        if chunk < 1:
            raise ValueError(f"teacher_seq_len must be >= 1, got {chunk}")
        first, last = self.document_of([a, b - 1])
        out = []
        for d in range(int(first), int(last) + 1):
            ds, de = int(self.starts[d]), int(self.starts[d + 1])
            lo, hi = max(a, ds), min(b, de)
            c = ds + (lo - ds) // chunk * chunk  # the chunk holding the span's first position here
            while c < hi:
                out.append((c, min(c + chunk, de, b)))
                c += chunk
        return np.asarray(out, np.int64).reshape(-1, 2)


def pack_pieces(lengths, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack pieces of the given lengths (each <= ``width``) into rows of ``width`` tokens, in order,
    each piece going into the first row with room (first fit). Returns (row, column) of each piece's
    first token; rows = row.max() + 1."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > width):
        raise ValueError(f"piece lengths must be in [1, {width}], got {lengths.min()}..{lengths.max()}")
    row, col = np.empty(len(lengths), np.int64), np.empty(len(lengths), np.int64)
    free: list[int] = []
    for i, n in enumerate(lengths.tolist()):
        for r, f in enumerate(free):
            if f >= n:
                break
        else:
            r = len(free)
            free.append(width)
        row[i], col[i] = r, width - free[r]
        free[r] -= n
    return row, col
