"""Knowledge-distillation losses and the fused, chunked LM + KD loss over the LM head.

Notation: q_s = softmax(student logits) over the full vocabulary (never tempered), p_t =
target_probs(teacher, tau) over the teacher's kept entries (zero elsewhere).

Every loss here depends on the student logits z only through z at k indices I (the teacher's kept
indices; for uld the student's own k largest), z at the target (z_y) and the log-normalizer lse =
logsumexp(z), because log q_s[i] = z_i - lse and the mass outside I is 1 - sum_j q_s[I_j]. Hence dL/dz = (dL/dlse) * q_s + scatter(dL/dz_I)
+ scatter(dL/dz_y): the fused path runs autograd only on these [N, k]-sized quantities and forms the
dense [chunk, V] gradient in place, with one exp pass over the chunk logits.

A position whose teacher signal keeps no entry (a student position no teacher position aligns with,
when teacher and student tokenize differently: pd_dist.core.crosstok) has no KD term and trains on the
LM loss at full weight, not at 1 - alpha.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from pd_dist.core.logits import SparseLogits, teacher_log_probs, _check_temperature

KDLoss = Literal["nll", "kld", "mse", "reverse_kld", "jsd", "tvd", "uld"]
KD_LOSSES = get_args(KDLoss)
IGNORE_INDEX = -100
_LOG2 = math.log(2.0)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for fp32/bf16/fp16 inputs; float64 stays float64 (lets tests run gradcheck / tight checks)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_kind(kind: str) -> None:
    if kind not in KD_LOSSES:
        raise ValueError(f"unknown KD loss kind {kind!r}; expected one of {KD_LOSSES}")


def lm_loss(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of ``student_logits[N, V]`` against ``targets[N]``; 0 where target == IGNORE_INDEX."""
    z = student_logits.to(_compute_dtype(student_logits))
    vocab = z.shape[-1]
    out = F.cross_entropy(z.reshape(-1, vocab), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return out.reshape(targets.shape)


def kd_indices(z: torch.Tensor, teacher_indices: torch.Tensor, kind: str) -> torch.Tensor:
    """The k student-vocabulary indices a KD loss reads the student logits ``z [..., V]`` at: the
    teacher's kept indices, or for uld the student's own k largest logits (sorted descending)."""
    if kind == "uld":
        return z.topk(min(teacher_indices.shape[-1], z.shape[-1]), dim=-1).indices
    return teacher_indices


def _kd_from_gathered(z_idx: torch.Tensor, lse: torch.Tensor, t_values: torch.Tensor, mask: torch.Tensor,
                      kind: str, temperature: float) -> torch.Tensor:
    """Per-token KD loss from student logits at the indices of kd_indices ``z_idx[..., k]``, the
    student log-normalizer ``lse[...]``, and the raw teacher values/mask. Dropped slots contribute
    exactly 0, and every masked branch is sanitized first so that neither values nor gradients become
    NaN."""
    dtype = z_idx.dtype
    zero = torch.zeros((), dtype=dtype, device=z_idx.device)
    if kind == "uld":
        # Universal logit distillation (Boizard et al., 2024): L1 between the sorted probabilities, so
        # the teacher's ids are never read. z_idx holds the student's k largest logits, descending;
        # the student's mass beyond them meets teacher zeros and counts whole.
        logp = teacher_log_probs(t_values, mask, temperature, dtype)
        p = torch.where(mask, logp.exp(), zero).sort(dim=-1, descending=True).values[..., :z_idx.shape[-1]]
        q = (z_idx - lse.unsqueeze(-1)).exp()
        dist = (q - p).abs().sum(-1) + (1.0 - q.sum(-1))
        return torch.where(mask.any(-1), dist, zero)
    if kind == "mse":
        # Raw logits on both sides: the temperature is deliberately not applied (logit matching).
        t = torch.where(mask, t_values.to(dtype), zero)
        d = torch.where(mask, z_idx - t, zero)
        return (d * d).sum(-1) / mask.sum(-1).clamp_min(1).to(dtype)

    logp = teacher_log_probs(t_values, mask, temperature, dtype)  # 0 at dropped
    p = torch.where(mask, logp.exp(), zero)
    if kind == "reverse_kld":
        # p_t is zero outside the kept set, so KL(q_s || p_t) over the full vocabulary is infinite
        # whenever q_s puts any mass there; use the student renormalized over the kept indices.
        fill = torch.where(mask.any(-1, keepdim=True), float("-inf"), 0.0).to(dtype)
        lq_t = torch.log_softmax(torch.where(mask, z_idx, fill), dim=-1)
        lq_t = torch.where(mask, lq_t, zero)
        return torch.where(mask, lq_t.exp() * (lq_t - logp), zero).sum(-1)

    lq = torch.where(mask, z_idx - lse.unsqueeze(-1), zero)  # log q_s at kept indices
    if kind == "nll":
        return -torch.where(mask, p * lq, zero).sum(-1)
    if kind == "kld":
        return torch.where(mask, p * (logp - lq), zero).sum(-1)
    q = torch.where(mask, lq.exp(), zero)
    outside = 1.0 - q.sum(-1)  # student mass outside the teacher's kept set
    if kind == "tvd":
        return 0.5 * (torch.where(mask, (p - q).abs(), zero).sum(-1) + outside)
    if kind == "jsd":
        # Kept j: 0.5 [p log(p/m) + q log(q/m)], m = (p+q)/2. Outside (p = 0, m = q/2): 0.5 q log 2 each.
        logm = torch.logaddexp(logp, lq) - _LOG2
        inside = torch.where(mask, 0.5 * (p * (logp - logm) + q * (lq - logm)), zero).sum(-1)
        return inside + 0.5 * _LOG2 * outside
    raise ValueError(f"unknown KD loss kind {kind!r}; expected one of {KD_LOSSES}")


def distillation_loss(student_logits: torch.Tensor, teacher: SparseLogits, kind: str,
                      temperature: float) -> torch.Tensor:
    """Per-token KD loss between ``student_logits[N, V]`` and truncated ``teacher[N, k]``.

    nll: -sum p_t log q_s;  kld: KL(p_t || q_s);  mse: mean over kept of (z_s - z_t)^2 on raw logits
    (temperature not applied);  reverse_kld: KL(q~ || p_t), q~ = q_s renormalized over the kept indices;
    jsd: exact Jensen-Shannon divergence between p_t (zero outside kept) and the full q_s;
    tvd: 0.5 * sum_V |p_t - q_s|;  uld: sum_V |sort(p_t) - sort(q_s)| (universal logit distillation,
    teacher ids ignored). A row with no kept entry gives 0.
    """
    _check_kind(kind)
    _check_temperature(temperature)
    if teacher.shape != student_logits.shape[:-1]:
        raise ValueError(f"teacher shape {tuple(teacher.shape)} != student token shape "
                         f"{tuple(student_logits.shape[:-1])}")
    z = student_logits.to(_compute_dtype(student_logits))
    lse = torch.logsumexp(z, dim=-1)
    z_idx = z.gather(-1, kd_indices(z, teacher.indices, kind))
    return _kd_from_gathered(z_idx, lse, teacher.values, teacher.mask, kind, temperature)


@dataclass
class PDLossOutput:
    loss: torch.Tensor  # differentiable scalar = sum over tokens of (w*lm + alpha*kd) / normalizer, w = 1 - alpha
    # (1 where the teacher row keeps no entry)
    lm_sum: torch.Tensor  # detached scalars: sums over valid tokens (float32, float64 for float64 inputs)
    kd_sum: torch.Tensor
    n_tokens: torch.Tensor  # int64: number of valid tokens (targets != IGNORE_INDEX)
    top1_agree: torch.Tensor  # int64: valid tokens where student argmax == teacher.indices[..., 0]


def _validate(hidden, weight, targets, teacher, alpha, kind, temperature, normalizer) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} != ({hidden.shape[0]},)")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if teacher is None:
        if alpha != 0:
            raise ValueError(f"alpha={alpha!r} needs teacher logits; without a teacher alpha must be 0")
    else:
        if teacher.shape != hidden.shape[:1]:
            raise ValueError(f"teacher shape {tuple(teacher.shape)} != ({hidden.shape[0]},)")
        _check_kind(kind)
    _check_temperature(temperature)
    if not float(normalizer) > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer!r}")


