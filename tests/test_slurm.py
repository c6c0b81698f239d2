"""launch/slurm/pretrain_pd.sbatch submitted to a one-node Slurm cluster started by the test.

The batch script as a user submits it (`sbatch` from the repository root), its #SBATCH resources
overridden on the command line to fit one CPU-only node: srun starts 3 tasks, which map
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID themselves (no MPI), rank 0 becomes the online teacher
serving students 1 and 2. Plus the fixture's own promises: a job that overruns is cancelled and nothing
of the cluster (daemons, slurmstepd, job processes) is left running after exit, also on failure.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, SMOKE, free_port, read_summary
from slurm import LoopbackSlurm, _descendants, _tagged_processes, ensure_slurm_packages, pid_running, skip_or_fail

pytestmark = [pytest.mark.multiproc, pytest.mark.cluster]

SBATCH = REPO / "launch" / "slurm" / "pretrain_pd.sbatch"
TASKS = 3  # 1 teacher + 2 students
# One node, no GPUs: these override the script's multi-node GPU #SBATCH lines. The node declares
# max(TASKS, nproc) CPUs (see LoopbackSlurm), so 3 single-CPU tasks fit a 2-core machine; a node with
# no GPU gres accepts --gpus-per-node=0.
ONE_NODE = ["--nodes=1", f"--ntasks={TASKS}", f"--ntasks-per-node={TASKS}", "--gpus-per-node=0",
            "--cpus-per-task=1", "--time=10", "--job-name=pd-dist-test"]


@pytest.fixture(scope="module")
def slurm_ready():
    reason = ensure_slurm_packages()
    if reason:
        skip_or_fail(reason)


def _cluster(tmp_path, **kw) -> LoopbackSlurm:
    return LoopbackSlurm(tmp_path / "slurm", cpus=max(TASKS, os.cpu_count() or 1), **kw)


def _assert_all_gone(pids: list[int], tag: str) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (any(pid_running(p) for p in pids) or
                                           tag in _tagged_processes().values()):
        time.sleep(0.1)
    assert not [p for p in pids if pid_running(p)], "a Slurm daemon outlived the cluster"
    left = [p for p, t in _tagged_processes().items() if t == tag and pid_running(p)]
    assert not left, f"processes of the cluster left running: {left}"


def test_sbatch_online_teacher_and_two_students(slurm_ready, tmp_path, smoke_data, tiny_teacher_dir):
    out_dir = tmp_path / "run"
    overrides = ["distill.mode=online", f"output_dir={out_dir}", f"data.dir={smoke_data.path}",
                 f"teacher.path={tiny_teacher_dir}", "train.steps=4", "train.save_every=0",
                 "train.eval_every=0"]
    args = [a for o in overrides for a in ("--set", o)]
    env = {"CONFIG": str(SMOKE), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    t0 = time.monotonic()
    with _cluster(tmp_path) as s:
        daemons, tag = [p.pid for p in s.daemons.values()], s.id
        t_up = time.monotonic() - t0
        job_id, output, code = s.submit(SBATCH, args, env=env, cwd=REPO, timeout=240, sbatch_args=ONE_NODE)
        t_job = time.monotonic() - t0 - t_up
        diag = f"job {job_id} exit {code}; output:\n{output[-6000:]}\n{s.diagnostics()}"
    _assert_all_gone(daemons, tag)
    print(f"cluster up {t_up:.1f} s, job {t_job:.1f} s, total {time.monotonic() - t0:.1f} s")
    assert code == 0, diag
    assert "[teacher 0] serving students [1, 2]" in output, diag
    assert "mode online | dp 2" in output, diag
    summary = read_summary(out_dir)
    assert summary["finished"] is True, summary
    assert len(summary["losses"]) == 4, summary
    assert not (REPO / f"pd-dist-{job_id}.out").exists()  # --output was redirected into the work dir


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm_ready, tmp_path, smoke_data,
                                                                 tiny_teacher_dir):
    """SIGUSR1 to the batch script mid-run (what --signal=B:USR1@300 sends before a time limit): the
    ranks finish their step, save a checkpoint and exit; the job requeues itself, the next start resumes
    with --auto-resume and ends with the per-step losses of an uninterrupted run."""
    import threading

    from conftest import launch

    base = [f"data.dir={smoke_data.path}", f"teacher.path={tiny_teacher_dir}", "train.steps=120",
            "train.save_every=0", "train.eval_every=0", "train.log_every=5"]
    launch(2, base + [f"output_dir={tmp_path / 'ref'}"], cwd=tmp_path)
    out_dir = tmp_path / "run"
    args = [a for o in base + [f"output_dir={out_dir}"] for a in ("--set", o)]
    env = {"CONFIG": str(SMOKE), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    two = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
           "--time=10", "--job-name=pd-dist-preempt"]
    # Slurm holds a requeued job back for its credential lifetime (120 s by default; 15 s here). Forcing
    # it to start sooner (scontrol update StartTime=now) races slurmd's list of revoked credentials.
    with _cluster(tmp_path, cred_expire=15) as s:
        result = {}
        th = threading.Thread(target=lambda: result.update(r=s.submit(SBATCH, args, env=env, cwd=REPO,
                                                                      timeout=400, sbatch_args=two)))
        th.start()
        deadline = time.monotonic() + 240
        signalled = None
        while time.monotonic() < deadline and th.is_alive() and signalled is None:
            for f in (s.workdir).glob("job-*.out"):
                if "step 10/120" in f.read_text(errors="replace"):
                    signalled = f.stem.split("-")[1]
                    s._client(["scancel", "--batch", "--signal=USR1", signalled], timeout=30)
            time.sleep(0.2)
        th.join(timeout=420)
        assert signalled, "the job never reached step 10"
        job_id, output, code = result["r"]
        diag = f"job {job_id} exit {code}; output:\n{output[-6000:]}\n{s.diagnostics()}"
    assert code == 0, diag
    assert "SIGUSR1: the ranks checkpoint and stop" in output and "requeueing job" in output, diag
    assert "start 1" in output and "resumed from" in output, diag  # the requeued start resumed by itself
    stopped = [ln for ln in output.splitlines() if "stopping after" in ln and "SIGUSR1 received" in ln]
    assert stopped, diag
    summary, ref = read_summary(out_dir), read_summary(tmp_path / "ref")
    assert summary["finished"] and len(summary["losses"]) == 120
    assert summary["losses"] == pytest.approx(ref["losses"], rel=1e-6, abs=1e-7)


def test_overrunning_job_is_cancelled_and_nothing_is_left(slurm_ready, tmp_path):
    script = tmp_path / "sleep.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --ntasks=2\necho started\nsrun sleep 600\n")
    with _cluster(tmp_path) as s:
        daemons, tag = [p.pid for p in s.daemons.values()], s.id
        with pytest.raises(subprocess.TimeoutExpired) as e:
            s.submit(script, cwd=tmp_path, timeout=8)
        assert "started" in (e.value.output or "")
        q = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=s.env(), capture_output=True, text=True)
        assert q.returncode == 0 and not q.stdout.strip(), q.stdout
        # The job's processes (slurmstepd, srun, the sleeps) are gone while the cluster still runs.
        ours = {p for p, t in _tagged_processes().items() if t == tag and pid_running(p)}
        daemon_tree = set(daemons).union(*(_descendants(p) for p in daemons))  # slurmctld's slurmscriptd
        assert ours <= daemon_tree, {p: _cmdline(p) for p in ours - daemon_tree}
    _assert_all_gone(daemons, tag)



def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def test_students_outlive_a_teacher_replica_killed_under_srun(slurm_ready, tmp_path, smoke_data, tiny_teacher_dir):
    """topology.teacher_failover under srun, which leaves the other tasks running when one dies
    (--kill-on-bad-exit=0): 2 teacher replicas (ranks 0, 1) and 2 students (ranks 2, 3, served by one
    each). Teacher rank 1 is SIGKILLed as it answers its fourth request, with more in flight; student 3
    re-sends them to teacher 0 and both students finish with the per-step losses of the same run
    uninterrupted (launched with deepspeed)."""
    from conftest import launch

    faulty = REPO / "tests" / "fault_launch.py"
    base = [f"data.dir={smoke_data.path}", f"teacher.path={tiny_teacher_dir}", "distill.mode=online",
            "topology.teacher_ranks=[0,1]", "topology.teacher_failover=true", "topology.peer_timeout_s=30",
            "train.steps=6", "train.save_every=0", "train.eval_every=0", "train.log_every=1",
            "distill.top_k=8"]
    launch(4, base + [f"output_dir={tmp_path / 'ref'}"], cwd=tmp_path)
    script = tmp_path / "failover.sbatch"
    # The Slurm script's own srun line with KILL_ON_BAD_EXIT=0, around the fault injector.
    script.write_text("#!/bin/bash\nset -euo pipefail\n"
                      f"srun --label --kill-on-bad-exit=0 python {faulty} --config {SMOKE} \"$@\"\n")
    out_dir, wt = tmp_path / "run", tmp_path / "through"
    # the run also writes through to a store: completed by the surviving replica from both spools
    args = [a for o in base + [f"output_dir={out_dir}", f"distill.write_through={wt}", "generate.shard_size=800"]
            for a in ("--set", o)]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PD_FAULT": "killserve:1:4"}
    four = ["--nodes=1", "--ntasks=4", "--ntasks-per-node=4", "--gpus-per-node=0", "--cpus-per-task=1",
            "--time=10", "--job-name=pd-dist-failover"]
    with LoopbackSlurm(tmp_path / "slurm", cpus=max(4, os.cpu_count() or 1)) as s:
        job_id, output, code = s.submit(script, args, env=env, cwd=REPO, timeout=300, sbatch_args=four)
        diag = f"job {job_id} exit {code}; output:\n{output[-6000:]}\n{s.diagnostics()}"
    failed = [ln for ln in output.splitlines() if ln.startswith("srun: error:") and ": task " in ln]
    assert len(failed) == 1 and failed[0].endswith("task 1: Killed"), diag  # only the killed teacher failed
    lines = output.splitlines()
    assert any(ln.startswith("3: pd-dist: student rank 3 (") and "lost teacher rank 1 (" in ln
               and "continuing with teacher rank 0 (" in ln for ln in lines), diag
    assert any(ln.startswith("0: [teacher 0] adopted student rank 3 (") for ln in lines), diag
    assert any(ln.startswith("0: [teacher 0] done:") for ln in lines), diag
    assert not any(ln.startswith("1: [teacher 1] done:") for ln in lines), diag  # it did die mid-run
    ref, run = read_summary(tmp_path / "ref"), read_summary(out_dir)
    assert run["finished"] and len(run["losses"]) == 6, diag
    assert run["losses"] == pytest.approx(ref["losses"], rel=1e-6, abs=1e-7)
    assert run["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-6)
    # Student 3 cannot notice before its step 3 (the requests of steps 1-3 were answered), and student 2
    # logs step 1 before either passes step 2's all-reduce; by step 4 at the latest replica 1 is lost.
    alive = _tb_series(out_dir / "tensorboard", "teacher/replicas_alive")
    assert alive[0] == 2 and alive[3:] == [1] * 3 and alive == sorted(alive, reverse=True), alive
    assert _tb_series(tmp_path / "ref" / "tensorboard", "teacher/replicas_alive") == [2] * 6
    from pd_dist.store import verify_store

    assert any(ln.startswith("0: [write_through] store complete") for ln in lines), diag
    assert verify_store(wt) == []
    info = json.loads((wt / "write_through_info.json").read_text())
    assert info["samples_from_spools"] >= 6 * 8  # every trained sample, whichever replica served it


def _tb_series(tb_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for f in sorted(tb_dir.glob("events.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out += [e.value for e in acc.Scalars(tag)]
    return out
