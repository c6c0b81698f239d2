"""Cross-tokenizer alignment in byte space and the teacher-to-student vocabulary projection
(pd_dist.core.crosstok), against brute-force references."""
from __future__ import annotations

import numpy as np
import pytest

from pd_dist.core.crosstok import (align_positions, byte_ends, byte_level_token_bytes, project_probs,
                                   vocab_projection)


def _segment(data: bytes, rng, max_len: int) -> list[bytes]:
    """A random cut of ``data`` into non-empty pieces of at most max_len bytes."""
    out, i = [], 0
    while i < len(data):
        n = int(rng.integers(1, max_len + 1))
        out.append(data[i:i + n])
        i += n
    return out


def _align_brute(student: list[bytes], teacher: list[bytes]) -> list[int]:
    """For each student prefix, the teacher prefix with the same bytes (by comparing the strings)."""
    prefixes = {b"".join(teacher[:j + 1]): j for j in range(len(teacher))}
    return [prefixes.get(b"".join(student[:i + 1]), -1) for i in range(len(student))]


@pytest.mark.parametrize("seed", range(8))
def test_alignment_matches_a_brute_force_prefix_comparison(seed):
    rng = np.random.default_rng(seed)
    text = bytes(rng.integers(0, 256, int(rng.integers(1, 400))).astype(np.uint8))
    student = _segment(text, rng, int(rng.integers(1, 6)))
    teacher = _segment(text, rng, int(rng.integers(1, 9)))
    got = align_positions(byte_ends(student), byte_ends(teacher))
    assert got.tolist() == _align_brute(student, teacher)
    assert got[-1] == len(teacher) - 1  # the whole text is a common prefix
    # A teacher that cuts exactly like the student aligns everywhere.
    assert align_positions(byte_ends(student), byte_ends(student)).tolist() == list(range(len(student)))


def test_alignment_refusals():
    with pytest.raises(ValueError, match="token 1 covers no bytes"):
        byte_ends([b"a", b"", b"c"])
    with pytest.raises(ValueError, match="teacher_ends must be one strictly increasing row"):
        align_positions(np.array([1, 2]), np.array([2, 2]))
    assert align_positions(np.array([1, 3]), np.array([], np.int64)).tolist() == [-1, -1]


@pytest.fixture(scope="module")
def two_bpes(tmp_path_factory):
    """Two byte-level BPEs trained by pd-dist's own trainer on different halves of one corpus."""
    from pd_dist.data import load_tokenizer
    from pd_dist.data.prepare import train_tokenizer

    rng = np.random.default_rng(0)
    words = ["".join(chr(c) for c in rng.integers(97, 123, int(rng.integers(2, 8)))) for _ in range(300)]
    lines = [" ".join(rng.choice(words, 12)) + ("\n" if i % 3 else ". Ünïcødé ✓\n") for i in range(3000)]
    root = tmp_path_factory.mktemp("bpes")
    train_tokenizer(lines[:1500], 400, root / "a")
    train_tokenizer(lines[1500:], 300, root / "b")
    return load_tokenizer(root / "a"), load_tokenizer(root / "b"), lines, root


def _table(tok):
    return byte_level_token_bytes(tok.get_vocab(), tok.all_special_tokens)


def test_token_bytes_of_real_tokenizers_rebuild_the_text_and_align(two_bpes):
    a, b, lines, _ = two_bpes
    ta, tb = _table(a), _table(b)
    text = "".join(lines[2990:])
    sa = [ta[i] for i in a(text)["input_ids"]]
    sb = [tb[i] for i in b(text)["input_ids"]]
    assert b"".join(sa) == b"".join(sb) == text.encode()
    got = align_positions(byte_ends(sb), byte_ends(sa))
    assert got.tolist() == _align_brute(sb, sa)
    assert 0.3 < (got >= 0).mean() < 1.0  # different merges: many boundaries shared, not all
    assert ta[a.eos_token_id] is None


