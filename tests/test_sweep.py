"""pd-dist sweep / eval / report: the grid, what its points share, a real sweep through the launcher that
is stopped and resumed, every student evaluated alike (lm-eval on a local task), and a report that can be
deleted and written again from the run directories."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SMOKE


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def _sweep(tmp_path, **kw):
    from pd_dist.explore.sweep import Sweep, SweepSpec

    spec = {"base": str(SMOKE), "output_dir": str(tmp_path / "sw"), **kw}
    return Sweep(SweepSpec.load(_write(tmp_path / "s.yaml", spec)), log=lambda *_: None)


@pytest.mark.parametrize("spec,needle", [
    ({"axes": {"distill.loss": "nll"}}, "sweep axis 'distill.loss': must be a non-empty list"),
    ({"axes": {"distill.lossy": ["nll"]}}, "distill.lossy"),
    ({"axes": {"distill.loss": ["nll", "bogus"]}}, "distill.loss"),
    ({"zip": [{"distill.top_p": [0.9, 0.95], "distill.top_k": [5]}]}, "same length"),
    ({"axes": {"distill.top_k": [5]}, "zip": [{"distill.top_k": [5]}]}, "varied twice"),
    ({"axes": {"train.seed": [1, 2]}}, "seeds"),
    ({"one_at_a_time": {"distill.loss": []}}, "sweep one_at_a_time 'distill.loss': must be a non-empty list"),
    ({"one_at_a_time": {"distill.colour": [1]}}, "'distill.colour': not a config key"),
    ({"axes": {"distill.loss": ["nll"]}, "one_at_a_time": {"distill.loss": ["kld"]}}, "varied twice"),
    ({"colour": 1}, "sweep key 'colour': unknown"),
    ({"base": "/nonexistent.yaml"}, "not found"),
])
def test_bad_sweeps_are_refused_with_one_line_naming_the_key(tmp_path, spec, needle):
    from pd_dist.core.configlib import ConfigError

    with pytest.raises(ConfigError) as e:
        _sweep(tmp_path, **spec)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_grid_zip_seeds_baselines_and_shared_stores(tmp_path, tiny_teacher_dir):
    sw = _sweep(tmp_path, set={"teacher.path": str(tiny_teacher_dir)},
                axes={"distill.loss": ["nll", "kld"], "distill.temperature": [1.0, 2.0]},
                zip=[{"distill.top_p": [0.9, 1.0], "distill.top_k": [5, 20]}], seeds=[1, 2])
    assert len(sw.points) == 2 * 2 * 2 * 2
    assert len({p.name for p in sw.points}) == len(sw.points)
    # one teacher and one store for all: they differ only in what is applied at training time
    assert len(sw.groups) == 1
    g = next(iter(sw.groups.values()))
    assert (g.config.generate.top_p, g.config.generate.top_k) == (1.0, 20)  # the widest any point asks for
    assert all(p.config.distill.mode == "offline" and p.config.distill.store == str(g.store) for p in sw.points)
    # one LM-only baseline per (student, seed), shared by every point of that seed
    assert len(sw.baselines) == 2
    for p in sw.points:
        b = next(b for b in sw.baselines if b.name == p.baseline)
        assert b.seed == p.seed and b.config.distill.mode == "none" and b.config.train.seed == p.seed
    zipped = {(p.config.distill.top_p, p.config.distill.top_k) for p in sw.points}
    assert zipped == {(0.9, 5), (1.0, 20)}


def test_drawn_signal_points_run_as_configured_beside_a_top_p_k_store(tmp_path, tiny_teacher_dir):
    """A drawn signal cannot be formed from stored top-p-k logits: its points keep their mode (with the
    group's teacher) while the top-p-k points share the group's store, which stays top-p-k."""
    sw = _sweep(tmp_path, set={"teacher.path": str(tiny_teacher_dir), "distill.loss": "kld"},
                axes={"distill.signal": ["sampled", "top_p_k", "head_tail"]})
    g = next(iter(sw.groups.values()))
    assert len(sw.groups) == 1 and g.config.distill.signal == "top_p_k"
    modes = {p.config.distill.signal: (p.config.distill.mode, p.config.distill.store) for p in sw.points}
    assert modes == {"top_p_k": ("offline", str(g.store)), "sampled": ("colocated", None),
                     "head_tail": ("colocated", None)}


def test_one_at_a_time_varies_each_key_alone_from_the_base(tmp_path, tiny_teacher_dir):
    from pd_dist.config import load_config

    base = load_config(SMOKE)
    sw = _sweep(tmp_path, set={"teacher.path": str(tiny_teacher_dir)}, seeds=[1, 2],
                axes={"distill.top_p": [0.9, 1.0]},
                one_at_a_time={"distill.loss": [base.distill.loss, "mse"],
                               "distill.temperature": [0.5, base.distill.temperature, 2.0]})
    # per (top_p, seed): the base recipe, mse, 0.5, 2.0 (the base's own values are the base point)
    assert len(sw.points) == 2 * 2 * 4
    assert sw.oat_base == {"distill.loss": base.distill.loss, "distill.temperature": base.distill.temperature}
    combos = {(p.config.distill.top_p, p.config.distill.loss, p.config.distill.temperature) for p in sw.points}
    t0, l0 = base.distill.temperature, base.distill.loss
    assert combos == {(tp, l, t) for tp in (0.9, 1.0) for l, t in ((l0, t0), ("mse", t0), (l0, 0.5), (l0, 2.0))}
    assert all(len(set(p.settings) & set(sw.oat_base)) <= 1 for p in sw.points)
    assert len(sw.groups) == 1 and len(sw.baselines) == 2


def test_report_compares_a_one_at_a_time_key_with_the_base_only():
    from pd_dist.explore.report import axis_rows, axis_table

    plan = {"oat_base": {"distill.loss": "nll", "distill.temperature": 1.0}}

    def row(settings, loss):
        return {"settings": settings, "val_loss": loss, "gain": (5.0 - loss) / 5.0, "agreement": None,
                "downstream": {}}
    rows = [row({}, 4.9), row({"distill.loss": "mse"}, 4.8), row({"distill.temperature": 2.0}, 5.5),
            row({"distill.temperature": 0.5}, 4.7)]
    loss = axis_rows("distill.loss", rows, plan)
    assert [(r["settings"]["distill.loss"], r["val_loss"]) for r in loss] == [("nll", 4.9), ("mse", 4.8)]
    temp = axis_rows("distill.temperature", rows, plan)
    assert sorted(r["settings"]["distill.temperature"] for r in temp) == [0.5, 1.0, 2.0]
    table, summary = axis_table("distill.temperature", temp)
    assert summary.startswith("best distill.temperature: 0.5 (val loss 4.7000)")
    assert any(line.startswith("| 1.0 | 1 | 4.9000 | +2.00% |") for line in table), table
    # a cartesian axis of the same sweep uses only the points at the base recipe
    both = [{**r, "settings": {**r["settings"], "distill.top_k": 5}} for r in rows]
    assert [r["val_loss"] for r in axis_rows("distill.top_k", both, plan)] == [4.9]


def test_teacher_and_student_axes_split_stores_and_baselines(tmp_path):
    sw = _sweep(tmp_path, axes={"teacher.preset": ["tiny-teacher", "tiny-student"],
                                "model.preset": ["tiny-student", "tiny-teacher"]})
    assert len(sw.groups) == 2  # one store per teacher
    assert len(sw.baselines) == 2  # one baseline per student
    assert {p.config.teacher.path for p in sw.points} == {str(g.teacher_dir) for g in sw.groups.values()}


def test_dry_run_lists_points_sharing_and_cost(tmp_path, tiny_teacher_dir):
    f = _write(tmp_path / "s.yaml", {"base": str(SMOKE), "output_dir": str(tmp_path / "sw"),
                                     "set": {"teacher.path": str(tiny_teacher_dir)},
                                     "axes": {"distill.loss": ["nll", "kld"]}})
    out = subprocess.run([sys.executable, "-m", "pd_dist.cli", "sweep", str(f), "--dry-run", "--slurm"],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "2 point(s), 1 LM-only baseline(s), 1 teacher/store job(s)" in out
    assert out.count("| store of teacher-") == 2 and "cost: student training" in out
    assert "#SBATCH --array=0-2" in out and "--dependency" not in out  # scripts shown, nothing submitted
    assert "pd_dist/entry/pretrain_pd.py --config $DIR/point.yaml" in out  # the installed entry script
    assert not (tmp_path / "sw").exists()


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory):
    """A tiny multiple-choice task in lm-eval's YAML + jsonl format, on local files only."""
    d = tmp_path_factory.mktemp("task")
    rows = [{"q": "def f(x):\n    return", "choices": [" x", " the", " zebra"], "a": 0},
            {"q": "import", "choices": [" os", " red", " happily"], "a": 0},
            {"q": "for i in", "choices": [" range(10):", " blue sky", " quickly"], "a": 0},
            {"q": "The", "choices": [" same", " ))))", " ::::"], "a": 0}]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "pd_test_mc.yaml").write_text(yaml.safe_dump({
        "task": "pd_test_mc", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(d / "mc.jsonl")}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{a}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    return d / "pd_test_mc.yaml"


@pytest.mark.multiproc
def test_sweep_runs_resumes_evaluates_and_reports(tmp_path, smoke_data, tiny_teacher_dir, mc_task,
                                                  installed_wheel):
    """From the installed wheel (its console script, run outside the checkout): the sweep starts the
    installed entry scripts (pd_dist/entry), not the checkout's launch/ folder."""
    _, site = installed_wheel
    out = tmp_path / "sw"
    f = _write(tmp_path / "s.yaml", {
        "base": "smoke.yaml",  # a shipped config, found by name in the install
        "output_dir": str(out), "axes": {"distill.loss": ["nll", "mse"]},
        "set": {"teacher.path": str(tiny_teacher_dir), "data.dir": str(smoke_data.path), "train.steps": 6,
                "train.save_every": 3, "train.eval_every": 0},
        "eval_tasks": [str(mc_task)]})
    env = dict(os.environ, PYTHONPATH=str(site),
               PATH=f"{site / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    pd_dist = str(site / "bin" / "pd-dist")  # the wheel's console script
    where = subprocess.run([sys.executable, "-c", "import pd_dist; print(pd_dist.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site)

    def sweep(*args):
        proc = subprocess.run([pd_dist, "sweep", str(f), *args], capture_output=True,
                              text=True, cwd=tmp_path, env=env, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    # First pass stops every run after 3 of its 6 steps (a time-limited allocation)...
    log = sweep("--set", "train.exit_after_steps=3")
    assert log.count("stopped before its last step") == 3
    # ...the second continues each from its checkpoint.
    log = sweep()
    assert log.count(": resuming") == 3 and "generating the store" not in log
    plan = json.loads((out / "sweep.json").read_text())
    runs = {p["name"]: p for p in plan["points"]}
    assert len(runs) == 3
    stores = list((out / "teachers").glob("*/store/manifest.json"))
    assert len(stores) == 1  # the teacher's forward paid once for both losses
    for rec in runs.values():
        d = Path(rec["dir"])
        run_log = (d / "run.log").read_text()
        assert str(site / "pd_dist" / "entry" / "pretrain_pd.py") in run_log and str(REPO / "launch") not in run_log
        s = json.loads((d / "summary.json").read_text())
        assert s["finished"] and len(s["losses"]) == 6
        e = json.loads((d / "eval.json").read_text())
        # eval recomputes the run's own final evaluation on the same held-out samples
        assert e["val_loss"] == pytest.approx(s["val_loss"], rel=1e-4)
        acc = e["downstream"]["pd_test_mc"]["acc"]
        assert 0.0 <= acc <= 1.0 and e["downstream"]["pd_test_mc"]["samples"] == 4
        if rec["kind"] == "pd":
            base = json.loads((Path(rec["baseline_dir"]) / "summary.json").read_text())
            assert e["lm_only_val_loss"] == pytest.approx(base["val_loss"], rel=1e-4)
            assert e["pd_gain"] == pytest.approx((e["lm_only_val_loss"] - e["val_loss"]) / e["lm_only_val_loss"])
            assert 0.0 <= e["teacher_top1_agreement"] <= 1.0 and math.isfinite(e["val_kd_loss"])
            assert s["teacher_val_loss"] == pytest.approx(e["teacher_val_loss"], rel=1e-4)
    # The two losses trained differently from the same store (NLL and KLD would not: they differ by the
    # teacher's entropy, a constant for the student).
    finals = [json.loads((Path(r["dir"]) / "eval.json").read_text())["val_loss"] for r in runs.values()
              if r["kind"] == "pd"]
    assert abs(finals[0] - finals[1]) > 1e-4

    log = sweep()
    assert log.count("finished, skipped") == 3 and ": running" not in log and ": resuming" not in log

    # pd-dist eval alone writes what the sweep's eval wrote
    point = Path(next(r["dir"] for r in runs.values() if r["kind"] == "pd"))
    first_eval = json.loads((point / "eval.json").read_text())
    (point / "eval.json").unlink()
    subprocess.run([pd_dist, "eval", str(point), "--tasks", str(mc_task)], check=True, capture_output=True,
                   cwd=tmp_path, env=env)
    again = json.loads((point / "eval.json").read_text())
    assert again["val_loss"] == pytest.approx(first_eval["val_loss"], rel=1e-6)
    assert again["downstream"]["pd_test_mc"]["acc"] == first_eval["downstream"]["pd_test_mc"]["acc"]

    rep = subprocess.run([pd_dist, "report", str(out)], capture_output=True, text=True,
                         cwd=tmp_path, env=env, check=True).stdout
    assert "## distill.loss" in rep and "best distill.loss:" in rep and "one run per setting" in rep
    # The LM-only baseline recorded its curve (its own run continued across the interruption), and each
    # setting's token multiplier is read off it at the point's held-out loss.
    from pd_dist.core.compute_gain import token_multiplier
    from pd_dist.explore.report import _fmt_multiplier

    base_dir = Path(next(r["baseline_dir"] for r in runs.values() if r["kind"] == "pd"))
    curve = json.loads((base_dir / "lm_curve.json").read_text())
    assert curve["points"][-1]["steps"] == 6 and len(curve["points"]) >= 3
    for r in runs.values():
        if r["kind"] == "pd":
            ev = json.loads((Path(r["dir"]) / "eval.json").read_text())["val_loss"]
            m = token_multiplier([(p["steps"], p["val_loss"]) for p in curve["points"]], ev, 6)
            assert f"| {_fmt_multiplier([m])} |" in rep, rep
    assert "TFLOPs saved / teacher's" in rep
    assert (out / "plots" / "gain_distill.loss.png").stat().st_size > 1000
    first = (out / "report.md").read_text()
    (out / "report.md").unlink()
    subprocess.run([pd_dist, "report", str(out)], check=True, capture_output=True, cwd=tmp_path, env=env)
    assert (out / "report.md").read_text() == first



def test_a_document_library_is_shared_across_seq_len_seed_and_blend_axes(tmp_path, tiny_teacher_dir, smoke_data):
    """distill.teacher_context document: one teacher group, one library, one generation job per data
    config; every point (two seq_lens and a blend, two seeds) reads the library; the dry run says so."""
    from pd_dist.explore.sweep import Sweep, SweepSpec

    blend = [{"path": "embedded", "weight": 3}, {"path": str(REPO / "README.md"), "weight": 1}]
    f = _write(tmp_path / "s.yaml", {
        "base": str(SMOKE), "output_dir": str(tmp_path / "sw"), "seeds": [1, 2],
        "set": {"teacher.path": str(tiny_teacher_dir), "distill.teacher_context": "document",
                "data.tokenizer": str(smoke_data.tokenizer_dir), "data.max_chars": 100000},
        "zip": [{"data.seq_len": [64, 32, 64], "train.global_batch_size": [8, 16, 8],
                 "data.source": ["embedded", "embedded", "blend"], "data.blend": [[], [], blend]}]})
    sw = Sweep(SweepSpec.load(f), log=lambda *_: None)
    assert len(sw.points) == 6 and len(sw.groups) == 1
    (g,) = sw.groups.values()
    assert g.document and len(g.datas) == 3 and len(g.job_configs()) == 3
    assert {p.config.distill.store for p in sw.points} == {str(g.store)}
    assert all(p.config.distill.mode == "offline" for p in sw.points)
    assert [c.teacher.path for c in g.job_configs()] == [str(tiny_teacher_dir)] * 3
    out = sw.describe()  # what `pd-dist sweep --dry-run` prints
    assert "1 teacher/store job(s)" in out and "document library" in out and "for 3 data config(s)" in out
    assert "at seq_len 32" in out and "blend of embedded x3" in out
    assert out.count("| store of teacher-") == 6
    (tmp_path / "w").mkdir()
    window = _sweep(tmp_path / "w", seeds=[1], set={"teacher.path": str(tiny_teacher_dir)},
                    axes={"data.seq_len": [64, 32]})
    assert len(window.groups) == 2  # a window store serves one seq_len: one per data
