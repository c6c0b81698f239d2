"""distill.teacher_context document: the pieces a span needs, the teacher's answer against each chunk run
alone, and the store of format 3 read at any seq_len and under a blend."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pd_dist.data.spans import DocumentIndex, pack_pieces


def _brute_pieces(starts, a, b, chunk):
    """Per position p in [a, b): the (chunk start, p + 1) it is read from, by walking every document."""
    out = {}
    for d in range(len(starts) - 1):
        for p in range(starts[d], starts[d + 1]):
            if a <= p < b:
                out[p] = starts[d] + (p - starts[d]) // chunk * chunk
    return out


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_pieces_cover_each_position_from_its_chunk_start(chunk):
    rng = np.random.default_rng(chunk)
    starts = np.concatenate([[0], np.cumsum(rng.integers(1, 20, 30))])
    index = DocumentIndex.from_starts(starts)
    for _ in range(50):
        a = int(rng.integers(0, index.n_tokens - 1))
        b = int(rng.integers(a + 1, min(index.n_tokens, a + 40) + 1))
        pieces = index.pieces(a, b, chunk)
        want = _brute_pieces(starts.tolist(), a, b, chunk)
        got = {}
        for s, e in pieces.tolist():
            assert 0 < e - s <= chunk and e <= b
            for p in range(max(s, a), e):
                assert p not in got
                got[p] = s
        assert got == want


def test_pieces_refuse_spans_outside_the_stream():
    index = DocumentIndex.from_starts([0, 5, 9])
    with pytest.raises(ValueError, match="outside the stream's 9 tokens"):
        index.pieces(3, 10, 4)
    with pytest.raises(ValueError, match="begin at 0"):
        DocumentIndex.from_starts([1, 5])


def test_pack_pieces_first_fit_never_overlaps():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 17, 60)
    row, col = pack_pieces(lengths, 16)
    used = {}
    for n, r, c in zip(lengths.tolist(), row.tolist(), col.tolist()):
        assert c + n <= 16
        for j in range(c, c + n):
            assert (r, j) not in used
            used[(r, j)] = True
    assert row.max() + 1 <= len(lengths)
    with pytest.raises(ValueError, match=r"piece lengths must be in \[1, 16\]"):
        pack_pieces([17], 16)


def _document_teacher(smoke_data, tiny_teacher_dir, T, keep_lse=False, rows=3):
    from pd_dist.core.logits import SignalSpec
    from pd_dist.models import ModelConfig, build_model
    from pd_dist.teacher.document import DocumentTeacher
    from pd_dist.teacher.inference import FrozenTeacher

    model = build_model(ModelConfig(path=str(tiny_teacher_dir)), smoke_data.vocab_size, seed=0)
    model = model.to(torch.float64)
    frozen = FrozenTeacher(model, torch.device("cpu"), torch.float64, SignalSpec.of("top_p_k", top_p=1.0, top_k=8),
                           64, keep_lse=keep_lse)
    return DocumentTeacher(frozen, smoke_data, T, rows=rows), model


def test_document_teacher_equals_each_chunk_run_alone(smoke_data, tiny_teacher_dir):
    """float64: each position's hidden state is the model's on its chunk alone, from the chunk's start;
    and the answer does not depend on how the spans are batched or packed."""
    T = 24
    dt, model = _document_teacher(smoke_data, tiny_teacher_dir, T)
    index = smoke_data.document_index(0)
    stream = smoke_data.streams[0]
    # spans that cross a document boundary and a chunk boundary
    bounds = index.starts[1:4]
    starts = [int(bounds[0]) - 5, int(bounds[1]) - 26, 3]
    L = 28
    hid = dt.hidden(0, starts, L)
    body = model.model
    for j, a in enumerate(starts):
        for off in range(L):
            p = a + off
            d = int(index.document_of([p])[0])
            c = int(index.starts[d]) + (p - int(index.starts[d])) // T * T
            toks = torch.from_numpy(stream.read(c, p + 1 - c))[None]
            ref = body(input_ids=toks).last_hidden_state[0, -1]
            torch.testing.assert_close(hid[j, off], ref, rtol=1e-9, atol=1e-9)
    one_by_one = torch.cat([dt.hidden(0, [a], L) for a in starts])
    torch.testing.assert_close(one_by_one, hid, rtol=1e-9, atol=1e-9)
    assert dt.context_overhead > 1.0


def test_document_teacher_answers_training_windows_by_sample_id(smoke_data, tiny_teacher_dir):
    dt, _ = _document_teacher(smoke_data, tiny_teacher_dir, 16)
    ids = np.array([5, 0, 3])
    L = smoke_data.seq_len
    got = dt(torch.zeros(3, L, dtype=torch.int64), ids)
    for j, i in enumerate(ids):
        s, a = smoke_data.window(int(i))
        one = dt.spans(s, [a], L)
        assert torch.equal(got.indices[j], one.indices[0])
        torch.testing.assert_close(got.values[j], one.values[0])


# ------------------------------------------------------------------ document stores (format 3)
ONE_RANK = None


def _one_rank():
    from types import SimpleNamespace

    return SimpleNamespace(dp_rank=0, dp_size=1, barrier=lambda: None, all_reduce_sum=lambda t: t, backend="gloo")


def _corpus(path, seed, n=120):
    import json
    import random

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 90)))}) + "\n")


@pytest.fixture(scope="module")
def doc_setup(tmp_path_factory, smoke_data, tiny_teacher_dir):
    """Source a alone at seq_len 32 and 48, and a blend of a with b at 32, all with the smoke tokenizer;
    one library generated from a@32 and completed by the blend (a kept, b added)."""
    from pd_dist.config import load_config
    from pd_dist.data import PackedDataset, prepare_data
    from pd_dist.models import ModelConfig
    from pd_dist.teacher.generate import run_generation

    from conftest import SMOKE

    tmp = tmp_path_factory.mktemp("doc_stores")
    a, b = tmp / "a.jsonl", tmp / "b.jsonl"
    _corpus(a, 1, n=50)
    _corpus(b, 2, n=25)
    lib = tmp / "lib"
    common = [f"data.tokenizer={smoke_data.tokenizer_dir}", "data.val_samples=4", "distill.mode=offline",
              "data.prepare_workers=1",
              "distill.teacher_context=document", f"distill.store={lib}", "distill.teacher_seq_len=40",
              "generate.record_tokens=32", "generate.shard_size=4", "generate.encoding=exact",
              f"teacher.path={tiny_teacher_dir}", "train.micro_batch_size=4"]
    runs = {"a32": ["data.source=files", f"data.files=[{a}]", "data.seq_len=32"],
            "a48": ["data.source=files", f"data.files=[{a}]", "data.seq_len=48"],
            "blend": ["data.source=blend", f"data.blend=[{{path: {a}, weight: 2}}, {{path: {b}, weight: 1}}]",
                      "data.seq_len=32"]}
    out = {}
    logs = []
    for name, extra in runs.items():
        cfg = load_config(SMOKE, common + extra + [f"output_dir={tmp / name}"])
        data = PackedDataset(prepare_data(cfg.data, tmp / name / "data", log=lambda *_: None))
        out[name] = (cfg, data)
    for name in ("a32", "blend"):
        cfg, data = out[name]
        if name == "blend":  # no teacher_seq_len: the library's own chunk (40), not data.seq_len; and
            # records of another size: source a's store is kept as it is, b's written in the new size
            cfg = load_config(SMOKE, [c for c in common if "teacher_seq_len" not in c and "record_tokens" not in c]
                              + runs[name] + ["generate.record_tokens=24", f"output_dir={tmp / name}"])
        run_generation(cfg, _one_rank(), data, ModelConfig(path=str(tiny_teacher_dir)), log=logs.append)
    return SimpleNamespace_(out=out, lib=lib, logs=logs, tmp=tmp)


class SimpleNamespace_(dict):
    __getattr__ = dict.__getitem__


def test_sources_keep_their_fingerprint_across_seq_len_and_blend(doc_setup):
    fp = {n: [e["fingerprint"] for e in d.sources] for n, (_, d) in doc_setup.out.items()}
    assert fp["a32"] == fp["a48"] == fp["blend"][:1]
    assert len(set(fp["blend"])) == 2
    assert any("complete already (kept)" in line for line in doc_setup.logs)  # the blend reused a's store


@pytest.mark.parametrize("name", ["a32", "a48", "blend"])
def test_one_document_library_serves_any_seq_len_and_blend(doc_setup, tiny_teacher_dir, name):
    """The stored windows (exact encoding) equal what a colocated teacher in document context answers
    for the same samples, at seq_len 32 and 48 and under a blend, training and held-out samples alike."""
    from pd_dist.core.logits import SignalSpec
    from pd_dist.models import ModelConfig, build_model
    from pd_dist.signals.sources import DocumentStoreWindows
    from pd_dist.teacher.document import context_teacher
    from pd_dist.teacher.inference import FrozenTeacher

    cfg, data = doc_setup.out[name]
    spec = SignalSpec.of("top_p_k", top_p=cfg.distill.top_p, top_k=cfg.distill.top_k)
    windows = DocumentStoreWindows.open(doc_setup.lib, data, spec, None)
    assert len(windows) == data.n_train + data.n_val
    model = build_model(ModelConfig(path=str(tiny_teacher_dir)), data.vocab_size, seed=0)
    live = context_teacher(cfg, FrozenTeacher(model, torch.device("cpu"), torch.float32, spec, 64), data)
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.choice(data.n_train, 6, replace=False), data.val_ids()[:2]])
    stored = windows.get_batch(ids)
    want = live(torch.zeros(len(ids), data.seq_len, dtype=torch.int64), ids)
    assert stored.shape == want.shape == (len(ids), data.seq_len)
    fin = want.values > -1e30
    assert torch.equal(stored.values > -1e30, fin)
    assert torch.equal(stored.indices[fin], want.indices[fin])
    torch.testing.assert_close(stored.values[fin], want.values[fin], rtol=1e-5, atol=1e-5)


def _spec(top_k=20):
    from pd_dist.core.logits import SignalSpec

    return SignalSpec.of("top_p_k", top_p=0.95, top_k=top_k)


def _altered(data, **meta):
    import copy

    other = copy.copy(data)
    other.meta = {**data.meta, **meta}
    other.sources = [dict(e) for e in data.sources]
    return other


def test_document_library_refusals_name_what_differs(doc_setup):
    from pd_dist.signals.sources import DocumentStoreWindows
    from pd_dist.store import StoreError

    lib = doc_setup.lib
    _, data = doc_setup.out["a32"]
    with pytest.raises(StoreError, match="the tokenizer differs"):
        other = _altered(data, tokenizer_hash="0" * 16)
        other.sources[0]["fingerprint"] = "f" * 64
        DocumentStoreWindows.open(lib, other, _spec(), None)
    with pytest.raises(StoreError, match="holds no document store for source .*the source's tokens differ"):
        other = _altered(data)
        other.sources[0]["fingerprint"] = "f" * 64
        DocumentStoreWindows.open(lib, other, _spec(), None)
    with pytest.raises(StoreError, match="its tokenizer hash is"):
        DocumentStoreWindows.open(lib, _altered(data, tokenizer_hash="0" * 16), _spec(), None)
    with pytest.raises(StoreError, match="chunks of 40 tokens, the run asks distill.teacher_seq_len=64"):
        DocumentStoreWindows.open(lib, data, _spec(), 64)
    with pytest.raises(StoreError, match="cannot serve the run's signal"):
        DocumentStoreWindows.open(lib, data, _spec(top_k=50), None)
    window = doc_setup.tmp / "window_store"
    window.mkdir()
    (window / "manifest.json").write_text("{}")
    with pytest.raises(StoreError, match="is a window store .*set distill.teacher_context window"):
        DocumentStoreWindows.open(window, data, _spec(), None)


def test_a_window_run_refuses_a_library_and_regeneration_refuses_other_settings(doc_setup, tiny_teacher_dir):
    from types import SimpleNamespace

    from pd_dist.config import load_config
    from pd_dist.models import ModelConfig
    from pd_dist.signals.sources import StoredLogits
    from pd_dist.store import StoreError
    from pd_dist.teacher.generate import run_generation

    from conftest import SMOKE

    cfg, data = doc_setup.out["a32"]
    window_cfg = load_config(SMOKE, ["distill.mode=offline", f"distill.store={doc_setup.lib}"])
    with pytest.raises(StoreError, match="library of document stores .*set distill.teacher_context document"):
        StoredLogits.build(SimpleNamespace(cfg=window_cfg, data=data, pair=None))
    import dataclasses

    other = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher_seq_len=24))
    with pytest.raises(StoreError, match="read in chunks of 40 tokens, the run asks distill.teacher_seq_len=24"):
        run_generation(other, _one_rank(), data, ModelConfig(path=str(tiny_teacher_dir)), log=lambda *_: None)


def test_document_write_through_completes_the_library_generation_writes(doc_setup, tiny_teacher_dir, tmp_path):
    """An online teacher in document context spools the windows it serves (some training windows in
    two sittings, a held-out one); completing the library cuts them into each source's records and
    fills the rest: every record equals what generation wrote (exact encoding), whatever its source
    (written from spools, partly covered, filled), and a second source's store is filled whole."""
    import json

    from pd_dist.config import load_config
    from pd_dist.models import ModelConfig, build_model
    from pd_dist.store import LogitsStore, verify_store
    from pd_dist.teacher.inference import FrozenTeacher
    from pd_dist.teacher.document import DocumentTeacher
    from pd_dist.teacher.serve import complete_document_write_through, write_through_stores
    from pd_dist.teacher.stores import SPOOL_DIR, DocumentRecords, WriteThrough, latest_records, record_dtype

    from conftest import SMOKE

    _, data = doc_setup.out["blend"]  # windows of 32 cut into records of 24
    lib = tmp_path / "through"
    cfg = load_config(SMOKE, [f"data.tokenizer={data.tokenizer_dir}", "data.val_samples=4", "distill.mode=online",
                              "distill.teacher_context=document", "distill.teacher_seq_len=40",
                              f"distill.write_through={lib}", "generate.record_tokens=24", "generate.shard_size=4",
                              "generate.encoding=exact", f"teacher.path={tiny_teacher_dir}",
                              "train.micro_batch_size=4", "data.seq_len=32"])
    weights = ModelConfig(path=str(tiny_teacher_dir))
    frozen = FrozenTeacher(build_model(weights, data.vocab_size, seed=0), torch.device("cpu"), torch.float32,
                           cfg.distill.signal_spec(cfg.train.seed), 64, keep_lse=True)
    teacher = DocumentTeacher(frozen, data, 40, 4)
    stores = write_through_stores(cfg, data, weights, teacher)
    assert [m.seq_len for _, m in stores] == [24, 24] and all(m.context == "document" for _, m in stores)
    a_train = [i for i in range(data.n_train) if data.window(i)[0] == 0]
    served = a_train[: len(a_train) // 2] + [int(data.val_ids()[0])]
    for sitting, ids in enumerate((served[::2], served[1::2])):  # a resumed run appends to the same spool
        through = WriteThrough(teacher, lib, "teacher00000", data.seq_len, stores[0][1].width)
        for b in range(0, len(ids), 4):
            through(torch.zeros(len(ids[b:b + 4]), data.seq_len, dtype=torch.int64), ids[b:b + 4])
        through.close()
    latest = latest_records(lib / SPOOL_DIR, record_dtype(data.seq_len, stores[0][1].width))
    assert sorted(latest) == sorted(served)
    covered = DocumentRecords(latest, data, 0, 24, stores[0][1].n_tokens).covered()
    assert 0 < len(covered) < stores[0][1].n_samples
    complete_document_write_through(lib, stores, data, teacher, 4, log=lambda *_: None)
    assert not (lib / SPOOL_DIR).exists()
    for (root, meta), src in zip(stores, ("a", "b")):
        assert verify_store(root) == []
        info = json.loads((root / "write_through_info.json").read_text())
        assert info["samples_from_spools"] == (len(covered) if src == "a" else 0)
        got = LogitsStore(root)
        ref = LogitsStore(doc_setup.lib / root.name)
        assert got.meta.to_dict() == {**ref.meta.to_dict(), "seq_len": 24, "n_samples": got.meta.n_samples,
                                      "shard_size": 4}
        n = got.meta.n_tokens
        want = ref.get_spans([0], n)
        have = got.get_spans([0], n)
        fin = want.values > -1e30
        assert torch.equal(have.values > -1e30, fin) and torch.equal(have.indices[fin], want.indices[fin])
        torch.testing.assert_close(have.values[fin], want.values[fin], rtol=1e-5, atol=1e-5)


def test_verify_checks_every_store_of_a_library(doc_setup, tmp_path, capsys):
    import shutil

    from pd_dist.cli import store_main

    lib = tmp_path / "lib"
    shutil.copytree(doc_setup.lib, lib)
    assert store_main(["verify", str(lib)]) == 0  # `pd-dist store verify LIBRARY`
    out = capsys.readouterr().out
    assert out.count(": OK") == 2, out
    shard = sorted((lib / sorted(p.name for p in lib.glob("source-*"))[0] / "shards").glob("*.bin"))[1]
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert store_main(["verify", str(lib)]) == 1
    out = capsys.readouterr().out
    assert "FAULT" in out and out.count(": OK") == 1, out


def test_resume_refuses_a_changed_teacher_context_and_reads_older_checkpoints_as_window(smoke_data):
    from test_resume_guard import _cfg, _state

    from pd_dist.teacher.specs import wire_spec
    from pd_dist.train.checkpoint import ResumeError, check_run_state, objective

    old = _cfg()
    state, sampler = _state(old)
    doc = _cfg("distill.teacher_context=document")
    with pytest.raises(ResumeError, match=r"distill.teacher_context was 'window' in the checkpoint, now 'document'"):
        check_run_state(state, doc, sampler, "fp", objective(doc, "w1"))
    for key in ("distill.teacher_context", "distill.teacher_seq_len"):
        del state["objective"][key]  # a checkpoint written before the keys existed: window context
    assert check_run_state(state, old, sampler, "fp", objective(old, "w1")) == []
    with pytest.raises(ResumeError, match="distill.teacher_context"):
        check_run_state(state, doc, sampler, "fp", objective(doc, "w1"))
    # A student and a teacher that disagree on the context or its chunk fail the bridge's handshake.
    hellos = [wire_spec(c, smoke_data).hello() for c in
              (old, doc, _cfg("distill.teacher_context=document", "distill.teacher_seq_len=32"))]
    assert not torch.equal(hellos[0], hellos[1]) and not torch.equal(hellos[1], hellos[2])


@pytest.mark.parametrize("overrides,needle", [
    (["distill.teacher_seq_len=64"], "is only read with teacher_context document"),
    (["distill.teacher_context=document", "distill.signal=sampled"], "serves the top_p_k signal only"),
    (["distill.teacher_context=document", "distill.mode=none", "distill.dump_logits=true", "distill.store=/tmp/x"],
     "distill.dump_logits.*training windows .*launch/generate_logits.py"),
    (["distill.teacher_context=document", "teacher.pipeline_stages=2"], "teacher.pipeline_stages"),
    (["distill.teacher_context=document", "distill.teacher_seq_len=1"], r"must be null or in \[2"),
])
def test_teacher_context_config_refusals(overrides, needle):
    from pd_dist.config import load_config
    from pd_dist.core.configlib import ConfigError

    from conftest import SMOKE

    with pytest.raises(ConfigError, match=needle):
        load_config(SMOKE, overrides)
