"""`pd-dist eval` (explore.evaluate.evaluate_run) recomputes a run's held-out figures by the route of the
run's own evaluation (a SignalSource and the student's held-out sums): checked here against an unchunked
float64 reference, and the offline route (a store holding the held-out samples) against the colocated one."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import SMOKE


def _run_dir(tmp_path, smoke_data, overrides, seed=3):
    """A finished-looking run directory: its config.yaml and an exported student (smoke shapes)."""
    from pd_dist.config import dump_config, load_config
    from pd_dist.models import build_model

    run = tmp_path / "run"
    cfg = load_config(SMOKE, [f"output_dir={run}", f"data.dir={smoke_data.path}", *overrides])
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    build_model(cfg.model, smoke_data.vocab_size, seed=seed).save_pretrained(str(run / "student"),
                                                                             safe_serialization=True)
    return run, cfg


def _reference(student_dir, teacher_dir, data, cfg):
    """The held-out figures computed unchunked in float64 from the full logits (pd_loss_reference), with
    the teacher's top-p-k signal truncated from its full logits."""
    from pd_dist.core.logits import truncate
    from pd_dist.core.losses import pd_loss_reference
    from pd_dist.models import ModelConfig, build_model, final_norm_and_head

    student = build_model(ModelConfig(path=str(student_dir)), data.vocab_size, seed=0).eval().double()
    teacher = build_model(ModelConfig(path=str(teacher_dir)), data.vocab_size, seed=0).eval()
    body, head = final_norm_and_head(student)
    sums = torch.zeros(5, dtype=torch.float64)
    val = data.val_ids()
    with torch.no_grad():
        window = torch.from_numpy(data.batch(val))
        inp, tgt = window[:, :-1], window[:, 1:].flatten()
        hidden = body(input_ids=inp).last_hidden_state.flatten(0, 1)
        t_logits = teacher(inp).logits.float()
        sig = truncate(t_logits, cfg.distill.top_p, cfg.distill.top_k).reshape(-1)
        out = pd_loss_reference(hidden, head.weight, tgt, sig, 0.0, cfg.distill.loss,
                                cfg.distill.loss_temperature, 1.0)
        t_ce = torch.nn.functional.cross_entropy(t_logits.double().flatten(0, 1), tgt, reduction="sum")
    n = float(out.n_tokens)
    return {"val_loss": float(out.lm_sum) / n, "val_kd_loss": float(out.kd_sum) / n,
            "teacher_top1_agreement": float(out.top1_agree) / n, "teacher_val_loss": float(t_ce) / n,
            "tokens": n}


@pytest.mark.parametrize("loss", ["nll", "kld"])
def test_eval_of_a_colocated_run_matches_a_float64_reference(tmp_path, smoke_data, tiny_teacher_dir, loss):
    from pd_dist.explore.evaluate import evaluate_run

    run, cfg = _run_dir(tmp_path, smoke_data, [f"teacher.path={tiny_teacher_dir}", "distill.mode=colocated",
                                               f"distill.loss={loss}"])
    got = evaluate_run(run, log=lambda *_: None)
    want = _reference(run / "student", tiny_teacher_dir, smoke_data, cfg)
    assert got["tokens"] == want["tokens"]
    for key in ("val_loss", "val_kd_loss", "teacher_val_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    # an argmax may flip between fp32 and fp64 on a near tie: at most one token
    assert abs(got["teacher_top1_agreement"] - want["teacher_top1_agreement"]) <= 1.0 / want["tokens"]
    assert got["ppl"] == pytest.approx(math.exp(got["val_loss"]))
    assert json.loads((run / "eval.json").read_text())["val_loss"] == got["val_loss"]


def test_eval_of_an_lm_only_run_has_no_kd_figures(tmp_path, smoke_data, tiny_teacher_dir):
    from pd_dist.explore.evaluate import evaluate_run

    run, cfg = _run_dir(tmp_path, smoke_data, ["distill.mode=none"])
    got = evaluate_run(run, log=lambda *_: None, write=False)
    want = _reference(run / "student", tiny_teacher_dir, smoke_data, cfg)
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert "val_kd_loss" not in got and "teacher_top1_agreement" not in got and got["teacher_val_loss"] is None


def _store(root, cfg, data, teacher_dir):
    """A store of the teacher's signal on the held-out samples (generate.include_val); the training
    samples (never read by the evaluation) all hold the signal of the first micro-batch, which keeps the
    teacher's forward to two micro-batches' worth."""
    from pd_dist.models import ModelConfig, build_model, model_identity
    from pd_dist.teacher.inference import FrozenTeacher
    from pd_dist.teacher.specs import store_meta, stored_signal
    from pd_dist.teacher.stores import SPOOL_DIR, complete_store

    (root / SPOOL_DIR).mkdir(parents=True)
    teacher = FrozenTeacher(build_model(ModelConfig(path=str(teacher_dir)), data.vocab_size, seed=0),
                            torch.device("cpu"), torch.float32, stored_signal(cfg),
                            cfg.train.loss_chunk_size, keep_lse=True)
    first = []

    def fill(tokens, ids):
        if int(ids.max()) >= data.n_train:
            return teacher(tokens, ids)
        if not first:
            first.append(teacher(tokens, ids))
        return first[0][:len(ids)]

    complete_store(root, store_meta(cfg, data, model_identity(teacher_dir, "tiny teacher")), data, fill,
                cfg.train.micro_batch_size, source="generate", fill_from="the teacher", log=lambda *_: None)


def test_eval_of_an_offline_run_reads_the_held_out_signal_from_its_store(tmp_path, smoke_data, tiny_teacher_dir):
    """With the teacher's weights unreadable, the run's store answers: the same figures as the
    colocated route within the store's value tolerance; a store without the held-out samples gives no
    KD figures, and its teacher's loss is the run's summary's."""
    from pd_dist.explore.evaluate import evaluate_run
    from pd_dist.store import LogitsStore

    store = tmp_path / "store"
    run, cfg = _run_dir(tmp_path, smoke_data, [f"teacher.path={tmp_path / 'gone'}", "distill.mode=offline",
                                               f"distill.store={store}", "generate.include_val=true"])
    _store(store, cfg, smoke_data, tiny_teacher_dir)
    got = evaluate_run(run, log=lambda *_: None, write=False)
    want = _reference(run / "student", tiny_teacher_dir, smoke_data, cfg)
    tol = LogitsStore(store).value_tolerance()
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert got["val_kd_loss"] == pytest.approx(want["val_kd_loss"], rel=1e-5, abs=4 * tol)
    assert abs(got["teacher_top1_agreement"] - want["teacher_top1_agreement"]) <= 1.0 / want["tokens"]

    lm_store = tmp_path / "train_only"
    cfg.generate.include_val = False
    _store(lm_store, cfg, smoke_data, tiny_teacher_dir)
    text = (run / "config.yaml").read_text().replace(str(store), str(lm_store))
    (run / "config.yaml").write_text(text)
    (run / "summary.json").write_text(json.dumps({"teacher_val_loss": 1.25}))
    lines = []
    got = evaluate_run(run, log=lines.append, write=False)
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert "val_kd_loss" not in got and got["teacher_val_loss"] == 1.25
    assert any("KD figures skipped" in line for line in lines)
