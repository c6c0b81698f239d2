"""A resume continues the run it came from: a changed objective (student model, teacher, signal,
truncation, loss, temperature, schedules, optimizer) is refused with one line naming the key and both values, unless the change is
named with --resume-override, which records it in the run's directory."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import launch, read_summary


def _cfg(*overrides):
    from conftest import SMOKE
    from pd_dist.config import load_config

    return load_config(SMOKE, list(overrides))


def _state(cfg, digest="w1"):
    from pd_dist.train.checkpoint import objective, run_state
    from pd_dist.data import GlobalBatchSampler

    sampler = GlobalBatchSampler(100, cfg.train.global_batch_size, cfg.train.seed)
    return run_state(cfg, 3, sampler, "fp", [1.0], objective(cfg, digest)), sampler


@pytest.mark.parametrize("key,value", [
    ("distill.mode", "none"), ("distill.top_k", 7), ("distill.top_p", 0.8), ("distill.loss", "kld"),
    ("distill.temperature", 2.0), ("distill.alpha.max", 0.5), ("optim.lr", 0.001), ("optim.beta2", 0.99),
    ("optim.weight_decay", 0.0), ("train.grad_clip", 0.5), ("teacher.preset", "tiny-student"),
    ("teacher.path", "/elsewhere"), ("distill.signal", "sampled"), ("distill.samples", 20),
    ("distill.wire_dtype", "fp32"), ("model.preset", "tiny-teacher"), ("model.rope_theta", 500000.0)])
def test_each_objective_key_is_refused_then_let_through_by_its_override(key, value):
    from pd_dist.train.checkpoint import ResumeError, check_run_state, objective

    old = _cfg()
    state, sampler = _state(old)
    new = _cfg(f"{key}={value}")
    now = objective(new, "w1")
    with pytest.raises(ResumeError) as e:
        check_run_state(state, new, sampler, "fp", now)
    msg = str(e.value)
    assert "\n" not in msg and key in msg and repr(state["objective"][key]) in msg and repr(now[key]) in msg
    accepted = check_run_state(state, new, sampler, "fp", now, overrides=[key])
    assert (key, state["objective"][key], now[key]) in accepted


@pytest.mark.parametrize("mode", ["colocated", "online"])
@pytest.mark.parametrize("key,value", [("distill.signal", "head_tail"), ("distill.samples", 12),
                                       ("distill.temperature", 2.0), ("distill.top_k", 7), ("distill.top_p", 0.8)])
def test_a_resume_with_another_signal_is_refused_naming_the_key(mode, key, value):
    """The objective holds the signal's keys as its SignalSpec gives them: a resume that would train
    toward another signal (kind, draws, temperature, truncation), colocated or online, is refused
    naming the key."""
    from pd_dist.train.checkpoint import ResumeError, check_run_state, objective

    base = [f"distill.mode={mode}", "distill.signal=sampled", "distill.samples=8", "distill.loss=kld"]
    old = _cfg(*base)
    spec = old.distill.signal_spec(old.train.seed)
    keys = objective(old, "w1")
    assert {f"distill.{k}": v for k, v in spec.config_keys().items() if k != "seed"}.items() <= keys.items()
    state, sampler = _state(old)
    new = _cfg(*base, f"{key}={value}")
    with pytest.raises(ResumeError, match=key.replace(".", r"\.") + " was"):
        check_run_state(state, new, sampler, "fp", objective(new, "w1"))
    assert check_run_state(state, old, sampler, "fp", objective(old, "w1")) == []


def test_the_objective_covers_every_model_and_distill_key():
    """Derived, not listed: every key of the sections the result depends on is checked on resume,
    so a key added to them later is covered without touching the checkpoint code."""
    from pd_dist.train.checkpoint import DISTILL_OPERATIONAL, objective
    from pd_dist.config import ExperimentConfig
    from pd_dist.core.configlib import field_docs

    keys = set(objective(_cfg(), "w1"))
    for key, *_ in field_docs(ExperimentConfig):
        section, _, rest = key.partition(".")
        if section in ("model", "optim") or (section == "distill" and rest.split(".")[0] not in DISTILL_OPERATIONAL):
            assert key in keys, f"{key} is not checked on resume"


def test_the_state_saved_beside_a_checkpoint_reads_back_unchanged():
    """The JSON sidecar (checked before DeepSpeed loads tensors) compares equal to the live objective."""
    from pd_dist.train.checkpoint import CheckpointManager, check_run_state, objective

    cfg = _cfg()
    state, sampler = _state(cfg)
    side = json.loads(json.dumps({k: state[k] for k in CheckpointManager.SIDECAR_KEYS if k in state}, default=str))
    assert check_run_state(side, cfg, sampler, "fp", objective(cfg, "w1")) == []


def test_other_teacher_weights_are_refused_unknown_ones_are_not():
    from pd_dist.train.checkpoint import ResumeError, check_run_state, objective

    cfg = _cfg()
    state, sampler = _state(cfg, digest="w1")
    with pytest.raises(ResumeError, match=r"teacher.weights was 'w1' in the checkpoint, now 'w2'"):
        check_run_state(state, cfg, sampler, "fp", objective(cfg, "w2"))
    # a rank that cannot read the teacher's directory does not compare it
    assert check_run_state(state, cfg, sampler, "fp", objective(cfg, None)) == []
    assert check_run_state(state, cfg, sampler, "fp", objective(cfg, "w1")) == []


def test_a_mode_override_carries_the_teacher_keys_and_unchanged_keys_pass():
    from pd_dist.train.checkpoint import check_run_state, objective

    cfg = _cfg("distill.mode=none")
    state, sampler = _state(cfg, digest=None)
    new = _cfg()
    accepted = check_run_state(state, new, sampler, "fp", objective(new, "w1"), overrides=["distill.mode"])
    assert {k for k, _, _ in accepted} == {"distill.mode", "teacher.preset", "teacher.path", "teacher.weights"}


def test_override_keys_are_checked_before_anything_starts():
    from pd_dist.train.checkpoint import check_override_keys

    check_override_keys(["distill.loss", "teacher.weights", "optim.lr"], _cfg())
    with pytest.raises(ValueError, match="--resume-override train.steps: not a key a resume checks"):
        check_override_keys(["train.steps"], _cfg())


def test_old_checkpoints_without_an_objective_still_check_schedules():
    from pd_dist.train.checkpoint import check_run_state
    from pd_dist.core.schedules import ConfigError

    cfg = _cfg()
    state, sampler = _state(cfg)
    del state["objective"]
    assert check_run_state(state, _cfg("distill.loss=kld"), sampler, "fp") == []  # not recorded then
    with pytest.raises(ConfigError):
        check_run_state(state, _cfg("optim.lr=0.001"), sampler, "fp")


def test_weights_digest_tells_trained_models_apart(tmp_path, smoke_data):
    from pd_dist.models import ModelConfig, build_model, weights_digest

    for seed in (1, 2):
        build_model(ModelConfig(preset="tiny-teacher"), smoke_data.vocab_size, seed=seed).save_pretrained(
            str(tmp_path / str(seed)))
    shutil.copytree(tmp_path / "1", tmp_path / "1copy")
    assert weights_digest(tmp_path / "1") == weights_digest(tmp_path / "1copy") != weights_digest(tmp_path / "2")
    with pytest.raises(FileNotFoundError):
        weights_digest(tmp_path)


@pytest.mark.multiproc
def test_launcher_refuses_a_changed_loss_and_a_retrained_teacher_and_records_an_override(tmp_path, smoke_data,
                                                                                         tiny_teacher_dir):
    from pd_dist.models import ModelConfig, build_model

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    out = tmp_path / "run"
    base = [f"output_dir={out}", f"data.dir={smoke_data.path}", f"teacher.path={teacher}", "train.steps=6",
            "train.save_every=3", "train.eval_every=0"]
    launch(1, base + ["train.exit_after_steps=3"], cwd=tmp_path)

    proc = launch(1, base + ["distill.loss=kld"], cwd=tmp_path, extra_args=["--resume"], check=False)
    assert proc.returncode != 0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("pd-dist: --resume")]
    assert len(lines) == 1 and "distill.loss was 'nll' in the checkpoint, now 'kld'" in lines[0], lines
    assert "Traceback" not in proc.stdout + proc.stderr

    # Another student model: refused from the state saved beside the checkpoint, before DeepSpeed
    # would load tensors of another shape.
    proc = launch(1, base + ["model.preset=tiny-teacher"], cwd=tmp_path, extra_args=["--resume"], check=False)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("pd-dist: --resume")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "model.preset was 'tiny-student' in the checkpoint, now 'tiny-teacher'" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr and "size mismatch" not in proc.stdout + proc.stderr

    # the same path, other weights: a retrained teacher
    build_model(ModelConfig(preset="tiny-teacher"), smoke_data.vocab_size, seed=99).save_pretrained(str(teacher))
    proc = launch(1, base, cwd=tmp_path, extra_args=["--resume"], check=False)
    assert proc.returncode != 0 and "teacher.weights was" in proc.stdout + proc.stderr
    shutil.rmtree(teacher)
    shutil.copytree(tiny_teacher_dir, teacher)

    launch(1, base + ["distill.loss=kld"], cwd=tmp_path,
           extra_args=["--resume", "--resume-override", "distill.loss"])
    assert read_summary(out)["finished"]
    records = [json.loads(ln) for ln in (out / "resume_overrides.jsonl").read_text().splitlines()]
    assert [(r["key"], r["checkpoint"], r["now"], r["step"]) for r in records] == [("distill.loss", "nll", "kld", 3)]
