"""A teacher in `distill.teacher_context: document`: each token's signal from its own document alone.

The definition is pd_dist.data.spans's: the teacher reads every document from its start in chunks of
``teacher_seq_len`` tokens, each chunk a sequence of its own. Asked for a span of a source's stream (a
training window, or a store record), it runs the pieces of the chunks the span touches (each from its
chunk's start: the prefix before the span is extra compute, counted in ``context_overhead``), packed
several to a row of ``teacher_seq_len`` tokens with a block-diagonal mask and positions restarting per
piece, and forms the signal only at the span's own positions. Generation, colocated and online runs all
answer through here, so they agree to float rounding whatever the student's windows.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from pd_dist.core.logits import SparseLogits
from pd_dist.data import PackedDataset
from pd_dist.data.spans import pack_pieces
from pd_dist.models import body_hidden_at, final_norm_and_head
from pd_dist.teacher.inference import FrozenTeacher, held_out_batches, sparse_logits_from_hidden


class DocumentTeacher:
    """``frozen`` (its model, signal, chunking, lse and gather) answering in document context over the
    token streams of ``data``. ``rows``: packed rows of ``teacher_seq_len`` tokens per forward (the
    memory bound, like a micro-batch). Called as ``teacher(input_ids, sample_ids)`` for training windows
    (the tokens are the data's own, so only the ids are read), or ``teacher.spans(source, starts,
    length)`` for arbitrary spans of one source's stream."""

    def __init__(self, frozen: FrozenTeacher, data: PackedDataset, teacher_seq_len: int, rows: int):
        if frozen.signal.drawn:
            raise ValueError(f"distill.teacher_context document serves top-p-k signals; {frozen.signal.describe()} "
                             "keys its draws by sample id")
        if teacher_seq_len < 1 or rows < 1:
            raise ValueError(f"teacher_seq_len and rows must be >= 1, got {teacher_seq_len}, {rows}")
        self.frozen, self.data, self.T, self.rows = frozen, data, int(teacher_seq_len), int(rows)
        self.signal, self.keep_lse = frozen.signal, frozen.keep_lse
        self.asked_tokens = self.read_tokens = 0

    @property
    def context_overhead(self) -> float:
        """Teacher tokens run per token asked for, so far (>= 1: the chunk prefixes before each span)."""
        return self.read_tokens / max(self.asked_tokens, 1)

    @torch.no_grad()
    def hidden(self, source: int, starts, length) -> torch.Tensor:
        """The teacher's final hidden states [B, length, H] at stream positions [start, start + length) of
        ``source`` for each start, each read in document context. ``length``: one for every span, or one
        per span (the result is then as long as the longest, zeros past each span's end)."""
        index, stream = self.data.document_index(source), self.data.streams[source]
        starts = [int(a) for a in starts]
        lengths = [int(n) for n in length] if np.ndim(length) else [int(length)] * len(starts)
        if len(lengths) != len(starts):
            raise ValueError(f"{len(lengths)} lengths for {len(starts)} spans")
        length = max(lengths, default=0)
        pieces, toks, want = [], [], []  # want: (span, offset in span, piece, offset in piece, count)
        for j, a in enumerate(starts):
            b = a + lengths[j]
            ps = index.pieces(a, b, self.T)
            base = int(ps[0, 0])
            window = stream.read(base, b - base)
            for s, e in ps.tolist():
                lo = max(s, a)
                want.append((j, lo - a, len(pieces), lo - s, e - lo))
                pieces.append(e - s)
                toks.append(window[s - base:e - base])
        row, col = pack_pieces(pieces, self.T)
        n_rows = int(row.max()) + 1
        ids = np.zeros((n_rows, self.T), np.int64)
        pos = np.zeros((n_rows, self.T), np.int64)  # padding: one-token sequences of their own
        for p, t in enumerate(toks):
            ids[row[p], col[p]:col[p] + len(t)] = t
            pos[row[p], col[p]:col[p] + len(t)] = np.arange(len(t))
        self.asked_tokens += sum(lengths)
        self.read_tokens += int(sum(pieces))
        body, _ = final_norm_and_head(self.frozen.model)
        dev = self.frozen.device
        ids_t, pos_t = torch.from_numpy(ids).to(dev), torch.from_numpy(pos).to(dev)
        hidden = torch.cat([body_hidden_at(body, ids_t[r:r + self.rows], pos_t[r:r + self.rows])
                            for r in range(0, n_rows, self.rows)])
        out = hidden.new_zeros(len(starts), length, hidden.shape[-1])
        for j, off, p, poff, n in want:
            c = int(col[p]) + poff
            out[j, off:off + n] = hidden[int(row[p]), c:c + n]
        return out

    @torch.no_grad()
    def spans(self, source: int, starts, length) -> SparseLogits:
        """The signal [B, length, k] at stream positions [start, start + length) of ``source`` (``length``
        per span as in :meth:`hidden`: rows past a span's end are not its signal)."""
        hidden = self.hidden(source, starts, length)
        _, head = final_norm_and_head(self.frozen.model)
        with self.frozen.gather([head.weight]):
            return sparse_logits_from_hidden(hidden, head.weight, self.signal, self.frozen.chunk_size,
                                             self.keep_lse)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, sample_ids=None) -> SparseLogits:
        """The signal [B, seq_len, k] of training windows by their sample ids (``input_ids`` only gives
        the shape). Without ids (a lockstep padding forward, whose answer is dropped) the windows are run
        as they are."""
        if sample_ids is None:
            return self.frozen(input_ids)
        L = int(input_ids.shape[1])
        parts = self.data.by_source(sample_ids, lambda s, starts: self.spans(s, starts, L))
        return SparseLogits.cat([p.reshape(1, *p.shape) for p in parts])

    @torch.no_grad()
    def val_loss(self, batches_ids, micro_batch: int) -> Optional[float]:
        """Mean next-token cross-entropy (nats) of the windows ``batches_ids`` (held-out sample ids), each
        token predicted in document context; None for no tokens."""
        _, head = final_norm_and_head(self.frozen.model)
        ids_all = np.asarray(batches_ids, np.int64)
        total, count = 0.0, 0
        for b in range(0, len(ids_all), micro_batch):
            ids = ids_all[b:b + micro_batch]
            hidden = torch.stack(self.data.by_source(
                ids, lambda s, starts: self.hidden(s, starts, self.data.seq_len)))
            targets = torch.from_numpy(self.data.batch(ids)[:, 1:]).to(hidden.device).flatten()
            flat = hidden.flatten(0, 1)
            with self.frozen.gather([head.weight]):
                for s in range(0, flat.shape[0], self.frozen.chunk_size):
                    z = (flat[s:s + self.frozen.chunk_size] @ head.weight.T).float()
                    total += F.cross_entropy(z, targets[s:s + self.frozen.chunk_size], reduction="sum").item()
            count += targets.numel()
        return total / count if count else None


