"""`mpirun -n N python launch/pretrain_pd.py` (Open MPI from Debian, installed with apt-get when missing):
ranks come from Open MPI's environment, the rendezvous from MASTER_ADDR/MASTER_PORT passed with -x. Two
colocated ranks end with the per-step losses of the same run under the deepspeed launcher; three ranks
run online (1 teacher + 2 students)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import apt_install, skip_or_fail
from conftest import REPO, SMOKE, free_port, read_summary, reference_2rank_overrides

pytestmark = [pytest.mark.multiproc, pytest.mark.cluster]


@pytest.fixture(scope="module")
def mpirun():
    if not shutil.which("mpirun"):
        reason = "missing mpirun and not root" if os.geteuid() != 0 else \
            apt_install(["openmpi-bin"], lambda: [] if shutil.which("mpirun") else ["mpirun"])
        if reason:
            skip_or_fail(reason)
    return shutil.which("mpirun")


def _mpirun(mpirun, n: int, overrides: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{Path(mpirun).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    # By name, not by its absolute path: Open MPI started by absolute path acts as --prefix and puts its
    # own bin (/usr/bin) first on the ranks' PATH, where a system ninja then re-compiles DeepSpeed's
    # comm op (and the next launch, with the venv's ninja, compiles it back): a minute per switch.
    cmd = [Path(mpirun).name, "-n", str(n), "--oversubscribe", "--bind-to", "none"]
    for var in ("MASTER_ADDR", "MASTER_PORT", "PATH", "PYTHONPATH"):
        cmd += ["-x", var]
    cmd += [sys.executable, str(REPO / "launch" / "pretrain_pd.py"), "--config", str(SMOKE)]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def test_mpirun_two_ranks_match_the_deepspeed_launcher(mpirun, tmp_path, smoke_data, tiny_teacher_dir,
                                                      colocated_2rank):
    # colocated_2rank: the same settings on 2 ranks under the deepspeed launcher (shared, conftest)
    proc = _mpirun(mpirun, 2, reference_2rank_overrides(tmp_path / "mpi", smoke_data, "colocated",
                                                        **{"teacher.path": tiny_teacher_dir}), tmp_path)
    assert "dp 2" in proc.stdout + proc.stderr
    a, b = read_summary(colocated_2rank), read_summary(tmp_path / "mpi")
    assert a["finished"] and len(a["losses"]) == 4
    assert b["finished"] and b["losses"] == pytest.approx(a["losses"], rel=1e-6, abs=1e-7)
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)


def test_mpirun_online_teacher_and_two_students(mpirun, tmp_path, smoke_data, tiny_teacher_dir):
    out = tmp_path / "online"
    proc = _mpirun(mpirun, 3, [f"data.dir={smoke_data.path}", f"teacher.path={tiny_teacher_dir}",
                               "distill.mode=online", "train.steps=4", "train.save_every=0", "train.eval_every=0",
                               f"output_dir={out}"], tmp_path)
    log = proc.stdout + proc.stderr
    assert "serving students [1, 2]" in log and "mode online | dp 2" in log, log[-3000:]
    s = read_summary(out)
    assert s["finished"] and len(s["losses"]) == 4
