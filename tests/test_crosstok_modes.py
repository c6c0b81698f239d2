"""Distillation across tokenizers in every mode (distill.cross_tokenizer): the student's signal against a
brute-force reference, colocated against one stored library serving two student tokenizers, an online
run against the stored signal, and the refusals."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import SMOKE, launch, read_summary


def _corpus(path, seed=0, n=90):
    rng = np.random.default_rng(seed)
    words = ["".join(chr(c) for c in rng.integers(97, 123, int(rng.integers(2, 8)))) for _ in range(150)]
    with open(path, "w") as fh:
        for i in range(n):
            text = " ".join(rng.choice(words, int(rng.integers(5, 80))))
            fh.write(json.dumps({"text": text + (". Ünïcødé ✓ 数据" if i % 4 == 0 else ".")}) + "\n")
    return [json.loads(line)["text"] for line in open(path)]


def _topo():
    """One process standing in for a one-rank job (data preparation and generation only)."""
    return SimpleNamespace(online=False, role_rank=0, role_size=1, dp_rank=0, dp_size=1, rank=0,
                           barrier=lambda: None, role_sum=lambda t: t, all_reduce_sum=lambda t: t, backend="gloo")


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    """A corpus; teacher tokenizer T (vocab 400, first half) with a tiny teacher saved beside it; student
    tokenizers S1 (vocab 300, second half) and S2 (vocab 350, all); the teacher's library generated
    once, through the generation job's cross-tokenizer path, from S1's config."""
    from pd_dist.config import load_config
    from pd_dist.data import PackedDataset, load_tokenizer
    from pd_dist.data.prepare import train_tokenizer
    from pd_dist.models import ModelConfig, build_model
    from pd_dist.run import generate_store, prepare_run_data, teacher_view_data

    tmp = tmp_path_factory.mktemp("crosstok")
    texts = _corpus(tmp / "corpus.jsonl")
    train_tokenizer(texts[:45], 400, tmp / "T")
    train_tokenizer(texts[45:], 300, tmp / "S1")
    train_tokenizer(texts, 350, tmp / "S2")
    teacher_dir = tmp / "teacher"
    vocab_t = len(load_tokenizer(tmp / "T"))
    model = build_model(ModelConfig(preset="tiny-teacher"), vocab_t, seed=7)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)  # sharp, so truncation keeps few entries
    model.save_pretrained(str(teacher_dir), safe_serialization=True)
    load_tokenizer(tmp / "T").save_pretrained(str(teacher_dir))
    lib = tmp / "lib"
    common = ["data.source=files", f"data.files=[{tmp / 'corpus.jsonl'}]", "data.seq_len=32", "data.val_samples=4",
              "data.prepare_workers=1", "distill.mode=offline", "distill.teacher_context=document",
              "distill.cross_tokenizer=map", f"teacher.path={teacher_dir}", f"distill.store={lib}",
              "distill.teacher_seq_len=40", "generate.record_tokens=24", "generate.encoding=exact",
              "generate.shard_size=4", "train.micro_batch_size=4", "distill.top_k=8", "train.threads=2"]
    out = {}
    for name in ("S1", "S2"):
        cfg = load_config(SMOKE, common + [f"data.tokenizer={tmp / name}", f"output_dir={tmp / name.lower()}"])
        if name == "S1":
            generate_store(cfg, _topo(), log=lambda *_: None)
        data = prepare_run_data(cfg, _topo(), log=lambda *_: None)
        out[name] = (cfg, data, teacher_view_data(cfg, _topo(), log=lambda *_: None))
    assert out["S1"][2].fingerprint == out["S2"][2].fingerprint  # one teacher view of one corpus
    assert isinstance(out["S1"][1], PackedDataset)
    return SimpleNamespace(tmp=tmp, lib=lib, teacher_dir=teacher_dir, out=out, common=common)


def _pair(cfg, data, tdata):
    from pd_dist.teacher.crosstok import CrossTokenizer

    return CrossTokenizer.build(cfg, data, tdata)


def _colocated(cfg, data, pair, teacher_dir, dtype=torch.float64):
    from pd_dist.models import ModelConfig, build_model
    from pd_dist.teacher.document import context_teacher
    from pd_dist.teacher.inference import FrozenTeacher

    model = build_model(ModelConfig(path=str(teacher_dir)), pair.align.teacher.vocab_size, seed=0).to(dtype)
    frozen = FrozenTeacher(model, torch.device("cpu"), dtype, cfg.distill.signal_spec(0), 64)
    return context_teacher(cfg, frozen, data, pair)


def _ids(data, n=6):
    rng = np.random.default_rng(1)
    return np.concatenate([rng.choice(data.n_train, n, replace=False), data.val_ids()[:2]])


def _table(data):
    from pd_dist.data import load_tokenizer
    from pd_dist.data.tokenizer_pair import checked_token_bytes

    return checked_token_bytes(load_tokenizer(data.tokenizer_dir), "t")


def test_student_signal_of_a_window_against_a_brute_force_reference(cross):
    """Every position of student windows (training and held-out, crossing documents): aligned exactly
    where a teacher prefix of the same document ends at the same byte (dicts of byte ends, one token at a
    time), and there the teacher's own document-context signal at that teacher position, projected
    through project_probs (numpy, float64)."""
    from pd_dist.core.crosstok import project_probs
    from pd_dist.core.logits import target_probs

    cfg, data, tdata = cross.out["S1"]
    pair = _pair(cfg, data, tdata)
    teacher = _colocated(cfg, data, pair, cross.teacher_dir)
    ids = _ids(data)
    got = teacher(torch.zeros(len(ids), data.seq_len, dtype=torch.int64), ids)
    s_tab, t_tab = _table(data), _table(tdata)
    nbytes = lambda tab, i: len(tab[i]) if tab[i] else 1  # noqa: E731  (EOS: one virtual byte)
    L, aligned_seen, want_q = data.seq_len, 0, []

    def doc_ends(d, s):  # {byte end: teacher stream position} of teacher document d, one token at a time
        ti = tdata.document_index(s)
        toks = tdata.streams[s].read(int(ti.starts[d]), int(ti.starts[d + 1] - ti.starts[d]))
        ends, acc = {}, 0
        for q, t in enumerate(toks.tolist()):
            acc += nbytes(t_tab, t)
            ends[acc] = int(ti.starts[d]) + q
        return ends

    for j, i in enumerate(ids):
        s, a = data.window(int(i))
        si = data.document_index(s)
        for off in range(L):
            p = a + off
            d = int(np.searchsorted(si.starts, p, side="right") - 1)
            toks = data.streams[s].read(int(si.starts[d]), p + 1 - int(si.starts[d]))
            end = sum(nbytes(s_tab, int(t)) for t in toks)
            ends = doc_ends(d, s)
            if end not in ends:
                assert torch.isinf(got.values[j, off]).all(), (i, off)
            else:
                want_q.append((j, off, s, ends[end]))
    # the teacher's own signal at every aligned teacher position, in one document-context forward per source
    for s in sorted({w[2] for w in want_q}):
        rows = [w for w in want_q if w[2] == s]
        sigs = teacher.teacher.spans(s, [w[3] for w in rows], 1)
        for (j, off, _, q), n in zip(rows, range(len(rows))):
            aligned_seen += 1
            sig = sigs[n]
            p_t = target_probs(sig, cfg.distill.temperature).numpy()
            want_i, want_p, lost = project_probs(sig.indices.numpy(), p_t, pair.target, width=sig.k)
            keep = want_p[0] > 0
            row_i, row_v = got.indices[j, off], got.values[j, off]
            assert torch.equal(row_i[:keep.sum()], torch.from_numpy(want_i[0][keep])), (j, off)
            np.testing.assert_allclose(row_v.exp().numpy()[:keep.sum()], want_p[0][keep], rtol=1e-6)
            assert torch.isinf(row_v[keep.sum():]).all()
    assert 0.3 * len(ids) * L < aligned_seen < len(ids) * L  # different tokenizers: much aligns, not all


@pytest.mark.parametrize("student", ["S1", "S2"])
def test_one_teacher_library_serves_students_of_two_tokenizers_as_colocated_answers(cross, student):
    """The one library, in the teacher's vocabulary, read for each student tokenizer (mapped as the
    loader workers map it) equals the colocated cross-tokenizer teacher's answer, and the uld form keeps
    the teacher's own probabilities entry by entry."""
    from pd_dist.core.logits import target_probs
    from pd_dist.signals.sources import DocumentStoreWindows
    from pd_dist.teacher.crosstok import CrossTokenizerStore

    cfg, data, tdata = cross.out[student]
    pair = _pair(cfg, data, tdata)
    assert pair.summary["student_tokenizer"] != pair.summary["teacher_tokenizer"]
    windows = DocumentStoreWindows.open(cross.lib, tdata, cfg.distill.signal_spec(0), None)
    store = CrossTokenizerStore(windows, pair)
    assert len(store) == data.n_train + data.n_val
    ids = _ids(data)
    stored = store.get_batch(ids)
    live = _colocated(cfg, data, pair, cross.teacher_dir, torch.float32)(
        torch.zeros(len(ids), data.seq_len, dtype=torch.int64), ids)
    assert stored.shape == live.shape == (len(ids), data.seq_len)
    fin = live.values > -1e30
    assert torch.equal(stored.values > -1e30, fin) and 0.3 < fin.any(-1).float().mean() < 1.0
    assert torch.equal(stored.indices[fin], live.indices[fin])
    torch.testing.assert_close(stored.values[fin], live.values[fin], rtol=1e-5, atol=1e-5)
    # uld: no merging, the teacher's own probabilities at tau, the ids projected
    pair.merge = False
    uld = store.get_batch(ids[:2])
    s, a = data.window(int(ids[0]))
    t0, n, aligned = pair.align.span(s, a, data.seq_len)
    raw = windows.stores[s].get_spans([t0], n)[0]
    hit = np.flatnonzero(aligned >= 0)
    want = target_probs(raw[torch.from_numpy(aligned[hit])], cfg.distill.temperature)
    got = uld.values[0, torch.from_numpy(hit)].exp()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    tgt = torch.from_numpy(pair.target)[raw.indices[torch.from_numpy(aligned[hit])]].clamp_min(0)
    assert torch.equal(uld.indices[0, torch.from_numpy(hit)], tgt)


