"""Shared fixtures: a tiny prepared dataset, a tiny saved teacher, and a runner for the real launcher."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "launch" / "configs" / "smoke.yaml"


# Test tiers: `multiproc` (the real launcher), `cluster` (ssh/pdsh/Slurm/mpirun on loopback hosts) and
# `fast`, every other test: units and in-process runs, `pytest -m fast`. A fast test may start Python
# subprocesses (the CLI), but no launcher, sshd, Slurm, MPI, pip or apt-get; the guard below fails it.
SLOW_TIERS = ("multiproc", "cluster")
_NOT_IN_FAST = {"deepspeed", "torchrun", "mpirun", "mpiexec", "srun", "sbatch", "salloc", "slurmctld", "slurmd",
                "sshd", "ssh", "pdsh", "pip", "pip3", "apt-get", "dpkg"}
_NOT_IN_FAST_MODULES = {"pip", "deepspeed", "deepspeed.launcher.runner", "torch.distributed.run", "venv"}


def pytest_itemcollected(item):
    if not any(item.get_closest_marker(m) for m in SLOW_TIERS):
        item.add_marker(pytest.mark.fast)


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: the build starts only when launches will run
def pytest_collection_modifyitems(config, items):
    # The fast tier first: its failures show within minutes, and DeepSpeed's one-time build of its comm
    # op (about a minute of compiling) runs beside it rather than inside the first launcher test.
    items.sort(key=lambda item: item.get_closest_marker("fast") is None)
    if any(item.get_closest_marker("fast") is None for item in items):
        _PREBUILD.append(subprocess.Popen([sys.executable, "-c", _BUILD_DS_OP], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True))


# What deepspeed.comm builds the first time a rank starts on the CPU accelerator (cached afterwards, and
# torch's build lock makes a rank that starts meanwhile wait for this build instead of starting another).
_BUILD_DS_OP = """
import os
os.nice(5)
import deepspeed.ops
from deepspeed.accelerator import get_accelerator
b = get_accelerator().create_op_builder("ShareMemCommBuilder")
if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False):
    b.load(verbose=False)
"""
_PREBUILD: list = []


def pytest_sessionfinish(session, exitstatus):
    for proc in _PREBUILD:  # let it finish: a build killed midway would leave torch's lock held
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            pass


def _slow_tier_program(args) -> Optional[str]:
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    if len(argv) == 1 and isinstance(argv[0], str) and " " in argv[0]:
        argv = argv[0].split()  # a shell command line
    argv = [os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in argv]
    if argv and Path(argv[0]).name in _NOT_IN_FAST:
        return Path(argv[0]).name
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] in _NOT_IN_FAST_MODULES:
        return "-m " + argv[argv.index("-m") + 1]
    return None


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_launcher(request, monkeypatch):
    """A fast test that starts a launcher, sshd, Slurm, MPI, pip or apt-get fails: mark it multiproc/cluster."""
    if request.node.get_closest_marker("fast") is None:
        return
    real = subprocess.Popen

    class Guarded(real):
        def __init__(self, args, *a, **kw):
            what = _slow_tier_program(args)
            if what is not None:
                raise RuntimeError(f"a fast-tier test started {what!r}; mark it multiproc or cluster")
            super().__init__(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", Guarded)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def smoke_cfg():
    from pd_dist.config import load_config

    return load_config(SMOKE)


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory, smoke_cfg):
    """The smoke config's corpus, tokenized and packed once per session."""
    from pd_dist.data import PackedDataset, prepare_data

    out = tmp_path_factory.mktemp("smoke_data")
    prepare_data(smoke_cfg.data, out, log=lambda *_: None)
    return PackedDataset(out)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, smoke_data):
    """A tiny teacher saved with save_pretrained (+ the run's tokenizer), loaded back by path in tests."""
    from pd_dist.data import load_tokenizer
    from pd_dist.models import ModelConfig, build_model

    out = tmp_path_factory.mktemp("tiny_teacher")
    model = build_model(ModelConfig(preset="tiny-teacher"), smoke_data.vocab_size, seed=7)
    # Sharper than a fresh init so top-p truncation keeps few entries and top-1 is meaningful.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    model.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(smoke_data.tokenizer_dir).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory):
    """The project built as a wheel and installed (no deps) into a folder of its own, once per session:
    (wheel file, install folder). Put the folder on PYTHONPATH and run from elsewhere to use the installed
    copy instead of the checkout; its console script is <folder>/bin/pd-dist."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel_dir = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheel_dir), str(REPO)], check=True, capture_output=True, cwd=tmp)
    (wheel,) = wheel_dir.glob("pd_dist-*.whl")
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    return wheel, site


def deepspeed_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "deepspeed"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def launch(nprocs: int, overrides: list[str], cwd: Path, config: Path = SMOKE, extra_args=(),
           timeout: float = 600, check: bool = True, script: Path = REPO / "launch" / "pretrain_pd.py",
           env_extra: Optional[dict] = None) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N launch/pretrain_pd.py --config ... --set ...` as a user would run it."""
    cmd = deepspeed_cmd() + ["--num_gpus", str(nprocs), "--master_port", str(free_port()),
                             str(script), "--config", str(config)]
    for o in overrides:
        cmd += ["--set", o]
    cmd += list(extra_args)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(env_extra or {})
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"launch failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc


