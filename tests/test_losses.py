"""Tests for pd_dist.core.losses against independent float64 dense (full-vocabulary) implementations."""
import itertools
import math

import pytest
import torch

from pd_dist.core.logits import SparseLogits, truncate
from pd_dist.core.losses import (IGNORE_INDEX, KD_LOSSES, distillation_loss, fused_pd_loss, lm_loss,
                            pd_loss_reference)

F64 = torch.float64


def dense_teacher_probs(teacher: SparseLogits, vocab: int, tau: float) -> torch.Tensor:
    """p_t as a full-vocabulary float64 vector: softmax(kept / tau) scattered, 0 elsewhere."""
    n = teacher.values.shape[0]
    p = torch.zeros(n, vocab, dtype=F64)
    for r in range(n):
        m = teacher.mask[r]
        v = teacher.values[r][m].double() / tau
        p[r, teacher.indices[r][m]] = torch.softmax(v, 0)
    return p


def textbook_kd(z: torch.Tensor, teacher: SparseLogits, kind: str, tau: float) -> torch.Tensor:
    """Textbook per-token formulas on dense float64 distributions (differentiable in z)."""
    z = z.double()
    vocab = z.shape[-1]
    p = dense_teacher_probs(teacher, vocab, tau)
    kept = p > 0  # kept entries with non-underflowing probability (all, for the test inputs)
    logq = torch.log_softmax(z, -1)
    q = logq.exp()
    if kind == "nll":
        return -(p * logq).sum(-1)
    if kind == "kld":
        return (torch.xlogy(p, p) - p * logq).sum(-1)
    if kind == "mse":
        zt = torch.zeros(z.shape[0], vocab, dtype=F64)
        km = torch.zeros(z.shape[0], vocab, dtype=torch.bool)
        for r in range(z.shape[0]):
            m = teacher.mask[r]
            zt[r, teacher.indices[r][m]] = teacher.values[r][m].double()
            km[r, teacher.indices[r][m]] = True
        return torch.where(km, (z - zt) ** 2, 0.0).sum(-1) / km.sum(-1)
    if kind == "reverse_kld":
        qt = torch.where(kept, q, 0.0)
        qt = qt / qt.sum(-1, keepdim=True)
        return torch.where(kept, qt * (torch.log(torch.where(kept, qt, 1.0)) - torch.log(torch.where(kept, p, 1.0))), 0.0).sum(-1)
    if kind == "jsd":
        m = 0.5 * (p + q)
        kl_pm = torch.xlogy(p, p) - torch.xlogy(p, m)
        kl_qm = q * (logq - torch.log(m))
        return 0.5 * (kl_pm + kl_qm).sum(-1)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "uld":  # both distributions sorted over the whole vocabulary (p zero-padded)
        return (p.sort(-1, descending=True).values - q.sort(-1, descending=True).values).abs().sum(-1)
    raise AssertionError(kind)


def make_case(n=7, vocab=23, k=6, top_p=0.8, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g) * scale
    teacher = truncate(torch.randn(n, vocab, generator=g) * 2.5, top_p, k)
    assert (teacher.counts() < k).any() and (teacher.counts() >= 1).all()  # some dropped entries
    return z, teacher


@pytest.mark.parametrize("kind", KD_LOSSES)
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_distillation_loss_values_and_grads_vs_textbook(kind, tau):
    z, teacher = make_case(seed=1)
    z32 = z.clone().requires_grad_()
    ours = distillation_loss(z32, teacher, kind, tau)
    z64 = z.double().requires_grad_()
    ref = textbook_kd(z64, teacher, kind, tau)
    assert ours.dtype == torch.float32 and ours.shape == (7,)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    w = torch.linspace(0.5, 1.5, 7)  # per-token weights so every token's gradient is checked
    (ours * w).sum().backward()
    (ref * w.double()).sum().backward()
    torch.testing.assert_close(z32.grad.double(), z64.grad, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_distillation_loss_gradcheck_float64(kind):
    z, teacher = make_case(n=3, vocab=9, k=5, top_p=0.7, seed=2)
    z = z.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: distillation_loss(x, teacher, kind, 1.7), (z,))


