"""No config input crashes or silently misleads a run: generated bad values for every key and type, the
non-finite and out-of-range numbers (beyond int32, beyond what fp32 represents, bools for numbers and
choices), broken or empty YAML files, control characters, non-scalar keys, deep nesting, duplicate keys,
YAML 1.1's number surprises and bad DeepSpeed base files. Every bad case is one ConfigError line naming
the key (or the file and place) from load_config; nothing is silently accepted. Merge keys work."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing

import pytest

from conftest import REPO, SMOKE


def _leaves(cls, prefix="", meta=False):
    """(dotted key, type, optional) of every leaf field of a config dataclass (+ its metadata if meta)."""
    from pd_dist.core.configlib import _is_optional

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        optional, inner = _is_optional(hints[f.name])
        if dataclasses.is_dataclass(inner):
            yield from _leaves(inner, key, meta)
        else:
            yield (key, inner, optional, f.metadata) if meta else (key, inner, optional)


def _bad_values(tp, optional, meta=None):
    """Values of the wrong type (or non-finite / out of range) for a field of type tp, as --set text."""
    from pd_dist.core.configlib import INT_BITS

    origin = typing.get_origin(tp)
    null = [] if optional else ["null"]
    if origin is typing.Literal:
        numbers = [f"{a}.0" for a in typing.get_args(tp) if type(a) is int]  # 3.0 is not the choice 3
        bools = ["true", "false"] if numbers else []
        return ["bogus-choice", "12345", "[1, 2]"] + numbers + bools + null
    if origin is list:
        (elem,) = typing.get_args(tp)
        wrong_elem = "[[1], [2]]" if elem is str else "[a, b]"
        return ["notalist", "{a: 1}", wrong_elem] + null
    if tp is bool:
        return ["maybe", "2", "1.5", "[true]", "{a: 1}"] + null
    if tp is int:
        bits = (meta or {}).get("int_bits", INT_BITS)
        return ["abc", "1.5", "true", "false", "18446744073709551616", "-1180591620717411303424", "[1]", "{a: 1}",
                "1:30", "3e5", str(2 ** bits), str(-2 ** bits - 1)] + null
    if tp is float:
        # non-finite, and finite values fp32 cannot hold: they overflow to inf or flush to 0 in the run
        return ["abc", ".nan", ".inf", "-.inf", "1e400", "true", "[1.0]", "{a: 1}", "1" + "0" * 400,
                "1e39", "-1e39", "1e300", "3.5e38", "1e-39", "-1e-40", "1e-300", "5e-324"] + null
    if tp is str:
        return ["5", "1.5", "true", "[a]", "{a: 1}", '"a\\tb"', '"a\\nb"', '"a\\x00b"'] + null
    return []


def _cases():
    from pd_dist.config import ExperimentConfig

    out = []
    for key, tp, optional, meta in _leaves(ExperimentConfig, meta=True):
        for v in _bad_values(tp, optional, meta):
            out.append((key, v))
    return out


CASES = _cases()


def test_the_fuzz_covers_every_key_with_300_plus_cases():
    from pd_dist.config import ExperimentConfig

    keys = {k for k, _, _ in _leaves(ExperimentConfig)}
    assert len(CASES) >= 700 and {k for k, _ in CASES} == keys


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={v[:20]}" for k, v in CASES])
def test_every_bad_value_is_one_line_naming_its_key(key, value):
    from pd_dist.config import load_config
    from pd_dist.core.configlib import ConfigError

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
    from pd_dist.core.configlib import ConfigError

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
    from pd_dist.core.configlib import ConfigError

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


def _one_line_error(fn, *needles):
    """The ConfigError message fn raises: one line holding every needle."""
    from pd_dist.core.configlib import ConfigError

    with pytest.raises(ConfigError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


# ------------------------------------------------------------------------------- numbers in range
# What the run computes in fp32 from each float key at its first steps; an accepted value must keep it
# finite (the oracle for the log grid below).
def _fp32_first_step_finite(key: str, v: float, smoke) -> bool:
    import datetime

    import numpy as np

    f = np.float32
    with np.errstate(all="ignore"):
        if key == "distill.temperature":  # kept logits (tens) / tau
            return bool(np.isfinite(f(80.0) / f(v)))
        if key.endswith("rope_theta"):  # rotary inverse frequencies theta ** (-2i / d)
            return bool(np.isfinite(f(1.0) / np.power(f(v), np.arange(0, 64, 2, dtype=np.float32) / f(64))).all())
        if key == "optim.eps":  # m / (sqrt(v) + eps) for a gradient of 1e-20, whose square underflows
            return bool(np.isfinite(f(1e-20) / (np.sqrt(f(1e-20) * f(1e-20)) + f(v))))
        if key in ("optim.lr", "teacher.pretrain_lr", "optim.weight_decay"):
            lr = v if key != "optim.weight_decay" else max(smoke.optim.lr, smoke.teacher.pretrain_lr)
            wd = v if key == "optim.weight_decay" else smoke.optim.weight_decay
            return bool(f(1.0) - f(lr) * f(wd) > 0 and np.isfinite(f(0.02) + f(lr)))
        if key == "topology.peer_timeout_s":  # heartbeats are 1 s apart: a shorter wait misses live peers
            return datetime.timedelta(seconds=v) >= datetime.timedelta(seconds=2)
    return True


def _float_keys():
    from pd_dist.config import ExperimentConfig

    return [k for k, tp, _ in _leaves(ExperimentConfig) if tp is float]


GRID = sorted({s * 10.0 ** e for e in range(-45, 40, 3) for s in (1, -1)} | {0.0, 1.0, 5e-324, 3.4e38})


@pytest.mark.parametrize("key", _float_keys())
def test_every_float_key_on_a_log_grid_is_accepted_finite_or_refused_by_name(key):
    """From 5e-324 to 3.4e38 and their negatives: each value loads with a finite first step or is one
    ConfigError line naming the key (the audit's 1e-40 temperature, 1e-300 eps or rope_theta, 1e300
    weight decay or lr and 1e-9 s timeout among them)."""
    from pd_dist.config import load_config
    from pd_dist.core.configlib import ConfigError

    extra = {"generate.top_p": ["distill.mode=offline", "distill.store=s"]}.get(key, [])
    accepted = 0
    for v in GRID + [1e-40, 1e-300, 1e300, 1e-9]:
        try:
            cfg = load_config(SMOKE, [f"{key}={v!r}"] + extra)
        except ConfigError as e:  # a cross-key check names the other key (alpha.max >= alpha.min)
            fp32 = v == 0 or 1.1754943508222875e-38 <= abs(v) <= 3.4028234663852886e38
            assert "\n" not in str(e) and (f"'{key}'" if not fp32 else "config key '") in str(e), str(e)
            continue
        accepted += 1
        assert _fp32_first_step_finite(key, v, cfg), f"{key}={v!r} was accepted"
    assert accepted, f"{key}: no value on the grid is accepted"


def test_int_keys_are_int32_unless_their_metadata_allows_more():
    """Every int key refuses 2^31 (or 2^63 where its metadata says int_bits=63) and bools; choices
    given as ints refuse false/true and 0.0/3.0."""
    from pd_dist.config import ExperimentConfig, TeacherConfig, load_config

    wide = []
    for key, tp, _, meta in _leaves(ExperimentConfig, meta=True):
        ints = tp is int or (typing.get_origin(tp) is list and typing.get_args(tp)[0] is int)
        choices = [a for a in typing.get_args(tp) if type(a) is int] if typing.get_origin(tp) is typing.Literal else []
        if not (ints or choices):
            continue
        bits = meta.get("int_bits", 31)
        wide += [key] if bits > 31 else []
        wrap = (lambda v: f"[{v}]") if typing.get_origin(tp) is list else (lambda v: v)
        values = [2 ** bits, -2 ** bits - 1, "true", "false"] if ints else \
            ["true", "false"] + [f"{a}.0" for a in choices]
        for v in values:
            _one_line_error(lambda: load_config(SMOKE, [f"{key}={wrap(v)}"]), key)
    assert set(wide) == {"train.seed", "data.max_chars", "data.tokenizer_train_chars", "data.shard_bytes"}
    for bad in (False, True, 0.0, 3.0):  # built in code: check_choices matches by type as well
        _one_line_error(lambda: TeacherConfig(zero_stage=bad).validate("teacher"), "'teacher.zero_stage'")


# ----------------------------------------------------------------------------- cross-key checks
@pytest.mark.parametrize("schedule", ["constant", "cosine", "wsd"])
def test_a_warmup_must_end_inside_the_run_and_the_teachers_pretraining(schedule):
    from pd_dist.config import load_config

    for steps in (1, 2, 7, 20):
        for warmup in range(0, steps + 3):
            over = [f"optim.lr_schedule={schedule}", f"train.steps={steps}", f"optim.warmup_steps={warmup}",
                    "teacher.pretrain_steps=50", "train.eval_every=0", "train.save_every=0", "train.log_every=1"]
            if warmup and warmup >= steps:
                _one_line_error(lambda: load_config(SMOKE, over), "'optim.warmup_steps'", f"train.steps = {steps}")
            else:
                assert load_config(SMOKE, over).optim.warmup_steps == warmup
    # the default teacher is pre-trained with the same optim section, for teacher.pretrain_steps
    for mode, refused in (("colocated", True), ("online", True), ("offline", True), ("none", False)):
        over = ["train.steps=100", "optim.warmup_steps=30", "teacher.pretrain_steps=30", f"distill.mode={mode}"]
        over += ["distill.store=s"] if mode == "offline" else []
        if refused:
            _one_line_error(lambda: load_config(SMOKE, over), "'optim.warmup_steps'", "teacher.pretrain_steps")
        else:
            load_config(SMOKE, over)


def test_generate_truncation_must_serve_the_offline_run_it_is_written_for():
    from pd_dist.config import load_config

    for mode in ("offline", "colocated"):
        for p, gp in [(0.5, 0.4), (0.5, 0.5), (0.5, 0.6), (0.95, 0.9), (1.0, 0.99)]:
            over = [f"distill.mode={mode}", "distill.store=s", f"distill.top_p={p}", f"generate.top_p={gp}"]
            if mode == "offline" and gp < p:
                _one_line_error(lambda: load_config(SMOKE, over), "'generate.top_p'", "distill.top_p")
            else:
                load_config(SMOKE, over)
        for k, gk in [(20, 19), (20, 20), (20, 21), (1, 1), (50, 2)]:
            over = [f"distill.mode={mode}", "distill.store=s", f"distill.top_k={k}", f"generate.top_k={gk}"]
            if mode == "offline" and gk < k:
                _one_line_error(lambda: load_config(SMOKE, over), "'generate.top_k'", "distill.top_k")
            else:
                load_config(SMOKE, over)


# ------------------------------------------------------------------------------------- YAML input
# Every C0 and C1 control character and DEL. YAML refuses all but tab, LF, CR and NEL (0x85) outright;
# those four are line structure or whitespace, and still may not end up inside a name or path.
CONTROLS = [chr(c) for c in list(range(0x20)) + list(range(0x7F, 0xA0))]
YAML_ALLOWED = {"\t", "\n", "\r", "\x85"}
PLACES = {  # where in a file the character goes
    "value": "output_dir: runs/a{c}b\n", "number": "train:\n  steps: 5{c}\n", "comment": "# a{c}b\ntrain: {{steps: 5}}\n",
    "key": "out{c}put_dir: x\n", "quoted": 'output_dir: "runs/a{c}b"\n'}


@pytest.mark.parametrize("c", CONTROLS, ids=lambda c: f"x{ord(c):02x}")
def test_control_characters_in_files_and_overrides_are_one_line(tmp_path, c):
    from pd_dist.config import load_config
    from pd_dist.core.configlib import ConfigError

    inputs = []
    for place, text in PLACES.items():
        f = tmp_path / f"{place}.yaml"
        f.write_text(text.format(c=c), encoding="utf-8", newline="")
        inputs.append((lambda f=f: load_config(f), str(f)))
    for over in (f"output_dir=runs/a{c}b", f"train.steps=5{c}", f"distill.loss=nll{c}"):
        inputs.append((lambda over=over: load_config(SMOKE, [over]), "override"))
    for load, where in inputs:
        try:
            cfg = load()
        except ConfigError as e:
            msg = str(e)
            assert "\n" not in msg and (where in msg or "config key" in msg), msg
            if c not in YAML_ALLOWED:
                assert f"control character #x{ord(c):04x}" in msg, msg
            continue
        assert c in YAML_ALLOWED, f"{where}: {c!r} was accepted"
        assert c not in cfg.output_dir


def _nested(kind: str, depth: int, indent: int = 1) -> str:
    """A YAML value nested depth levels deep (block mappings start below a key indented `indent` levels)."""
    if kind == "flow_list":
        return "[" * depth + "1" + "]" * depth
    if kind == "flow_map":
        return "{a: " * depth + "1" + "}" * depth
    return "".join("\n" + "  " * (indent + i + 1) + f"k{i}:" for i in range(depth)) + " 1"


@pytest.mark.parametrize("depth", [65, 200, 3000, 20000])
@pytest.mark.parametrize("kind", ["flow_list", "flow_map", "block_map"])
def test_deep_nesting_is_refused_before_the_stack_runs_out(tmp_path, kind, depth):
    from pd_dist.config import load_config

    f = tmp_path / "deep.yaml"
    f.write_text(f"data:\n  files: {_nested(kind, depth)}\n")
    _one_line_error(lambda: load_config(f), str(f), "nested more than 64 levels")
    if kind != "block_map":
        _one_line_error(lambda: load_config(SMOKE, [f"data.files={_nested(kind, depth)}"]), "override 'data.files=",
                        "nested more than 64 levels")
    f.write_text(f"train:\n  steps: {_nested(kind, 20)}\n")  # shallow: refused by type, by name
    _one_line_error(lambda: load_config(f), "'train.steps'")


NON_SCALAR_KEYS = ["[a, b]", "{a: 1}", "[]", "{}", "*L", "*M"]


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("key", NON_SCALAR_KEYS)
def test_a_list_or_mapping_as_a_key_is_refused(tmp_path, nested, key):
    from pd_dist.config import load_config

    anchors = "model: {path: &L [x], preset: &M {y: 1}}\n" if key.startswith("*") else ""
    entry = f"? {key}\n: 1\n"
    f = tmp_path / "key.yaml"
    f.write_text(anchors + ("train:\n" + "".join(f"  {line}\n" for line in entry.splitlines()) if nested else entry))
    _one_line_error(lambda: load_config(f), str(f), "cannot be a config key")
    if not key.startswith("*"):
        _one_line_error(lambda: load_config(SMOKE, [f"train={{{key}: 1}}"]), "override", "cannot be a config key")


def _split(section: dict) -> tuple[dict, dict]:
    items = list(section.items())
    return dict(items[: len(items) // 2]), dict(items[len(items) // 2:])


def _flow(d) -> str:
    return json.dumps(d)  # JSON is YAML flow syntax


def test_merge_keys_spread_mappings_under_the_explicit_keys(tmp_path):
    """Every section of smoke.yaml written as merges (an inline list of mappings, an anchored sibling) plus
    explicit keys loads to the same config; explicit keys win; a merged-in key overridden explicitly is no
    duplicate, an explicit key given twice still is; --set on an aliased mapping changes that one only."""
    import yaml

    from pd_dist.config import load_config

    raw = yaml.safe_load(SMOKE.read_text())
    want = load_config(SMOKE)
    for name, section in raw.items():
        if not isinstance(section, dict) or len(section) < 2:
            continue
        merged, explicit = _split(section)
        decoy = {k: "decoy" for k in explicit}  # a later merge: the explicit keys win over it
        rest = {k: v for k, v in raw.items() if k != name}
        body = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in explicit.items())
        f = tmp_path / f"merge_{name}.yaml"
        f.write_text(yaml.safe_dump(rest) + f"{name}:\n  <<: [{_flow(merged)}, {_flow(decoy)}]\n{body}")
        assert load_config(f) == want, f.read_text()
        k0 = next(iter(explicit))
        f.write_text(yaml.safe_dump(rest) + f"{name}:\n  <<: {_flow(merged)}\n{body}  {k0}: {json.dumps(explicit[k0])}\n")
        _one_line_error(lambda: load_config(f), str(f), f"'{k0}' given twice")
    # model and teacher share ModelConfig's keys: an anchor on one merged into the other
    f = tmp_path / "anchor.yaml"
    f.write_text(SMOKE.read_text().replace("model:\n  preset: tiny-student\n",
                                           "model: &m\n  preset: tiny-student\n  rope_theta: 500.0\n")
                 .replace("teacher:\n  preset: tiny-teacher\n", "teacher:\n  <<: *m\n  preset: tiny-teacher\n"))
    cfg = load_config(f, ["model.rope_theta=700"])
    assert (cfg.model.rope_theta, cfg.teacher.rope_theta, cfg.teacher.preset) == (700.0, 500.0, "tiny-teacher")
    f.write_text(SMOKE.read_text().replace("model:\n  preset: tiny-student\n", "model: &m {preset: tiny-teacher}\n")
                 .replace("teacher:\n  preset: tiny-teacher\n  pretrain_steps: 20\n", "teacher: *m\nx:\n"
                          "  pretrain_steps: 20\n").replace("x:\n  pretrain_steps: 20\n  pretrain_lr: 0.005\n", ""))
    assert "teacher: *m\ntrain:" in f.read_text()
    cfg = load_config(f, ["model.preset=tiny-student"])  # the alias is a copy once loaded
    assert (cfg.model.preset, cfg.teacher.preset) == ("tiny-student", "tiny-teacher")


def _alias_bomb(kind: str, n: int) -> list[str]:
    """Entries of a YAML list whose aliases expand exponentially (laughs), nest n deep (chain), or refer to
    themselves (a recursive list or mapping)."""
    if kind == "laughs":
        return ["&a0 [x, x, x, x, x, x, x, x, x, x]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, n)]
    if kind == "chain":
        return ["&a0 [x]"] + [f"&a{i} [*a{i - 1}]" for i in range(1, n)]
    return ["&r [*r]" if kind == "recursive_list" else "&r {k: *r}"]


@pytest.mark.parametrize("kind,n,what", [("laughs", 6, "values"), ("laughs", 9, "values"), ("chain", 70, "levels"),
                                         ("chain", 500, "levels"), ("recursive_list", 1, "levels"),
                                         ("recursive_map", 1, "levels")])
def test_aliases_that_expand_past_the_bounds_are_refused(tmp_path, kind, n, what):
    from pd_dist.config import load_config

    f = tmp_path / "aliases.yaml"
    f.write_text("data:\n  files:\n" + "".join(f"    - {v}\n" for v in _alias_bomb(kind, n)))
    _one_line_error(lambda: load_config(f), str(f), what, "once its aliases are expanded")


# ------------------------------------------------------------------------- DeepSpeed base files
BAD_DS = {  # the audit's eight kinds, then more of the same families
    "malformed": b'{"zero_optimization": {"stage": 1}',
    "a_list": b'[{"zero_optimization": {"stage": 1}}]',
    "zero_not_a_mapping": b'{"zero_optimization": 5}',
    "batch_conflict": b'{"train_batch_size": 12345}',
    "optimizer": b'{"optimizer": {"type": "Adam", "params": {"lr": 0.001}}}',
    "empty": b"",
    "binary": bytes(range(256)) * 4,
    "missing": None,
    "scheduler": b'{"scheduler": {"type": "WarmupLR"}}',
    "whitespace": b" \n\t\n",
    "null": b"null",
    "stage_string": b'{"zero_optimization": {"stage": "1"}}',
    "stage_bool": b'{"zero_optimization": {"stage": true}}',
    "stage_other": b'{"zero_optimization": {"stage": 2}}',
    "micro_conflict": b'{"train_micro_batch_size_per_gpu": 3}',
    "grad_accum_fixed": b'{"gradient_accumulation_steps": 1}',
    "clip_conflict": b'{"gradient_clipping": 0.25}',
    "batch_bool": b'{"train_batch_size": true}',
    "fp16": b'{"fp16": {"enabled": true}}',
    "amp": b'{"amp": {"enabled": true}}',
    "bf16_with_auto_precision": b'{"bf16": {"enabled": true}}',
    "nan": b'{"gradient_clipping": NaN}',
    "duplicate": b'{"zero_optimization": {"stage": 1}, "zero_optimization": {"stage": 1}}',
    "deep": b"[" * 100000 + b"]" * 100000,
    "latin1": '{"x": "caf\xe9"}'.encode("latin-1"),
}


@pytest.mark.parametrize("role", ["train", "teacher"])
@pytest.mark.parametrize("kind", list(BAD_DS))
def test_a_bad_deepspeed_base_is_refused_by_load_config(tmp_path, role, kind):
    """Before anything starts (process groups, data, the teacher's pre-training): one line naming the
    key and the file, for the student's and the teacher's base."""
    from pd_dist.config import load_config

    f = tmp_path / f"{kind}.json"
    if BAD_DS[kind] is not None:
        f.write_bytes(BAD_DS[kind])
    if role == "teacher" and kind in ("stage_other",):  # stage 1 and 2 are wrong for the ZeRO-3 teacher
        f.write_bytes(b'{"zero_optimization": {"stage": 1}}')
    over = [f"{role}.deepspeed_config={f}"]
    if kind == "bf16_with_auto_precision":
        over.append("train.precision=auto")
    _one_line_error(lambda: load_config(SMOKE, over), f"'{role}.deepspeed_config'", str(f))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_good_deepspeed_bases_load(tmp_path, stage):
    """The shipped files, copies of them, {} and values equal to the experiment's are accepted."""
    from pd_dist.config import DS_CONFIG_DIR, deepspeed_config, load_config

    shipped = json.loads((DS_CONFIG_DIR / f"zero{stage}.json").read_text())
    same = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
            "bf16": {"enabled": False}, "zero_optimization": {"stage": stage}}
    for i, base in enumerate([shipped, {}, same]):
        f = tmp_path / f"{stage}_{i}.json"
        f.write_text(json.dumps(base))
        teacher = f if stage == 3 else DS_CONFIG_DIR / "zero3.json"
        cfg = load_config(SMOKE, [f"train.zero_stage={stage}", f"train.deepspeed_config={f}", "train.precision=fp32",
                                  f"teacher.deepspeed_config={teacher if i != 2 else DS_CONFIG_DIR / 'zero3.json'}",
                                  "teacher.pretrain_batch_size=8"])
        ds = deepspeed_config(cfg, 2, bf16=False)
        assert (ds["gradient_accumulation_steps"], ds["zero_optimization"]["stage"]) == (1, stage)


def test_the_teachers_pretraining_batch_must_agree_with_a_fixed_train_batch_size(tmp_path):
    from pd_dist.config import load_config

    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_batch_size": 8}))
    load_config(SMOKE, [f"train.deepspeed_config={f}", "teacher.pretrain_batch_size=8"])
    load_config(SMOKE, [f"train.deepspeed_config={f}", "teacher.pretrain_batch_size=16", "teacher.path=t"])
    _one_line_error(lambda: load_config(SMOKE, [f"train.deepspeed_config={f}", "teacher.pretrain_batch_size=16"]),
                    "'train.deepspeed_config'", "teacher.pretrain_batch_size")


def test_the_cli_answers_a_bad_deepspeed_base_in_one_line(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text('{"zero_optimization": 5}')
    proc = subprocess.run([sys.executable, "-m", "pd_dist.cli", "config", "--set", f"teacher.deepspeed_config={f}"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("pd-dist: config key 'teacher.deepspeed_config'") and str(f) in proc.stderr
