"""Online distillation over gloo with real processes: equivalence with colocated PD, a teacher killed
mid-run, and a launch across two ssh "hosts" with `deepspeed --hostfile`."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import (REPO, SMOKE, free_port, launch, read_student, read_summary,
                      reference_2rank_overrides)

pytestmark = pytest.mark.multiproc

BASE = ["train.save_every=0", "train.eval_every=0", "train.log_every=1", "train.global_batch_size=8",
        "train.micro_batch_size=4", "optim.warmup_steps=1", "distill.alpha.schedule=constant",
        "distill.alpha.value=0.5", "distill.top_k=8"]


def _runcfg(out, smoke_data, teacher, mode, steps=4):
    return BASE + [f"output_dir={out}", f"data.dir={smoke_data.path}", f"teacher.path={teacher}",
                   f"distill.mode={mode}", f"train.steps={steps}"]


def test_online_one_teacher_two_students_matches_colocated(tmp_path, smoke_data, tiny_teacher_dir,
                                                           colocated_2rank):
    """1 teacher + 2 students (the 1:2 ratio) end where 2 colocated-PD ranks end."""
    col, onl = colocated_2rank, tmp_path / "online"  # col: _runcfg(..., "colocated"), shared (conftest)
    assert sorted(_runcfg(col, smoke_data, tiny_teacher_dir, "colocated")) == sorted(
        reference_2rank_overrides(col, smoke_data, "colocated", **{"teacher.path": tiny_teacher_dir}))
    proc = launch(3, _runcfg(onl, smoke_data, tiny_teacher_dir, "online") + ["distill.prefetch=3"],
                  cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert "serving students [1, 2]" in out and "mode online | dp 2" in out
    a, b = read_summary(col), read_summary(onl)
    # The same teacher on the same tokens; only the teacher's batch shapes differ (fp32 round-off).
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    assert b["teacher_top1_agreement"] == pytest.approx(a["teacher_top1_agreement"], abs=1e-6)
    # The teacher rank measured its own held-out loss and published it to its students.
    assert a["teacher_val_loss"] is not None
    assert b["teacher_val_loss"] == pytest.approx(a["teacher_val_loss"], rel=1e-6)
    pa, pb = read_student(col), read_student(onl)
    for k in pa:
        assert (pa[k] - pb[k]).abs().max().item() < 1e-4, k
    assert list((onl / "tensorboard").glob("events.*")), "student TensorBoard events missing"
    assert list((onl / "tensorboard" / "teacher0").glob("events.*")), "teacher TensorBoard events missing"


def _spawn_ranks(n, args, cwd, port):
    """Start n ranks as srun would (environment only, no launcher that kills the others on failure)."""
    procs = []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), LOCAL_SIZE=str(n),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen([sys.executable, str(REPO / "launch" / "pretrain_pd.py"), *args],
                                      cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def _args(overrides, config=SMOKE):
    out = ["--config", str(config)]
    for o in overrides:
        out += ["--set", o]
    return out


def test_teacher_killed_students_exit_then_resume(tmp_path, smoke_data, tiny_teacher_dir):
    run = tmp_path / "run"
    over = _runcfg(run, smoke_data, tiny_teacher_dir, "online", steps=400) + [
        "train.save_every=5", "topology.peer_timeout_s=10", "train.log_every=50"]
    procs = _spawn_ranks(3, _args(over), tmp_path, free_port())
    teacher, students = procs[0], procs[1:]
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "latest").exists():
            assert time.monotonic() < deadline, "no checkpoint was written"
            assert all(p.poll() is None for p in procs), "a rank ended early"
            time.sleep(0.05)
        teacher.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        outs = [p.communicate(timeout=60)[0] for p in students]
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # Within the peer timeout (10 s; a closed connection is noticed at once), with slack for a loaded machine.
    assert elapsed < 10 + 20, f"students took {elapsed:.1f}s to notice"
    for p, out in zip(students, outs):
        assert p.returncode != 0
        lines = [l for l in out.splitlines() if l.startswith("pd-dist: rank")]
        assert len(lines) == 1, out[-2000:]
        assert re.search(r"teacher rank 0 \([^)]+\)", lines[0]) and "closed the connection" in lines[0]
    # The last completed checkpoint loads, and a restart continues from it.
    latest = (run / "checkpoints" / "latest").read_text().strip()
    ck_step = int(latest.removeprefix("step"))
    assert ck_step >= 5 and ck_step % 5 == 0
    procs = _spawn_ranks(3, _args(over + ["train.exit_after_steps=3"]) + ["--resume"], tmp_path, free_port())
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs[1][-3000:]
    assert f"at step {ck_step}" in outs[1]
    resumed = read_summary(run)
    assert len(resumed["losses"]) == ck_step + 3
    # The same run, uninterrupted, for ck_step + 3 steps: the same losses.
    ref = tmp_path / "ref"
    ref_over = [o if not o.startswith("output_dir=") else f"output_dir={ref}" for o in over]
    procs = _spawn_ranks(3, _args(ref_over + [f"train.exit_after_steps={ck_step + 3}"]), tmp_path, free_port())
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs[1][-3000:]
    assert resumed["losses"] == pytest.approx(read_summary(ref)["losses"], rel=1e-6)


@pytest.mark.cluster
def test_two_host_hostfile_launch(tmp_path, smoke_data, tiny_teacher_dir):
    """`deepspeed --hostfile` over pdsh/ssh: node1 runs the teacher, node2 the student, in document
    context (distill.teacher_context document, chunks of 48 for 64-token windows), the teacher writing
    through what it serves into a library of document stores. The launched run's held-out KD figures
    are recomputed in-process for its exported student from a colocated document teacher and from that
    library (all modes, one definition), and differ from a window teacher's."""
    from cluster import LoopbackCluster, ensure_cluster_packages, skip_or_fail

    reason = ensure_cluster_packages()
    if reason:
        skip_or_fail(reason)
    out = tmp_path / "run"
    with LoopbackCluster(workdir=tmp_path / "cluster") as c:
        c.deepspeed_env(tmp_path, {"PYTHONPATH": str(REPO)})
        proc = c.launch(REPO / "launch" / "pretrain_pd.py",
                        _args(_runcfg(out, smoke_data, tiny_teacher_dir, "online") + DOCUMENT
                              + [f"distill.write_through={tmp_path / 'library'}", "generate.encoding=exact"]),
                        cwd=tmp_path,
                        timeout=400)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert re.search(r"node1: .*\[teacher 0\] serving students \[1\]", text), text[-3000:]
    assert re.search(r"node2: .*mode online \| dp 1", text), text[-3000:]
    s = read_summary(out)
    assert s["finished"] and len(s["losses"]) == 4
    assert (out / "student" / "model.safetensors").is_file()
    kd = re.search(r"final eval \|.*val_kd_loss ([0-9.]+)", text)
    assert kd, text[-3000:]
    _document_figures_agree(out, s, float(kd.group(1)), smoke_data, tiny_teacher_dir, tmp_path)