def test_alignment_figures_and_source_summary(cross):
    """kd/aligned_frac and kd/mapped_mass as the sources report them: from the signal itself (a row
    keeps an entry where aligned; its probabilities sum to the mass that mapped)."""
    from pd_dist.signals.sources import DocumentStoreWindows, StoredLogits
    from pd_dist.teacher.crosstok import CrossTokenizerStore

    cfg, data, tdata = cross.out["S1"]
    pair = _pair(cfg, data, tdata)
    windows = DocumentStoreWindows.open(cross.lib, tdata, cfg.distill.signal_spec(0), None)
    source = StoredLogits(CrossTokenizerStore(windows, pair), data, 0)
    source.cross_merge, source.cross_summary = True, dict(pair.summary)
    plan = [np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7])]
    source.plan(plan)
    sigs = [source.signal(ids, torch.zeros(4, data.seq_len, dtype=torch.int64)) for ids in plan]
    scal = source.scalars()
    hit = torch.cat([s.mask.any(-1).flatten() for s in sigs])
    assert scal["kd/aligned_frac"] == pytest.approx(hit.float().mean().item(), abs=1e-12)
    mass = torch.cat([s.values.exp().sum(-1).flatten() for s in sigs])[hit]
    assert scal["kd/mapped_mass"] == pytest.approx(mass.double().mean().item(), rel=1e-6)
    assert 0.99 < scal["kd/mapped_mass"] <= 1.0 + 1e-6  # byte-level: every teacher token maps somewhere
    assert source.scalars() == {}  # figures since the last call
    summ = source.summary()["cross_tokenizer"]
    assert summ["aligned_frac"] == pytest.approx(scal["kd/aligned_frac"]) and summ["how"] == "map"
    assert summ["sample_aligned_frac"] > 0.3


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides,needle", [
    (["distill.teacher_context=window", "distill.teacher_seq_len=null"], "needs distill.teacher_context document"),
    (["distill.loss=mse"], "cannot train on projected probabilities"),
    (["distill.cross_tokenizer=uld", "distill.loss=kld"], "is replaced by uld"),
    (["teacher.path=null"], "needs teacher.path"),
    (["distill.min_aligned_frac=1.5"], "must be in [0, 1]"),
])
def test_cross_tokenizer_config_refusals(cross, overrides, needle):
    from pd_dist.config import load_config
    from pd_dist.core.configlib import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, cross.common + [f"data.tokenizer={cross.tmp / 'S1'}"] + overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cross_tokenizer_refusals_of_the_pair_the_data_and_the_store(cross, smoke_data, tmp_path):
    import dataclasses

    from pd_dist.data.tokenizer_pair import StreamAlignment, TokenizerPairError
    from pd_dist.signals.sources import DocumentStoreWindows
    from pd_dist.store import StoreError
    from pd_dist.train.checkpoint import objective, objective_changes

    cfg, data, tdata = cross.out["S1"]
    strict = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, min_aligned_frac=0.999))
    with pytest.raises(TokenizerPairError, match=r"only .*% of the student's positions align .*min_aligned_frac 0.999"):
        _pair(strict, data, tdata)
    # the teacher's data of another text
    other = StreamAlignment(data, smoke_data, np.ones(data.vocab_size, np.int64), np.ones(smoke_data.vocab_size, np.int64))
    with pytest.raises(TokenizerPairError, match="documents in the student's data, .* in the teacher's: not the same text"):
        other.span(0, 0, data.seq_len)
    # a window store (one tokenizer's samples) asked to serve through a teacher's view
    win = tmp_path / "win"
    win.mkdir()
    (win / "manifest.json").write_text(json.dumps({"format": "pd-dist-teacher-logits", "format_version": 2}))
    with pytest.raises(StoreError, match="is a window store"):
        DocumentStoreWindows.open(win, tdata, cfg.distill.signal_spec(0), None)
    # a changed tokenizer on resume: the objective records the pair
    a, b = objective(cfg, None, ("t", "s1")), objective(cfg, None, ("t", "s2"))
    assert objective_changes(a, b) == [("student.tokenizer", "s1", "s2")]