def test_lm_loss_vs_float64_and_ignore():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 11, generator=g) * 3
    y = torch.tensor([1, IGNORE_INDEX, 10, 0, IGNORE_INDEX, 5])
    out = lm_loss(z, y)
    logq = torch.log_softmax(z.double(), -1)
    for i, t in enumerate(y.tolist()):
        want = 0.0 if t == IGNORE_INDEX else -logq[i, t].item()
        assert abs(out[i].item() - want) < 1e-5


def test_kd_simple_identities():
    """Closed-form sanity checks that do not share code with either implementation."""
    vocab = 8
    teacher = SparseLogits(torch.tensor([[2, 5, 0]]), torch.tensor([[1.0, 1.0, float("-inf")]]))
    # student uniform: q = 1/8 everywhere; p = 1/2 on {2, 5}
    z = torch.zeros(1, vocab)
    assert distillation_loss(z, teacher, "nll", 1.0).item() == pytest.approx(math.log(8), rel=1e-6)
    assert distillation_loss(z, teacher, "kld", 1.0).item() == pytest.approx(math.log(4), rel=1e-6)
    assert distillation_loss(z, teacher, "tvd", 1.0).item() == pytest.approx(0.5 * (2 * 3 / 8 + 6 / 8), rel=1e-6)
    assert distillation_loss(z, teacher, "reverse_kld", 1.0).item() == pytest.approx(0.0, abs=1e-7)
    assert distillation_loss(z, teacher, "mse", 1.0).item() == pytest.approx(1.0, rel=1e-6)
    # JSD: kept j: m = (1/2+1/8)/2 = 5/16; outside: 6 entries * 0.5 * (1/8) log 2
    jsd = 2 * 0.5 * (0.5 * math.log(0.5 / (5 / 16)) + (1 / 8) * math.log((1 / 8) / (5 / 16))) + 0.5 * 6 / 8 * math.log(2)
    assert distillation_loss(z, teacher, "jsd", 1.0).item() == pytest.approx(jsd, rel=1e-6)
    # student equal to the teacher on its support, nothing outside: every divergence is 0
    z2 = torch.full((1, vocab), -1e4)
    z2[0, 2] = z2[0, 5] = 3.0
    for kind in ("kld", "reverse_kld", "jsd", "tvd"):
        assert abs(distillation_loss(z2, teacher, kind, 1.0).item()) < 1e-6, kind


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_no_nan_with_dropped_entries(kind):
    """Dropped entries gather index 0; even a -inf / huge student logit there must not leak NaN."""
    teacher = SparseLogits(torch.tensor([[3, 1, 0, 0], [2, 0, 0, 0]]),
                           torch.tensor([[2.0, 1.0, float("-inf"), float("-inf")],
                                         [0.5, float("-inf"), float("-inf"), float("-inf")]]))
    z = torch.randn(2, 6)
    z[:, 0] = float("-inf")  # index 0 is never kept by the teacher here
    z = z.requires_grad_()
    out = distillation_loss(z, teacher, kind, 2.0)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert not torch.isnan(z.grad).any()
    # a kept-nothing row (cannot come from truncate, but must stay finite)
    empty = SparseLogits(torch.zeros(1, 3, dtype=torch.int64), torch.full((1, 3), float("-inf")))
    z3 = torch.randn(1, 6, requires_grad=True)
    out3 = distillation_loss(z3, empty, kind, 1.0)
    out3.sum().backward()
    assert torch.isfinite(out3).all() and torch.isfinite(z3.grad).all()


# ---------------------------------------------------------------- fused chunked LM + KD loss

def fused_case(n=29, h=12, vocab=41, k=7, dtype=F64, seed=0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64).to(dtype)
    weight = (torch.randn(vocab, h, generator=g, dtype=F64) * 0.7).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::ignore_every] = IGNORE_INDEX
    teacher = truncate(torch.randn(n, vocab, generator=g) * 2.0, 0.85, k)
    return hidden, weight, targets, teacher