DOCUMENT = ["distill.teacher_context=document", "distill.teacher_seq_len=48"]


def _document_figures_agree(out, s, kd_printed, smoke_data, tiny_teacher_dir, tmp_path):
    """``s``: the launched run's summary; ``kd_printed``: its final held-out KD loss (4 decimals)."""
    import json

    import torch

    from pd_dist.config import load_config
    from pd_dist.explore.evaluate import held_out_metrics
    from pd_dist.models import ModelConfig, build_model
    from pd_dist.signals.sources import ColocatedTeacher, DocumentStoreWindows, StoredLogits
    from pd_dist.store import verify_store
    from pd_dist.store.library import library_stores
    from pd_dist.teacher.document import context_teacher
    from pd_dist.teacher.inference import FrozenTeacher

    cfg = load_config(out / "config.yaml")
    spec = cfg.distill.signal_spec(cfg.train.seed)
    student = build_model(ModelConfig(path=str(out / "student")), smoke_data.vocab_size, seed=0)
    teacher = build_model(ModelConfig(path=str(tiny_teacher_dir)), smoke_data.vocab_size, seed=0)
    frozen = FrozenTeacher(teacher, torch.device("cpu"), torch.float32, spec, cfg.train.loss_chunk_size)
    lib = tmp_path / "library"  # what the online teacher wrote through: one source store, sound
    assert [verify_store(p) for p in library_stores(lib)] == [[]]
    info = json.loads((library_stores(lib)[0] / "write_through_info.json").read_text())
    assert info["samples_from_spools"] > 0 and info["samples_filled"] > 0, info
    sources = {"colocated": ColocatedTeacher(context_teacher(cfg, frozen, smoke_data), smoke_data, 4),
               "offline": StoredLogits(DocumentStoreWindows.open(lib, smoke_data, spec, 48), smoke_data, 0),
               "window": ColocatedTeacher(frozen, smoke_data, 4)}
    figs = {k: held_out_metrics(student, smoke_data, 4, source=v, kind=cfg.distill.loss,
                                chunk_size=cfg.train.loss_chunk_size, log=lambda *_: None)
            for k, v in sources.items()}
    assert s["teacher_val_loss"] == pytest.approx(sources["colocated"].teacher_val_loss(), rel=1e-5)
    for mode in ("colocated", "offline"):
        assert s["teacher_top1_agreement"] == pytest.approx(figs[mode]["teacher_top1_agreement"], abs=1e-6), mode
        assert kd_printed == pytest.approx(figs[mode]["val_kd_loss"], abs=6e-5), mode
    assert abs(figs["window"]["val_kd_loss"] - kd_printed) > 1e-3, (figs["window"], kd_printed)
