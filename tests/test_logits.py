"""Tests for pd_dist.core.logits: top-p-k truncation semantics and teacher target probabilities."""
import math

import numpy as np
import pytest
import torch

from pd_dist.core.logits import SparseLogits, target_probs, truncate, truncate_reference

NEG_INF = float("-inf")


def expected_kept_f64(row, top_p, top_k):
    """Independent float64 (numpy) definition for one row: list of kept values, descending.
    Top-p on the full softmax (smallest prefix whose mass reaches top_p, crossing token included,
    at least one), then the first top_k of that prefix; -inf entries are never kept."""
    x = np.asarray(row, dtype=np.float64)
    finite = x[np.isfinite(x)]
    order = np.sort(finite)[::-1]
    if top_p >= 1.0:
        kept = order
    else:
        p = np.exp(order - order.max())
        p /= p.sum()
        before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
        kept = order[before < top_p]
    return list(kept[:top_k])


def check_consistent(logits, sp, k_width):
    """Structural invariants: width, sorted kept prefix, dropped = (-inf, 0), kept values bit-equal to
    the input at their indices."""
    assert sp.k == k_width
    assert sp.indices.dtype == torch.int64 and sp.values.dtype == torch.float32
    assert sp.values.shape == (*logits.shape[:-1], k_width)
    mask = sp.mask
    # kept entries form a prefix
    assert torch.equal(mask, mask.cummin(-1).values)
    assert torch.all(sp.indices[~mask] == 0)
    assert torch.all(sp.values[~mask] == NEG_INF)
    gathered = logits.float().gather(-1, sp.indices)
    assert torch.equal(torch.where(mask, gathered, sp.values), sp.values)
    # descending
    v = torch.where(mask, sp.values, torch.full_like(sp.values, -1e30))
    assert torch.all(v[..., :-1] >= v[..., 1:])
    # no repeated index among kept entries
    flat_i, flat_m = sp.indices.reshape(-1, k_width), mask.reshape(-1, k_width)
    for i, m in zip(flat_i, flat_m):
        assert len(set(i[m].tolist())) == int(m.sum())


def assert_same(a: SparseLogits, b: SparseLogits, exact_indices=True):
    assert torch.equal(a.values, b.values)
    if exact_indices:
        assert torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("top_p,top_k", [(0.9, 20), (0.5, 5), (0.99, 64), (1.0, 7), (0.3, 1), (0.95, 200)])
def test_matches_reference_random(top_p, top_k):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 200, generator=g) * 3
    ours, ref = truncate(logits, top_p, top_k), truncate_reference(logits, top_p, top_k)
    check_consistent(logits, ours, min(top_k, 200))
    assert_same(ours, ref)  # continuous random values: no ties, so indices must agree too
    for row, vals in zip(logits, ours.values):
        exp = expected_kept_f64(row.numpy(), top_p, top_k)
        got = vals[vals > NEG_INF].double().numpy()
        np.testing.assert_array_equal(got, np.asarray(exp))


def test_hand_computed_float64_case():
    probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15])  # shuffled on purpose
    logits = torch.tensor(np.log(probs), dtype=torch.float32)
    # sorted: 0.5, 0.2, 0.15, 0.1, 0.05; mass before each: 0, .5, .7, .85, .95
    cases = {(0.4, 5): [1], (0.6, 5): [1, 3], (0.75, 5): [1, 3, 4], (0.9, 5): [1, 3, 4, 2],
             (0.96, 5): [1, 3, 4, 2, 0], (0.9, 2): [1, 3], (1.0, 3): [1, 3, 4]}
    for (p, k), idx in cases.items():
        sp = truncate(logits, p, k)
        n = len(idx)
        assert sp.counts().item() == n, (p, k)
        assert sp.indices[:n].tolist() == idx
        assert torch.equal(sp.values[:n], logits[idx])
        assert torch.all(sp.values[n:] == NEG_INF)
        assert_same(sp, truncate_reference(logits, p, k))