def pd_loss_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      teacher: SparseLogits | None, alpha: float, kind: str, temperature: float,
                      normalizer: float) -> PDLossOutput:
    """Unchunked LM + KD loss with plain autograd (holds the full [N, V] logits; for tests/benchmarks)."""
    _validate(hidden, weight, targets, teacher, alpha, kind, temperature, normalizer)
    logits = (hidden @ weight.t()).to(_compute_dtype(hidden, weight))
    valid = targets != IGNORE_INDEX
    lm = lm_loss(logits, targets)
    lm_sum = lm.sum()
    if teacher is None:
        loss = (1.0 - alpha) * lm_sum
    else:  # a row with no kept teacher entry trains on the LM loss alone
        loss = torch.where(teacher.mask.any(-1), 1.0 - alpha, 1.0).to(lm.dtype).mul(lm).sum()
    if teacher is None:
        kd_sum = torch.zeros((), dtype=logits.dtype, device=logits.device)
        top1 = torch.zeros((), dtype=torch.int64, device=logits.device)
    else:
        kd = distillation_loss(logits, teacher, kind, temperature)
        kd_sum = torch.where(valid, kd, torch.zeros_like(kd)).sum()
        if alpha != 0:
            loss = loss + alpha * kd_sum
        top1 = ((logits.argmax(-1) == teacher.indices[:, 0]) & valid).sum()
    return PDLossOutput(loss=loss / normalizer, lm_sum=lm_sum.detach(), kd_sum=kd_sum.detach(),
                        n_tokens=valid.sum(), top1_agree=top1)


