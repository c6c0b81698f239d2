"""Config loading: every shipped config loads, bad values are refused by key, DeepSpeed JSON is derived."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pd_dist.config import (DEFAULT_CONFIG, ExperimentConfig, config_doc, config_from_dict,
                            config_keys_markdown, deepspeed_config, dump_config, load_config)
from pd_dist.core.configlib import ConfigError, field_docs, parse_override

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((REPO / "launch" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path):
    cfg = load_config(path)
    again = config_from_dict(__import__("yaml").safe_load(dump_config(cfg)))
    assert again == cfg


def test_default_is_the_papers_best_recipe():
    cfg = load_config(None)
    assert Path(DEFAULT_CONFIG).name == "default.yaml"
    d = cfg.distill
    assert (d.mode, d.top_p, d.top_k, d.loss, d.alpha.schedule, d.alpha.max) == \
        ("colocated", 0.95, 50, "nll", "wsd", 0.9)
    assert cfg.optim.lr_schedule == "wsd"


@pytest.mark.parametrize("override,key,allowed", [
    ("distill.top_p=1.5", "distill.top_p", "(0, 1]"),
    ("distill.top_p=0", "distill.top_p", "(0, 1]"),
    ("distill.top_k=0", "distill.top_k", ">= 1"),
    ("distill.temperature=0", "distill.temperature", "> 0"),
    ("distill.temperature=-1", "distill.temperature", "> 0"),
    ("distill.alpha.max=1.5", "distill.alpha.max", "[0, 1]"),
    ("distill.alpha.value=-0.1", "distill.alpha.value", "[0, 1]"),
    ("distill.alpha.schedule=cosine", "distill.alpha.schedule", "wsd_beta"),
    ("distill.loss=kl", "distill.loss", "reverse_kld"),
    ("distill.mode=live", "distill.mode", "colocated"),
    ("optim.lr_schedule=step", "optim.lr_schedule", "cosine"),
    ("optim.lr=0", "optim.lr", "> 0"),
    ("train.micro_batch_size=3", "train.global_batch_size", "multiple of train.micro_batch_size"),
    ("train.zero_stage=4", "train.zero_stage", "0, 1, 2 or 3"),
    ("train.steps=ten", "train.steps", "integer"),
    ("train.precision=fp16", "train.precision", "fp32"),
    ("model.preset=gpt5", "model.preset", "pd-330m"),
    ("data.source=web", "data.source", "embedded"),
    ("data.files=[a.txt]", "data.files", "data.source is 'files'"),
])
def test_bad_values_name_the_key(override, key, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "launch/configs/smoke.yaml", [override])
    msg = str(e.value)
    assert f"'{key}'" in msg, msg
    if allowed:
        assert allowed in msg, msg
    assert "\n" not in msg


def test_unknown_keys_are_refused_by_full_name():
    with pytest.raises(ConfigError, match=r"unknown config key 'distill.alpha.maxx'.*max"):
        load_config(None, ["distill.alpha.maxx=0.5"])
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        config_from_dict({"trian": {"steps": 3}})


def test_overrides_parse_as_yaml():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=0.5") == ("a", 0.5)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=[x.jsonl, y.txt]") == ("a", ["x.jsonl", "y.txt"])
    assert parse_override("a=null") == ("a", None)
    with pytest.raises(ConfigError):
        parse_override("no_equals_sign")
    cfg = load_config(None, ["distill.top_k=20", "distill.alpha.schedule=constant", "train.steps=70"])
    assert (cfg.distill.top_k, cfg.distill.alpha.schedule, cfg.train.steps) == (20, "constant", 70)


def test_batch_sizes_must_divide_over_ranks():
    cfg = config_from_dict({"train": {"global_batch_size": 16, "micro_batch_size": 4}})
    cfg.check_world(1), cfg.check_world(2), cfg.check_world(4)
    assert cfg.grad_accum(2) == 2
    with pytest.raises(ConfigError, match="micro_batch_size x data-parallel size = 4 x 3"):
        cfg.check_world(3)


def test_deepspeed_json_is_derived_from_the_experiment(tmp_path):
    cfg = config_from_dict({"train": {"global_batch_size": 16, "micro_batch_size": 2, "zero_stage": 2,
                                      "grad_clip": 0.5}})
    ds = deepspeed_config(cfg, dp_size=2, bf16=False)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"] == {"enabled": False}
    # DeepSpeed's own consistency rule holds.
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    base = tmp_path / "ds.json"
    base.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    cfg.train.deepspeed_config = str(base)
    with pytest.raises(ConfigError, match="'train_batch_size' = 32 but the experiment config gives 16"):
        deepspeed_config(cfg, 2, False)
    base.write_text(json.dumps({"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="optimizer"):
        deepspeed_config(cfg, 2, False)
    base.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="train.zero_stage"):
        deepspeed_config(cfg, 2, False)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shipped_deepspeed_configs_leave_batch_sizes_to_the_experiment(stage):
    raw = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert raw[k] == "auto"
    cfg = config_from_dict({"train": {"zero_stage": stage}})
    assert deepspeed_config(cfg, 1, False)["zero_optimization"]["stage"] == stage


def test_every_key_is_documented_and_docs_are_current():
    rows = field_docs(ExperimentConfig)
    undocumented = [k for k, _, _, text in rows if not text]
    assert not undocumented, undocumented
    keys = {k for k, *_ in rows}
    for k in ("output_dir", "train.steps", "distill.mode", "distill.top_p", "distill.top_k",
              "distill.temperature", "distill.loss", "distill.alpha.schedule", "optim.lr_schedule"):
        assert k in keys
    doc = (REPO / "docs" / "config.md").read_text()
    assert config_keys_markdown() in doc
    assert doc == config_doc(), "docs/config.md is stale: pd-dist config --doc > docs/config.md"


def test_choices_are_declared_once():
    """Enum-like keys are Literal types owned by their component; the config and the code agree."""
    import typing

    from pd_dist.core import losses
    from pd_dist.signals import sources as signals
    from pd_dist.config import DistillConfig
    from pd_dist.core.configlib import literal_choices

    hints = typing.get_type_hints(DistillConfig)
    assert literal_choices(hints["loss"]) == losses.KD_LOSSES
    assert set(literal_choices(hints["mode"])) == set(signals.SOURCES)
    rows = {k: t for k, t, _, _ in field_docs(ExperimentConfig)}
    assert rows["distill.mode"] == r"none \| colocated \| online \| offline"
    with pytest.raises(ConfigError, match="'distill.wire_dtype' = 'int8': must be one of"):
        load_config(None, ["distill.wire_dtype=int8"])


@pytest.mark.multiproc  # runs pip (the wheel build): not a fast-tier test
def test_default_config_found_in_a_non_editable_install(tmp_path, installed_wheel):
    """The wheel carries the shipped YAML and DeepSpeed JSON, so `pd-dist config` works from anywhere."""
    wheel, site = installed_wheel
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"pd_dist/configs/default.yaml", "pd_dist/configs/deepspeed/zero3.json"} <= names
    assert {"pd_dist/entry/pretrain_pd.py", "pd_dist/entry/generate_logits.py",
            "pd_dist/entry/prepare_data.py"} <= names
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-m", "pd_dist.cli", "config"], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "mode: colocated" in proc.stdout
    check = ("import pd_dist.config as c, pathlib; assert pathlib.Path(c.__file__).is_relative_to(%r); "
             "c.deepspeed_config(c.load_config(None, ['train.zero_stage=3']), 1, False)" % str(site))
    assert subprocess.run([sys.executable, "-c", check], env=env, cwd=tmp_path).returncode == 0


def test_cli_reports_config_errors_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "pd_dist.cli", "config", "--set", "distill.top_k=0"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "pd-dist: config key 'distill.top_k' = 0: must be >= 1"