def test_all_equal_logits_keep_ceil_p_times_v():
    v = 10
    logits = torch.full((3, v), 1.25)
    for p in (0.05, 0.31, 0.55, 0.77, 0.99):  # p*V never (nearly) an integer
        sp = truncate(logits, p, v)
        want = math.ceil(p * v)
        assert sp.counts().tolist() == [want] * 3, p
        assert torch.all(sp.values[sp.mask] == 1.25)
        check_consistent(logits, sp, v)
        assert torch.equal(sp.counts(), truncate_reference(logits, p, v).counts())
    # top-k caps the top-p prefix
    assert truncate(logits, 0.77, 3).counts().tolist() == [3, 3, 3]


def test_ties():
    logits = torch.tensor([[3.0, 1.0, 3.0, 0.0, 3.0, 1.0, 1.0, -2.0]])
    for p, k in [(0.5, 8), (0.9, 8), (0.97, 4), (0.999, 8), (0.1, 2)]:
        sp = truncate(logits, p, k)
        check_consistent(logits, sp, k)
        ref = truncate_reference(logits, p, k)
        # which of several tied indices is kept at a cut is unspecified: compare values and counts
        assert_same(sp, ref, exact_indices=False)
        exp = expected_kept_f64(logits[0].numpy(), p, k)
        assert sp.values[0][sp.mask[0]].tolist() == exp


def test_top_p_one_keeps_everything_up_to_k():
    logits = torch.randn(4, 30)
    sp = truncate(logits, 1.0, 30)
    assert sp.counts().tolist() == [30] * 4
    assert torch.equal(sp.values, logits.sort(-1, descending=True).values)
    # ... even with a very peaked distribution where a float cumsum saturates before the tail
    peaked = torch.tensor([[100.0, 0.0, -50.0, -80.0]])
    assert truncate(peaked, 1.0, 4).counts().item() == 4
    assert truncate(peaked, 0.999999, 4).counts().item() == 1


def test_k_equals_vocab_k_one_and_k_beyond_vocab():
    logits = torch.randn(5, 12)
    full = truncate(logits, 1.0, 12)
    assert full.k == 12 and full.counts().tolist() == [12] * 5
    one = truncate(logits, 0.9, 1)
    assert one.k == 1
    assert torch.equal(one.indices[:, 0], logits.argmax(-1))
    assert torch.equal(one.values[:, 0], logits.max(-1).values)
    wide = truncate(logits, 0.8, 100)  # width clamps to V
    assert wide.k == 12
    assert_same(wide, truncate_reference(logits, 0.8, 100))
    assert_same(wide, truncate(logits, 0.8, 12))


def test_leading_dims():
    logits = torch.randn(2, 3, 40) * 2
    sp = truncate(logits, 0.8, 10)
    assert sp.shape == (2, 3) and sp.values.shape == (2, 3, 10)
    flat = truncate(logits.reshape(6, 40), 0.8, 10)
    assert_same(sp.reshape(6), flat)
    assert_same(sp, truncate_reference(logits, 0.8, 10))


def test_bf16_input_kept_values_exact_fp32():
    logits = (torch.randn(4, 300) * 4).bfloat16()
    sp = truncate(logits, 0.9, 16)
    assert sp.values.dtype == torch.float32
    check_consistent(logits, sp, 16)
    ref = truncate_reference(logits.float(), 0.9, 16)
    # bf16 logits have many ties; values and counts must still agree with the fp32 reference
    assert_same(sp, ref, exact_indices=False)


def test_neg_inf_inputs():
    logits = torch.tensor([
        [1.0, NEG_INF, 0.5, NEG_INF, -1.0, NEG_INF],
        [NEG_INF, NEG_INF, 2.0, NEG_INF, NEG_INF, NEG_INF],
        [NEG_INF] * 6,
    ])
    for p in (1.0, 0.999, 0.5):
        sp = truncate(logits, p, 5)
        check_consistent(logits, sp, 5)
        assert_same(sp, truncate_reference(logits, p, 5))
        for r in range(2):
            assert sp.values[r][sp.mask[r]].tolist() == expected_kept_f64(logits[r].numpy(), p, 5)
        assert sp.counts()[2].item() == 0
    assert truncate(logits, 1.0, 5).counts().tolist() == [3, 1, 0]
    tp = target_probs(truncate(logits, 1.0, 5), 1.0)
    assert torch.isfinite(tp).all() and tp[2].sum() == 0


