"""Design-space sweeps: a grid of normal runs started through the real launcher, resumable, evaluated alike.

A sweep file names a base experiment config and the axes to vary::

    base: ../default.yaml            # relative to the sweep file, or a shipped config name (default.yaml)
    set: {train.steps: 120}          # overrides applied to every point
    axes:                            # the cartesian product of these
      distill.loss: [nll, kld, mse]
    zip:                             # optional: groups of keys that vary together, one value at a time
      - {distill.top_p: [0.9, 0.95], distill.top_k: [20, 50]}
    one_at_a_time:                   # optional: the paper's design, each value alone from the base recipe
      distill.temperature: [0.5, 2.0]   # (one base point, then one point per value that differs from it)
      distill.alpha.schedule: [constant, wsd]
    seeds: [1234, 1]                 # train.seed of every point (default: the base config's)
    output_dir: runs/sweeps/loss
    nprocs: 1                        # ranks per point (deepspeed --num_gpus), or
    hostfile: null                   # deepspeed --hostfile (multi-node)
    teacher_signal: store            # store | as_configured
    eval_tasks: []                   # lm-eval task YAML files run on every student (pd-dist eval)

Every point is a normal run of `launch/pretrain_pd.py` (its installed copy, pd_dist/entry) with its own output directory (resolved config,
TensorBoard, summary.json, checkpoints), under `<output_dir>/points/<name>`; an LM-only baseline is
added per (student, seed): the same config with distill.mode none, shared by every point that trains
that student. With `teacher_signal: store` the points that run colocated or offline are trained offline
from a store generated once per teacher (and data): one generation job, which also pre-trains the
teacher when the config has no teacher.path, writes the widest top-p-k any point asks for and the
teacher's held-out loss; every point that differs only in what is applied at training time (loss,
temperature, alpha, LR, a narrower top-p-k) reads it, so the teacher's forward is paid once. Online
points, and points with a drawn signal (distill.signal sampled or head_tail, whose draws cannot be
formed from stored top-p-k logits), run as configured, with their teacher.path or the group's teacher
(whose store is then written but unused).

With `distill.teacher_context: document` in the base, the store is a library of per-source document
stores that serves any seq_len, blend or seed: one group per teacher and tokenizer (not per data), its
generation job run once per distinct data config of its points (a source already stored is kept), so
points along seq_len, seed and blend axes all read the one library.

Resumable: a point with a finished summary.json is skipped, one with checkpoints continues with
--resume. `--slurm` writes the generation and the points as two Slurm arrays (the second depending on
the first) and submits them.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional


from pd_dist.config import DEFAULT_CONFIG, ExperimentConfig, dump_config, load_config
from pd_dist.core.configlib import ConfigError, load_yaml, parse_override, to_dict

SHIPPED = DEFAULT_CONFIG.parent
# The launcher entry scripts installed with the package (pd_dist/entry), started by path.
ENTRY_DIR = Path(__file__).resolve().parents[1] / "entry"


def entry_script(name: str) -> Path:
    """The installed file of entry point `name` (pretrain_pd, generate_logits, prepare_data)."""
    return ENTRY_DIR / f"{name}.py"


@dataclass
class SweepSpec:
    base: str
    output_dir: str
    set: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list] = field(default_factory=dict)
    zip: list[dict[str, list]] = field(default_factory=list)
    one_at_a_time: dict[str, list] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    nprocs: int = 1
    hostfile: Optional[str] = None
    teacher_signal: Literal["store", "as_configured"] = "store"
    eval_tasks: list[str] = field(default_factory=list)
    source: Optional[str] = None  # the sweep file this came from (base and task paths are relative to it)

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: list[str] = ()) -> "SweepSpec":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"sweep file {path}: not found")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"sweep file {path}: cannot read ({e})") from None
        raw = load_yaml(text, str(path)) or {}  # the config loader: one line for any bad YAML
        if not isinstance(raw, dict):
            raise ConfigError(f"sweep file {path}: must be a mapping")
        known = {f.name for f in dataclasses.fields(cls)} - {"source"}
        for k in raw:
            if k not in known:
                raise ConfigError(f"sweep key {k!r}: unknown (one of {', '.join(sorted(known))})")
        for k in ("base", "output_dir"):
            if not raw.get(k):
                raise ConfigError(f"sweep key {k!r}: required")
        spec = cls(**raw, source=str(path.resolve()))
        for o in overrides:  # --set on the command line: added to `set`, applied to every point
            if "=" not in o:
                raise ConfigError(f"--set {o!r}: expected KEY=VALUE")
            k, v = parse_override(o)
            spec.set[k] = v
        spec.validate()
        return spec

    def resolve(self, p: str) -> Path:
        """A path in the sweep file: absolute, relative to the sweep file, or a shipped config name."""
        q = Path(p)
        if q.is_absolute():
            return q
        here = Path(self.source).parent if self.source else Path.cwd()
        if (here / q).exists():
            return (here / q).resolve()
        if (SHIPPED / q).exists():
            return SHIPPED / q
        return q.resolve()

    def validate(self) -> None:
        if not isinstance(self.set, dict):
            raise ConfigError(f"sweep key 'set': must be a mapping of config keys, got {self.set!r}")
        if not isinstance(self.axes, dict):
            raise ConfigError(f"sweep key 'axes': must be a mapping of config key -> list, got {self.axes!r}")
        for k, vals in self.axes.items():
            if not isinstance(vals, list) or not vals:
                raise ConfigError(f"sweep axis {k!r}: must be a non-empty list of values, got {vals!r}")
        if not isinstance(self.zip, list):
            raise ConfigError(f"sweep key 'zip': must be a list of groups, got {self.zip!r}")
        for i, group in enumerate(self.zip):
            if not isinstance(group, dict) or not group:
                raise ConfigError(f"sweep zip[{i}]: must be a mapping of config key -> list, got {group!r}")
            lens = {k: len(v) if isinstance(v, list) else -1 for k, v in group.items()}
            if min(lens.values()) < 1 or len(set(lens.values())) != 1:
                raise ConfigError(f"sweep zip[{i}]: every key needs a list of the same length, got {lens}")
        if not isinstance(self.one_at_a_time, dict):
            raise ConfigError(f"sweep key 'one_at_a_time': must be a mapping of config key -> list, "
                              f"got {self.one_at_a_time!r}")
        for k, vals in self.one_at_a_time.items():
            if not isinstance(vals, list) or not vals:
                raise ConfigError(f"sweep one_at_a_time {k!r}: must be a non-empty list of values, got {vals!r}")
        keys = list(self.axes) + [k for g in self.zip for k in g] + list(self.one_at_a_time)
        if len(keys) != len(set(keys)):
            raise ConfigError(f"sweep axes: a key is varied twice ({', '.join(keys)})")
        if "train.seed" in keys:
            raise ConfigError("sweep axes: vary train.seed with the `seeds` key (baselines are per seed)")
        if not all(isinstance(s, int) for s in self.seeds):
            raise ConfigError(f"sweep key 'seeds': must be a list of integers, got {self.seeds!r}")
        if self.nprocs < 1:
            raise ConfigError(f"sweep key 'nprocs': must be >= 1, got {self.nprocs}")
        if self.teacher_signal not in ("store", "as_configured"):
            raise ConfigError(f"sweep key 'teacher_signal': {self.teacher_signal!r}, must be store or as_configured")
        base = self.resolve(self.base)
        if not base.is_file():
            raise ConfigError(f"sweep key 'base': {base} not found")
        for t in self.eval_tasks:
            if not self.resolve(t).is_file():
                raise ConfigError(f"sweep key 'eval_tasks': {self.resolve(t)} not found")

    def settings(self, base_values: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
        """Every combination of the axes (cartesian) and zipped groups (in step), in file order, each
        crossed with the one-at-a-time points: the base recipe ({}), then each one_at_a_time value alone,
        skipping a value equal to the base's (``base_values``: key -> the base config's value)."""
        dims: list[list[dict[str, Any]]] = [[{k: v} for v in vals] for k, vals in self.axes.items()]
        for group in self.zip:
            n = len(next(iter(group.values())))
            dims.append([{k: vals[i] for k, vals in group.items()} for i in range(n)])
        if self.one_at_a_time:
            base_values = base_values or {}
            oat = [{}] + [{k: v} for k, vals in self.one_at_a_time.items() for v in vals
                          if not (k in base_values and base_values[k] == v)]
            dims.append(oat)
        return [dict(kv for d in combo for kv in d.items()) for combo in itertools.product(*dims)] or [{}]


@dataclass
class Point:
    """One run of the sweep."""
    name: str
    kind: Literal["pd", "baseline"]
    settings: dict[str, Any]     # the axis values of this point ({} for a baseline)
    seed: int
    config: ExperimentConfig     # resolved, output_dir = the point's directory
    baseline: Optional[str] = None  # the name of the point's LM-only baseline
    group: Optional[str] = None     # the name of its teacher/store group (teacher_signal: store)

    @property
    def dir(self) -> Path:
        return Path(self.config.output_dir)

    def state(self) -> str:
        summary = self.dir / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("finished"):
            return "finished"
        ck = self.dir / "checkpoints" / "latest"
        return "resumable" if ck.is_file() else "new"


@dataclass
class TeacherGroup:
    """The generation job shared by the points of one teacher and data (teacher_signal: store)."""
    name: str
    config: ExperimentConfig     # its output_dir holds the pre-trained teacher; distill.store the store
    # distill.teacher_context document: every distinct data config of its points (the first: config.data),
    # each generated into the one library
    datas: list = field(default_factory=list)

    @property
    def document(self) -> bool:
        return self.config.distill.teacher_context == "document"

    def job_configs(self) -> list[ExperimentConfig]:
        """The generation jobs, in order: the group's config (it pre-trains the teacher where needed), then
        for a library one per further data config, reading the teacher the first one left."""
        out = [self.config]
        for d in self.datas[1:]:
            c = copy.deepcopy(self.config)
            c.data = copy.deepcopy(d)
            c.teacher.path = str(self.teacher_dir)
            out.append(c)
        return out

    def job_file(self, i: int) -> Path:
        return self.dir / ("point.yaml" if i == 0 else f"point-data{i}.yaml")

    @property
    def dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def store(self) -> Path:
        return Path(self.config.distill.store)

    @property
    def teacher_dir(self) -> Path:
        c = self.config
        return Path(c.teacher.path) if c.teacher.path else self.dir / "teacher" / "export"

    def done(self) -> bool:
        if self.document:  # each data config's job leaves its mark once its sources are stored
            return all((self.dir / f"generated-{i}.done").is_file() for i in range(len(self.job_configs())))
        return (self.store / "manifest.json").is_file()


def _describe_data(d) -> str:
    what = (d.source if d.source != "blend" else "blend of " + ", ".join(f"{s.path} x{s.weight:g}" for s in d.blend))
    return f"{what} at seq_len {d.seq_len}"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _get_path(d: dict, dotted: str) -> Any:
    """The value at a dotted config key of a to_dict() tree; ConfigError naming the key if absent."""
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"sweep key {dotted!r}: not a config key")
        node = node[part]
    return node


def _slug(settings: dict[str, Any]) -> str:
    parts = [f"{k.split('.')[-1]}={v}" for k, v in settings.items()]
    s = ",".join(parts) or "base"
    return "".join(c if c.isalnum() or c in "=,.-_" else "_" for c in s)[:80]


def _overrides(d: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in d.items()]


class Sweep:
    """The points, groups and baselines of a SweepSpec, and how to run them."""

    def __init__(self, spec: SweepSpec, log: Callable[[str], None] = print):
        self.spec, self.log = spec, log
        self.out = Path(spec.output_dir).resolve()
        base_path = spec.resolve(spec.base)
        base = load_config(base_path, _overrides(spec.set))
        seeds = spec.seeds or [base.train.seed]
        self.oat_base = {k: _get_path(to_dict(base), k) for k in spec.one_at_a_time}
        data_dir = self.out / "data"
        self.groups: dict[str, TeacherGroup] = {}
        self.points: list[Point] = []
        baselines: dict[str, Point] = {}
        for settings in spec.settings(self.oat_base):
            for seed in seeds:
                over = {**spec.set, **settings, "train.seed": seed, "baseline.enabled": False}
                try:
                    cfg = load_config(base_path, _overrides(over))
                except ConfigError as e:
                    raise ConfigError(f"sweep point {_slug(settings)} seed {seed}: {e}") from None
                cfg.data.dir = cfg.data.dir or str(data_dir / _digest(to_dict(cfg.data)))
                group = None
                if spec.teacher_signal == "store" and cfg.distill.mode != "none":
                    group = self._group(cfg)
                    if not cfg.teacher.path:
                        cfg.teacher.path = str(group.teacher_dir)
                    # the shared store holds top-p-k logits; a drawn signal (sampled, head_tail) cannot be
                    # formed from them, so such points run as configured (with the group's teacher)
                    if cfg.distill.mode in ("colocated", "offline") and cfg.distill.signal == "top_p_k":
                        cfg.distill.mode, cfg.distill.store = "offline", str(group.store)
                name = f"{_slug(settings)}-seed{seed}"
                cfg.output_dir = str(self.out / "points" / name)
                point = Point(name, "pd", settings, seed, cfg, group=group.name if group else None)
                if cfg.distill.mode != "none":
                    b = self._baseline(cfg, seed)
                    baselines.setdefault(b.name, b)
                    point.baseline = b.name
                self.points.append(point)
        self.baselines = list(baselines.values())
        self._widen_stores()

    def _student_key(self, cfg: ExperimentConfig) -> dict:
        """What makes two runs the same student training: everything but the teacher signal and the
        run's bookkeeping (logging, evaluation and checkpoint cadence, early stops)."""
        d = to_dict(cfg)
        for k in ("distill", "teacher", "generate", "output_dir", "baseline", "topology"):
            d.pop(k, None)
        for k in ("exit_after_steps", "log_every", "eval_every", "save_every", "keep_checkpoints", "threads"):
            d["train"].pop(k, None)
        return d

    def _baseline(self, cfg: ExperimentConfig, seed: int) -> Point:
        b = copy.deepcopy(cfg)
        b.distill = dataclasses.replace(cfg.distill, mode="none", store=None, dump_logits=False)
        # An LM-only run with `baseline` on records its own LM-only curve (the points' token multipliers).
        b.baseline = dataclasses.replace(cfg.baseline, enabled=cfg.baseline.points > 1)
        name = f"lm-only-{_digest(self._student_key(b))}-seed{seed}"
        b.output_dir = str(self.out / "baselines" / name)
        return Point(name, "baseline", {}, seed, b)

    def _group(self, cfg: ExperimentConfig) -> TeacherGroup:
        # One teacher per teacher config and data (a teacher pre-trained here: with the first point's seed).
        # A document library is keyed by the teacher and the tokenizer only: any seq_len or blend reads it
        # (a tokenizer trained on the data, data.tokenizer null, depends on the data, so then it is too).
        data_key = to_dict(cfg.data)
        if cfg.distill.teacher_context == "document" and cfg.data.tokenizer:
            data_key = {"tokenizer": cfg.data.tokenizer, "teacher_seq_len": cfg.distill.teacher_seq_len}
        name = f"teacher-{_digest({'teacher': to_dict(cfg.teacher), 'data': data_key})}"
        if name in self.groups and self.groups[name].document:
            g = self.groups[name]
            if all(to_dict(d) != to_dict(cfg.data) for d in g.datas):
                g.datas.append(copy.deepcopy(cfg.data))
        if name not in self.groups:
            g = copy.deepcopy(cfg)
            g.output_dir = str(self.out / "teachers" / name)
            g.distill = dataclasses.replace(cfg.distill, mode="offline", signal="top_p_k",
                                            store=str(self.out / "teachers" / name / "store"))
            g.generate = dataclasses.replace(cfg.generate, include_val=True)
            self.groups[name] = TeacherGroup(name, g, datas=[copy.deepcopy(cfg.data)])
        return self.groups[name]

    def _widen_stores(self) -> None:
        """Each store keeps the widest truncation any of its points asks for (narrower ones re-truncate)."""
        for g in self.groups.values():
            pts = [p for p in self.points if p.group == g.name and p.config.distill.mode == "offline"]
            if pts:
                g.config.generate.top_p = max(p.config.distill.top_p for p in pts)
                g.config.generate.top_k = max(p.config.distill.top_k for p in pts)

    # ---------------------------------------------------------------------------------- planning
    def describe(self) -> str:
        """The dry run: every job, what it shares, its state and the cost estimate."""
        from pd_dist.models import preset_param_count

        lines = [f"sweep {self.spec.source}: {len(self.points)} point(s), {len(self.baselines)} LM-only "
                 f"baseline(s), {len(self.groups)} teacher/store job(s) -> {self.out}"]
        total_student, total_teacher = 0.0, 0.0

        def params(m, vocab):
            try:
                return preset_param_count(m.preset, vocab) if not m.path else None
            except Exception:
                return None

        for g in self.groups.values():
            c = g.config
            what = (f"document library {g.store} (one store per source) for {len(g.datas)} data config(s): "
                    + "; ".join(_describe_data(d) for d in g.datas) if g.document else f"store {g.store}")
            lines.append(f"  [teacher] {g.name}: teacher {c.teacher.path or c.teacher.preset + ' (pre-trained here)'}"
                         f" -> {what} top-{c.generate.top_p}-{c.generate.top_k} "
                         f"[{'done' if g.done() else 'to do'}]")
            pt = params(c.teacher, c.data.vocab_size)
            if pt and not c.teacher.path:
                total_teacher += 6 * pt * c.teacher.pretrain_steps * c.data.seq_len * (
                    c.teacher.pretrain_batch_size or c.train.global_batch_size)
        for p in self.baselines + self.points:
            c = p.config
            tokens = c.train.steps * c.train.global_batch_size * c.data.seq_len
            ps = params(c.model, c.data.vocab_size)
            if ps:
                total_student += 6 * ps * tokens
            share = f" | store of {p.group}" if p.group and c.distill.mode == "offline" else ""
            share += f" | baseline {p.baseline}" if p.baseline else ""
            lines.append(f"  [{p.kind}] {p.name}: {_overrides(p.settings) or ['(base)']} seed {p.seed}, "
                         f"mode {c.distill.mode}, {tokens / 1e6:.2f}M tokens{share} [{p.state()}]")
        lines.append(f"cost: student training ~{total_student:.3g} FLOPs over all runs"
                     + (f", teacher pre-training ~{total_teacher:.3g} FLOPs" if total_teacher else "")
                     + "; each store's teacher forward once (2 x teacher params x its samples' tokens)")
        return "\n".join(lines)

    def write_plan(self) -> None:
        """sweep.json (the spec and every point) and each point's point.json + point.yaml."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "sweep.json").write_text(json.dumps({
            "spec": dataclasses.asdict(self.spec), "axes": self.axis_keys(), "oat_base": self.oat_base,
            "points": [self._point_record(p) for p in self.points + self.baselines],
            "groups": {g.name: str(g.dir) for g in self.groups.values()}}, indent=1, default=str))
        for job in self.points + self.baselines:
            job.dir.mkdir(parents=True, exist_ok=True)
            (job.dir / "point.yaml").write_text(dump_config(job.config))
        for g in self.groups.values():
            g.dir.mkdir(parents=True, exist_ok=True)
            for i, c in enumerate(g.job_configs()):
                g.job_file(i).write_text(dump_config(c))
        for p in self.points + self.baselines:
            (p.dir / "point.json").write_text(json.dumps(self._point_record(p), indent=1, default=str))

    def axis_keys(self) -> list[str]:
        return list(self.spec.axes) + [k for g in self.spec.zip for k in g] + list(self.spec.one_at_a_time)

    def _point_record(self, p: Point) -> dict:
        base = next((b for b in self.baselines if b.name == p.baseline), None)
        return {"name": p.name, "kind": p.kind, "settings": p.settings, "seed": p.seed, "dir": str(p.dir),
                "baseline_dir": str(base.dir) if base else None, "group": p.group}

    # ---------------------------------------------------------------------------------- running
    def _launch_cmd(self, script: str, config: Path, resume: bool) -> list[str]:
        exe = Path(sys.executable).parent / "deepspeed"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
        if self.spec.hostfile:
            cmd += ["--hostfile", str(self.spec.resolve(self.spec.hostfile))]
        else:
            cmd += ["--num_gpus", str(self.spec.nprocs), "--master_port", str(_free_port())]
        cmd += [str(entry_script(script)), "--config", str(config)]
        return cmd + (["--resume"] if resume else [])

    def _run(self, cmd: list[str], log_file: Path) -> None:
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        with open(log_file, "a") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        if proc.returncode:
            tail = "\n".join(log_file.read_text().splitlines()[-25:])
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); log {log_file}:\n{tail}")

    def run(self, evaluate: bool = True) -> None:
        """Every job in order (teachers/stores, baselines, points), skipping finished ones, then eval."""
        self.write_plan()
        for g in self.groups.values():
            if g.done():
                self.log(f"[sweep] {g.name}: store done, reused")
                continue
            # The generation job also pre-trains the teacher when it has no path (online points use it too).
            for i in range(len(g.job_configs())):
                if g.document and (g.dir / f"generated-{i}.done").is_file():
                    continue
                self.log(f"[sweep] {g.name}: generating the store{f' (data config {i + 1})' if g.document else ''} "
                         f"(log {g.dir / 'run.log'})")
                self._run(self._launch_cmd("generate_logits", g.job_file(i), False), g.dir / "run.log")
                if g.document:
                    (g.dir / f"generated-{i}.done").write_text("")
        jobs = self.baselines + self.points
        for i, p in enumerate(jobs, 1):
            state = p.state()
            if state == "finished":
                self.log(f"[sweep] {i}/{len(jobs)} {p.name}: finished, skipped")
            else:
                self.log(f"[sweep] {i}/{len(jobs)} {p.name}: {'resuming' if state == 'resumable' else 'running'}"
                         f" (log {p.dir / 'run.log'})")
                self._run(self._launch_cmd("pretrain_pd", p.dir / "point.yaml", state == "resumable"),
                          p.dir / "run.log")
            if p.state() != "finished":  # stopped early (train.exit_after_steps): resumed next time
                self.log(f"[sweep] {p.name}: stopped before its last step; run the sweep again to continue")
                continue
            if evaluate and not (p.dir / "eval.json").is_file():
                from pd_dist.explore.evaluate import evaluate_run

                base = next((b for b in self.baselines if b.name == p.baseline), None)
                evaluate_run(p.dir, tasks=[self.spec.resolve(t) for t in self.spec.eval_tasks],
                             baseline=base.dir if base else None, log=self.log)
        self.log(f"[sweep] done: pd-dist report {self.out}")

    # ---------------------------------------------------------------------------------- slurm
    def slurm_scripts(self, partition: Optional[str] = None) -> dict[str, str]:
        """Two array scripts: the teacher/store jobs, then every run (baselines first) and its eval."""
        pd_dist = f"{sys.executable} -m pd_dist.cli"
        head = ["#!/bin/bash", "#SBATCH --nodes=1", f"#SBATCH --ntasks-per-node={self.spec.nprocs}",
                "#SBATCH --output=%x-%A_%a.out"] + ([f"#SBATCH --partition={partition}"] if partition else [])
        env = ["export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)",
               "export MASTER_PORT=$((20000 + SLURM_ARRAY_TASK_ID % 10000))"]
        out = {}
        groups = list(self.groups.values())
        if groups:
            # A library's jobs run in order in its task (each adds the sources of one data config).
            cases = "\n".join(f"  {i}) CFGS=\"{' '.join(str(g.job_file(j)) for j in range(len(g.job_configs())))}\" ;;"
                              for i, g in enumerate(groups))
            out["teachers.sbatch"] = "\n".join(head + ["#SBATCH --job-name=pd-sweep-teachers",
                                                       f"#SBATCH --array=0-{len(groups) - 1}", *env,
                                                       "case $SLURM_ARRAY_TASK_ID in", cases, "esac",
                                                       "for CFG in $CFGS; do",
                                                       f"  srun {sys.executable} {entry_script('generate_logits')} --config $CFG || exit 1",
                                                       "done"]) + "\n"
        jobs = self.baselines + self.points
        cases = "\n".join(f"  {i}) DIR={p.dir} ;;" for i, p in enumerate(jobs))
        out["points.sbatch"] = "\n".join(head + ["#SBATCH --job-name=pd-sweep-points",
                                                 f"#SBATCH --array=0-{len(jobs) - 1}", *env,
                                                 "case $SLURM_ARRAY_TASK_ID in", cases, "esac",
                                                 "RESUME=; [ -f $DIR/checkpoints/latest ] && RESUME=--resume",
                                                 f"[ -f $DIR/summary.json ] && grep -q '\"finished\": true' $DIR/summary.json || "
                                                 f"srun {sys.executable} {entry_script('pretrain_pd')} --config $DIR/point.yaml $RESUME",
                                                 f"{pd_dist} eval $DIR" + "".join(
                                                     f" --tasks {self.spec.resolve(t)}" for t in self.spec.eval_tasks)]) + "\n"
        return out

    def submit_slurm(self, partition: Optional[str] = None) -> list[str]:
        """Write the array scripts under <output_dir>/slurm and submit them (points after teachers).
        Baselines and points run as independent array tasks: a point's eval reads its baseline when done."""
        if shutil.which("sbatch") is None:
            raise RuntimeError("--slurm: sbatch not found on PATH")
        self.write_plan()
        d = self.out / "slurm"
        d.mkdir(parents=True, exist_ok=True)
        ids, dep = [], []
        for name, text in self.slurm_scripts(partition).items():
            (d / name).write_text(text)
            cmd = ["sbatch", "--parsable", *dep, str(d / name)]
            job = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=d).stdout.strip().split(";")[0]
            ids.append(job)
            dep = [f"--dependency=afterok:{job}"]
        return ids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