@pytest.mark.multiproc
def test_online_across_tokenizers_trains_on_the_stored_signal(cross, tmp_path):
    """1 teacher rank + 1 student, cross_tokenizer map: the teacher reads the text in its own tokenizer
    and answers in the student's. The student's first-step loss (before any update) equals the one
    computed here from the library's mapped signal with the same initial student, and its aligned
    fraction over the run equals the library's over the same samples."""
    from pd_dist.core.losses import fused_pd_loss
    from pd_dist.core.schedules import alpha_at
    from pd_dist.models import body_hidden, build_model, final_norm_and_head
    from pd_dist.signals.sources import DocumentStoreWindows
    from pd_dist.teacher.crosstok import CrossTokenizerStore

    cfg, data, tdata = cross.out["S1"]
    run = tmp_path / "online"
    over = [o for o in cross.common if not o.startswith("distill.mode")] + [
        f"data.tokenizer={cross.tmp / 'S1'}", f"data.dir={data.path}", "distill.mode=online",
        f"output_dir={run}", "train.steps=3", "train.save_every=0", "train.eval_every=0", "train.log_every=1",
        "optim.warmup_steps=1", "baseline=false"]
    proc = launch(2, over, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert "[tokenizers] teacher" in out and "serving students [1]" in out
    summ = read_summary(run)
    # the same signal from the library, the same initial student, step 0's global batch
    pair = _pair(cfg, data, tdata)
    store = CrossTokenizerStore(DocumentStoreWindows.open(cross.lib, tdata, cfg.distill.signal_spec(0), None), pair)
    sampler = data.sampler(cfg.train.global_batch_size, cfg.train.seed)
    model = build_model(cfg.model, data.vocab_size, seed=cfg.train.seed)
    body, head = final_norm_and_head(model)
    alpha = alpha_at(0, 3, cfg.distill.alpha)  # the run's 3 steps
    assert alpha > 0.5
    batch_ids = sampler.global_batch_ids(0)
    lm = kd = n = 0.0
    with torch.no_grad():
        for s in range(0, len(batch_ids), cfg.train.micro_batch_size):
            ids = batch_ids[s:s + cfg.train.micro_batch_size]
            toks = torch.from_numpy(data.batch(ids))
            sig = store.get_batch(ids)
            res = fused_pd_loss(body_hidden(body, toks[:, :-1]).flatten(0, 1), head.weight, toks[:, 1:].flatten(),
                                sig.reshape(-1), alpha, cfg.distill.kd_loss, cfg.distill.loss_temperature, 1.0)
            lm, kd, n = lm + float(res.lm_sum), kd + float(res.kd_sum), n + float(res.n_tokens)
    assert summ["losses"][0] == pytest.approx((1 - alpha) * lm / n + alpha * kd / n, rel=1e-5)
    hit = total = 0
    for step in range(3):
        sig = store.get_batch(sampler.global_batch_ids(step))
        hit, total = hit + int(sig.mask.any(-1).sum()), total + sig.mask.shape[0] * sig.mask.shape[1]
    ct = summ["cross_tokenizer"]
    assert ct["aligned_frac"] == pytest.approx(hit / total, abs=1e-12) and 0.3 < ct["aligned_frac"] < 1.0
    assert summ["teacher_val_loss"] is None  # per teacher token: not the student's yardstick
    # pd-dist eval of the run reads the teacher's view beside the data and reproduces the run's figures
    from pd_dist.explore.evaluate import evaluate_run

    ev = evaluate_run(run, log=lambda *_: None, write=False)
    assert ev["val_loss"] == pytest.approx(summ["val_loss"], rel=1e-5)
    assert ev["teacher_top1_agreement"] == pytest.approx(summ["teacher_top1_agreement"], abs=1e-6)


def test_colocated_and_offline_sources_built_for_a_run_agree(cross):
    """The two sources as a run builds them (build_source with the pair): colocated (its teacher model
    of the teacher's vocabulary, reading the teacher's data) and offline (the library, mapped in a
    DataLoader worker process, so the whole pair crosses a pickle) give the same planned signals, and
    report the same alignment figures."""
    import dataclasses

    from pd_dist.models import ModelConfig, build_model
    from pd_dist.signals.sources import ColocatedTeacher, SourceContext, StoredLogits, build_source

    cfg, data, tdata = cross.out["S1"]
    pair = _pair(cfg, data, tdata)
    plan = [np.array([3, 1, 4, 1]), np.array([5, 9, 2, 6]), data.val_ids()[:4]]
    got = {}
    for mode in ("colocated", "offline"):
        c = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, mode=mode),
                                data=dataclasses.replace(cfg.data, loader_workers=1))
        ctx = SourceContext(c, None, data, torch.device("cpu"), log=lambda *_: None, pair=pair,
                            teacher=lambda: build_model(ModelConfig(path=str(cross.teacher_dir)), tdata.vocab_size, seed=0))
        source = build_source(ctx)
        assert isinstance(source, {"colocated": ColocatedTeacher, "offline": StoredLogits}[mode])
        source.plan(plan)
        got[mode] = ([source.signal(ids, torch.zeros(4, data.seq_len, dtype=torch.int64)) for ids in plan],
                     source.scalars())
        source.close()
    for a, b in zip(got["colocated"][0], got["offline"][0]):
        fin = a.values > -1e30
        assert torch.equal(fin, b.values > -1e30) and torch.equal(a.indices[fin], b.indices[fin])
        torch.testing.assert_close(a.values[fin], b.values[fin], rtol=1e-5, atol=1e-5)
    sa, sb = got["colocated"][1], got["offline"][1]
    assert sa["kd/aligned_frac"] == sb["kd/aligned_frac"] and 0.3 < sa["kd/aligned_frac"] < 1.0
    assert sa["kd/mapped_mass"] == pytest.approx(sb["kd/mapped_mass"], rel=1e-5)