def context_teacher(cfg, frozen: FrozenTeacher, data: PackedDataset, pair=None):
    """The teacher a run of ``cfg`` answers with: ``frozen`` itself in window context; in document context
    a DocumentTeacher reading documents in chunks of distill.teacher_seq_len (default: data.seq_len),
    train.micro_batch_size rows per forward. With ``pair`` (distill.cross_tokenizer, a
    teacher.crosstok.CrossTokenizer) the DocumentTeacher reads the data as the teacher tokenizes it, and
    answers for the student's windows in the student's vocabulary."""
    d = cfg.distill
    if d.teacher_context != "document":
        return frozen
    rows = cfg.teacher.micro_batch_size or cfg.train.micro_batch_size
    if pair is not None:
        from pd_dist.teacher.crosstok import CrossTokenizerTeacher

        return CrossTokenizerTeacher(DocumentTeacher(frozen, pair.align.teacher, d.teacher_seq_len or data.seq_len,
                                                     rows), pair)
    return DocumentTeacher(frozen, data, d.teacher_seq_len or data.seq_len, rows)


def teacher_held_out_loss(teacher, data: PackedDataset, micro_batch: int) -> Optional[float]:
    """The teacher's loss on the data's held-out samples, read as the teacher reads them (its context)."""
    if isinstance(teacher, DocumentTeacher):
        return teacher.val_loss(data.val_ids(), micro_batch)
    return teacher.val_loss(held_out_batches(data, micro_batch))
