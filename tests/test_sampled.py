"""The sampled teacher signal (distill.signal: sampled): its draws are a pure function of (seed, sample
id, position), and its loss gradient is an unbiased estimate of the full-vocabulary KD gradient."""
from __future__ import annotations

import math

import pytest
import torch

from pd_dist.logits import sample_keys, sample_signal, target_probs
from pd_dist.losses import distillation_loss


def test_draws_depend_only_on_seed_sample_and_position():
    z = torch.randn(4, 6, 13, generator=torch.Generator().manual_seed(0)) * 2
    ids = torch.tensor([10, 11, 12, 13])
    full = sample_signal(z, sample_keys(5, ids, 6), 20, 1.0)
    # another batching, another chunking: the same draws
    part = sample_signal(z[2:].reshape(-1, 13), sample_keys(5, ids[2:], 6).reshape(-1), 20, 1.0)
    assert torch.equal(part.indices.reshape(2, 6, 20), full.indices[2:])
    assert torch.equal(part.values.reshape(2, 6, 20), full.values[2:])
    other = sample_signal(z, sample_keys(6, ids, 6), 20, 1.0)  # another seed: other draws
    assert not torch.equal(other.indices, full.indices)
    w = target_probs(full, 1.0)
    assert torch.allclose(w.sum(-1), torch.ones(4, 6))
    counts = (w * 20).round()
    assert torch.allclose(w * 20, counts, atol=1e-5)  # weights are counts / n
    # distinct kept ids per position, sorted by weight
    for r in range(4):
        for t in range(6):
            kept = full.indices[r, t][full.mask[r, t]]
            assert len(set(kept.tolist())) == len(kept)
            assert (full.values[r, t][full.mask[r, t]].diff() <= 0).all()


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sampled_kd_gradient_is_unbiased(tau):
    """Mean over M independent draws of d/dz [-sum_i w_i log q_i] converges to the full-vocabulary
    gradient q - p_tau; checked per component within 5 standard errors (variance p(1-p)/(n M))."""
    V, n, M = 11, 8, 4000
    g = torch.Generator().manual_seed(1)
    t_logits = torch.randn(V, generator=g, dtype=torch.float64) * 2
    s_logits = torch.randn(V, generator=g, dtype=torch.float64)
    p = torch.softmax(t_logits / tau, -1)
    q = torch.softmax(s_logits, -1)
    signal = sample_signal(t_logits.expand(M, V), sample_keys(3, torch.arange(M), 1).reshape(M), n, tau)
    z = s_logits.expand(M, V).clone().requires_grad_(True)
    distillation_loss(z, signal, "nll", 1.0).sum().backward()
    mean = z.grad.mean(0)
    exact = q - p
    se = (p * (1 - p) / (n * M)).sqrt()
    assert ((mean - exact).abs() <= 5 * se + 1e-9).all(), (mean - exact) / se
    # and the loss value estimates the cross-entropy
    ce = -(p * q.log()).sum().item()
    est = distillation_loss(s_logits.expand(M, V), signal, "nll", 1.0)
    assert abs(est.mean().item() - ce) <= 5 * est.std().item() / math.sqrt(M)
    # a top-k truncation of the same teacher is biased: its gradient misses the tail
    from pd_dist.logits import truncate

    top = truncate(t_logits.expand(1, V).float(), 1.0, 3)
    z1 = s_logits.float().reshape(1, V).clone().requires_grad_(True)
    distillation_loss(z1, top, "nll", tau).sum().backward()
    assert ((z1.grad[0].double() - exact).abs() > 10 * se).any()


def test_bad_arguments_are_refused():
    z = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1, got 0"):
        sample_signal(z, torch.zeros(2, dtype=torch.int64), 0, 1.0)
    with pytest.raises(ValueError, match="keys shape"):
        sample_signal(z, torch.zeros(3, dtype=torch.int64), 4, 1.0)


@pytest.mark.parametrize("sets,needle", [
    (["distill.loss=mse"], "distill.loss"),
    (["distill.mode=offline", "distill.store=/tmp/x"], "is not stored yet"),
    (["train.pipeline_stages=2", "train.zero_stage=1"], "pipelined"),
    (["distill.samples=0"], "distill.samples"),
])
def test_sampled_signal_config_refusals(sets, needle):
    from conftest import SMOKE
    from pd_dist.config import load_config
    from pd_dist.configlib import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, ["distill.signal=sampled", *sets])
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.multiproc
def test_online_sampled_signal_matches_colocated(tmp_path, smoke_data, tiny_teacher_dir):
    """The teacher draws by (seed, sample id, position): a teacher rank serving a student over the
    bridge gives the losses of a teacher in the student's process; and the draws are what trains."""
    from conftest import launch, read_summary

    base = ["train.save_every=0", "train.eval_every=0", "train.log_every=1", "train.steps=4",
            "train.global_batch_size=8", "train.micro_batch_size=4", "distill.alpha.schedule=constant",
            "distill.alpha.value=0.5", "distill.signal=sampled", "distill.samples=16",
            f"data.dir={smoke_data.path}", f"teacher.path={tiny_teacher_dir}"]
    col, onl = tmp_path / "colocated", tmp_path / "online"
    outs = [launch(1, base + [f"output_dir={col}", "distill.mode=colocated"], cwd=tmp_path),
            launch(2, base + [f"output_dir={onl}", "distill.mode=online"], cwd=tmp_path)]
    for p in outs:
        assert "(16 sampled draws/token)" in p.stdout + p.stderr  # the signal is the sampled one
    a, b = read_summary(col), read_summary(onl)
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)
