"""`pd-dist plan`: teacher:student split against a brute-force reference, formulas by hand, CLI."""
from __future__ import annotations

import json
import math
import random
from fractions import Fraction

import pytest

from pd_dist.explore.plan import PlanInput, format_plan, main, make_plan, parse_size


def _reference_split(nt: int, ns: int, gpn: int, nodes: int, whole: bool, divisible: bool = False) -> int:
    """Every (t, s) pair, exact rational arithmetic; max min(capacity), ties -> fewer teacher GPUs."""
    total = gpn * nodes
    best = None
    for t in range(1, total):
        s = total - t
        if whole and t % gpn or divisible and s % t:
            continue
        # FLOP/s per GPU cancels: capacity ∝ t / (2 nt) vs s / (6 ns).
        tps = min(Fraction(t, 2 * nt), Fraction(s, 6 * ns))
        if best is None or tps > best[0]:
            best = (tps, t)
    return best[1]


@pytest.mark.parametrize("seed", range(5))
def test_split_matches_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(200):
        nt = rng.randint(1, 400) * 10 ** 8
        ns = rng.randint(1, 100) * 10 ** 8
        gpn = rng.choice([1, 2, 4, 8])
        whole = rng.random() < 0.5
        divisible = rng.random() < 0.3
        nodes = rng.randint(2 if whole else 1, 9)
        if gpn * nodes < 2:
            nodes = 2
        inp = PlanInput(teacher_params=nt, student_params=ns, tokens=1e9, gpus_per_node=gpn, nodes=nodes)
        plan = make_plan(inp, whole_nodes=whole, divisible=divisible)
        ref_t = _reference_split(nt, ns, gpn, nodes, whole, divisible)
        assert plan.teacher_gpus == ref_t, (nt, ns, gpn, nodes, whole, divisible)
        assert plan.teacher_gpus + plan.student_gpus == gpn * nodes
        assert plan.teacher_gpus >= 1 and plan.student_gpus >= 1
        if divisible:
            assert plan.student_gpus % plan.teacher_gpus == 0
            assert plan.students_per_teacher == plan.student_gpus // plan.teacher_gpus
        if whole:
            assert plan.teacher_gpus % gpn == 0
            assert plan.teacher_nodes == plan.teacher_gpus // gpn


def test_three_to_one_params_balance_one_to_one():
    # 2 N_t = 2 * 3 N_s = 6 N_s: a teacher GPU serves exactly one student GPU.
    ns = 1e9
    inp = PlanInput(teacher_params=3 * ns, student_params=ns, tokens=1e12, gpus_per_node=8, nodes=1,
                    flops_per_gpu=6e14, global_batch_tokens=2 ** 20)
    plan = make_plan(inp, whole_nodes=False)
    assert (plan.teacher_gpus, plan.student_gpus) == (4, 4)
    assert plan.ratio == 1.0 and plan.ideal_ratio == pytest.approx(1.0)
    assert plan.bottleneck == "balanced"
    assert plan.teacher_util == pytest.approx(1.0) and plan.student_util == pytest.approx(1.0)
    # 4 GPUs x 6e14 / (6e9 FLOP per token) = 4e5 tokens/s on either side.
    assert plan.tokens_per_s == pytest.approx(4e5)
    assert plan.teacher_capacity_tokens_per_s == pytest.approx(4e5)
    assert plan.student_capacity_tokens_per_s == pytest.approx(4e5)
    assert plan.step_time_s == pytest.approx(2 ** 20 / 4e5)
    assert plan.wall_time_s == pytest.approx(1e12 / 4e5)
    assert plan.steps == math.ceil(1e12 / 2 ** 20)
    # Whole nodes, 2 x 8: one node each, still balanced.
    plan = make_plan(PlanInput(teacher_params=3 * ns, student_params=ns, tokens=1e12, nodes=2))
    assert (plan.teacher_gpus, plan.student_gpus, plan.teacher_nodes) == (8, 8, 1)
    assert plan.bottleneck == "balanced"


