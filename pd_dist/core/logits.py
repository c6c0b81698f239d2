"""Teacher-logit processing: top-p-k truncation into fixed-width sparse logits, and target probabilities.

The paper (Peng et al. 2024, "Pre-training Distillation for LLMs") stores teacher outputs as
F(z) = softmax(Truncate(z) / tau), where Truncate applies top-p first (on the full-vocabulary
softmax at temperature 1) and then top-k. Storing only the truncated logits makes offline
distillation feasible (k entries per token instead of the full vocabulary); the temperature is
applied later, at training time, by :func:`target_probs`.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, fields
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

_NEG_INF = float("-inf")
# Rows of the logsumexp are processed in blocks of about this many elements through one reusable
# fp32 buffer: a full-size temporary would cost a fresh allocation (page faults) per call, which on
# CPU takes longer than the exp itself. Blocks of >= 2 rows keep the per-row reduction order equal
# to torch.logsumexp's, so truncate and truncate_reference agree bit-for-bit (tested).
_LSE_BLOCK_ELEMS = 1 << 21


@dataclass
class SparseLogits:
    """Top-p-k truncated teacher logits, fixed width k. Entries sorted by value descending.

    Dropped entries (beyond the top-p prefix) have value -inf and index 0 (so gathers stay in range).
    ``values`` are the raw (un-tempered) teacher logits, bit-identical to the input logits (as fp32).
    ``lse``, when present, is each token's fp32 logsumexp over the *full* vocabulary (what a store keeps
    so a wider truncation can be narrowed exactly later); it is None where nobody computed it.
    """

    indices: torch.Tensor  # int64 [..., k]
    values: torch.Tensor  # float [..., k]; -inf where dropped
    lse: Optional[torch.Tensor] = None  # float32 [...] (the leading shape), or None

    def __post_init__(self):
        if self.indices.shape != self.values.shape:
            raise ValueError(
                f"SparseLogits: indices shape {tuple(self.indices.shape)} != values shape "
                f"{tuple(self.values.shape)}")
        if self.lse is not None and self.lse.shape != self.values.shape[:-1]:
            raise ValueError(f"SparseLogits: lse shape {tuple(self.lse.shape)} != leading shape "
                             f"{tuple(self.values.shape[:-1])}")
        if self.indices.dim() < 1:
            raise ValueError("SparseLogits: tensors need at least one dimension (k)")
        if self.indices.dtype != torch.int64:
            raise ValueError(f"SparseLogits: indices must be int64, got {self.indices.dtype}")
        if not self.values.is_floating_point():
            raise ValueError(f"SparseLogits: values must be floating point, got {self.values.dtype}")

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """Leading (token) shape, without k."""
        return self.values.shape[:-1]

    @property
    def mask(self) -> torch.Tensor:
        """True where the entry was kept by the truncation."""
        return self.values > _NEG_INF

    def counts(self) -> torch.Tensor:
        """Number of kept entries per token (int64, leading shape)."""
        return self.mask.sum(-1)

    def to(self, device=None, dtype=None) -> "SparseLogits":
        """Move to ``device``; ``dtype`` converts the values only (indices stay int64, lse fp32)."""
        return SparseLogits(self.indices.to(device=device), self.values.to(device=device, dtype=dtype),
                            None if self.lse is None else self.lse.to(device=device))

    def without_lse(self) -> "SparseLogits":
        return SparseLogits(self.indices, self.values)

    def reshape(self, *lead_shape) -> "SparseLogits":
        """Reshape the leading dims; k stays the last dim. Accepts ``reshape(a, b)`` or ``reshape((a, b))``."""
        if len(lead_shape) == 1 and isinstance(lead_shape[0], (tuple, list, torch.Size)):
            lead_shape = tuple(lead_shape[0])
        shape = (*lead_shape, self.k)
        return SparseLogits(self.indices.reshape(shape), self.values.reshape(shape),
                            None if self.lse is None else self.lse.reshape(lead_shape))

    def __getitem__(self, idx) -> "SparseLogits":
        """Index the leading dims (the same index is applied to indices, values and lse)."""
        out = SparseLogits(self.indices[idx], self.values[idx],
                           None if self.lse is None else self.lse[idx])
        if out.k != self.k:
            raise IndexError("SparseLogits indexing must not touch the last (k) dimension")
        return out

    @staticmethod
    def cat(parts: list["SparseLogits"]) -> "SparseLogits":
        """Concatenate along dim 0. All parts must have the same k; lse is kept only if every part has it."""
        if not parts:
            raise ValueError("SparseLogits.cat needs at least one part")
        lse = None
        if all(p.lse is not None for p in parts):
            lse = torch.cat([p.lse for p in parts], 0)
        return SparseLogits(torch.cat([p.indices for p in parts], 0),
                            torch.cat([p.values for p in parts], 0), lse)


def _check_truncate_args(logits: torch.Tensor, top_p: float, top_k: int) -> None:
    if not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dim, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def _check_temperature(temperature: float) -> None:
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _logsumexp_rows(x: torch.Tensor) -> torch.Tensor:
    """fp32 logsumexp over the last dim of a 2-D tensor (any float dtype), without a full-size temporary."""
    m = x.amax(-1).float()
    # All -inf rows: shift by 0 so exp gives 0 and the result is -inf (like torch.logsumexp), not NaN.
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    if x.device.type != "cpu":
        # One fused kernel on accelerators; the blocking below only pays off on CPU.
        return torch.logsumexp(x.float(), -1)
    rows, vocab = x.shape
    block = max(2, _LSE_BLOCK_ELEMS // vocab)
    buf = torch.empty((min(block, rows), vocab), dtype=torch.float32)
    s = torch.empty(rows, dtype=torch.float32)
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        b = buf[: r1 - r0]
        torch.sub(x[r0:r1], m[r0:r1, None], out=b)
        b.exp_()
        torch.sum(b, -1, out=s[r0:r1])
    return m + s.log()


def top_p_keep(sorted_vals: torch.Tensor, lse: torch.Tensor, top_p: float) -> torch.Tensor:
    """The top-p rule, the one copy every truncation uses: over descending-sorted logits, entry j is kept
    iff the probability mass strictly before it is < top_p (so the token that crosses the threshold is
    kept, as in HF's TopPLogitsWarper; the first finite token always is). Probabilities and the cumsum
    are in float64 so the decision only depends on fp32 rounding of the logits and the normalizer, not on
    accumulation error over the prefix. ``lse`` is the full-vocabulary logsumexp (leading shape)."""
    finite = sorted_vals > _NEG_INF
    if top_p >= 1.0:
        # Special case: a float cumsum may never reach exactly 1.0.
        return finite
    probs = torch.exp(sorted_vals.double() - lse.double().unsqueeze(-1))
    mass_before = F.pad(probs.cumsum(-1)[..., :-1], (1, 0))
    return (mass_before < top_p) & finite


def _pack(vals: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vals = torch.where(keep, vals, torch.full_like(vals, _NEG_INF))
    idx = torch.where(keep, idx, torch.zeros_like(idx))
    return vals, idx


def truncate(logits: torch.Tensor, top_p: float, top_k: int, keep_lse: bool = False) -> SparseLogits:
    """Top-p (on softmax at temperature 1) then top-k truncation of ``logits[..., V]``.

    Returns width ``min(top_k, V)`` (a width beyond V cannot be filled). Kept values are the input
    logits upcast to fp32 without arithmetic (bit-identical for fp32/bf16/fp16 input; float64 input is
    rounded to fp32); dropped slots are (-inf, index 0). The result carries the fp32 full-vocabulary
    logsumexp per token (``.lse``) whenever it was computed: always for top_p < 1 (top-p needs it),
    and for top_p = 1 only with ``keep_lse`` (an offline store keeps it).
    Only the log-normalizer and the k largest entries are needed (top-k is a prefix of the sorted
    order, so the top-p decision for those entries needs nothing else): no full-vocabulary sort.
    Among exactly tied logits at the cut, which index is kept is unspecified (values are not).
    -inf input entries are never kept; an all -inf row yields 0 kept entries.
    """
    _check_truncate_args(logits, top_p, top_k)
    vocab = logits.shape[-1]
    k = min(int(top_k), vocab)
    lead = logits.shape[:-1]
    x = logits.reshape(-1, vocab)
    # topk on the input dtype: bf16 -> fp32 is exact, so the kept values are the same either way, and
    # this avoids a full fp32 copy of the vocabulary.
    vals, idx = torch.topk(x, k, dim=-1, largest=True, sorted=True)
    vals = vals.float()
    lse = _logsumexp_rows(x) if top_p < 1.0 or keep_lse else None
    keep = top_p_keep(vals, lse, float(top_p))
    vals, idx = _pack(vals, idx, keep)
    return SparseLogits(idx.reshape(*lead, k), vals.reshape(*lead, k),
                        None if lse is None else lse.reshape(lead))


def truncate_reference(logits: torch.Tensor, top_p: float, top_k: int) -> SparseLogits:
    """Straightforward truncation via a full-vocabulary sort (slow; for tests and benchmarks).

    Sorts all V logits, computes the full sorted softmax and its cumulative sum, applies top-p, then
    keeps the first k of the top-p prefix. Ties are ordered by lower index first (stable sort).
    """
    _check_truncate_args(logits, top_p, top_k)
    vocab = logits.shape[-1]
    k = min(int(top_k), vocab)
    x = logits.float()
    sorted_vals, sorted_idx = torch.sort(x, dim=-1, descending=True, stable=True)
    keep = top_p_keep(sorted_vals, torch.logsumexp(x, dim=-1), float(top_p))
    vals, idx = _pack(sorted_vals[..., :k], sorted_idx[..., :k], keep[..., :k])
    return SparseLogits(idx.contiguous(), vals.contiguous())


def teacher_log_probs(values: torch.Tensor, mask: torch.Tensor, temperature: float,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """log softmax(kept / tau) over the kept entries; 0 (not -inf) at dropped entries so that products
    with zero probabilities stay finite. Rows with no kept entry give all zeros (no NaN)."""
    _check_temperature(temperature)
    v = values.to(dtype or torch.float32) / float(temperature)
    # Fill dropped slots with -inf, except in rows with nothing kept (log_softmax of all -inf is NaN).
    fill = torch.where(mask.any(-1, keepdim=True), _NEG_INF, 0.0).to(v.dtype)
    logp = torch.log_softmax(torch.where(mask, v, fill), dim=-1)
    return torch.where(mask, logp, torch.zeros_like(logp))


def target_probs(sparse: SparseLogits, temperature: float) -> torch.Tensor:
    """Teacher targets p_t = softmax(kept / tau) over the kept entries only (float32, 0 at dropped)."""
    mask = sparse.mask
    logp = teacher_log_probs(sparse.values, mask, temperature, torch.float32)
    return torch.where(mask, logp.exp(), torch.zeros_like(logp))


# ------------------------------------------------------------------------------------- sampled signal
def _u64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _u64(0x9E3779B97F4A7C15), _u64(0xBF58476D1CE4E5B9), _u64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (>> on int64 is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 on int64 tensors (wrapping arithmetic): a stateless, well-mixed 64-bit hash."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def sample_keys(seed: int, sample_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """int64 [n, seq_len]: one key per (seed, sample id, position), from which that position's draws
    are derived. The draws of a token depend on nothing else (not the batch, chunking or device), so
    a regenerated store, a colocated and an online run draw the same tokens."""
    ids = torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1, 1)
    pos = torch.arange(seq_len, dtype=torch.int64).reshape(1, -1)
    k = _splitmix64(torch.full_like(ids, int(seed)) ^ _splitmix64(ids))
    return _splitmix64(k ^ _splitmix64(pos + (1 << 32)))


def _draws(p: torch.Tensor, keys: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n draws per row from the (unnormalized, float64) weights ``p`` [rows, V] by inverse CDF in
    vocabulary order, draw j of a row using u = splitmix64(key + j) / 2^64 (53 bits); ``keys`` [rows].
    Returns (counts, ids), each [rows, n]: the distinct drawn ids of a row in the first slots (ascending),
    each with its number of draws; unused slots have count 0 and id 0."""
    vocab = p.shape[-1]
    cdf = p.cumsum(-1)
    k = keys.reshape(-1, 1).to(torch.int64).cpu()
    bits = _shr(_splitmix64(k + torch.arange(n, dtype=torch.int64).reshape(1, -1)), 11)  # 53 random bits
    u = (bits.double() * 2.0 ** -53).to(cdf.device) * cdf[:, -1:]
    draws = torch.searchsorted(cdf, u, right=True)  # [rows, n]
    # u can round up to the total: such a draw takes the row's last token of positive weight
    last = vocab - 1 - torch.argmax((p.flip(-1) > 0).to(torch.uint8), dim=-1, keepdim=True).to(draws.device)
    draws = torch.minimum(draws, last)
    d, _ = torch.sort(draws, dim=-1)
    first = torch.ones_like(d, dtype=torch.bool)
    first[:, 1:] = d[:, 1:] != d[:, :-1]
    group = first.long().cumsum(-1) - 1  # slot of each draw's distinct token
    counts = torch.zeros(d.shape, dtype=torch.float64, device=d.device).scatter_add_(
        1, group, torch.ones_like(d, dtype=torch.float64))
    return counts, torch.zeros_like(d).scatter_(1, group, d)


def _by_weight(log_w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries sorted by log weight descending (stable), ids of -inf slots set to 0; values as fp32."""
    vals, order = torch.sort(log_w, dim=-1, descending=True, stable=True)
    idx = torch.where(vals > _NEG_INF, idx.gather(-1, order), torch.zeros_like(idx))
    return vals.float().contiguous(), idx.contiguous()


def _check_draws(n_samples) -> int:
    if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    return int(n_samples)


def count_log_weights(n_samples: int) -> torch.Tensor:
    """fp32 log(c / n) for c = 0..n (c = 0 gives -inf): the values a sampled signal of n draws can hold,
    computed exactly as :func:`sample_signal` computes them (so a store can keep counts and give back the
    same bits)."""
    n = _check_draws(n_samples)
    return (torch.arange(n + 1, dtype=torch.float64) / n).log().float()


def sample_signal(logits: torch.Tensor, keys: torch.Tensor, n_samples: int, temperature: float) -> SparseLogits:
    """The sampled teacher signal (Anshumann et al. 2025, "Sparse Logit Sampling"): per position, draw
    ``n_samples`` tokens with replacement from p = softmax(logits / tau); keep the distinct tokens with
    weights w = count / n_samples, as SparseLogits of width ``n_samples`` whose values are log w (so
    target_probs(signal, 1.0) == w), sorted by weight descending; unused slots are -inf (index 0).

    Estimator. For any student distribution q, L = -sum_i w_i log q_i is an unbiased estimate of the
    cross-entropy CE(p, q) = -sum_v p_v log q_v (E[w_v] = p_v), and its gradient in the student logits,
    q - w, is an unbiased estimate of the full-vocabulary gradient q - p. Per vocabulary entry the
    variance is p_v (1 - p_v) / n_samples (multinomial counts), so the total squared error of the
    gradient is (1 - sum_v p_v^2) / n_samples. The temperature is applied here, at sampling time: the
    loss reads the weights at temperature 1. (KL = CE - H(p) has the same gradient; its value with the
    plug-in entropy of w is biased, which does not affect training.)

    ``keys`` (int64, the logits' leading shape; see :func:`sample_keys`) seed each position's draws:
    draw j of a position uses u = splitmix64(key + j) / 2^64 by inverse CDF over the probabilities in
    vocabulary order (cumulated in float64)."""
    _check_temperature(temperature)
    n = _check_draws(n_samples)
    if keys.shape != logits.shape[:-1]:
        raise ValueError(f"keys shape {tuple(keys.shape)} != logits leading shape {tuple(logits.shape[:-1])}")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    p = torch.softmax(logits.reshape(-1, vocab).double() / float(temperature), dim=-1)
    counts, idx = _draws(p, keys.reshape(-1), n)
    log_w = torch.where(counts > 0, (counts / n).log(), torch.full_like(counts, _NEG_INF))
    vals, idx = _by_weight(log_w, idx)
    return SparseLogits(idx.reshape(*lead, n), vals.reshape(*lead, n))


def head_tail_signal(logits: torch.Tensor, keys: torch.Tensor, top_p: float, top_k: int, n_samples: int,
                     temperature: float) -> SparseLogits:
    """The head-and-tail teacher signal: the exact top-p-k head (the entries :func:`truncate` keeps) with
    their probabilities p_v = softmax(logits / tau)_v, plus ``n_samples`` draws from the rest of the
    vocabulary (the tail, renormalized) weighted by the tail's exact total mass M: a tail token drawn c
    times has weight M c / n. Values are log weights (read by the loss at temperature 1), width
    min(top_k, V) + n_samples, sorted by weight descending; unused slots -inf (index 0).

    M = exp(lse_tail - lse) with both log-normalizers over the full vocabulary at tau in float64, on the
    teacher's side: never 1 - sum(head), which cancels catastrophically when the head holds nearly all
    the mass. Estimator: E[w_v] = p_v for every v (head entries exactly, tail entries E[M c_v / n] =
    M p_v / M), so -sum w log q is an unbiased estimate of CE(p, q) and q - w of its gradient q - p. The
    head carries no variance; a tail entry's variance is M^2 r_v (1 - r_v) / n with r_v = p_v / M, so
    the total squared gradient error is M^2 (1 - sum_tail r_v^2) / n: a factor M^2 below
    :func:`sample_signal`'s at the same n. When the head covers the vocabulary (M = 0) nothing is
    drawn. Draws are keyed as in :func:`sample_signal`, by ``keys``."""
    _check_truncate_args(logits, top_p, top_k)
    _check_temperature(temperature)
    n = _check_draws(n_samples)
    if keys.shape != logits.shape[:-1]:
        raise ValueError(f"keys shape {tuple(keys.shape)} != logits leading shape {tuple(logits.shape[:-1])}")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    head = truncate(logits.reshape(-1, vocab), top_p, top_k)
    z = logits.reshape(-1, vocab).double() / float(temperature)
    lse = torch.logsumexp(z, -1, keepdim=True)
    # dropped head slots hold index 0 too: add, so they cannot clear a kept token 0
    in_head = torch.zeros_like(z, dtype=torch.int32).scatter_add_(1, head.indices, head.mask.to(torch.int32)) > 0
    z_tail = z.masked_fill(in_head, _NEG_INF)
    lse_tail = torch.logsumexp(z_tail, -1, keepdim=True)
    has_tail = torch.isfinite(lse_tail)
    log_mass = torch.where(has_tail, lse_tail - lse, torch.full_like(lse, _NEG_INF))
    head_w = torch.where(head.mask, z.gather(1, head.indices) - lse, torch.full_like(lse, _NEG_INF))
    # rows without a tail draw from a dummy uniform row; their draws get weight 0 below
    r = torch.where(has_tail, torch.exp(z_tail - torch.where(has_tail, lse_tail, 0.0)), 1.0 / vocab)
    counts, idx = _draws(r, keys.reshape(-1), n)
    tail_w = torch.where((counts > 0) & has_tail, log_mass + (counts / n).log(),
                         torch.full_like(counts, _NEG_INF))
    vals, idx = _by_weight(torch.cat([head_w, tail_w], 1), torch.cat([head.indices, idx], 1))
    width = head.k + n
    return SparseLogits(idx.reshape(*lead, width), vals.reshape(*lead, width))


# ------------------------------------------------------------------------------------ signal kinds
class _Registered(ABCMeta):
    """Lets ``SignalSpec(kind, ...)`` build the registered class of ``kind`` (see SignalSpec.of); a kind
    that leaves one of SignalSpec's abstract methods undefined cannot be built (TypeError naming it)."""

    def __call__(cls, *args, **kwargs):
        if cls is SignalSpec:
            return SignalSpec.of(*args, **kwargs)
        return super().__call__(*args, **kwargs)


def _check_top_p(top_p) -> None:
    if isinstance(top_p, bool) or not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"signal top_p must be in (0, 1], got {top_p!r}")


def _check_top_k(top_k) -> None:
    if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
        raise ValueError(f"signal top_k must be an integer >= 1, got {top_k!r}")


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or int(seed) != seed:
        raise ValueError(f"signal seed must be an integer, got {seed!r}")


class SignalSpec(metaclass=_Registered):
    """What of the teacher's distribution is kept per position (distill.signal), and how it is formed,
    sent, stored, checked and read by the loss: the one description of the teacher signal.

    Each kind is one frozen dataclass subclass, registered under its ``kind`` (the distill.signal value)
    and its wire ``code`` (the integer a teacher and its students exchange in the handshake):

    * :class:`TopPK` (``top_p_k``): the truncated raw logits (:func:`truncate` at top_p, top_k); the
      loss applies tau. A stored one serves any narrower top_p/top_k (re-truncated on load).
    * :class:`Sampled` (``sampled``): ``samples`` draws at ``temperature`` (:func:`sample_signal`); log
      weights, loss at 1.
    * :class:`HeadTail` (``head_tail``): the top-p-k head plus ``samples`` tail draws
      (:func:`head_tail_signal`); log weights, loss at 1.

    Drawn kinds key their draws by (``seed``, sample id, position) (:func:`sample_keys`) and can only be
    served by a store holding exactly the same draws.

    Build one with ``SignalSpec.of(kind, **params)`` (or ``SignalSpec(kind, ...)``: the same, with the
    parameters also accepted positionally in the order top_p, top_k, samples, temperature, seed);
    parameters the kind does not hold are ignored (a config passes all of distill's), a name no kind
    holds is refused.

    A new kind is one subclass; everything that looks a kind up (config validation, the wire's
    handshake, a store's manifest, the compatibility check) then knows it. For example, the arg-max
    token alone, with weight 1::

        @dataclass(frozen=True)
        class Greedy(SignalSpec, kind="greedy", code=7):
            temperature: float = 1.0

            def width(self, vocab_size):
                return 1

            def describe(self, seed=True):
                return "greedy"

            def form(self, logits, keys=None, keep_lse=False):
                idx = logits.argmax(-1, keepdim=True)
                return SparseLogits(idx, torch.zeros(idx.shape))  # log weight 0 = probability 1

            @property
            def loss_temperature(self):
                return 1.0

    The defaults below cover the rest: no draw parameters (``params``), no head truncation
    (``truncation``), served only by an equal spec (``cannot_serve``), the config keys from the
    dataclass fields (``config_keys``). A kind whose signal holds draws sets ``drawn = True``.
    """

    kind: ClassVar[str] = ""
    code: ClassVar[int] = -1
    drawn: ClassVar[bool] = False
    registry: ClassVar[dict[str, type]] = {}
    _POSITIONAL: ClassVar[tuple[str, ...]] = ("top_p", "top_k", "samples", "temperature", "seed")

    def __init_subclass__(cls, kind: Optional[str] = None, code: Optional[int] = None, **kw):
        super().__init_subclass__(**kw)
        if kind is None:
            return
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"a signal kind must be a non-empty string, got {kind!r}")
        if isinstance(code, bool) or not isinstance(code, int) or code < 0:
            raise ValueError(f"signal kind {kind!r}: its wire code must be an integer >= 0, got {code!r}")
        taken = {c.code: k for k, c in SignalSpec.registry.items()}
        if kind in SignalSpec.registry:
            raise ValueError(f"signal kind {kind!r} is registered already ({SignalSpec.registry[kind].__name__})")
        if code in taken:
            raise ValueError(f"signal kind {kind!r}: wire code {code} is {taken[code]!r}'s already")
        cls.kind, cls.code = kind, code
        SignalSpec.registry[kind] = cls

    @staticmethod
    def kinds() -> tuple[str, ...]:
        """The registered kinds, in registration order."""
        return tuple(SignalSpec.registry)

    @staticmethod
    def unregister(kind: str) -> None:
        """Forget ``kind`` (for a kind registered for a while only, as a test's)."""
        SignalSpec.registry.pop(kind, None)

    @staticmethod
    def cls_of(kind: str) -> type:
        """The class registered for ``kind``; ValueError naming the registered ones otherwise."""
        try:
            return SignalSpec.registry[kind]
        except (KeyError, TypeError):
            raise ValueError(f"signal kind must be one of {', '.join(SignalSpec.registry)}, got {kind!r}") from None

    @staticmethod
    def of(kind: str = "top_p_k", *args, **params) -> "SignalSpec":
        """The spec of ``kind`` with those of ``params`` it holds (see the class docstring)."""
        cls = SignalSpec.cls_of(kind)
        if len(args) > len(SignalSpec._POSITIONAL):
            raise TypeError(f"SignalSpec takes at most {len(SignalSpec._POSITIONAL)} positional parameters "
                            f"after the kind, got {len(args)}")
        for name, value in zip(SignalSpec._POSITIONAL, args):
            if name in params:
                raise TypeError(f"SignalSpec: {name} given twice")
            params[name] = value
        known = {f.name for c in SignalSpec.registry.values() for f in fields(c)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise TypeError(f"SignalSpec: no signal kind has the parameter(s) {unknown} (known: {sorted(known)})")
        own = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in own})

    # ------------------------------------------------------------------ what each kind defines
    @abstractmethod
    def width(self, vocab_size: int) -> int:
        """Entries per position."""

    @abstractmethod
    def describe(self, seed: bool = True) -> str:
        """One phrase, e.g. "top-0.95-20 head + 30 draws at tau 1 (seed 0)"."""

    @abstractmethod
    def form(self, logits: torch.Tensor, keys: Optional[torch.Tensor] = None, keep_lse: bool = False) -> SparseLogits:
        """The signal of ``logits`` [..., V]; ``keys`` (the leading shape) for drawn kinds; ``keep_lse``:
        carry each position's full-vocabulary logsumexp where the kind keeps raw logits."""

    @property
    @abstractmethod
    def loss_temperature(self) -> float:
        """The temperature the loss applies to the signal's values."""

    def params(self) -> dict:
        """The parameters that decide the drawn values besides the head truncation (empty for undrawn
        kinds): what a store records and a teacher and its students must agree on."""
        return {}

    def truncation(self) -> Optional[tuple[float, int]]:
        """(top_p, top_k) of the exact top-p-k part of the signal; None when it has none."""
        return None

    def cannot_serve(self, want: "SignalSpec", vocab_size: int) -> Optional[str]:
        """Why a store holding this signal cannot give ``want`` (None when it can): by default only the
        same kind with the same parameters can."""
        if want.kind != self.kind:
            return f"it holds the {self.kind} signal ({self.describe()}), the run asks for {want.kind} ({want.describe()})"
        if want.truncation() != self.truncation() or want.params() != self.params():
            return (f"it holds {self.describe()}, the run asks for {want.describe()} (drawn signals are not "
                    "re-drawn on load)")
        return None

    def config_keys(self) -> dict:
        """The distill config keys (without the ``distill.`` prefix) this spec was built from: kind and
        the dataclass fields, the seed as train.seed's (``seed``)."""
        return {"signal": self.kind, **{f.name: getattr(self, f.name) for f in fields(self)}}

    # ---------------------------------------------------------------- store and wire forms
    def wire_top_p(self) -> float:
        """The top_p a handshake carries (0 where the signal has no top-p-k part)."""
        t = self.truncation()
        return 0.0 if t is None else float(t[0])

    def store_fields(self) -> tuple[float, int, dict]:
        """(top_p, top_k, signal) as a store manifest writes them: the head truncation, else (1, width
        without a vocabulary bound, as format 2 wrote a sampled store), and the signal object ({} for
        top-p-k, the manifest of format version 1)."""
        t = self.truncation()
        top_p, top_k = t if t is not None else (1.0, self.width(1 << 62))
        return float(top_p), int(top_k), {"kind": self.kind, **self.params()}

    @staticmethod
    def from_store(top_p: float, top_k: int, signal: Optional[dict]) -> "SignalSpec":
        """The spec a manifest's (top_p, top_k, signal) fields describe (a missing or empty signal is
        top-p-k, as format 1 and 2 stores of logits wrote it); inverse of :meth:`store_fields`."""
        sig = dict(signal or {"kind": "top_p_k"})
        kind = sig.pop("kind", "top_p_k")
        cls = SignalSpec.cls_of(kind)
        own = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in {"top_p": float(top_p), "top_k": int(top_k), **sig}.items() if k in own})


