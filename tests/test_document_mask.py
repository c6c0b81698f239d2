"""data.document_mask: within a packed window each document is attended to on its own, positions
restarting at each document (a new document starts right after each EOS). A packed window's per-token
logits equal those of each of its documents run alone, for the data-parallel student, the pipeline
layers and the teacher; a store and a resume record the setting; off changes nothing."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pd_dist.models import (ModelConfig, body_hidden, build_model, document_causal_mask, document_inputs,
                            document_position_ids, final_norm_and_head, preset_config)

V, EOS, T = 300, 0, 24


def _windows() -> torch.Tensor:
    """Three packed windows: documents of several lengths, EOS last, EOS first, EOS twice in a row,
    and no EOS at all."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, V, (4, T), generator=g)
    ids[0, [4, 11, 12, 20]] = EOS
    ids[1, [0, T - 1]] = EOS
    ids[3, [1, 2, 3]] = EOS
    return ids


def _documents(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each document of a window: each ends with (and includes) an EOS, or the window."""
    out, start = [], 0
    for t in range(len(row)):
        if row[t] == EOS:
            out.append((start, t + 1))
            start = t + 1
    if start < len(row):
        out.append((start, len(row)))
    return out


def test_positions_and_mask_match_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        B, L = 1 + trial % 3, 1 + trial
        ids = torch.randint(0, 4, (B, L), generator=g)  # EOS (0) about every fourth token
        pos = document_position_ids(ids, EOS)
        mask = document_causal_mask(pos)
        assert pos.dtype == torch.int64 and pos.shape == (B, L) and mask.shape == (B, 1, L, L)
        for b in range(B):
            doc = [0] * L
            want_pos = [0] * L
            for t in range(1, L):
                new = bool(ids[b, t - 1] == EOS)
                doc[t] = doc[t - 1] + new
                want_pos[t] = 0 if new else want_pos[t - 1] + 1
            assert pos[b].tolist() == want_pos
            want = [[doc[q] == doc[k] and k <= q for k in range(L)] for q in range(L)]
            assert mask[b, 0].tolist() == want


def test_window_without_eos_is_plain_causal():
    ids = torch.arange(1, 9).unsqueeze(0)
    pos = document_position_ids(ids, EOS)
    assert torch.equal(pos, torch.arange(8).unsqueeze(0))
    assert torch.equal(document_causal_mask(pos)[0, 0], torch.ones(8, 8, dtype=torch.bool).tril())


def test_eager_attention_gets_an_additive_mask():
    conf = preset_config(ModelConfig(preset="tiny-student"), V)
    conf._attn_implementation = "eager"
    ids = _windows()
    got = document_inputs(conf, ids, EOS, torch.float64)["attention_mask"]
    want = document_causal_mask(document_position_ids(ids, EOS))
    assert got.dtype == torch.float64 and torch.equal(got == 0, want)


def _model(preset: str, seed: int = 5):
    return build_model(ModelConfig(preset=preset), V, seed=seed, dtype=torch.float64).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_body_packed_equals_each_document_alone(attn):
    model = _model("tiny-student")
    model.config._attn_implementation = attn
    body, head = final_norm_and_head(model)
    ids = _windows()
    with torch.no_grad():
        packed = body_hidden(body, ids, EOS) @ head.weight.T
        for b in range(len(ids)):
            for s, e in _documents(ids[b]):
                alone = body(input_ids=ids[b:b + 1, s:e]).last_hidden_state[0] @ head.weight.T
                torch.testing.assert_close(packed[b, s:e], alone, atol=1e-5, rtol=0)
        # Off (no EOS id) is the model's own forward, number for number.
        assert torch.equal(body_hidden(body, ids), body(input_ids=ids).last_hidden_state)


def test_data_parallel_student_loss_is_the_sum_over_documents_alone():
    from pd_dist.train.student import PDStudent

    ids = _windows()
    g = torch.Generator().manual_seed(4)
    targets = torch.randint(0, V, ids.shape, generator=g)
    model = _model("tiny-student")
    masked = PDStudent(model, "nll", 1.0, chunk_size=7, document_eos=EOS)
    plain = PDStudent(model, "nll", 1.0, chunk_size=7)
    with torch.no_grad():
        out = masked(ids, targets)
        lm, agree = torch.zeros((), dtype=torch.float64), 0
        for b in range(len(ids)):
            for s, e in _documents(ids[b]):
                one = plain(ids[b:b + 1, s:e], targets[b:b + 1, s:e])
                lm += one.lm_sum.double()
                assert one.n_tokens == e - s
        torch.testing.assert_close(out.lm_sum.double(), lm, atol=1e-5, rtol=0)
        assert out.n_tokens == ids.numel()
        # The mask changes the numbers once a window holds more than one document.
        assert not torch.allclose(plain(ids, targets).lm_sum.double(), lm, atol=1e-3)


def _pipeline_layers(preset: str, seed: int, document_eos):
    from pd_dist.pipeline_layers import DecoderPipe, EmbeddingPipe, LayerWeights, NormHeadPipe

    conf = preset_config(ModelConfig(preset=preset), V)
    w = LayerWeights(seed, conf.initializer_range, None)
    holder = SimpleNamespace(head=None)
    layers = [EmbeddingPipe(conf, w, document_eos)]
    layers += [DecoderPipe(conf, i, w) for i in range(conf.num_hidden_layers)]
    layers += [NormHeadPipe(conf, w, holder)]
    layers = [m.double().eval() for m in layers]

    def run(ids):
        x = ids
        for m in layers:
            x = m(x)
        return x @ holder.head.weight.T
    return run


def test_pipeline_layers_packed_equal_each_document_alone_and_the_hf_model():
    ids = _windows()
    masked, plain = _pipeline_layers("tiny-student", 5, EOS), _pipeline_layers("tiny-student", 5, None)
    model = _model("tiny-student", seed=5)
    body, head = final_norm_and_head(model)
    with torch.no_grad():
        packed = masked(ids)
        for b in range(len(ids)):
            for s, e in _documents(ids[b]):
                torch.testing.assert_close(packed[b, s:e], plain(ids[b:b + 1, s:e])[0], atol=1e-5, rtol=0)
        # The same weights as the whole HF model (drawn by name): the stages compute what it computes.
        torch.testing.assert_close(packed, body_hidden(body, ids, EOS) @ head.weight.T, atol=1e-9, rtol=0)
        torch.testing.assert_close(plain(ids), body(input_ids=ids).last_hidden_state @ head.weight.T,
                                   atol=1e-9, rtol=0)


def test_pipeline_activations_carry_positions_only_with_the_mask():
    from pd_dist.pipeline_layers import EmbeddingPipe, LayerWeights

    conf = preset_config(ModelConfig(preset="tiny-student"), V)
    w = LayerWeights(1, conf.initializer_range, None)
    ids = _windows()
    assert torch.is_tensor(EmbeddingPipe(conf, w)(ids))
    hidden, pos = EmbeddingPipe(conf, w, EOS)(ids)
    assert hidden.is_floating_point() and torch.equal(pos, document_position_ids(ids, EOS))


def test_teacher_packed_equals_each_document_alone():
    from pd_dist.core.logits import SignalSpec
    from pd_dist.teacher.inference import FrozenTeacher

    ids = _windows()
    model = _model("tiny-teacher", seed=9)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)  # sharp: top-k ties are unlikely
    top16 = SignalSpec.of("top_p_k", top_p=1.0, top_k=16)
    teacher = FrozenTeacher(model, torch.device("cpu"), torch.float64, top16, 5, document_eos=EOS)
    packed = teacher(ids)
    alone_teacher = FrozenTeacher(model, torch.device("cpu"), torch.float64, top16, 5)
    for b in range(len(ids)):
        for s, e in _documents(ids[b]):
            alone = alone_teacher(ids[b:b + 1, s:e])
            assert torch.equal(packed.indices[b, s:e], alone.indices[0])
            torch.testing.assert_close(packed.values[b, s:e], alone.values[0], atol=1e-5, rtol=0)
    windows = torch.cat([ids, torch.randint(1, V, (len(ids), 1))], dim=1)
    assert teacher.val_loss([windows]) != alone_teacher.val_loss([windows])


def test_dataset_gives_the_tokenizers_eos(smoke_data):
    from pd_dist.data import load_tokenizer

    assert smoke_data.document_eos(False) is None
    eos = smoke_data.document_eos(True)
    assert eos == load_tokenizer(smoke_data.tokenizer_dir).eos_token_id
    assert (smoke_data.stream()[:100_000] == eos).any()  # every document ends with it


# ------------------------------------------------------------------------------------- store, resume
def test_store_records_the_mask_and_older_stores_read_as_off(tmp_path):
    from test_store import full_logits, make_meta, run_kw, write_store

    from pd_dist.store import LogitsStore, StoreError, StoreMeta, open_for_training

    off, on = make_meta(), make_meta(document_mask=True)
    assert "document_mask" not in off.resolved().to_dict()  # an older store's metadata and digest
    assert on.resolved().to_dict()["document_mask"] is True and on.digest() != off.digest()
    assert StoreMeta.from_dict(off.resolved().to_dict()).document_mask is False
    full = full_logits("gauss", off.n_samples, seed=1)
    store_off = LogitsStore(write_store(tmp_path / "off", full, off))
    store_on = LogitsStore(write_store(tmp_path / "on", full, on))
    assert store_on.meta.document_mask and not store_off.meta.document_mask
    store_off.check_compatible(**run_kw())
    store_on.check_compatible(**run_kw(), document_mask=True)
    with pytest.raises(StoreError, match=r"data.document_mask=true, the run has data.document_mask=false"):
        open_for_training(tmp_path / "on", **run_kw())
    with pytest.raises(StoreError, match=r"data.document_mask=false, the run has data.document_mask=true"):
        open_for_training(tmp_path / "off", **run_kw(), document_mask=True)


def test_store_meta_of_a_run_follows_the_config(smoke_cfg, smoke_data):
    import dataclasses

    from pd_dist.teacher.specs import store_meta, wire_spec

    teacher = {"name": "t", "config_hash": "c", "weights_hash": "w"}
    on = dataclasses.replace(smoke_cfg, data=dataclasses.replace(smoke_cfg.data, document_mask=True))
    assert store_meta(on, smoke_data, teacher).document_mask is True
    assert store_meta(smoke_cfg, smoke_data, teacher).document_mask is False
    # A student and a teacher that disagree fail the handshake (hello differs).
    assert not torch.equal(wire_spec(on, smoke_data).hello(), wire_spec(smoke_cfg, smoke_data).hello())


def test_resume_refuses_a_changed_mask_and_reads_older_checkpoints_as_off():
    from test_resume_guard import _cfg, _state

    from pd_dist.train.checkpoint import ResumeError, check_run_state, objective

    old = _cfg()
    state, sampler = _state(old)
    on = _cfg("data.document_mask=true")
    with pytest.raises(ResumeError, match=r"data.document_mask was False in the checkpoint, now True"):
        check_run_state(state, on, sampler, "fp", objective(on, "w1"))
    assert check_run_state(state, on, sampler, "fp", objective(on, "w1"),
                           overrides=["data.document_mask"]) == [("data.document_mask", False, True)]
    # A checkpoint written before the key existed trained without the mask.
    del state["objective"]["data.document_mask"]
    assert check_run_state(state, old, sampler, "fp", objective(old, "w1")) == []
    with pytest.raises(ResumeError, match="data.document_mask"):
        check_run_state(state, on, sampler, "fp", objective(on, "w1"))


# ------------------------------------------------------------------------------- through the launcher
def _short_documents(path) -> None:
    """A fixed corpus of short documents (one to four made-up sentences each): most 64-token windows hold
    a document boundary, so the mask changes every loss. Generated from a seeded word list, not read from
    anywhere, so the test's figures do not move when unrelated files change."""
    import json
    import random

    words = ("the model reads a window of tokens and predicts the next one while a teacher gives its "
             "distribution over the vocabulary so the student learns from both signals at once").split()
    rng = random.Random(0)
    with open(path, "w") as fh:
        for _ in range(600):
            sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "."
                         for _ in range(rng.randint(1, 4))]
            fh.write(json.dumps({"text": " ".join(sentences)}) + "\n")