def _fused_forward(hidden, weight, targets, t_idx, t_val, alpha, kind, temperature, normalizer,
                   chunk_size, grad_hidden_needed, grad_weight_needed):
    """Chunked forward; also the gradients w.r.t. hidden/weight when requested (see module docstring).

    Only one [chunk, V] logits buffer (plus a low-precision copy for bf16/fp16 inputs) is alive at a
    time; it is reused across chunks and turned into the logits gradient in place.
    """
    n, _ = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    cdt = _compute_dtype(hidden, weight)
    low_precision = hidden.dtype != cdt or weight.dtype != cdt
    need_grad = grad_hidden_needed or grad_weight_needed
    have_teacher = t_idx is not None
    w_t = weight.t()

    rows = max(1, min(chunk_size, n))
    zbuf = torch.empty((rows, vocab), dtype=cdt, device=device)
    lpbuf = torch.empty((rows, vocab), dtype=hidden.dtype, device=device) if low_precision else None
    grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if grad_hidden_needed else None
    # Accumulated in the weight's dtype (one rounding per chunk in bf16, as in Liger's fused linear CE),
    # so no extra fp32 copy of a vocabulary-sized gradient is needed.
    grad_w = torch.zeros_like(weight) if grad_weight_needed and n == 0 else None
    lm_sum = torch.zeros((), dtype=cdt, device=device)
    lm_obj_sum = torch.zeros((), dtype=cdt, device=device)  # the LM sum as weighted in the loss
    kd_sum = torch.zeros((), dtype=cdt, device=device)
    top1 = torch.zeros((), dtype=torch.int64, device=device)
    valid_all = targets != IGNORE_INDEX
    w_lm, w_kd = 1.0 - float(alpha), float(alpha)

    for s in range(0, n, rows):
        e = min(n, s + rows)
        h = hidden[s:e]
        z = zbuf[: e - s]
        if low_precision:
            torch.mm(h, w_t, out=lpbuf[: e - s])
            z.copy_(lpbuf[: e - s])
        else:
            torch.mm(h, w_t, out=z)
        valid = valid_all[s:e]
        y = torch.where(valid, targets[s:e], torch.zeros_like(targets[s:e])).unsqueeze(1)
        z_y = z.gather(1, y).squeeze(1)
        if have_teacher:
            idx, tv = t_idx[s:e], t_val[s:e]
            tmask = tv > float("-inf")
            kidx = kd_indices(z, idx, kind)
            z_idx = z.gather(1, kidx)
            # rows with no kept entry: LM at full weight (a tensor only where that can happen)
            w_row = torch.where(tmask.any(-1), w_lm, 1.0).to(cdt) if w_lm != 1.0 else None
        m, amax = z.max(1)
        if have_teacher:
            top1 += ((amax == idx[:, 0]) & valid).sum()
        # z becomes exp(z - m) in place; lse = m + log(sum).
        z.sub_(m.unsqueeze(1)).exp_()
        ssum = z.sum(1)
        lse = m + ssum.log()

        with torch.enable_grad():
            lse_l = lse.detach().requires_grad_(need_grad)
            zy_l = z_y.detach().requires_grad_(need_grad)
            lm = torch.where(valid, lse_l - zy_l, torch.zeros_like(lse_l))
            lm_sum += lm.detach().sum()
            if have_teacher and w_row is not None:
                lm_w = (lm * w_row).sum()
                lm_obj_sum += lm_w.detach()
                obj = lm_w / normalizer
            else:
                lm_obj_sum += lm.detach().sum() * w_lm
                obj = lm.sum() * (w_lm / normalizer) if w_lm != 0 else None
            kd_grad = have_teacher and need_grad and w_kd != 0
            if have_teacher:
                # alpha == 0: KD is only logged, so keep it out of the autograd graph.
                with torch.set_grad_enabled(kd_grad):
                    zi_l = z_idx.detach().requires_grad_(kd_grad)
                    kd = _kd_from_gathered(zi_l, lse_l, tv, tmask, kind, temperature)
                    kd = torch.where(valid, kd, torch.zeros_like(kd))
                kd_sum += kd.detach().sum()
                if w_kd != 0:
                    kd_obj = kd.sum() * (w_kd / normalizer)
                    obj = kd_obj if obj is None else obj + kd_obj
            if not need_grad:
                continue
            leaves = [lse_l, zy_l] + ([zi_l] if kd_grad else [])
            grads = torch.autograd.grad(obj, leaves, allow_unused=True, materialize_grads=True)

        # dense logits gradient: (dL/dlse) * softmax(z) + scattered dL/dz_y and dL/dz_I
        g = z.mul_((grads[0] / ssum).unsqueeze(1))
        g.scatter_add_(1, y, grads[1].unsqueeze(1))  # zeros where the LM term has no weight
        if kd_grad:
            g.scatter_add_(1, kidx, grads[2])
        if low_precision:
            g = lpbuf[: e - s].copy_(g)
        if grad_hidden_needed:
            torch.mm(g, weight, out=grad_h[s:e])
        if grad_weight_needed:
            if grad_w is None:
                grad_w = torch.mm(g.t(), h)
            else:
                grad_w.addmm_(g.t(), h)

    loss = (lm_obj_sum + w_kd * kd_sum) / normalizer
    stats = (lm_sum, kd_sum, valid_all.sum(), top1)
    return loss, stats, grad_h, grad_w