@dataclass(frozen=True)
class TopPK(SignalSpec, kind="top_p_k", code=0):
    """The paper's signal: the raw logits kept by top-p (at temperature 1) then top-k truncation; the
    loss applies ``temperature``. A stored one can be narrowed on load to any smaller top_p / top_k."""
    top_p: float = 1.0
    top_k: int = 50
    temperature: float = 1.0

    def __post_init__(self):
        _check_top_p(self.top_p)
        _check_top_k(self.top_k)
        _check_temperature(self.temperature)

    def width(self, vocab_size: int) -> int:
        return min(int(self.top_k), int(vocab_size))

    def describe(self, seed: bool = True) -> str:
        return f"top-{self.top_p:g}-{self.top_k}"

    def form(self, logits, keys=None, keep_lse=False) -> SparseLogits:
        return truncate(logits, self.top_p, self.top_k, keep_lse=keep_lse)

    @property
    def loss_temperature(self) -> float:
        return float(self.temperature)

    def truncation(self) -> tuple[float, int]:
        return float(self.top_p), int(self.top_k)

    def store_fields(self) -> tuple[float, int, dict]:
        return float(self.top_p), int(self.top_k), {}

    def cannot_serve(self, want, vocab_size):
        if want.kind != self.kind:
            return super().cannot_serve(want, vocab_size)
        problems = []
        if self.width(vocab_size) < want.width(vocab_size):
            problems.append(f"it keeps top_k={self.top_k} entries per token, fewer than the asked "
                            f"top_k={want.top_k} (a store can only be narrowed on load, not widened)")
        if self.top_p < float(want.top_p) - TOP_P_EPS:
            problems.append(f"it was truncated at top_p={self.top_p}, narrower than the asked "
                            f"top_p={want.top_p} (a store can only be narrowed on load, not widened)")
        return "; ".join(problems) or None