@pytest.mark.multiproc
def test_pipelined_student_and_teacher_train_as_one_rank_does(tmp_path, smoke_data, tiny_teacher_dir):
    """On short documents with the mask on, a 2-stage student pipeline fed by a 2-stage teacher pipeline
    (online) gives the one-rank colocated run's losses; and the launched runs did mask: their held-out
    figures are those of the mask, recomputed here, not the unmasked ones."""
    from conftest import launch, read_summary
    from test_layouts import COMMON

    from pd_dist.config import load_config
    from pd_dist.data import PackedDataset
    from pd_dist.explore.evaluate import held_out_metrics
    from pd_dist.teacher.inference import FrozenTeacher, held_out_batches

    corpus = tmp_path / "short.jsonl"
    _short_documents(corpus)
    data = [f"data.dir={tmp_path / 'data'}", "data.source=files", f"data.files=[{corpus}]",
            f"data.tokenizer={smoke_data.tokenizer_dir}"]  # the tiny teacher's tokenizer

    def run(name, nprocs, mode, *extra):
        out = tmp_path / name
        launch(nprocs, COMMON + data + [f"output_dir={out}", f"teacher.path={tiny_teacher_dir}",
                                        f"distill.mode={mode}", "train.zero_stage=0",
                                        "train.micro_batch_size=4", "data.document_mask=true", *extra], cwd=tmp_path)
        return read_summary(out)

    ref = run("ref", 1, "colocated")
    both = run("both", 4, "online", "topology.teacher_ranks=[0,1]", "teacher.pipeline_stages=2",
               "train.pipeline_stages=2")
    assert both["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
    assert both["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)
    assert both["teacher_val_loss"] == pytest.approx(ref["teacher_val_loss"], rel=1e-6)

    cfg = load_config(tmp_path / "ref" / "config.yaml")
    packed = PackedDataset(tmp_path / "data")
    eos = packed.document_eos(True)
    teacher = build_model(ModelConfig(path=str(tiny_teacher_dir)), packed.vocab_size, seed=0)
    student = build_model(ModelConfig(path=str(tmp_path / "ref" / "student")), packed.vocab_size, seed=0)
    figures = {}
    for mask in (eos, None):
        frozen = FrozenTeacher(teacher, torch.device("cpu"), torch.float32, cfg.distill.signal_spec(0),
                               cfg.train.loss_chunk_size, document_eos=mask)
        figures[mask] = (frozen.val_loss(held_out_batches(packed, 4)),
                         held_out_metrics(student, packed, 4, chunk_size=cfg.train.loss_chunk_size,
                                          document_eos=mask, log=lambda s: None)["val_loss"])
    # The launched figure must sit on the masked recomputation, and the unmasked one must lie far further
    # off than that agreement, so the check tells the two apart whatever the size of the mask's effect.
    for launched, (masked, unmasked) in zip((ref["teacher_val_loss"], ref["val_loss"]), zip(*figures.values())):
        assert launched == pytest.approx(masked, rel=1e-5)
        assert abs(unmasked - masked) > 20 * max(abs(launched - masked), 1e-6 * abs(masked)), (launched, masked, unmasked)
