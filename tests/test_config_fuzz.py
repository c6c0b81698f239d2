"""No config input crashes or silently misleads a run: generated bad values for every key and type, the
non-finite and out-of-range numbers, broken or empty YAML files, duplicate keys and YAML 1.1's number
surprises. Every bad case is one ConfigError line naming the key; nothing is silently accepted."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

import pytest

from conftest import REPO, SMOKE


def _leaves(cls, prefix=""):
    """(dotted key, type) of every leaf field of a config dataclass."""
    from pd_dist.configlib import _is_optional

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        optional, inner = _is_optional(hints[f.name])
        if dataclasses.is_dataclass(inner):
            yield from _leaves(inner, key)
        else:
            yield key, inner, optional


def _bad_values(tp, optional):
    """Values of the wrong type (or non-finite / out of range) for a field of type tp, as --set text."""
    origin = typing.get_origin(tp)
    null = [] if optional else ["null"]
    if origin is typing.Literal:
        return ["bogus-choice", "12345", "[1, 2]"] + null
    if origin is list:
        (elem,) = typing.get_args(tp)
        wrong_elem = "[[1], [2]]" if elem is str else "[a, b]"
        return ["notalist", "{a: 1}", wrong_elem] + null
    if tp is bool:
        return ["maybe", "2", "1.5", "[true]", "{a: 1}"] + null
    if tp is int:
        return ["abc", "1.5", "true", "18446744073709551616", "-1180591620717411303424", "[1]", "{a: 1}",
                "1:30", "3e5"] + null
    if tp is float:
        return ["abc", ".nan", ".inf", "-.inf", "1e400", "true", "[1.0]", "{a: 1}",
                "1" + "0" * 400] + null
    if tp is str:
        return ["5", "1.5", "true", "[a]", "{a: 1}"] + null
    return []


def _cases():
    from pd_dist.config import ExperimentConfig

    out = []
    for key, tp, optional in _leaves(ExperimentConfig):
        for v in _bad_values(tp, optional):
            out.append((key, v))
    return out


CASES = _cases()


def test_the_fuzz_covers_every_key_with_300_plus_cases():
    from pd_dist.config import ExperimentConfig

    keys = {k for k, _, _ in _leaves(ExperimentConfig)}
    assert len(CASES) >= 300 and {k for k, _ in CASES} == keys


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={v[:20]}" for k, v in CASES])
def test_every_bad_value_is_one_line_naming_its_key(key, value):
    from pd_dist.config import load_config
    from pd_dist.configlib import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, [f"{key}={value}"])
    msg = str(e.value)
    assert "\n" not in msg and key in msg, msg


@pytest.mark.parametrize("override,key", [
    ("distill.temperature=.inf", "distill.temperature"), ("model.rope_theta=0", "model.rope_theta"),
    ("model.rope_theta=-1", "model.rope_theta"), ("model.rope_theta=.nan", "model.rope_theta"),
    ("teacher.rope_theta=.inf", "teacher.rope_theta"), ("train.grad_clip=.nan", "train.grad_clip"),
    ("optim.eps=.inf", "optim.eps"), ("optim.weight_decay=.nan", "optim.weight_decay"),
    ("optim.weight_decay=.inf", "optim.weight_decay"), ("topology.peer_timeout_s=.inf", "topology.peer_timeout_s"),
    ("topology.peer_timeout_s=1e300", "topology.peer_timeout_s"), ("train.seed=-1", "train.seed"),
    ("train.seed=9223372036854775808", "train.seed"), ("output_dir=", "output_dir"), ("output_dir=' '", "output_dir"),
    ("optim.warmup_steps=50", "optim.warmup_steps"), ("train.steps=1:30", "train.steps"),
    ("optim.lr=1e400", "optim.lr"),
])
def test_values_that_would_mislead_a_run_are_refused(override, key):
    from pd_dist.config import load_config
    from pd_dist.configlib import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, [override, "train.steps=20"] if not override.startswith("train.steps") else [override])
    assert key in str(e.value) and "\n" not in str(e.value)


def test_yaml_1_2_numbers():
    from pd_dist.config import load_config

    cfg = load_config(SMOKE, ["optim.lr=1e-3", "distill.temperature=2", "train.steps=1_000"])
    assert cfg.optim.lr == 0.001 and cfg.distill.temperature == 2.0 and cfg.train.steps == 1000


@pytest.mark.parametrize("text,needle", [
    ("train:\n\tsteps: 5\n", "line 2, column 1"),
    ("train: {steps: 5\n", "not valid YAML"),
    ("train:\n  steps: 5\n---\ntrain:\n  steps: 6\n", "line 3"),
    ("train: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("train:\n  steps: 5\n  steps: 6\n", "'steps' given twice"),
    ("", "is empty"),
    ("# only a comment\n", "is empty"),
    ("- a\n- b\n", "mapping at the top level"),
])
def test_broken_yaml_files_are_one_line_with_the_place(tmp_path, text, needle):
    from pd_dist.config import load_config
    from pd_dist.configlib import ConfigError

    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert needle in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value)


def test_invalid_utf8_and_the_cli_answer_in_one_line(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    for cfg in (f, tmp_path / "dup.yaml"):
        if cfg.name == "dup.yaml":
            cfg.write_text("train:\n  steps: 5\ntrain:\n  steps: 6\n")
        proc = subprocess.run([sys.executable, "-m", "pd_dist.cli", "config", "--config", str(cfg)],
                              capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and str(cfg) in proc.stderr
    assert "not UTF-8" in subprocess.run([sys.executable, "-m", "pd_dist.cli", "config", "--config", str(f)],
                                         capture_output=True, text=True, cwd=REPO).stderr
