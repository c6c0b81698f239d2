"""Teacher inference: a frozen causal LM, run forward and formed into its signal chunk by chunk.

Everything that needs teacher logits goes through here: the colocated source, a teacher rank's server,
the offline generation job, and the dump of a model's own logits. The full [tokens, vocab] logits of a
micro-batch never exist at once: the LM head runs `chunk_size` tokens at a time and each chunk is
formed into the signal (e.g. truncated) before the next one is. No optimizer and no engine live here.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pd_dist.core.logits import SignalSpec, SparseLogits, sample_keys
from pd_dist.models import body_hidden, final_norm_and_head


def freeze(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model on `device` in `dtype`, in eval mode, with no parameter requiring grad."""
    return model.to(device, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def sparse_logits_from_hidden(hidden: torch.Tensor, head_weight: torch.Tensor, signal: SignalSpec,
                              chunk_size: int, keep_lse: bool = False,
                              keys: Optional[torch.Tensor] = None) -> SparseLogits:
    """``signal`` (SignalSpec.form) of ``hidden @ head_weight.T``, computed `chunk_size` tokens at a time.

    ``hidden`` is [..., H]; the result has the same leading shape. With ``keep_lse`` a top-p-k signal
    carries each token's full-vocabulary logsumexp, which an offline store keeps (it carries it anyway
    for top_p < 1). A drawn signal (``signal.drawn``: sampled, head_tail) keys its draws by ``keys``
    (the leading shape; pd_dist.core.logits.sample_keys)."""
    if not isinstance(signal, SignalSpec):
        raise ValueError(f"sparse_logits_from_hidden: signal must be a SignalSpec, got {signal!r}")
    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    if signal.drawn:
        if keys is None:
            raise ValueError(f"signal {signal.describe()} needs per-position keys (sample_keys)")
        keys = keys.reshape(-1)
    # Formed in the head's dtype (topk on bf16 is exact; the normalizer is fp32 inside truncate).
    parts = [signal.form(flat[s:s + chunk_size] @ head_weight.T,
                         None if keys is None else keys[s:s + chunk_size], keep_lse=keep_lse)
             for s in range(0, flat.shape[0], chunk_size)]
    return SparseLogits.cat(parts).reshape(*lead)


class FrozenTeacher:
    """A teacher ready to answer: frozen on its device, with the run's signal and chunking.

    ``teacher(input_ids)`` gives the sparse logits of a micro-batch [B, T] -> SparseLogits [B, T, k].
    ``gather``: for a model whose weights are partitioned over ranks (ZeRO-3), a context manager factory
    that makes the given parameters whole for its duration (deepspeed.zero.GatheredParameters); the
    LM head is applied outside its module's forward, so its weight is gathered explicitly. Such a model
    is already placed by its engine and is not moved here.
    ``signal``: what it answers (a SignalSpec, e.g. top-p-k truncation); a drawn signal (sampled,
    head_tail) keys its draws by (seed, sample id, position), so it is called as
    ``teacher(input_ids, sample_ids)``. ``keep_lse``: top-p-k answers carry the full-vocabulary
    logsumexp (what a store keeps).
    ``document_eos``: data.document_mask's EOS id (each document of a window attended to on its own)."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, signal: SignalSpec,
                 chunk_size: int, keep_lse: bool = False, gather=None, *, document_eos: Optional[int] = None):
        if not isinstance(signal, SignalSpec):
            raise ValueError(f"FrozenTeacher: signal must be a SignalSpec, got {signal!r}")
        self.model = freeze(model, device, dtype) if gather is None else model.eval().requires_grad_(False)
        self.device, self.gather = device, gather or (lambda params: contextlib.nullcontext())
        self.signal, self.chunk_size, self.keep_lse = signal, chunk_size, keep_lse
        self.document_eos = document_eos

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, sample_ids=None) -> SparseLogits:
        body, head = final_norm_and_head(self.model)
        hidden = body_hidden(body, input_ids.to(self.device), self.document_eos)
        keys = None
        if self.signal.drawn:
            if sample_ids is None:  # a dummy forward (lockstep padding): its answer is dropped
                sample_ids = torch.zeros(input_ids.shape[0], dtype=torch.int64)
            keys = sample_keys(self.signal.seed, torch.as_tensor(sample_ids), input_ids.shape[1])
        with self.gather([head.weight]):
            return sparse_logits_from_hidden(hidden, head.weight, self.signal, self.chunk_size, self.keep_lse,
                                             keys)

    @torch.no_grad()
    def val_loss(self, batches) -> Optional[float]:
        """Mean next-token cross-entropy (nats) over held-out batches of int64 [B, T + 1] windows,
        chunked like the training loss; None for no tokens."""
        body, head = final_norm_and_head(self.model)
        total, count = 0.0, 0
        for window in batches:
            window = torch.as_tensor(window, device=self.device)
            hidden = body_hidden(body, window[:, :-1], self.document_eos).flatten(0, 1)
            targets = window[:, 1:].flatten()
            with self.gather([head.weight]):
                for s in range(0, hidden.shape[0], self.chunk_size):
                    z = (hidden[s:s + self.chunk_size] @ head.weight.T).float()
                    total += F.cross_entropy(z, targets[s:s + self.chunk_size], reduction="sum").item()
            count += targets.numel()
        return total / count if count else None


def held_out_batches(data, micro_batch: int):
    """The run's held-out samples (data.val_samples) in micro-batches of [B, T + 1] token windows."""
    val = data.val_ids()
    for s in range(0, len(val), micro_batch):
        yield torch.from_numpy(data.batch(val[s:s + micro_batch]))


def perplexity(loss: Optional[float]) -> Optional[float]:
    return None if loss is None else math.exp(min(loss, 50.0))