class _FusedPDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, t_idx, t_val, alpha, kind, temperature, normalizer,
                chunk_size, grad_hidden_needed, grad_weight_needed):
        loss, stats, grad_h, grad_w = _fused_forward(
            hidden, weight, targets, t_idx, t_val, alpha, kind, temperature, normalizer, chunk_size,
            grad_hidden_needed, grad_weight_needed)
        # Kept as plain ctx attributes (not save_for_backward) so backward can hand over the only
        # reference: autograd then adopts them as .grad instead of cloning a vocabulary-sized tensor.
        ctx.grads = (grad_h, grad_w)
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        if ctx.grads is None:
            raise RuntimeError("fused_pd_loss: backward can only run once (grads are handed over, not kept)")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        # Scale in place: these buffers are owned by this node. (Multiplying by exactly 1 is exact.)
        if grad_h is not None:
            grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w.mul_(grad_loss.to(grad_w.dtype))
        return (grad_h, grad_w) + (None,) * 10


def fused_pd_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  teacher: SparseLogits | None, alpha: float, kind: str, temperature: float,
                  normalizer: float, chunk_size: int = 1024) -> PDLossOutput:
    """LM + KD loss over the LM head without materializing the [N, V] logits.

    Same result as :func:`pd_loss_reference`. Tokens are processed ``chunk_size`` at a time; the
    gradients w.r.t. ``hidden`` and ``weight`` are computed during the forward pass and only scaled by
    the incoming gradient in backward (no logits recomputation). Under ``torch.no_grad()`` or when
    neither input requires grad, no gradient work is done. ``normalizer`` is the global number of
    valid tokens (so chunks, micro-batches and ranks sum consistently): loss = sum / normalizer.
    Memory: one [chunk_size, V] buffer in fp32 (plus one in the input dtype for bf16/fp16 inputs).
    """
    _validate(hidden, weight, targets, teacher, alpha, kind, temperature, normalizer)
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} != weight dtype {weight.dtype}")
    t_idx = teacher.indices if teacher is not None else None
    t_val = teacher.values if teacher is not None else None
    grad_enabled = torch.is_grad_enabled()
    gh, gw = grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad
    args = (hidden, weight, targets, t_idx, t_val, float(alpha), kind, float(temperature),
            float(normalizer), int(chunk_size))
    if gh or gw:
        loss, lm_sum, kd_sum, n_tok, top1 = _FusedPDLoss.apply(*args, gh, gw)
    else:
        loss, (lm_sum, kd_sum, n_tok, top1), _, _ = _fused_forward(*args, False, False)
    return PDLossOutput(loss=loss, lm_sum=lm_sum, kd_sum=kd_sum, n_tokens=n_tok, top1_agree=top1)