def test_the_dry_run_shows_the_pair_and_its_aligned_fraction(cross, capsys):
    from pd_dist.config import load_config
    from pd_dist.data import load_tokenizer
    from pd_dist.data.tokenizer_pair import aligned_fraction, sample_texts
    from pd_dist.explore.plan import print_rank_map

    over = cross.common + [f"data.tokenizer={cross.tmp / 'S1'}", f"output_dir={cross.tmp / 'dry'}"]
    cfg = load_config(SMOKE, over)
    assert print_rank_map(cfg, 1, 1) == 0
    out = capsys.readouterr().out
    texts = sample_texts(cfg.data)
    t, s = load_tokenizer(cross.teacher_dir), load_tokenizer(cross.tmp / "S1")
    want = aligned_fraction(texts, t, s, _table(SimpleNamespace(tokenizer_dir=cross.teacher_dir)),
                            _table(SimpleNamespace(tokenizer_dir=cross.tmp / "S1")))
    assert f"{want:.1%} of the student's positions align on {len(texts):,} documents" in out
    assert "distill.min_aligned_frac 0.5: ok" in out and "(vocab 400)" not in out and "vocab 400)" in out
    print_rank_map(load_config(SMOKE, over + ["distill.min_aligned_frac=0.999"]), 1, 1)
    assert "BELOW: the run will refuse to start" in capsys.readouterr().out