def test_projection_maps_to_the_longest_student_prefix(two_bpes):
    a, b, _, _ = two_bpes
    ta, tb = _table(a), _table(b)
    target, exact = vocab_projection(ta, tb)
    student = {s: i for i, s in enumerate(tb) if s}
    for t, s in enumerate(ta):
        if s is None:
            assert target[t] == -1
            continue
        prefixes = [n for n in range(1, len(s) + 1) if s[:n] in student]
        want = student[s[:max(prefixes)]] if prefixes else -1
        assert target[t] == want and exact[t] == (s in student), (t, s)
    assert exact.mean() > 0.5  # most strings are shared by BPEs of similar text
    with pytest.raises(ValueError, match="not in the byte-level alphabet"):
        byte_level_token_bytes({"a": 0, "\u4e00": 1})


@pytest.mark.parametrize("seed", range(4))
def test_projection_keeps_the_mass(seed):
    """Float64: each row's projected probabilities plus its unmapped mass equal its input mass; ids
    that map to one student token are summed; the result equals a dense scatter-add."""
    rng = np.random.default_rng(seed)
    V_t, V_s, N, k = 50, 20, 30, 8
    target = rng.integers(-1, V_s, V_t)  # -1: unmapped teacher tokens
    idx = np.stack([rng.choice(V_t, k, replace=False) for _ in range(N)])
    p = rng.dirichlet(np.ones(k), N) * rng.uniform(0.5, 1.0, (N, 1))  # truncated: rows sum below 1
    p[:, -2:] = np.where(rng.random((N, 2)) < 0.3, 0.0, p[:, -2:])  # empty slots
    ids, mass, lost = project_probs(idx, p, target)
    np.testing.assert_allclose(mass.sum(1) + lost, p.sum(1), rtol=0, atol=1e-12)
    dense = np.zeros((N, V_s))
    for r in range(N):
        for j in range(k):
            if target[idx[r, j]] >= 0:
                dense[r, target[idx[r, j]]] += p[r, j]
    got = np.zeros((N, V_s))
    for r in range(N):
        np.add.at(got[r], ids[r], mass[r])
    np.testing.assert_allclose(got, dense, rtol=0, atol=1e-12)
    assert (np.diff(mass, axis=1) <= 0).all()  # sorted descending, zero padding last
    np.testing.assert_allclose(lost, np.where(target[idx] < 0, p, 0).sum(1), atol=1e-12)
    with pytest.raises(ValueError, match=r"teacher ids must lie in \[0, 50\)"):
        project_probs(idx + 50, p, target)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_projected_signal_equals_the_numpy_projection_and_feeds_the_kd_losses(temperature):
    """project_signal (torch, any leading shape) against project_probs on target_probs; rows with
    nothing kept project to nothing; a KD loss at temperature 1 on the result targets p' / mapped."""
    import torch

    from pd_dist.core.crosstok import project_signal
    from pd_dist.core.logits import SparseLogits, target_probs
    from pd_dist.core.losses import distillation_loss

    rng = np.random.default_rng(1)
    V_t, V_s, k = 60, 25, 7
    target = rng.integers(-1, V_s, V_t)
    idx = torch.from_numpy(np.stack([rng.choice(V_t, k, replace=False) for _ in range(2 * 5)])).reshape(2, 5, k)
    val = torch.from_numpy(np.sort(rng.normal(0, 3, (2, 5, k)), -1)[..., ::-1].copy()).float()
    val[..., -2:] = torch.where(torch.rand(2, 5, 2) < 0.4, float("-inf"), val[..., -2:])
    val[1, 3] = float("-inf")  # a row with nothing kept
    sig = SparseLogits(idx, val)
    out, mapped = project_signal(sig, torch.from_numpy(target), temperature)
    assert out.values.shape == (2, 5, k) and mapped.shape == (2, 5)
    p = target_probs(sig, temperature).double().reshape(-1, k).numpy()
    ids, mass, lost = project_probs(idx.reshape(-1, k).numpy(), p, target, width=k)
    got_p = torch.where(out.mask, out.values.double().exp(), torch.zeros((), dtype=torch.float64))
    np.testing.assert_allclose(got_p.reshape(-1, k).numpy(), mass, rtol=1e-6, atol=1e-7)
    keep = mass > 0
    assert (out.indices.reshape(-1, k).numpy()[keep] == ids[keep]).all()
    np.testing.assert_allclose(mapped.reshape(-1).numpy(), p.sum(1) - lost, rtol=1e-6, atol=1e-7)
    assert mapped[1, 3] == 0 and not out.mask[1, 3].any()
    want = np.where(mapped.reshape(-1, 1).numpy() > 0, mass / np.maximum(mapped.reshape(-1, 1).numpy(), 1e-30), 0)
    np.testing.assert_allclose(target_probs(out, 1.0).reshape(-1, k).numpy(), want, rtol=1e-5, atol=1e-6)
    z = torch.randn(2, 5, V_s, dtype=torch.float64)
    kd = distillation_loss(z, out, "kld", 1.0)
    logq = torch.log_softmax(z, -1).reshape(-1, V_s).numpy()
    ref = [sum(w * (np.log(w) - logq[r, i]) for i, w in zip(ids[r], want[r]) if w > 0) for r in range(10)]
    np.testing.assert_allclose(kd.reshape(-1).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_a_pair_projection_is_built_once_and_cached_beside_the_data(two_bpes, tmp_path, monkeypatch):
    import pd_dist.data.tokenizer_pair as tp

    a, b, _, root = two_bpes
    logs = []
    first = tp.pair_projection(root / "a", root / "b", tmp_path, log=logs.append)
    want = vocab_projection(_table(a), _table(b))
    want[0][a.eos_token_id], want[1][a.eos_token_id] = b.eos_token_id, True  # end of document maps to itself
    assert np.array_equal(first.target, want[0]) and np.array_equal(first.exact, want[1])
    assert first.path.parent == tmp_path / tp.PAIR_DIR and first.path.with_suffix(".json").is_file()
    assert len(logs) == 1 and "teacher tokens mapped" in logs[0]
    monkeypatch.setattr(tp, "vocab_projection", lambda *a: pytest.fail("built again"))
    again = tp.pair_projection(root / "a", root / "b", tmp_path, log=logs.append)
    assert np.array_equal(again.target, first.target) and len(logs) == 1
    monkeypatch.undo()
    other = tp.pair_projection(root / "b", root / "a", tmp_path)  # the other direction: a pair of its own
    assert other.path != first.path and len(other.target) == len(_table(b))


def test_tokenizers_that_cannot_be_aligned_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pd_dist.data.tokenizer_pair import TokenizerPairError, checked_token_bytes

    words = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()  # drops the spaces: no round trip
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    with pytest.raises(TokenizerPairError, match="the student's tokenizer: its tokens do not rebuild the text"):
        checked_token_bytes(tok, "the student's", "hello world")
    wide = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"数据": 0, "[UNK]": 1},
                                                                                unk_token="[UNK]")),
                                   unk_token="[UNK]")
    with pytest.raises(TokenizerPairError, match="the teacher's tokenizer: token 0 .* byte-level alphabet"):
        checked_token_bytes(wide, "the teacher's")


