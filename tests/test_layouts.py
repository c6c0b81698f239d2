"""Parallel layouts through the real launcher on gloo, against single-rank references: a 2-stage x
2-data-parallel student pipeline and a ZeRO-3 student built inside zero.Init end with the losses and
parameters of data-parallel and one-rank runs, in colocated, offline and online modes; a pipelined run
stopped and resumed continues exactly; a teacher partitioned over 2 ranks (ZeRO-3) answers as one rank
does; the rank map of a 512-rank job prints without starting anything."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, assert_same_params, launch, read_initial, read_student, read_summary

pytestmark = pytest.mark.multiproc

STEPS = 4
COMMON = [f"train.steps={STEPS}", "train.save_every=0", "train.eval_every=0", "train.log_every=1",
          "train.global_batch_size=8", "optim.warmup_steps=1", "distill.top_k=8",
          "distill.alpha.schedule=constant", "distill.alpha.value=0.5"]


def _over(out, data, teacher, mode, *extra):
    return COMMON + [f"output_dir={out}", f"data.dir={data.path}", f"teacher.path={teacher}",
                     f"distill.mode={mode}", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, smoke_data, tiny_teacher_dir):
    """1 rank, ZeRO 0, colocated: what every layout below must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    launch(1, _over(out, smoke_data, tiny_teacher_dir, "colocated", "train.zero_stage=0",
                    "train.micro_batch_size=4"), cwd=out)
    return read_summary(out), read_student(out)


def _check(out, reference, smoke_data, rel=1e-5):
    """Same per-step losses, held-out figures and final parameters as the one-rank reference."""
    ref_summary, ref_params = reference
    s = read_summary(out)
    assert s["losses"] == pytest.approx(ref_summary["losses"], rel=rel, abs=1e-6)
    assert s["val_loss"] == pytest.approx(ref_summary["val_loss"], rel=rel)
    assert s["teacher_top1_agreement"] == pytest.approx(ref_summary["teacher_top1_agreement"], abs=1e-6)
    assert s["teacher_val_loss"] == pytest.approx(ref_summary["teacher_val_loss"], rel=1e-6)
    assert_same_params(read_student(out), ref_params, read_initial(smoke_data))
    return s


def test_pipeline_2x2_matches_data_parallel_and_one_rank(reference, tmp_path, smoke_data, tiny_teacher_dir):
    dp = tmp_path / "dp"
    launch(2, _over(dp, smoke_data, tiny_teacher_dir, "colocated", "train.micro_batch_size=2"), cwd=tmp_path)
    _check(dp, reference, smoke_data)
    pp = tmp_path / "pp"
    proc = launch(4, _over(pp, smoke_data, tiny_teacher_dir, "colocated", "train.micro_batch_size=2",
                           "train.pipeline_stages=2"), cwd=tmp_path)
    assert "dp 2 x micro 2 x accum 2" in proc.stdout + proc.stderr and "pipeline 2 stages" in proc.stdout
    _check(pp, reference, smoke_data)
    # One save_pretrained directory, gathered from both stages, loadable as a plain HF model.
    assert json.loads((pp / "student" / "pd_dist_pipeline.json").read_text())["stages"] == 2


def test_pipeline_online_last_stage_is_the_client(reference, tmp_path, smoke_data, tiny_teacher_dir):
    """1 teacher + 2 pipelines of 2 stages: only the last stages talk to the teacher."""
    out = tmp_path / "online"
    proc = launch(5, _over(out, smoke_data, tiny_teacher_dir, "online", "train.micro_batch_size=2",
                           "train.pipeline_stages=2"), cwd=tmp_path)
    assert "serving students [2, 4]" in proc.stdout + proc.stderr  # the last stages of both pipelines
    _check(out, reference, smoke_data)


def test_pipeline_offline_and_resume(reference, tmp_path, smoke_data, tiny_teacher_dir, store_1rank_top8):
    store = store_1rank_top8  # 1-rank generation, top-8 (shared with test_golden)
    base = _over(tmp_path / "x", smoke_data, tiny_teacher_dir, "offline", "train.micro_batch_size=4",
                 "train.pipeline_stages=2", f"distill.store={store}")
    base = [o for o in base if not o.startswith("output_dir=")]
    full = tmp_path / "full"
    launch(2, base + [f"output_dir={full}"], cwd=tmp_path)
    # Stored values are quantized (TV <= 1e-3 per token): offline agrees with colocated to that order.
    ref_summary, _ = reference
    assert read_summary(full)["losses"] == pytest.approx(ref_summary["losses"], rel=2e-3)
    part = tmp_path / "part"
    launch(2, base + [f"output_dir={part}", "train.exit_after_steps=2", "train.save_every=2"], cwd=tmp_path)
    assert read_summary(part)["finished"] is False
    launch(2, base + [f"output_dir={part}", "train.save_every=2"], cwd=tmp_path, extra_args=["--resume"])
    a, b = read_summary(full), read_summary(part)
    assert b["finished"] and b["losses"] == pytest.approx(a["losses"], rel=1e-6, abs=1e-7)
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)
    assert_same_params(read_student(part), read_student(full), read_initial(smoke_data), rel=1e-6)


