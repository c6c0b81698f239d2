"""The drawn teacher signals (distill.signal: sampled, head_tail): their draws are a pure function of
(seed, sample id, position), their loss gradient is an unbiased estimate of the full-vocabulary KD
gradient, stores keep them exactly, and colocated, online and offline runs train on the same values."""
from __future__ import annotations

import math

import pytest
import torch

from pd_dist.core.logits import head_tail_signal, sample_keys, sample_signal, target_probs, truncate
from pd_dist.core.losses import distillation_loss


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
    from pd_dist.core.logits import truncate

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
    (["distill.mode=none", "distill.dump_logits=true", "distill.store=/tmp/x"], "cannot be dumped"),
    (["train.pipeline_stages=2", "train.zero_stage=1"], "pipelined"),
    (["distill.samples=0"], "distill.samples"),
    (["generate.top_k=3"], "generate.top_k"),
    (["generate.encoding=qgap"], "generate.encoding"),
])
def test_sampled_signal_config_refusals(sets, needle):
    from conftest import SMOKE
    from pd_dist.config import load_config
    from pd_dist.core.configlib import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, ["distill.signal=sampled", *sets])
    assert needle in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- head_tail
def _reference_p(z: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.softmax(z.double() / tau, -1)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_head_tail_head_is_exact_and_tail_is_unbiased(tau):
    """Head entries carry the teacher's exact probabilities at tau (float64 reference); tail weights
    average to the tail probabilities; the mean gradient over M draws is q - p within 5 standard errors
    (tail variance M_tail^2 r (1 - r) / n), and lies far closer than sampled's at the same n."""
    V, n, M = 13, 6, 4000
    g = torch.Generator().manual_seed(2)
    t_logits = torch.randn(V, generator=g, dtype=torch.float64) * 2
    s_logits = torch.randn(V, generator=g, dtype=torch.float64)
    p = _reference_p(t_logits, tau)
    q = torch.softmax(s_logits, -1)
    keys = sample_keys(9, torch.arange(M), 1).reshape(M)
    sig = head_tail_signal(t_logits.expand(M, V), keys, 0.8, 3, n, tau)
    assert sig.k == 3 + n
    head = truncate(t_logits.reshape(1, V).float(), 0.8, 3)
    h_ids = head.indices[0][head.mask[0]]
    w = torch.zeros(M, V, dtype=torch.float64).scatter_add_(1, sig.indices, target_probs(sig, 1.0).double())
    assert torch.allclose(w[:, h_ids], p[h_ids].expand(M, -1), rtol=1e-6, atol=0)
    assert torch.allclose(w.sum(-1), torch.ones(M, dtype=torch.float64), atol=1e-5)
    tail = torch.ones(V, dtype=torch.bool)
    tail[h_ids] = False
    mass = p[tail].sum()
    r = p / mass
    se = mass * (r * (1 - r) / (n * M)).sqrt()
    assert ((w.mean(0) - p)[tail].abs() <= 5 * se[tail] + 1e-9).all()
    z = s_logits.expand(M, V).clone().requires_grad_(True)
    distillation_loss(z, sig, "nll", 1.0).sum().backward()
    err = z.grad.mean(0) - (q - p)
    assert (err[tail].abs() <= 5 * se[tail] + 1e-6).all() and (err[h_ids].abs() <= 5 * se[tail].max()).all()
    # per draw set, the head-tail gradient is much closer to the exact one than a sampled signal's
    smp = sample_signal(t_logits.expand(M, V), keys, n, tau)
    z2 = s_logits.expand(M, V).clone().requires_grad_(True)
    distillation_loss(z2, smp, "nll", 1.0).sum().backward()
    exact = (q - p).expand(M, V)
    assert ((z.grad - exact) ** 2).sum(-1).mean() < 0.5 * ((z2.grad - exact) ** 2).sum(-1).mean()


def test_head_tail_tail_mass_is_exact_when_the_head_holds_almost_everything():
    """The tail's mass comes from full-vocabulary log-normalizers in float64, not 1 - sum(head): with a
    head holding all but ~1e-9 of the mass the tail weights still sum to the float64 reference mass to
    1e-6 relative (fp32 weights), where 1 - sum(fp32 head) would be off by orders of magnitude."""
    V = 500
    z = torch.randn(2, V, generator=torch.Generator().manual_seed(3)) - 25.0
    z[:, :4] = torch.tensor([0.0, -0.5, -1.0, -1.5])
    sig = head_tail_signal(z, sample_keys(0, torch.arange(2), 1).reshape(2), 1.0, 4, 8, 1.0)
    p = _reference_p(z, 1.0)
    ref_mass = p[:, 4:].sum(-1)
    assert (ref_mass < 1e-8).all()
    w = target_probs(sig, 1.0).double()
    is_tail = sig.mask & (sig.indices >= 4)
    got = (w * is_tail).sum(-1)
    assert torch.allclose(got, ref_mass, rtol=1e-6)
    naive = 1 - (w * (sig.mask & (sig.indices < 4))).float().sum(-1).double()
    assert ((naive - ref_mass).abs() / ref_mass > 1e-2).all()


def test_head_tail_without_a_tail_is_the_exact_distribution():
    z = torch.randn(3, 7, generator=torch.Generator().manual_seed(4))
    sig = head_tail_signal(z, sample_keys(0, torch.arange(3), 1).reshape(3), 1.0, 10, 5, 1.5)
    assert sig.k == 7 + 5 and (sig.counts() == 7).all()
    w = torch.zeros(3, 7, dtype=torch.float64).scatter_add_(1, sig.indices, target_probs(sig, 1.0).double())
    assert torch.allclose(w, _reference_p(z, 1.5), rtol=1e-6)


def test_head_tail_draws_depend_only_on_seed_sample_and_position():
    z = torch.randn(4, 6, 40, generator=torch.Generator().manual_seed(5)) * 2
    ids = torch.tensor([3, 4, 5, 6])
    full = head_tail_signal(z, sample_keys(1, ids, 6), 0.9, 5, 12, 1.0)
    part = head_tail_signal(z[1:3].reshape(-1, 40), sample_keys(1, ids[1:3], 6).reshape(-1), 0.9, 5, 12, 1.0)
    assert torch.equal(part.indices.reshape(2, 6, -1), full.indices[1:3])
    assert torch.equal(part.values.reshape(2, 6, -1), full.values[1:3])
    for r in range(4):
        for t in range(6):
            kept = full.indices[r, t][full.mask[r, t]]
            assert len(set(kept.tolist())) == len(kept)  # tail draws never repeat a head id
    # token 0 in a head that also has dropped slots (which hold index 0): still never drawn again
    z0 = torch.full((50, 30), -3.0)
    z0[:, 0], z0[:, 1:4] = 4.0, torch.randn(50, 3, generator=torch.Generator().manual_seed(6))
    sig = head_tail_signal(z0, sample_keys(2, torch.arange(50), 1).reshape(50), 0.5, 4, 40, 1.0)
    assert (sig.counts() < 4 + 40).all() and ((sig.indices == 0) & sig.mask).sum(-1).eq(1).all()


# ---------------------------------------------------------------------------------------------- stores
def _signal_meta(kind: str, n: int = 16, encoding=None):
    from pd_dist.store import StoreMeta

    sig = {"kind": kind, "samples": n, "temperature": 1.0, "seed": 7}
    top_p, top_k = (1.0, n) if kind == "sampled" else (0.9, 4)
    return StoreMeta(teacher={"name": "t", "config_hash": "c", "weights_hash": "w"}, tokenizer_hash="tok",
                     data_fingerprint="fp", seq_len=24, vocab_size=300, top_p=top_p, top_k=top_k, n_samples=5,
                     shard_size=3, signal=sig, encoding=encoding or {}).resolved()


def _write(root, meta, z):
    from pd_dist.core.logits import SignalSpec
    from pd_dist.store import ShardWriter, shard_ranges, write_manifest

    spec = meta.signal_spec
    assert isinstance(spec, SignalSpec)
    sigs = spec.form(z, sample_keys(spec.seed, torch.arange(len(z)), z.shape[1]))
    for i, (a, b) in enumerate(shard_ranges(meta.n_samples, meta.shard_size)):
        with ShardWriter(root, meta, i) as w:
            for s in range(a, b):
                w.add(s, sigs[s])
            w.finish()
    write_manifest(root, meta)
    return sigs


@pytest.mark.parametrize("kind,encoding", [("sampled", None), ("sampled", {"name": "exact"}),
                                           ("head_tail", {"name": "exact"}), ("head_tail", None)])
def test_a_store_keeps_a_drawn_signal(tmp_path, kind, encoding):
    """Written and read back: bit-identical for the counts and exact encodings, within the qgap value
    tolerance otherwise; verify passes; info reports the signal; the lse is not invented."""
    from pd_dist.store import LogitsStore, store_info, verify_store

    meta = _signal_meta(kind, encoding=encoding)
    if kind == "sampled" and encoding is None:
        assert meta.encoding["name"] == "counts"
    z = torch.randn(5, 24, 300, generator=torch.Generator().manual_seed(6)) * 3
    sigs = _write(tmp_path, meta, z)
    store = LogitsStore(tmp_path)
    got = store.get_batch([0, 1, 2, 3, 4])
    assert got.lse is None and torch.equal(got.indices, sigs.indices)
    if meta.encoding["name"] in ("counts", "exact"):
        assert torch.equal(got.values, sigs.values)
    else:
        m = sigs.mask
        assert torch.equal(got.mask, m)
        assert (got.values[m] - sigs.values[m]).abs().max() <= store.value_tolerance()
    assert verify_store(tmp_path) == []
    info = store_info(tmp_path)
    assert info["format_version"] == 2 and info["signal"]["kind"] == kind and info["signal"]["samples"] == 16
    assert info["signal"]["width"] == meta.width == (16 if kind == "sampled" else 20)


def test_sampled_store_bytes_are_counts_not_floats(tmp_path):
    """The counts encoding stores a sampled signal in fewer bytes than its exact fp32 log weights."""
    z = torch.randn(5, 24, 300, generator=torch.Generator().manual_seed(8)) * 3
    _write(tmp_path / "counts", _signal_meta("sampled"), z)
    _write(tmp_path / "exact", _signal_meta("sampled", encoding={"name": "exact"}), z)
    from pd_dist.store import store_info

    assert store_info(tmp_path / "counts")["shard_bytes"] < store_info(tmp_path / "exact")["shard_bytes"]


def test_a_drawn_store_serves_only_the_same_draws(tmp_path):
    from pd_dist.core.logits import SignalSpec
    from pd_dist.store import StoreError, open_for_training

    meta = _signal_meta("head_tail")
    _write(tmp_path, meta, torch.randn(5, 24, 300, generator=torch.Generator().manual_seed(9)))
    kw = dict(data_fingerprint="fp", tokenizer_hash="tok", seq_len=24, vocab_size=300)
    same = SignalSpec("head_tail", 0.9, 4, 16, 1.0, 7)
    assert open_for_training(tmp_path, signal=same, **kw).get(0).k == 20
    for other, needle in [(SignalSpec("top_p_k", 0.9, 4), "holds the head_tail signal"),
                          (SignalSpec("sampled", 1.0, 16, 16, 1.0, 7), "run asks for sampled"),
                          (SignalSpec("head_tail", 0.9, 4, 16, 1.0, 8), "not re-drawn"),
                          (SignalSpec("head_tail", 0.9, 3, 16, 1.0, 7), "not re-drawn")]:
        with pytest.raises(StoreError, match=needle):
            open_for_training(tmp_path, signal=other, **kw)
    with pytest.raises(StoreError, match="cannot be re-truncated"):
        open_for_training(tmp_path, signal=same, **kw).get(0, top_k=2)


def test_counts_encoding_refuses_values_that_are_not_draw_counts():
    import numpy as np

    from pd_dist.store.codec import CodecError, encode_block

    vals = np.array([[np.log(0.5), np.log(0.3), -np.inf]], np.float32)
    with pytest.raises(CodecError, match="draw count"):
        encode_block(vals, np.array([[1, 2, 0]]), vals[:, 0], 10, {"name": "counts", "samples": 4})


# ------------------------------------------------------------------------------ through the launcher
@pytest.mark.multiproc
@pytest.mark.parametrize("signal", ["sampled", "head_tail"])
def test_a_drawn_signal_trains_the_same_in_all_three_modes(signal, tmp_path, smoke_data, tiny_teacher_dir):
    """The teacher draws by (seed, sample id, position): a teacher in the student's process, a teacher
    rank serving over the bridge and a store (lossless encodings) give the same per-step losses, and the
    drawn signal is what trains. The sampled store is written by the generation job; the head_tail one
    by the online run's teacher as it serves (distill.write_through)."""
    from conftest import launch, read_summary
    from test_offline_launch import _launch_gen

    base = ["train.save_every=0", "train.eval_every=0", "train.log_every=1", "train.steps=3",
            "train.global_batch_size=8", "train.micro_batch_size=4", "distill.alpha.schedule=constant",
            "distill.alpha.value=0.5", f"distill.signal={signal}", "distill.samples=16", "distill.top_k=6",
            f"data.dir={smoke_data.path}", f"teacher.path={tiny_teacher_dir}", "generate.shard_size=500",
            "generate.include_val=false"]
    col, onl, off, store = (tmp_path / d for d in ("colocated", "online", "offline", "store"))
    online = base + [f"output_dir={onl}", "distill.mode=online"]
    if signal == "head_tail":
        online += [f"distill.write_through={store}", "generate.encoding=exact"]
    outs = [launch(1, base + [f"output_dir={col}", "distill.mode=colocated"], cwd=tmp_path),
            launch(2, online, cwd=tmp_path)]
    if signal == "sampled":
        _launch_gen(1, base + [f"distill.store={store}"], cwd=tmp_path)
    outs.append(launch(1, base + [f"output_dir={off}", "distill.mode=offline", f"distill.store={store}"],
                       cwd=tmp_path))
    want = "16 draws at tau 1" if signal == "sampled" else "top-0.95-6 head + 16 draws at tau 1"
    for p in outs:
        assert f"({want})" in p.stdout + p.stderr  # the signal is the drawn one
    a = read_summary(col)
    for other in (onl, off):
        assert read_summary(other)["losses"] == pytest.approx(a["losses"], rel=1e-5)
