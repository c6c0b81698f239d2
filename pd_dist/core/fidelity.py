"""How faithful a stored (sparse) teacher signal is to the teacher's full distribution, per position.

p is the teacher's full next-token distribution, softmax(logits / tau). p_hat is what training targets
from the signal: target_probs(signal, loss temperature), over the kept ids only (zero elsewhere; for
top-p-k the head renormalised, for drawn signals their weights). Per position:

- ``head_mass``: sum of p over the kept ids (what the truncation keeps of the true mass);
- ``tv``: total variation, 0.5 sum |p - p_hat|;
- ``reverse_kl``: KL(p_hat || p), finite (p_hat lives on the kept ids);
- ``forward_kl``: KL(p || p_tail), where p_tail is p_hat scaled to the head mass with the rest of the
  mass spread evenly over the ids not kept (p_hat itself puts 0 where p does not, so KL(p || p_hat) is
  infinite for any truncation; this is the finite version that says how much the head's shape and the
  tail's absence cost);
- ``jsd``: Jensen-Shannon divergence of p and p_hat (nats, at most log 2).
All in float64 from logits; pure functions of tensors.
"""
from __future__ import annotations

import math

import torch

from pd_dist.core.logits import SparseLogits, teacher_log_probs

METRICS = ("head_mass", "tv", "reverse_kl", "forward_kl", "jsd")


def signal_fidelity(logits: torch.Tensor, signal: SparseLogits, temperature: float,
                    loss_temperature: float) -> dict[str, torch.Tensor]:
    """Each metric of the module docstring per position: ``logits`` [N, V] (the teacher's full logits),
    ``signal`` [N, k] (its stored form), p at ``temperature`` and p_hat at ``loss_temperature``. Rows
    whose signal keeps nothing are NaN."""
    z = logits.to(torch.float64)
    n, vocab = z.shape
    logp = torch.log_softmax(z / temperature, dim=-1)
    p = logp.exp()
    mask = signal.mask
    q_k = torch.where(mask, teacher_log_probs(signal.values, mask, loss_temperature, torch.float64).exp(), 0.0)
    q = torch.zeros_like(p).scatter_add_(1, signal.indices, q_k)  # p_hat over the vocabulary
    # summed, not scattered: a dropped slot's id (0 by convention) must not unmark a kept id 0
    kept = torch.zeros_like(p).scatter_add_(1, signal.indices, mask.to(p.dtype)) > 0
    head = torch.where(kept, p, 0.0).sum(-1)
    tv = 0.5 * (p - q).abs().sum(-1)
    rev = torch.where(q > 0, q * (q.clamp_min(1e-300).log() - logp), 0.0).sum(-1)
    n_tail = (vocab - kept.sum(-1)).to(torch.float64)
    tail_each = torch.where(n_tail > 0, (1 - head).clamp_min(0) / n_tail.clamp_min(1), 0.0)
    q_tail = torch.where(kept, q * head.unsqueeze(-1), tail_each.unsqueeze(-1))
    fwd = torch.where(p > 0, p * (logp - q_tail.clamp_min(1e-300).log()), 0.0).sum(-1)
    m = 0.5 * (p + q)
    logm = m.clamp_min(1e-300).log()
    jsd = 0.5 * (torch.where(p > 0, p * (logp - logm), 0.0).sum(-1)
                 + torch.where(q > 0, q * (q.clamp_min(1e-300).log() - logm), 0.0).sum(-1))
    empty = ~mask.any(-1)
    out = {"head_mass": head, "tv": tv, "reverse_kl": rev, "forward_kl": fwd, "jsd": jsd}
    return {k: torch.where(empty, math.nan, v) for k, v in out.items()}


def mean_fidelity(parts: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Each metric's mean over every position of ``parts`` (signal_fidelity results), NaN rows left out."""
    out = {}
    for k in METRICS:
        v = torch.cat([p[k].reshape(-1) for p in parts])
        v = v[~torch.isnan(v)]
        out[k] = float(v.mean()) if v.numel() else math.nan
    return out
