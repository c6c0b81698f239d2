"""The teacher signal's one description (pd_dist.core.logits.SignalSpec): a class per kind in one
registry, which config validation, the wire's handshake, a store's manifest and the compatibility check
only look kinds up in, so a new kind is one class."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from pd_dist.core.logits import HeadTail, Sampled, SignalSpec, SparseLogits, TopPK


@dataclass(frozen=True)
class Greedy(SignalSpec, kind="greedy", code=7):
    """The class docstring's worked example: the arg-max token alone, with weight 1."""
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


SignalSpec.unregister("greedy")  # registered by the class statement; the fixture registers it per test


@pytest.fixture
def greedy():
    """Greedy registered for one test only."""
    SignalSpec.registry["greedy"] = Greedy
    yield Greedy
    SignalSpec.unregister("greedy")


def test_the_registry_builds_each_kind_and_keeps_the_positional_form():
    assert SignalSpec.of("top_p_k", top_p=0.9, top_k=5, samples=3) == TopPK(0.9, 5)
    assert SignalSpec("head_tail", 0.9, 4, 16, 1.0, 7) == HeadTail(0.9, 4, 16, 1.0, 7)
    assert SignalSpec("sampled", 1.0, 16, 16, 2.0, 7) == Sampled(16, 2.0, 7)
    assert isinstance(SignalSpec.of("sampled"), SignalSpec)
    assert [SignalSpec.cls_of(k).code for k in ("top_p_k", "sampled", "head_tail")] == [0, 1, 2]
    with pytest.raises(ValueError, match="signal kind must be one of top_p_k, sampled, head_tail.*'nope'"):
        SignalSpec.of("nope")
    with pytest.raises(TypeError, match="topk"):
        SignalSpec.of("top_p_k", topk=3)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1, got 0"):
        SignalSpec.of("head_tail", top_k=0)
    with pytest.raises(ValueError, match="wire code 1 is 'sampled'"):
        type("Clash", (SignalSpec,), {}, kind="clash", code=1)
    with pytest.raises(ValueError, match="registered already"):
        type("Again", (SignalSpec,), {}, kind="sampled", code=99)


def test_each_kind_says_what_it_can_serve():
    v = 1000
    wide = TopPK(0.95, 50)
    assert wide.cannot_serve(TopPK(0.9, 20, temperature=2.0), v) is None  # narrowed on load; tau is the loss's
    assert "top_k=50 entries per token, fewer than the asked top_k=60" in wide.cannot_serve(TopPK(0.95, 60), v)
    assert "narrower than the asked top_p=0.99" in wide.cannot_serve(TopPK(0.99, 50), v)
    assert TopPK(0.95, 5000).cannot_serve(TopPK(0.95, 2000), v) is None  # both the whole vocabulary wide
    ht = HeadTail(0.9, 4, 16, 1.0, 7)
    assert ht.cannot_serve(HeadTail(0.9, 4, 16, 1.0, 7), v) is None
    for other in (HeadTail(0.9, 3, 16, 1.0, 7), HeadTail(0.9, 4, 16, 1.0, 8), HeadTail(0.9, 4, 16, 2.0, 7)):
        assert "not re-drawn" in ht.cannot_serve(other, v)
    assert "holds the sampled signal" in Sampled(16).cannot_serve(TopPK(), v)
    assert Sampled(16, 1.0, 3).cannot_serve(Sampled(16, 1.0, 3), v) is None
    assert "not re-drawn" in Sampled(16, 1.0, 3).cannot_serve(Sampled(8, 1.0, 3), v)


def test_store_fields_round_trip_and_keep_the_older_manifest_form():
    for spec in (TopPK(0.9, 12), Sampled(16, 1.5, 3), HeadTail(0.8, 4, 8, 1.0, 2)):
        back = SignalSpec.from_store(*spec.store_fields())
        assert back.store_fields() == spec.store_fields() and back.kind == spec.kind
    assert TopPK(0.9, 12).store_fields() == (0.9, 12, {})  # format 1: no signal object
    assert Sampled(16, 1.5, 3).store_fields() == (1.0, 16, {"kind": "sampled", "samples": 16,
                                                             "temperature": 1.5, "seed": 3})
    assert SignalSpec.from_store(0.9, 12, None) == TopPK(0.9, 12)


def test_a_kind_registered_in_a_test_reaches_config_wire_and_store(greedy, tmp_path):
    from conftest import SMOKE
    from pd_dist.cluster.bridge import WireSpec
    from pd_dist.config import load_config
    from pd_dist.store import LogitsStore, ShardWriter, StoreError, StoreMeta, write_manifest
    from pd_dist.teacher.inference import sparse_logits_from_hidden

    assert "greedy" in SignalSpec.kinds()
    cfg = load_config(SMOKE, ["distill.signal=greedy", "distill.loss=kld"])
    spec = cfg.distill.signal_spec(cfg.train.seed)
    assert spec == greedy(temperature=cfg.distill.temperature) and cfg.distill.loss_temperature == 1.0
    with pytest.raises(ValueError, match="distill.signal.*greedy2"):
        load_config(SMOKE, ["distill.signal=greedy2"])

    wire = WireSpec(vocab_size=97, tokenizer_hash="t", seq_len=6, signal=spec, value_dtype="fp32",
                    micro_batch=2, n_samples=10)
    hello = dict(zip(("magic", "version", "vocab_size", "tokenizer_hash", "seq_len", "top_k", "top_p_x1e6",
                      "value_dtype", "micro_batch", "index_bytes", "signal"), wire.hello().tolist()))
    assert (hello["signal"], hello["top_k"], hello["top_p_x1e6"], wire.width) == (7, 1, 0, 1)

    hidden, head = torch.randn(2, 6, 8), torch.randn(97, 8)
    got = sparse_logits_from_hidden(hidden, head, spec, chunk_size=5)
    assert torch.equal(got.indices[..., 0], (hidden @ head.T).argmax(-1))

    meta = StoreMeta.for_signal(spec, teacher={"name": "t", "config_hash": "c", "weights_hash": "w"},
                                tokenizer_hash="tok", data_fingerprint="fp", seq_len=6, vocab_size=97,
                                n_samples=2, shard_size=2, encoding={"name": "exact"}).resolved()
    assert meta.signal == {"kind": "greedy"} and meta.width == 1
    assert StoreMeta.from_dict(meta.to_dict()).signal_spec == greedy()
    with ShardWriter(tmp_path, meta, 0) as w:
        for s in range(2):
            w.add(s, got[s])
        w.finish()
    write_manifest(tmp_path, meta)
    store = LogitsStore(tmp_path)
    kw = dict(data_fingerprint="fp", tokenizer_hash="tok", seq_len=6, vocab_size=97)
    store.check_compatible(signal=greedy(), **kw)
    assert torch.equal(store.get(1).indices, got[1].indices)
    with pytest.raises(StoreError, match="holds the greedy signal"):
        store.check_compatible(signal=TopPK(), **kw)


def test_the_toy_kind_is_gone_after_its_test():
    assert "greedy" not in SignalSpec.kinds()
    with pytest.raises(ValueError, match="got 'greedy'"):
        SignalSpec.of("greedy")