TOP_P_EPS = 1e-9  # top_p values closer than this are the same truncation


@dataclass(frozen=True)
class Sampled(SignalSpec, kind="sampled", code=1):
    """``samples`` draws per position from softmax(logits / temperature) (:func:`sample_signal`): log
    weights, read by the loss at temperature 1. Served only by the same draws."""
    samples: int = 50
    temperature: float = 1.0
    seed: int = 0
    drawn: ClassVar[bool] = True

    def __post_init__(self):
        _check_draws(self.samples)
        _check_temperature(self.temperature)
        _check_seed(self.seed)

    def width(self, vocab_size: int) -> int:
        return int(self.samples)

    def params(self) -> dict:
        return {"samples": int(self.samples), "temperature": float(self.temperature), "seed": int(self.seed)}

    def describe(self, seed: bool = True) -> str:
        return f"{self.samples} draws at tau {self.temperature:g}" + (f" (seed {self.seed})" if seed else "")

    def form(self, logits, keys=None, keep_lse=False) -> SparseLogits:
        if keys is None:
            raise ValueError(f"signal {self.kind} needs per-position keys (sample_keys)")
        return sample_signal(logits, keys, self.samples, self.temperature)

    @property
    def loss_temperature(self) -> float:
        return 1.0


@dataclass(frozen=True)
class HeadTail(SignalSpec, kind="head_tail", code=2):
    """The exact top-p-k head plus ``samples`` draws from the tail (:func:`head_tail_signal`): log
    weights, read by the loss at temperature 1. Served only by the same head and the same draws."""
    top_p: float = 1.0
    top_k: int = 50
    samples: int = 50
    temperature: float = 1.0
    seed: int = 0
    drawn: ClassVar[bool] = True

    def __post_init__(self):
        _check_top_p(self.top_p)
        _check_top_k(self.top_k)
        _check_draws(self.samples)
        _check_temperature(self.temperature)
        _check_seed(self.seed)

    def width(self, vocab_size: int) -> int:
        return min(int(self.top_k), int(vocab_size)) + int(self.samples)

    def params(self) -> dict:
        return {"samples": int(self.samples), "temperature": float(self.temperature), "seed": int(self.seed)}

    def truncation(self) -> tuple[float, int]:
        return float(self.top_p), int(self.top_k)

    def cannot_serve(self, want, vocab_size):
        if want.kind == self.kind and abs(self.top_p - want.top_p) <= TOP_P_EPS and self.top_k == want.top_k \
                and self.params() == want.params():
            return None
        return super().cannot_serve(want, vocab_size)

    def describe(self, seed: bool = True) -> str:
        return (f"top-{self.top_p:g}-{self.top_k} head + {self.samples} draws at tau {self.temperature:g}"
                + (f" (seed {self.seed})" if seed else ""))

    def form(self, logits, keys=None, keep_lse=False) -> SparseLogits:
        if keys is None:
            raise ValueError(f"signal {self.kind} needs per-position keys (sample_keys)")
        return head_tail_signal(logits, keys, self.top_p, self.top_k, self.samples, self.temperature)

    @property
    def loss_temperature(self) -> float:
        return 1.0