def test_store_fidelity_of_a_document_store_recomputes_the_teachers_distribution(cross, capsys):
    """pd-dist store info --fidelity on the library's exact-encoded store: its metrics equal those of
    the teacher's full logits against their own top-p-k truncation at the same positions, which only
    holds if the stored records are read at the positions the teacher recomputes."""
    import subprocess
    import sys

    from pd_dist.core.fidelity import mean_fidelity, signal_fidelity
    from pd_dist.core.logits import truncate
    from pd_dist.models import ModelConfig, build_model, final_norm_and_head
    from pd_dist.store.library import library_stores
    from pd_dist.teacher.document import DocumentTeacher
    from pd_dist.teacher.fidelity import store_fidelity
    from pd_dist.teacher.inference import FrozenTeacher

    cfg, data, tdata = cross.out["S1"]
    (root,) = library_stores(cross.lib)
    got = store_fidelity(root, tdata, positions=240, seed=5)  # 10 records of 24 positions
    model = build_model(ModelConfig(path=str(cross.teacher_dir)), tdata.vocab_size, seed=0).eval()
    _, head = final_norm_and_head(model)
    spec = cfg.distill.signal_spec(0)
    dt = DocumentTeacher(FrozenTeacher(model, torch.device("cpu"), torch.float32, spec, 64), tdata, 40, 8)
    n, R = tdata.streams[0].n_tokens, 24
    records = np.random.default_rng(5).permutation(-(-n // R))[:10]  # the records it sampled
    parts = []
    with torch.no_grad():
        for r in records:
            a = int(r) * R
            z = dt.hidden(0, [a], min(R, n - a))[0] @ head.weight.T
            parts.append(signal_fidelity(z, truncate(z, spec.top_p, spec.top_k), 1.0, 1.0))
    want = mean_fidelity(parts)
    assert got["positions"] == sum(int(p["tv"].numel()) for p in parts) >= 216
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert 0.5 < got["head_mass"] < 1.0 and got["tv"] > 0 and got["bytes_per_token"] > 0
    # the teacher named explicitly (what the generation job passes: a teacher pre-trained by pd-dist is
    # recorded by name only), and one that is not there
    from pd_dist.store import StoreError

    assert store_fidelity(root, tdata, positions=240, seed=5, teacher=cross.teacher_dir) == got
    with pytest.raises(StoreError, match="nowhere"):
        store_fidelity(root, tdata, positions=24, teacher=Path(cross.teacher_dir).parent / "nowhere")
    # the CLI: info with the fidelity figures, and a one-line refusal without --data
    cli = [sys.executable, "-m", "pd_dist.cli", "store", "info", str(root), "--json"]
    out = subprocess.run(cli + ["--fidelity", "--data", str(tdata.path), "--positions", "48"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["fidelity"]["positions"] >= 48
    bad = subprocess.run(cli + ["--fidelity"], capture_output=True, text=True)
    assert bad.returncode == 2 and "needs --data" in bad.stderr