def test_hand_computed_unbalanced():
    # N_t = 9 N_s: ideal teacher:student = 3:1. With 8 GPUs: 6:2 exactly.
    plan = make_plan(PlanInput(teacher_params=9e9, student_params=1e9, tokens=1e9, nodes=1),
                     whole_nodes=False)
    assert (plan.teacher_gpus, plan.student_gpus) == (6, 2)
    # With 6 GPUs (no exact balance): t=4 -> min(4/18, 2/6)=0.222; t=5 -> min(5/18, 1/6)=0.167;
    # t=3 -> min(3/18, 3/6)=0.167. So 4:2, teacher-bound, students 2/3 busy.
    plan = make_plan(PlanInput(teacher_params=9e9, student_params=1e9, tokens=1e9, gpus_per_node=6,
                               nodes=1, flops_per_gpu=1.8e14), whole_nodes=False)
    assert (plan.teacher_gpus, plan.student_gpus) == (4, 2)
    assert plan.bottleneck == "teacher"
    assert plan.tokens_per_s == pytest.approx(4 * 1.8e14 / 18e9)
    assert plan.teacher_util == pytest.approx(1.0)
    assert plan.student_util == pytest.approx((4 / 18) / (2 / 6))


def test_divisible_split():
    # 9B : 1.9B on 32 GPUs per GPU is 19:13 (13 % 19 != 0). Divisible splits t | (32 - t): 1, 2, 4, 8, 16.
    inp = PlanInput(teacher_params=9e9, student_params=1.9e9, tokens=1e11, nodes=4)
    free = make_plan(inp, whole_nodes=False)
    assert free.students_per_teacher is None
    assert "--divisible" in format_plan(free)
    div = make_plan(inp, whole_nodes=False, divisible=True)
    assert (div.teacher_gpus, div.students_per_teacher) == (16, 1)
    # Whole nodes on 3 nodes, tiny student: 16:8 is best but not divisible; 8:16 is.
    inp = PlanInput(teacher_params=32e9, student_params=0.33e9, tokens=1e11, nodes=3)
    assert make_plan(inp, divisible=True).teacher_gpus == 8
    assert main(["--teacher", "32B", "--student", "330M", "--nodes", "3", "--divisible", "--json"]) == 0


def test_tie_prefers_fewer_teacher_gpus():
    # N_t = 3 N_s on 3 GPUs: t=1 -> min(1, 2)=1, t=2 -> min(2, 1)=1: equal, so 1 teacher GPU.
    plan = make_plan(PlanInput(teacher_params=3e9, student_params=1e9, tokens=1e9, gpus_per_node=3,
                               nodes=1), whole_nodes=False)
    assert (plan.teacher_gpus, plan.student_gpus) == (1, 2)


def test_whole_node_constraint():
    # Ideal 1.58:1 on 4 x 8 GPUs. Per GPU: t=19 -> min(19/18, 13/11.4) = 1.056 beats
    # t=20 -> min(20/18, 12/11.4) = 1.053. Whole nodes: t=16 -> 0.889 beats t=24 -> min(1.33, 0.70).
    inp = PlanInput(teacher_params=9e9, student_params=1.9e9, tokens=1e11, nodes=4)
    free = make_plan(inp, whole_nodes=False)
    whole = make_plan(inp, whole_nodes=True)
    assert free.teacher_gpus == 19
    assert whole.teacher_gpus % 8 == 0 and whole.teacher_gpus == 16 and whole.teacher_nodes == 2
    assert whole.tokens_per_s <= free.tokens_per_s
    # A tiny student: teachers would want nearly everything, but students keep at least one node.
    whole = make_plan(PlanInput(teacher_params=32e9, student_params=0.33e9, tokens=1e11, nodes=3))
    assert (whole.teacher_gpus, whole.student_gpus) == (16, 8)
    # Whole-node teachers on one node are impossible.
    with pytest.raises(ValueError, match="nodes >= 2"):
        make_plan(PlanInput(teacher_params=9e9, student_params=1e9, tokens=1e9, nodes=1))
    # Per-GPU split on one GPU total is impossible too.
    with pytest.raises(ValueError, match="at least 2 GPUs"):
        make_plan(PlanInput(teacher_params=9e9, student_params=1e9, tokens=1e9, gpus_per_node=1, nodes=1),
                  whole_nodes=False)