def test_aligned_fraction_counts_the_student_positions_a_teacher_prefix_ends_at(two_bpes):
    from pd_dist.data.tokenizer_pair import aligned_fraction, checked_token_bytes

    a, b, lines, _ = two_bpes
    ta, tb = checked_token_bytes(a, "a"), checked_token_bytes(b, "b")
    texts = lines[2900:2920]
    hits = total = 0
    for text in texts:
        s = [tb[i] for i in b(text, add_special_tokens=False)["input_ids"]]
        t = [ta[i] for i in a(text, add_special_tokens=False)["input_ids"]]
        got = _align_brute(s, t)
        hits += sum(g >= 0 for g in got)
        total += len(got)
    assert aligned_fraction(texts, a, b, ta, tb) == pytest.approx(hits / total, abs=1e-12)
    assert aligned_fraction(texts, a, a, ta, ta) == 1.0


def test_student_signal_of_one_text_across_two_real_tokenizers(two_bpes):
    """A teacher signal over one text's teacher tokens, moved to the student's positions: with the same
    tokenizer on both sides it is the teacher's own signal (KD loss equal, every position aligned);
    across two tokenizers each aligned position carries its teacher position's projected distribution
    and the others are empty (KD 0)."""
    import torch

    from pd_dist.core.crosstok import project_signal, student_signal
    from pd_dist.core.logits import SparseLogits
    from pd_dist.core.losses import distillation_loss

    a, b, lines, _ = two_bpes
    ta, tb = _table(a), _table(b)
    text = lines[2950] + lines[2951]
    ids_a = a(text, add_special_tokens=False)["input_ids"]
    ids_b = b(text, add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(0)
    k = 6
    vals, idx = torch.randn(len(ids_a), len(ta), generator=g, dtype=torch.float64).mul(3).topk(k)
    sig = SparseLogits(idx, vals.float())
    # The same tokenizer on both sides: the identity projection, every position aligned.
    ident = torch.arange(len(ta))
    same, mask, mass = student_signal(sig, align_positions(byte_ends([ta[i] for i in ids_a]),
                                                           byte_ends([ta[i] for i in ids_a])), ident, 1.0)
    assert bool(mask.all()) and torch.allclose(mass, torch.ones(len(ids_a)))
    z = torch.randn(len(ids_a), len(ta), generator=g, dtype=torch.float64)
    torch.testing.assert_close(distillation_loss(z, same, "kld", 1.0), distillation_loss(z, sig, "kld", 1.0),
                               rtol=1e-6, atol=1e-6)
    # Two tokenizers: b's positions take a's signal where a prefix of a ends.
    aligned = align_positions(byte_ends([tb[i] for i in ids_b]), byte_ends([ta[i] for i in ids_a]))
    target = torch.from_numpy(vocab_projection(ta, tb)[0])
    out, mask, mass = student_signal(sig, aligned, target, 2.0)
    assert mask.tolist() == (aligned >= 0).tolist() and 0 < mask.float().mean() < 1
    for pos in range(len(ids_b)):
        if aligned[pos] < 0:
            assert not out.mask[pos].any() and mass[pos] == 0
            continue
        one, m1 = project_signal(SparseLogits(idx[aligned[pos]:aligned[pos] + 1], vals[aligned[pos]:aligned[pos] + 1].float()),
                                 target, 2.0)
        assert torch.equal(out.indices[pos], one.indices[0]) and torch.equal(out.values[pos], one.values[0])
        assert mass[pos] == m1[0]
    zb = torch.randn(len(ids_b), len(tb), generator=g, dtype=torch.float64)
    kd = distillation_loss(zb, out, "kld", 1.0)
    assert (kd[~mask] == 0).all() and (kd[mask] > 0).all()
    with pytest.raises(ValueError, match="names teacher position"):
        student_signal(sig, torch.tensor([len(ids_a)]), target, 1.0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_loss_is_the_l1_distance_of_sorted_probabilities(temperature):
    """distill.loss uld, with a teacher of another vocabulary (ids past the student's, never read): against
    a float64 reference that sorts both full distributions and pads the shorter with zeros;
    its gradient reaches the student logits; rows with nothing kept give 0."""
    import torch

    from pd_dist.core.logits import SparseLogits
    from pd_dist.core.losses import distillation_loss

    g = torch.Generator().manual_seed(3)
    N, V_s, V_t, k = 12, 30, 50, 6
    vals, idx = torch.randn(N, V_t, generator=g, dtype=torch.float64).mul(2).topk(k)
    vals[:, -1] = torch.where(torch.rand(N, generator=g) < 0.5, float("-inf"), vals[:, -1])
    vals[4] = float("-inf")  # nothing kept
    sig = SparseLogits(idx, vals)
    z = torch.randn(N, V_s, generator=g, dtype=torch.float64, requires_grad=True)
    got = distillation_loss(z, sig, "uld", temperature)
    v = sig.values.double().numpy() / temperature  # the teacher's probabilities in float64
    e = np.where(np.isfinite(v), np.exp(v - np.where(np.isfinite(v), v, -np.inf).max(1, keepdims=True)), 0.0)
    p = e / np.maximum(e.sum(1, keepdims=True), 1e-300)
    q = torch.softmax(z, -1).detach().numpy()
    for r in range(N):
        ps = np.zeros(max(V_s, k))
        ps[:k] = np.sort(p[r])[::-1]
        qs = np.zeros(max(V_s, k))
        qs[:V_s] = np.sort(q[r])[::-1]
        want = 0.0 if r == 4 else np.abs(ps - qs).sum()
        assert float(got[r].detach()) == pytest.approx(want, abs=1e-9), r
    got.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad[0].abs().sum() > 0
