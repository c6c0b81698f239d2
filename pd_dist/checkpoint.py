"""Checkpoint and resume: DeepSpeed checkpoints under <output_dir>/checkpoints, plus the run state that
makes a resumed run continue exactly (step, data position, schedules, loss history, RNG).

Tags are ``step<N>`` (zero-padded), so the step names the checkpoint and no tag has to be agreed on
between ranks; the newest `keep` are kept. What DeepSpeed writes besides the engine state is the
"client state" built here; on resume it is checked against the new run before anything trains, so a
resume can only continue the run it came from.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .configlib import to_dict
from .config import ExperimentConfig
from .data import GlobalBatchSampler
from .schedules import check_schedule_state, schedule_state
from .topology import Topology


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def run_state(cfg: ExperimentConfig, step: int, sampler: GlobalBatchSampler, data_fingerprint: str,
              losses: list[float]) -> dict:
    """The client state saved with a checkpoint at `step` (steps done)."""
    return {"step": step, "data": sampler.state(step), "data_fingerprint": data_fingerprint,
            "schedules": schedule_state(cfg.distill.alpha, cfg.optim), "distill": to_dict(cfg.distill),
            "losses": list(losses), "rng": rng_state(), "total_steps": cfg.train.steps}


def check_run_state(state: dict, cfg: ExperimentConfig, sampler: GlobalBatchSampler,
                    data_fingerprint: str) -> None:
    """Refuse to resume a checkpoint into a run that would not continue it (other data, length,
    data order or schedules)."""
    if state["data_fingerprint"] != data_fingerprint:
        raise RuntimeError("--resume: the checkpoint was trained on other data (fingerprint "
                           f"{state['data_fingerprint']}, now {data_fingerprint})")
    if state["total_steps"] != cfg.train.steps:
        raise RuntimeError(f"--resume: the checkpoint's run has train.steps={state['total_steps']}, "
                           f"now {cfg.train.steps}; schedules would not continue")
    sampler.check_state(state["data"])
    check_schedule_state(state["schedules"], cfg.distill.alpha, cfg.optim)


class CheckpointManager:
    """Save, find, load and prune one run's checkpoints. Every rank calls save/load (DeepSpeed
    writes its shards from all of them); `latest` and pruning are the logging rank's."""

    def __init__(self, root: Path, keep: int, topo: Topology, log: Callable[[str], None]):
        self.root, self.keep, self.topo, self.log = Path(root), keep, topo, log

    @staticmethod
    def tag(step: int) -> str:
        return f"step{step:08d}"

    def tags(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step"))

    def latest(self) -> Optional[str]:
        f = self.root / "latest"
        return f.read_text().strip() if f.is_file() else None

    def prune(self) -> None:
        if self.keep <= 0:
            return
        latest = self.latest()
        for t in self.tags()[:-self.keep]:
            if t != latest:
                shutil.rmtree(self.root / t, ignore_errors=True)

    def save(self, engine, step: int, state: dict) -> None:
        tag = self.tag(step)
        engine.save_checkpoint(str(self.root), tag=tag, client_state=state)
        self.topo.barrier()
        if self.topo.is_logger:
            self.prune()
        self.log(f"checkpoint {self.root / tag}")

    def refuse_overwrite(self) -> None:
        """A fresh run must not start over another run's checkpoints."""
        if self.latest() is not None:
            raise RuntimeError(f"{self.root} already holds checkpoints: pass --resume to continue "
                               "that run, or choose another output_dir")

    def load(self, engine) -> dict:
        """Load the latest checkpoint into `engine`, restore the RNG, return the client state."""
        if self.latest() is None:
            raise RuntimeError(f"--resume: no checkpoint under {self.root}")
        path, state = engine.load_checkpoint(str(self.root))
        if path is None:
            raise RuntimeError(f"--resume: could not load the checkpoint in {self.root}")
        set_rng_state(state["rng"])
        self.log(f"resumed from {path} at step {state['step']}")
        return state