def test_wire_and_store_formulas():
    inp = PlanInput(teacher_params=9e9, student_params=1.9e9, tokens=100e9, seq_len=4096, top_k=50,
                    mean_kept=20, nodes=2, global_batch_tokens=4 * 2 ** 20, vocab_size=151552,
                    bytes_per_entry=6.0, store_bytes_per_entry=2.5)
    plan = make_plan(inp)
    # Padded fixed-k rows on the wire: 50 x 6 B; ids back: 4 B per token + 8 B per 4096-token sample.
    assert plan.wire_entries_per_token == 50
    assert plan.wire_logits_bytes_per_token == 300.0
    assert plan.wire_ids_bytes_per_token == pytest.approx(4 + 8 / 4096)
    assert plan.wire_bytes_per_token == pytest.approx(304 + 8 / 4096)
    assert plan.wire_bytes_per_step == pytest.approx((304 + 8 / 4096) * 4 * 2 ** 20)
    assert plan.wire_bytes_per_s == pytest.approx(plan.wire_bytes_per_token * plan.tokens_per_s)
    assert plan.dense_fp16_bytes_per_token == 151552 * 2
    assert plan.wire_reduction == pytest.approx(151552 * 2 / 300)
    # Offline store: only kept entries, 100e9 x 20 x 2.5 B = 5 TB.
    assert plan.store_bytes == pytest.approx(5e12)
    assert plan.store_bytes_per_token == pytest.approx(50.0)
    assert plan.dense_store_bytes == pytest.approx(100e9 * 151552 * 2)
    # Unpadded wire sends only the kept entries.
    inp.wire_padded = False
    plan = make_plan(inp)
    assert plan.wire_logits_bytes_per_token == 120.0
    assert plan.wire_reduction == pytest.approx(151552 * 2 / 120)
    # mean_kept defaults to top_k.
    plan = make_plan(PlanInput(teacher_params=9e9, student_params=1e9, tokens=1e9, top_k=10, nodes=2,
                               store_bytes_per_entry=3.0))
    assert plan.store_bytes == pytest.approx(1e9 * 10 * 3.0)


@pytest.mark.parametrize("bad, match", [
    (dict(teacher_params=0), "teacher_params"),
    (dict(student_params=-1), "student_params"),
    (dict(tokens=0), "tokens"),
    (dict(top_k=0), "top_k"),
    (dict(mean_kept=60), "mean_kept"),
    (dict(flops_per_gpu=float("nan")), "flops_per_gpu"),
    (dict(gpus_per_node=0), "gpus_per_node"),
])
def test_bad_input(bad, match):
    kw = dict(teacher_params=9e9, student_params=1e9, tokens=1e9, nodes=2)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        make_plan(PlanInput(**kw))


def test_parse_size():
    assert parse_size("9B") == 9e9
    assert parse_size("330M") == 330e6
    assert parse_size("1.9b") == pytest.approx(1.9e9)
    assert parse_size("100B") == 100e9
    assert parse_size("4k") == 4000
    assert parse_size("4k", binary=True) == 4096
    assert parse_size("1.5T") == 1.5e12
    assert parse_size("9e9") == 9e9
    assert parse_size(" 42 ") == 42
    assert parse_size(7) == 7.0
    for bad in ("", "9X", "B", "-3B", "nine"):
        with pytest.raises(ValueError, match="cannot read size"):
            parse_size(bad)


def test_parse_size_presets():
    from pd_dist.models import preset_param_count

    assert parse_size("pd-1.9b") == preset_param_count("pd-1.9b", 151552)
    assert parse_size("PD-330M") == preset_param_count("pd-330m", 151552)
    assert 1.8e9 < parse_size("pd-1.9b") < 2.0e9
    assert parse_size("tiny-student", vocab_size=100) == preset_param_count("tiny-student", 100)


