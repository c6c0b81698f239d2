"""Store fidelity metrics (pd_dist.core.fidelity) against float64 references written out per position."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch


def _ref(z, idx, vals, mask, tau, loss_tau):
    """numpy, one position at a time."""
    p = np.exp(z / tau - np.logaddexp.reduce(z / tau))
    kept = idx[mask]
    w = vals[mask] / loss_tau
    qk = np.exp(w - np.logaddexp.reduce(w))
    q = np.zeros_like(p)
    q[kept] = qk
    head = p[kept].sum()
    tv = 0.5 * np.abs(p - q).sum()
    rev = sum(qi * math.log(qi / p[i]) for i, qi in zip(kept, qk))
    qt = np.full_like(p, (1 - head) / (len(p) - len(kept)))
    qt[kept] = qk * head
    fwd = float((p * (np.log(p) - np.log(qt))).sum())
    m = 0.5 * (p + q)
    jsd = 0.5 * (p * np.log(p / m)).sum() + 0.5 * sum(q[i] * math.log(q[i] / m[i]) for i in kept)
    return {"head_mass": head, "tv": tv, "reverse_kl": rev, "forward_kl": fwd, "jsd": jsd}


@pytest.mark.parametrize("tau,loss_tau", [(1.0, 1.0), (2.0, 2.0), (1.5, 1.0)])
def test_fidelity_metrics_against_a_float64_reference(tau, loss_tau):
    from pd_dist.core.fidelity import signal_fidelity
    from pd_dist.core.logits import truncate

    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 40, generator=g, dtype=torch.float64) * 2.5
    sig = truncate(z.float(), 0.8, 7)
    got = signal_fidelity(z, sig, tau, loss_tau)
    for r in range(6):
        want = _ref(z[r].numpy(), sig.indices[r].numpy(), sig.values[r].double().numpy(), sig.mask[r].numpy(),
                    tau, loss_tau)
        for k, v in want.items():
            assert float(got[k][r]) == pytest.approx(v, rel=1e-9, abs=1e-12), (k, r)
    # an untruncated signal is the distribution itself
    full = truncate(z.float(), 1.0, 40)
    same = signal_fidelity(z, full, tau, tau)
    for k in ("tv", "reverse_kl", "forward_kl", "jsd"):
        assert float(same[k].abs().max()) < 1e-6, k
    assert float((same["head_mass"] - 1).abs().max()) < 1e-12


def test_empty_rows_are_nan_and_left_out_of_means():
    from pd_dist.core.fidelity import mean_fidelity, signal_fidelity
    from pd_dist.core.logits import SparseLogits, truncate

    z = torch.randn(3, 10, dtype=torch.float64)
    sig = truncate(z.float(), 0.9, 3)
    vals = sig.values.clone()
    vals[1] = float("-inf")
    got = signal_fidelity(z, SparseLogits(sig.indices, vals), 1.0, 1.0)
    assert math.isnan(float(got["tv"][1])) and not math.isnan(float(got["tv"][0]))
    means = mean_fidelity([got])
    assert means["tv"] == pytest.approx(float((got["tv"][0] + got["tv"][2]) / 2))
