"""Model presets, loading by path, the tokenizer/vocabulary checks, and the body/head split."""
from __future__ import annotations

import pytest
import torch

from pd_dist.models import (PRESETS, ModelConfig, build_model, check_same_tokenizer, final_norm_and_head,
                            preset_param_count)
from pd_dist.teacher.inference import FrozenTeacher
from pd_dist.core.logits import SignalSpec, truncate


@pytest.mark.parametrize("preset,billions", [("pd-330m", 0.33), ("pd-670m", 0.67), ("pd-1.9b", 1.9),
                                             ("pd-3.8b", 3.8), ("pd-6.8b", 6.8)])
def test_paper_student_sizes(preset, billions):
    # The paper's sizes are quoted at GLM-4's 151552-token vocabulary.
    n = preset_param_count(preset, 151552)
    assert abs(n / 1e9 - billions) / billions < 0.08, f"{preset}: {n / 1e9:.3f}B"


def test_presets_use_grouped_query_attention():
    for name, (hidden, ffn, layers, heads, kv, tied) in PRESETS.items():
        assert heads % kv == 0 and hidden % heads == 0, name


def test_build_is_seeded_and_round_trips_through_save_pretrained(tmp_path):
    a = build_model(ModelConfig(preset="tiny-student"), 300, seed=1)
    b = build_model(ModelConfig(preset="tiny-student"), 300, seed=1)
    c = build_model(ModelConfig(preset="tiny-student"), 300, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    a.save_pretrained(str(tmp_path), safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = build_model(ModelConfig(path=str(tmp_path)), 300, seed=99)
    ids = torch.randint(0, 300, (2, 9))
    torch.testing.assert_close(loaded(ids).logits, a(ids).logits)
    with pytest.raises(ValueError, match="vocab_size 300 but the run's tokenizer has 301"):
        build_model(ModelConfig(path=str(tmp_path)), 301, seed=0)
    with pytest.raises(FileNotFoundError):
        build_model(ModelConfig(path=str(tmp_path / "missing")), 300, seed=0)


def test_body_and_head_reproduce_the_models_logits():
    model = build_model(ModelConfig(preset="tiny-teacher"), 257, seed=3)
    ids = torch.randint(0, 257, (3, 11))
    body, head = final_norm_and_head(model)
    hidden = body(input_ids=ids).last_hidden_state
    torch.testing.assert_close(hidden @ head.weight.T, model(ids).logits)


def test_frozen_teacher_matches_truncating_full_logits():
    model = build_model(ModelConfig(preset="tiny-teacher"), 257, seed=4)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    ids = torch.randint(0, 257, (2, 13))
    got = FrozenTeacher(model, torch.device("cpu"), torch.float32, SignalSpec.of("top_p_k", top_p=0.9, top_k=7),
                        chunk_size=5)(ids)
    with torch.no_grad():
        want = truncate(model(ids).logits.float(), 0.9, 7)
    assert got.indices.shape == (2, 13, 7)
    torch.testing.assert_close(got.values, want.values)
    assert torch.equal(got.indices[got.mask], want.indices[want.mask])


def test_frozen_teacher_val_loss_matches_a_float64_reference(smoke_data):
    """The teacher's held-out loss (what a run reports beside its student's) is the mean next-token
    cross-entropy over the held-out windows, chunked or not."""
    from pd_dist.teacher.inference import held_out_batches

    model = build_model(ModelConfig(preset="tiny-teacher"), smoke_data.vocab_size, seed=5)
    with torch.no_grad():
        windows = torch.from_numpy(smoke_data.batch(smoke_data.val_ids()))
        logits = model.double()(windows[:, :-1]).logits
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    model.float()
    for chunk, micro in ((7, 3), (100000, 64)):
        got = FrozenTeacher(model, torch.device("cpu"), torch.float32, SignalSpec.of("top_p_k", top_p=0.95, top_k=4),
                            chunk).val_loss(
            held_out_batches(smoke_data, micro))
        assert got == pytest.approx(want, rel=1e-5)


def test_tokenizer_mismatch_is_refused(tmp_path, smoke_data):
    from pd_dist.data import load_tokenizer

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    load_tokenizer(smoke_data.tokenizer_dir).save_pretrained(str(model_dir))
    check_same_tokenizer(model_dir, smoke_data.tokenizer_dir, "the teacher")  # same: fine
    import json

    tj = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: same size, different tokenizer
    (model_dir / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="different tokenizer"):
        check_same_tokenizer(model_dir, smoke_data.tokenizer_dir, "the teacher")