def test_format_plan_mentions_the_numbers():
    plan = make_plan(PlanInput(teacher_params=9e9, student_params=1.9e9, tokens=100e9, mean_kept=20, nodes=4))
    text = format_plan(plan)
    assert "16:16" in text and "teacher-bound" in text and "5 TB" in text


def test_cli_text(capsys):
    rc = main(["--teacher", "9B", "--student", "1.9B", "--tokens", "100B", "--seq-len", "4096",
               "--top-k", "50", "--mean-kept", "20", "--gpus-per-node", "8", "--nodes", "4",
               "--flops-per-gpu", "400e12"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "split teacher:student" in out and "16:16" in out
    assert "offline store" in out and "5 TB" in out


def test_cli_json(capsys):
    rc = main(["--teacher", "3B", "--student", "1B", "--nodes", "1", "--no-whole-nodes", "--seq-len", "4k",
               "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["teacher_gpus"], d["student_gpus"]) == (4, 4)
    assert d["inp"]["seq_len"] == 4096
    assert d["inp"]["teacher_params"] == 3e9


def test_cli_preset(capsys):
    from pd_dist.models import preset_param_count

    assert main(["--teacher", "9B", "--student", "pd-1.9b", "--nodes", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["inp"]["student_params"] == preset_param_count("pd-1.9b", 151552)


@pytest.mark.parametrize("argv", [
    ["--teacher", "9B", "--student", "1.9B", "--nodes", "1"],  # whole-node teachers need 2 nodes
    ["--teacher", "9B", "--student", "0", "--nodes", "2"],
    ["--teacher", "0B", "--student", "1B", "--nodes", "2"],
    ["--teacher", "9X", "--student", "1B", "--nodes", "2"],
    ["--teacher", "9B", "--nodes", "2"],  # missing --student
    ["--teacher", "9B", "--student", "1B", "--nodes", "two"],
    ["--teacher", "9B", "--student", "1B", "--nodes", "2", "--top-k", "10", "--mean-kept", "20"],
    ["--teacher", "9B", "--student", "1B", "--nodes", "2", "--bogus"],
])
def test_cli_bad_input_exits_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pd-dist plan: error:"), captured.err


def test_cli_help(capsys):
    assert main(["--help"]) == 0
    assert "--teacher" in capsys.readouterr().out


def test_the_dry_run_prints_the_layouts_compute_balance_and_warns_when_teacher_bound(capsys):
    """64 nodes x 8 with online.yaml's one teacher node: 8 teacher ranks against 504 students. With a
    pd-6.8b teacher and pd-1.9b students (vocab 4096, seq 256): teacher forward F_t and student training
    F_s per token from pd_dist.core.flops; the teachers serve (8 / F_t) / (504 / F_s) of the students'
    consumption, and the balanced split gives the teachers 512 x F_t / (F_t + F_s) ranks."""
    from pd_dist.config import load_config
    from pd_dist.models import model_shape
    from pd_dist.explore.plan import print_rank_map
    from pd_dist.models import ModelConfig

    over = ["teacher.path=null", "teacher.preset=pd-6.8b", "model.preset=pd-1.9b", "train.global_batch_size=4032"]
    cfg = load_config("launch/configs/online.yaml", over)
    assert print_rank_map(cfg, 64, 8) == 0
    out = capsys.readouterr().out
    ft = model_shape(ModelConfig(preset="pd-6.8b"), 4096).forward_flops(256)
    fs = model_shape(ModelConfig(preset="pd-1.9b"), 4096).train_flops(256)
    ideal = 512 * ft / (ft + fs)
    assert (f"8 teacher rank(s) for 504 student rank(s); the teachers can serve {(8 / ft) / (504 / fs):.0%} of what "
            f"the students consume") in out
    assert f"balanced at about {ideal:.0f}:{512 - ideal:.0f} of these 512 ranks" in out
    assert "warning: this run will be teacher-bound" in out
    # a pd-1.9b teacher for pd-1.9b students costs a third of their training per token: 16 of 64 nodes
    balanced = load_config("launch/configs/online.yaml", ["teacher.path=null", "teacher.preset=pd-1.9b",
                                                          "model.preset=pd-1.9b", "topology.teacher_nodes=16",
                                                          "train.global_batch_size=3072"])
    print_rank_map(balanced, 64, 8)
    out = capsys.readouterr().out
    assert "128 teacher rank(s) for 384 student rank(s); the teachers can serve 100%" in out
    assert "teacher-bound" not in out
    print_rank_map(load_config(None, []), 1, 1)
    assert "compute balance: each rank spends" in capsys.readouterr().out


def test_roi_against_hand_arithmetic(tmp_path, capsys):
    """9B teacher, 1B student, 100B tokens, 8 GPUs at 4e14 FLOP/s achieved, any split (not whole nodes):
    - student training: 6 x 1e9 x 1e11 = 6e20 FLOPs / 4e14 = 1.5e6 s = 416.67 GPU-h;
    - teacher forward: 2 x 9e9 x 1e11 = 1.8e21 / 4e14 = 4.5e6 s = 1250 GPU-h (colocated every run,
      offline once);
    - online: the ideal split N_t / 3N_s = 3 gives 6:2, both sides at 1.333e5 tok/s, so the run takes
      1e11 / 1.333e5 = 7.5e5 s and its 6 teacher GPUs hold 6 x 7.5e5 / 3600 = 1250 GPU-h;
    - a pilot's multiplier 1.4 saves 0.4 x 416.67 = 166.67 GPU-h per student; the generation's 1250
      GPU-h break even after 1250 / 166.67 = 7.5, so 8 students;
    - store: 1e11 tokens x 50 kept x 2.5 B = 1.25e13 B."""
    from pd_dist.explore.plan import law_multiplier, make_roi

    plan = make_plan(PlanInput(teacher_params=9e9, student_params=1e9, tokens=1e11, flops_per_gpu=4e14,
                               gpus_per_node=8, nodes=1), whole_nodes=False)
    r = make_roi(plan, students=4, pilot=1.4, pilot_source="runs/x")
    assert r.student_gpu_h == pytest.approx(416.6667, rel=1e-6)
    assert r.teacher_colocated_gpu_h == pytest.approx(1250) and r.teacher_offline_gpu_h == pytest.approx(1250)
    assert (plan.teacher_gpus, plan.student_gpus) == (6, 2)
    assert r.teacher_online_gpu_h == pytest.approx(1250, rel=1e-9)
    assert r.saved_gpu_h[0] == pytest.approx(166.6667, rel=1e-6) and r.break_even_students == [8]
    assert r.store_bytes == pytest.approx(1.25e13)
    # The law's arithmetic: L = 1 + 1/D at D = 1 is 2; 25% less is 1.5 = 1 + 1/2: twice the data. 60%
    # less (0.8) is below the floor E = 1: no amount of data reaches it.
    law = {"E": 1.0, "A": 0.0, "B": 1.0, "alpha": 1.0, "beta": 1.0}
    assert law_multiplier(0.25, 1.0, 1.0, law) == pytest.approx(2.0)
    assert law_multiplier(0.6, 1.0, 1.0, law) is None
    # Without a pilot: the paper's range, each end through Chinchilla's law, labelled as such.
    r = make_roi(plan)
    assert r.multipliers[0] < r.multipliers[1] and "Chinchilla" in r.source and "paper" in r.source
    # The CLI: a pilot run's summary, every figure under the projection label; a run without one refused.
    (tmp_path / "summary.json").write_text(json.dumps({"pd_token_multiplier": 1.4}))
    args = ["--teacher", "9B", "--student", "1B", "--tokens", "100B", "--flops-per-gpu", "4e14", "--no-whole-nodes"]
    assert main(args + ["--roi", "--pilot", str(tmp_path), "--students", "4"]) == 0
    out = capsys.readouterr().out
    assert "projected (every figure below is a projection" in out and "1.40x (measured on the pilot run" in out
    assert "8 student(s)" in out and "417 GPU-h per student" in out
    (tmp_path / "summary.json").write_text(json.dumps({"pd_token_multiplier": None}))
    assert main(args + ["--roi", "--pilot", str(tmp_path)]) == 2
    assert "has no pd_token_multiplier" in capsys.readouterr().err