def run(fn, hidden, weight, *args, scale=1.0, **kw):
    hh = hidden.clone().requires_grad_()
    ww = weight.clone().requires_grad_()
    out = fn(hh, ww, *args, **kw)
    (out.loss * scale).backward()
    return out, hh.grad, ww.grad


def check_outputs(a, b, rtol, atol):
    (oa, gha, gwa), (ob, ghb, gwb) = a, b
    for name in ("loss", "lm_sum", "kd_sum"):
        torch.testing.assert_close(getattr(oa, name).detach().double(), getattr(ob, name).detach().double(),
                                   rtol=rtol, atol=atol, msg=name)
    assert oa.n_tokens.item() == ob.n_tokens.item()
    assert oa.top1_agree.item() == ob.top1_agree.item()
    assert gha.dtype == ghb.dtype and gwa.dtype == gwb.dtype
    torch.testing.assert_close(gha.double(), ghb.double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(gwa.double(), gwb.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind,alpha", list(itertools.product(KD_LOSSES, [0.0, 0.5, 1.0])))
def test_fused_matches_reference_float64(kind, alpha):
    hidden, weight, targets, teacher = fused_case()
    norm = float((targets != IGNORE_INDEX).sum())
    args = (targets, teacher, alpha, kind, 1.5, norm)
    ref = run(pd_loss_reference, hidden, weight, *args)
    for chunk in (1, 5, 8, 29, 1024):  # 5 and 8 do not divide N = 29
        check_outputs(run(fused_pd_loss, hidden, weight, *args, chunk_size=chunk), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_fused_matches_reference_float32(kind):
    hidden, weight, targets, teacher = fused_case(dtype=torch.float32, seed=1)
    args = (targets, teacher, 0.5, kind, 1.0, 25.0)
    ref = run(pd_loss_reference, hidden, weight, *args)
    check_outputs(run(fused_pd_loss, hidden, weight, *args, chunk_size=6), ref, rtol=1e-5, atol=1e-6)


def test_fused_reference_against_dense_textbook_float64():
    """Ties the reference itself to the textbook formulas (so fused == reference is meaningful)."""
    hidden, weight, targets, teacher = fused_case(seed=5)
    valid = targets != IGNORE_INDEX
    norm = 17.0
    for kind in KD_LOSSES:
        hh = hidden.clone().requires_grad_()
        ww = weight.clone().requires_grad_()
        z = hh @ ww.t()
        lm = torch.where(valid, -torch.log_softmax(z, -1).gather(1, targets.clamp_min(0)[:, None]).squeeze(1), 0.0)
        kd = torch.where(valid, textbook_kd(z, teacher, kind, 1.5), 0.0)
        want = (0.3 * lm.sum() + 0.7 * kd.sum()) / norm
        want.backward()
        got = run(fused_pd_loss, hidden, weight, targets, teacher, 0.7, kind, 1.5, norm, chunk_size=4)
        torch.testing.assert_close(got[0].loss.detach(), want.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[1], hh.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[2], ww.grad, rtol=1e-5, atol=1e-7)


def test_fused_teacher_none():
    hidden, weight, targets, _ = fused_case(seed=2)
    args = (targets, None, 0.0, "kld", 1.0, 21.0)
    ref = run(pd_loss_reference, hidden, weight, *args)
    for chunk in (3, 64):
        got = run(fused_pd_loss, hidden, weight, *args, chunk_size=chunk)
        check_outputs(got, ref, rtol=1e-10, atol=1e-12)
        assert got[0].kd_sum.item() == 0 and got[0].top1_agree.item() == 0
    with pytest.raises(ValueError, match="alpha"):
        fused_pd_loss(hidden, weight, targets, None, 0.5, "kld", 1.0, 21.0)
    with pytest.raises(ValueError, match="alpha"):
        pd_loss_reference(hidden, weight, targets, None, 0.5, "kld", 1.0, 21.0)


def test_fused_alpha_zero_logs_kd_without_gradient():
    hidden, weight, targets, teacher = fused_case(seed=3)
    with_t = run(fused_pd_loss, hidden, weight, targets, teacher, 0.0, "jsd", 1.0, 10.0, chunk_size=7)
    without = run(fused_pd_loss, hidden, weight, targets, None, 0.0, "jsd", 1.0, 10.0, chunk_size=7)
    assert with_t[0].kd_sum.item() > 0
    torch.testing.assert_close(with_t[1], without[1], rtol=0, atol=0)
    torch.testing.assert_close(with_t[2], without[2], rtol=0, atol=0)


def test_fused_ignored_tokens_contribute_nothing():
    hidden, weight, targets, teacher = fused_case(seed=4, ignore_every=3)
    keep = targets != IGNORE_INDEX
    full = run(fused_pd_loss, hidden, weight, targets, teacher, 0.5, "kld", 1.0, 9.0, chunk_size=4)
    sub = run(fused_pd_loss, hidden[keep], weight, targets[keep], teacher[keep], 0.5, "kld", 1.0, 9.0, chunk_size=4)
    torch.testing.assert_close(full[0].loss, sub[0].loss, rtol=1e-12, atol=1e-12)
    assert torch.all(full[1][~keep] == 0)
    torch.testing.assert_close(full[1][keep], sub[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(full[2], sub[2], rtol=1e-10, atol=1e-12)


def test_fused_grad_output_scaling():
    hidden, weight, targets, teacher = fused_case(seed=6)
    args = (targets, teacher, 0.5, "tvd", 2.0, 30.0)
    ref = run(pd_loss_reference, hidden, weight, *args, scale=3.0)
    got = run(fused_pd_loss, hidden, weight, *args, scale=3.0, chunk_size=8)
    check_outputs(got, ref, rtol=1e-10, atol=1e-12)
    # also as part of a larger graph
    hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_pd_loss(hh * 2.0, ww, *args, chunk_size=8)
    (out.loss * -0.5).backward()
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (pd_loss_reference(hr * 2.0, wr, *args).loss * -0.5).backward()
    torch.testing.assert_close(hh.grad, hr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ww.grad, wr.grad, rtol=1e-10, atol=1e-12)


def test_fused_sum_then_divide_halves_add_up():
    hidden, weight, targets, teacher = fused_case(n=30, seed=7)
    norm = float((targets != IGNORE_INDEX).sum())
    args = ("kld", 1.0, norm)
    whole = run(fused_pd_loss, hidden, weight, targets, teacher, 0.5, *args, chunk_size=4)
    a = run(fused_pd_loss, hidden[:13], weight, targets[:13], teacher[:13], 0.5, *args, chunk_size=4)
    b = run(fused_pd_loss, hidden[13:], weight, targets[13:], teacher[13:], 0.5, *args, chunk_size=4)
    torch.testing.assert_close(a[0].loss + b[0].loss, whole[0].loss, rtol=1e-12, atol=1e-12)
    assert a[0].n_tokens + b[0].n_tokens == whole[0].n_tokens
    torch.testing.assert_close(torch.cat([a[1], b[1]]), whole[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a[2] + b[2], whole[2], rtol=1e-10, atol=1e-13)


def test_fused_bf16_inputs():
    hidden, weight, targets, teacher = fused_case(n=40, h=32, vocab=64, dtype=F64, seed=8)
    for kind in ("kld", "reverse_kld"):
        args = (targets, teacher, 0.5, kind, 1.0, 30.0)
        ref = run(pd_loss_reference, hidden, weight, *args)  # float64 truth
        got = run(fused_pd_loss, hidden.bfloat16(), weight.bfloat16(), *args, chunk_size=16)
        assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
        assert got[0].loss.dtype == torch.float32
        torch.testing.assert_close(got[0].loss.double(), ref[0].loss.detach(), rtol=2e-2, atol=1e-3)
        for g, r in ((got[1], ref[1]), (got[2], ref[2])):
            rel = (g.double() - r).norm() / r.norm()
            assert rel < 3e-2, rel


def test_fused_no_grad_and_frozen_inputs():
    hidden, weight, targets, teacher = fused_case(seed=9)
    args = (targets, teacher, 0.5, "jsd", 1.0, 20.0)
    ref = pd_loss_reference(hidden, weight, *args)
    with torch.no_grad():
        out = fused_pd_loss(hidden.requires_grad_(), weight, *args, chunk_size=6)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    hidden.requires_grad_(False)
    out2 = fused_pd_loss(hidden, weight, *args, chunk_size=6)  # nothing requires grad
    assert not out2.loss.requires_grad
    torch.testing.assert_close(out2.kd_sum, ref.kd_sum, rtol=1e-12, atol=1e-12)
    # only the weight trainable (frozen hidden) and only the hidden trainable (frozen head)
    full = run(pd_loss_reference, hidden, weight, *args)
    ww = weight.clone().requires_grad_()
    fused_pd_loss(hidden, ww, *args, chunk_size=6).loss.backward()
    torch.testing.assert_close(ww.grad, full[2], rtol=1e-10, atol=1e-12)
    hh = hidden.clone().requires_grad_()
    fused_pd_loss(hh, weight, *args, chunk_size=6).loss.backward()
    torch.testing.assert_close(hh.grad, full[1], rtol=1e-10, atol=1e-12)


def test_fused_argument_errors():
    hidden, weight, targets, teacher = fused_case(n=5)
    with pytest.raises(ValueError, match="kind"):
        fused_pd_loss(hidden, weight, targets, teacher, 0.5, "kl", 1.0, 5.0)
    with pytest.raises(ValueError, match="temperature"):
        fused_pd_loss(hidden, weight, targets, teacher, 0.5, "kld", 0.0, 5.0)
    with pytest.raises(ValueError, match="normalizer"):
        fused_pd_loss(hidden, weight, targets, teacher, 0.5, "kld", 1.0, 0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_pd_loss(hidden, weight, targets, teacher, 0.5, "kld", 1.0, 5.0, chunk_size=0)
    with pytest.raises(ValueError, match="alpha"):
        fused_pd_loss(hidden, weight, targets, teacher, 1.5, "kld", 1.0, 5.0)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(hidden @ weight.t(), teacher, "kld", -1.0)


@pytest.mark.parametrize("kind,alpha", [("nll", 0.7), ("uld", 0.7), ("kld", 1.0)])
def test_rows_without_teacher_entries_train_on_lm_at_full_weight(kind, alpha):
    """A row whose signal keeps nothing (an unaligned position across tokenizers) has no KD term and an
    LM weight of 1, not 1 - alpha: fused and reference against the formula written out, in float64."""
    hidden, weight, targets, teacher = fused_case()
    empty = torch.zeros(hidden.shape[0], dtype=torch.bool)
    empty[::3] = True
    teacher = SparseLogits(teacher.indices, torch.where(empty.unsqueeze(-1), float("-inf"), teacher.values))
    norm = float((targets != IGNORE_INDEX).sum())
    logits = hidden @ weight.t()
    valid = targets != IGNORE_INDEX
    kd = torch.where(valid & ~empty, distillation_loss(logits, teacher, kind, 1.5), 0.0)
    w = torch.where(empty, 1.0, 1.0 - alpha).double()
    want = float(((w * lm_loss(logits, targets)).sum() + alpha * kd.sum()) / norm)
    args = (targets, teacher, alpha, kind, 1.5, norm)
    ref = run(pd_loss_reference, hidden, weight, *args)
    assert float(ref[0].loss) == pytest.approx(want, rel=1e-12)
    for chunk in (4, 1024):
        check_outputs(run(fused_pd_loss, hidden, weight, *args, chunk_size=chunk), ref, rtol=1e-10, atol=1e-12)