def test_zero3_student_built_partitioned_matches(reference, tmp_path, smoke_data, tiny_teacher_dir):
    from test_distributed import _zero3_config

    out = tmp_path / "z3"
    proc = launch(2, _over(out, smoke_data, tiny_teacher_dir, "colocated", "train.micro_batch_size=2",
                           "train.zero_stage=3", f"train.deepspeed_config={_zero3_config(tmp_path)}"),
                  cwd=tmp_path)
    assert "ZeRO 3" in proc.stdout
    _check(out, reference, smoke_data)


def test_zero3_student_loaded_from_a_path_partitioned(tmp_path, smoke_data, tiny_teacher_dir):
    """model.path under ZeRO-3: each tensor read into its partition; same run as a stage-0 one."""
    runs = {}
    for zero in (0, 3):
        out = tmp_path / f"z{zero}"
        over = _over(out, smoke_data, tiny_teacher_dir, "none", "train.micro_batch_size=2",
                     f"model.path={tiny_teacher_dir}", f"train.zero_stage={zero}")
        if zero == 3:
            from test_distributed import _zero3_config

            over.append(f"train.deepspeed_config={_zero3_config(tmp_path)}")
        launch(2, over, cwd=tmp_path)
        runs[zero] = read_summary(out)
    assert runs[3]["losses"] == pytest.approx(runs[0]["losses"], rel=1e-5)
    assert runs[3]["val_loss"] == pytest.approx(runs[0]["val_loss"], rel=1e-5)


def test_zero3_teacher_over_two_ranks_answers_like_one_rank(reference, tmp_path, smoke_data, tiny_teacher_dir):
    """Teacher weights partitioned over teacher ranks 0 and 1, each serving its own student; every
    small tensor really partitioned (persistence threshold 0)."""
    from test_distributed import _zero3_config

    out = tmp_path / "z3t"
    proc = launch(4, _over(out, smoke_data, tiny_teacher_dir, "online", "train.micro_batch_size=2",
                           "topology.teacher_ranks=[0,1]", "teacher.zero_stage=3",
                           f"teacher.deepspeed_config={_zero3_config(tmp_path)}"), cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert "[teacher 0] serving students [2]" in text and "[teacher 1] serving students [3]" in text
    assert "partitioned over 2 teacher ranks (ZeRO-3)" in text
    _check(out, reference, smoke_data)


def test_two_stage_teacher_answers_like_one_rank(reference, tmp_path, smoke_data, tiny_teacher_dir):
    """One teacher replica as a 2-stage forward-only pipeline (ranks 0, 1) serving 2 students: requests
    go to stage 0, answers come from stage 1, and the students train as with a colocated teacher."""
    out = tmp_path / "tpp"
    proc = launch(4, _over(out, smoke_data, tiny_teacher_dir, "online", "train.micro_batch_size=2",
                           "topology.teacher_ranks=[0,1]", "teacher.pipeline_stages=2"), cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert "stage 0/2 of teacher replica 0: takes the requests of students [2, 3]" in text
    assert "stage 1/2 of teacher replica 0: answers students [2, 3]" in text
    _check(out, reference, smoke_data)


def test_rank_map_of_512_ranks_without_starting_anything():
    args = ["--config", str(REPO / "launch" / "configs" / "online.yaml"), "--set", "train.pipeline_stages=4",
            "--set", "teacher.pipeline_stages=4", "--set", "topology.teacher_nodes=8", "--set",
            "train.global_batch_size=448", "--set", "train.micro_batch_size=4"]
    plan = subprocess.run([sys.executable, "-m", "pd_dist.cli", "plan", *args, "--nodes", "64",
                           "--gpus-per-node", "8"], capture_output=True, text=True, cwd=REPO)
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    assert lines[0] == "512 ranks on 64 node(s)"
    assert "16 replica(s) x 4 stage(s)" in lines[1] and "112 data-parallel x 4 pipeline stage(s)" in lines[2]
    rows = [ln for ln in lines if ln[:5].strip().isdigit()]
    assert len(rows) == 512
    assert "answers student ranks 487, 491, 495, 499, 503, 507, 511" in rows[63]
    assert rows[511].split()[3:6] == ["student", "111", "3/4"]
    assert "requests to rank 60, answers from rank 63" in rows[511]
    # The same map from the entry point's dry run (no process group, no launcher).
    dry = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain_pd.py"), *args, "--dry-run",
                          "--nodes", "64", "--ranks-per-node", "8"], capture_output=True, text=True, cwd=REPO)
    assert dry.returncode == 0 and dry.stdout == plan.stdout
    # An impossible layout: one line naming the key.
    bad = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain_pd.py"), *args[:-8], "--set",
                          "train.pipeline_stages=3", "--set", "train.global_batch_size=384", "--dry-run",
                          "--nodes", "64", "--ranks-per-node", "8"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "'topology.cross_node'" in bad.stderr and "span nodes" in bad.stderr