# A short colocated run on 2 ranks (4 steps, constant alpha 0.5, the top-8 signal of the tiny teacher):
# what online (test_online_launch), offline (test_offline_launch) and mpirun (test_mpi) runs of the same
# settings must reproduce. Launched once per session by the `colocated_2rank` fixture.
REFERENCE_2RANK = ["train.steps=4", "train.save_every=0", "train.eval_every=0", "train.log_every=1",
                   "train.global_batch_size=8", "train.micro_batch_size=4", "optim.warmup_steps=1",
                   "distill.alpha.schedule=constant", "distill.alpha.value=0.5", "distill.top_k=8"]


def reference_2rank_overrides(out: Path, smoke_data, mode: str, **kw) -> list[str]:
    return REFERENCE_2RANK + [f"output_dir={out}", f"data.dir={smoke_data.path}", f"distill.mode={mode}",
                              *(f"{k}={v}" for k, v in kw.items())]


@pytest.fixture(scope="session")
def colocated_2rank(tmp_path_factory, smoke_data, tiny_teacher_dir) -> Path:
    """The output directory of the shared 2-rank colocated reference run (REFERENCE_2RANK)."""
    out = tmp_path_factory.mktemp("colocated_2rank") / "run"
    proc = launch(2, reference_2rank_overrides(out, smoke_data, "colocated", **{"teacher.path": tiny_teacher_dir}),
                  cwd=out.parent)
    (out.parent / "launch.log").write_text(proc.stdout + proc.stderr)  # what it printed, for tests to read
    return out


@pytest.fixture(scope="session")
def store_1rank_top8(tmp_path_factory, smoke_data, tiny_teacher_dir) -> Path:
    """A top-8 store of the tiny teacher on the smoke data, written by a 1-rank generation job with the
    smoke config's generate settings; read (never changed) by test_golden and test_layouts."""
    from test_offline_launch import _launch_gen

    store = tmp_path_factory.mktemp("store_1rank_top8") / "store"
    _launch_gen(1, store_1rank_top8_overrides(store, smoke_data, tiny_teacher_dir), cwd=store.parent)
    return store


def store_1rank_top8_overrides(store: Path, smoke_data, teacher) -> list[str]:
    return [f"distill.store={store}", f"data.dir={smoke_data.path}", f"teacher.path={teacher}", "distill.top_k=8"]


def read_summary(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "summary.json").read_text())


def read_student(out_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(out_dir) / "student" / "model.safetensors"))


def assert_same_params(a: dict, b: dict, init: dict, rel=1e-3):
    """Per tensor, ||a - b|| must be tiny against how far training moved it, ||b - init||.

    Adam turns fp32 summation-order noise in the near-zero gradients of rare embedding rows into
    update noise (measured: 1e-4 of the movement); a skipped gradient all-reduce or a bad ZeRO-3
    gather changes the update itself, i.e. O(1) of the movement, and NaN fails outright."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.isfinite(a[k]).all(), k
        moved = (b[k] - init[k]).norm().item()
        assert moved > 0, f"{k} did not train"
        diff = (a[k] - b[k]).norm().item()
        assert diff <= rel * moved, f"{k}: |diff| {diff:.3g} vs movement {moved:.3g}"


def read_initial(smoke_data):
    """The student's initial weights (seeded preset init), to check that training moved them."""
    from conftest import SMOKE
    from pd_dist.config import load_config
    from pd_dist.models import build_model

    c = load_config(SMOKE)
    model = build_model(c.model, smoke_data.vocab_size, seed=c.train.seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