def test_target_probs_vs_float64_softmax():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 60, generator=g) * 2.5
    sp = truncate(logits, 0.8, 12)
    for tau in (0.5, 1.0, 2.0, 7.0):
        tp = target_probs(sp, tau)
        assert tp.dtype == torch.float32
        for r in range(5):
            kept = sp.values[r][sp.mask[r]].double().numpy() / tau
            e = np.exp(kept - kept.max())
            exp = e / e.sum()
            n = len(kept)
            np.testing.assert_allclose(tp[r, :n].double().numpy(), exp, rtol=1e-6, atol=1e-7)
            assert torch.all(tp[r, n:] == 0)
        np.testing.assert_allclose(tp.sum(-1).numpy(), 1.0, rtol=1e-6)


def test_temperature_flattens_targets():
    sp = truncate(torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]), 1.0, 5)
    ent = []
    for tau in (0.25, 1.0, 4.0, 100.0):
        p = target_probs(sp, tau).double()
        ent.append(float(-(p * p.clamp_min(1e-300).log()).sum()))
    assert ent == sorted(ent) and ent[0] < 0.1 and abs(ent[-1] - math.log(5)) < 1e-3
    # low temperature approaches one-hot on the top entry
    assert target_probs(sp, 0.05)[0, 0] > 0.999


def test_argument_errors():
    x = torch.randn(2, 10)
    for p in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="top_p"):
            truncate(x, p, 3)
        with pytest.raises(ValueError, match="top_p"):
            truncate_reference(x, p, 3)
    for k in (0, -2, 2.5):
        with pytest.raises(ValueError, match="top_k"):
            truncate(x, 0.9, k)
    sp = truncate(x, 0.9, 3)
    for tau in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            target_probs(sp, tau)
    with pytest.raises(ValueError):
        SparseLogits(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 4))


def test_sparse_logits_container_ops():
    logits = torch.randn(2, 3, 20)
    sp = truncate(logits, 0.7, 4)
    assert sp.k == 4 and sp.shape == (2, 3)
    assert torch.equal(sp.counts(), sp.mask.sum(-1))
    half = sp.to(dtype=torch.bfloat16)
    assert half.values.dtype == torch.bfloat16 and half.indices.dtype == torch.int64
    assert torch.equal(half.mask, sp.mask)  # -inf survives the cast
    flat = sp.reshape(-1)
    assert flat.values.shape == (6, 4) and sp.reshape((3, 2)).values.shape == (3, 2, 4)
    assert_same(sp[1], SparseLogits(sp.indices[1], sp.values[1]))
    assert_same(flat[2:5], SparseLogits(flat.indices[2:5], flat.values[2:5]))
    cat = SparseLogits.cat([flat[:2], flat[2:]])
    assert_same(cat, flat)
    with pytest.raises(IndexError):
        sp[..., 0]


@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_lse_is_the_full_vocabulary_logsumexp(top_p):
    x = torch.randn(5, 3, 301, dtype=torch.float64) * 4
    sparse = truncate(x.float(), top_p, 7, keep_lse=True)
    lse = sparse.lse
    assert lse.shape == (5, 3) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(x, -1), rtol=0, atol=1e-5)
    plain = truncate(x.float(), top_p, 7)
    assert torch.equal(sparse.values, plain.values) and torch.equal(sparse.indices, plain.indices)
    # top-p needs the normalizer anyway, so it always travels with the result; top_p = 1 skips it.
    assert (plain.lse is None) == (top_p == 1.0)
    # lse follows the leading dims through indexing, reshape, cat and moves.
    assert torch.equal(sparse[1:3].lse, lse[1:3]) and torch.equal(sparse.reshape(-1).lse, lse.reshape(-1))
    assert torch.equal(SparseLogits.cat([sparse[:2], sparse[2:]]).lse, lse)
    assert SparseLogits.cat([sparse[:2], sparse[2:].without_lse()]).lse is None
    with pytest.raises(ValueError, match="lse shape"):
        SparseLogits(sparse.indices, sparse.values, lse[:, :2])
