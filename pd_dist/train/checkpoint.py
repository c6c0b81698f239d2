"""Checkpoint and resume: DeepSpeed checkpoints under <output_dir>/checkpoints, plus the run state that
makes a resumed run continue exactly (step, data position, schedules, loss history, RNG).

Tags are ``step<N>`` (zero-padded), so the step names the checkpoint and no tag has to be agreed on
between ranks; the newest `keep` are kept. What DeepSpeed writes besides the engine state is the
"client state" built here; on resume it is checked against the new run before anything trains, so a
resume can only continue the run it came from: same data and order, and the same objective (teacher,
truncation, loss, temperature, schedules, optimizer) unless a change is named with --resume-override.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Callable, Optional

import numpy as np
import torch

from pd_dist.core.configlib import to_dict
from pd_dist.config import ExperimentConfig
from pd_dist.data import GlobalBatchSampler
from pd_dist.core.schedules import check_schedule_state, schedule_state
from pd_dist.cluster.topology import Topology


class ResumeError(RuntimeError):
    """A resume that would not continue the run it names (the launcher prints it as one line)."""


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


TEACHER_KEYS = ("teacher.preset", "teacher.path", "teacher.weights")
# Keys of `distill` that say where things are or how far ahead to fetch, not what the student learns.
DISTILL_OPERATIONAL = ("store", "write_through", "prefetch", "dump_logits")


def _flat(prefix: str, d: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(f"{prefix}.{k}", v) if isinstance(v, dict) else {f"{prefix}.{k}": v})
    return out


def objective(cfg: ExperimentConfig, teacher_weights: Optional[str] = None,
              tokenizers: Optional[tuple[str, str]] = None) -> dict[str, Any]:
    """What the student is and is trained toward, as flat config keys, derived from the sections the
    result depends on: the student model (every `model` key), the whole teacher signal (every `distill`
    key but where files are and how far ahead to fetch: mode, signal, samples, truncation, loss,
    temperature, the alpha schedule, wire dtype; the signal's keys as its SignalSpec gives them,
    SignalSpec.config_keys, so each kind's parameters are covered; its draws' seed is train.seed, which
    the data order pins already), the teacher (preset, path and `teacher_weights`, a
    models.weights_digest or a store's teacher hash; None where this rank cannot read it), the
    optimizer and LR schedule, clipping, and data.document_mask (what the student attends to; the rest
    of the data is checked by its fingerprint and order). A resumed run must keep every one of them
    unless told otherwise (`--resume-override KEY`); a key added to those sections is covered without
    listing it. ``tokenizers``: with distill.cross_tokenizer, the (teacher, student) tokenizer hashes,
    kept as teacher.tokenizer and student.tokenizer (a pair that changes would change every aligned
    position's target)."""
    distill = {k: v for k, v in to_dict(cfg.distill).items() if k not in DISTILL_OPERATIONAL}
    keys: dict[str, Any] = _flat("model", to_dict(cfg.model))
    keys.update(_flat("distill", distill))
    spec = cfg.distill.signal_spec(cfg.train.seed)
    keys.update({f"distill.{k}": v for k, v in spec.config_keys().items() if k != "seed"})
    keys.update(_flat("optim", to_dict(cfg.optim)))
    keys["train.grad_clip"] = cfg.train.grad_clip
    keys["data.document_mask"] = cfg.data.document_mask
    if cfg.distill.mode != "none":
        keys.update(zip(TEACHER_KEYS, (None if cfg.teacher.path else cfg.teacher.preset, cfg.teacher.path,
                                       teacher_weights)))
    if tokenizers is not None:
        keys["teacher.tokenizer"], keys["student.tokenizer"] = tokenizers
    return keys


def objective_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint value, current value) of every key that differs. A teacher digest either side
    could not read (None) is not a difference; a key only one side has is."""
    missing = "<absent>"
    changes = []

    def norm(v):  # a state read back from JSON (the checkpoint's sidecar) has lists for tuples
        return json.loads(json.dumps(v, default=str))

    for k in list(now) + sorted(k for k in saved if k not in now):
        a, b = norm(saved.get(k, missing)), norm(now.get(k, missing))
        if k == "teacher.weights" and (a is None or b is None):
            continue
        if a != b:
            changes.append((k, a, b))
    return changes


def run_state(cfg: ExperimentConfig, step: int, sampler: GlobalBatchSampler, data_fingerprint: str,
              losses: list[float], objective_keys: Optional[dict[str, Any]] = None) -> dict:
    """The client state saved with a checkpoint at `step` (steps done)."""
    return {"step": step, "data": sampler.state(step), "data_fingerprint": data_fingerprint,
            "schedules": schedule_state(cfg.distill.alpha, cfg.optim), "distill": to_dict(cfg.distill),
            "objective": objective_keys if objective_keys is not None else objective(cfg),
            "losses": list(losses), "rng": rng_state(), "total_steps": cfg.train.steps}


def check_run_state(state: dict, cfg: ExperimentConfig, sampler: GlobalBatchSampler,
                    data_fingerprint: str, objective_keys: Optional[dict[str, Any]] = None,
                    overrides: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """Refuse to resume a checkpoint into a run that would not continue it: other data, length or data
    order, or another objective (see :func:`objective`) unless each changed key is in `overrides`.
    Returns the changes `overrides` let through (to be recorded)."""
    if state["data_fingerprint"] != data_fingerprint:
        raise ResumeError("--resume: the checkpoint was trained on other data (fingerprint "
                           f"{state['data_fingerprint']}, now {data_fingerprint}: another corpus, blend of "
                           "sources or weights, tokenizer or seq_len)")
    if state["total_steps"] != cfg.train.steps:
        raise ResumeError(f"--resume: the checkpoint's run has train.steps={state['total_steps']}, "
                           f"now {cfg.train.steps}; schedules would not continue")
    sampler.check_state(state["data"])
    now = objective_keys if objective_keys is not None else objective(cfg)
    if "objective" not in state:  # checkpoints written before the objective was recorded
        check_schedule_state(state["schedules"], cfg.distill.alpha, cfg.optim)
        return []
    overrides = set(overrides)
    if overrides & {"distill.mode", *TEACHER_KEYS}:
        # The teacher keys name one thing (which teacher), and it appears or goes with the mode: a
        # deliberate change of one of them may change all of them.
        overrides |= set(TEACHER_KEYS)
    # A checkpoint written before data.document_mask or distill.teacher_context existed trained without
    # the mask, its teacher reading the window.
    before = {"data.document_mask": False, "distill.teacher_context": "window", "distill.teacher_seq_len": None}
    changes = objective_changes({**before, **state["objective"]}, now)
    refused = [c for c in changes if c[0] not in overrides]
    if refused:
        raise ResumeError("--resume: the run's objective changed: " + "; ".join(
            f"{k} was {a!r} in the checkpoint, now {b!r}" for k, a, b in refused)
            + " (pass --resume-override KEY for each deliberate change)")
    return [c for c in changes if c[0] in overrides]


def check_override_keys(keys: Iterable[str], cfg: ExperimentConfig) -> None:
    """Refuse a --resume-override KEY that names no objective key."""
    known = set(objective(cfg)) | set(TEACHER_KEYS)
    for k in keys:
        if k not in known:
            raise ValueError(f"--resume-override {k}: not a key a resume checks (one of: "
                             + ", ".join(sorted(known)) + ")")


DISK_FULL_BYTES = 16 << 20  # a failed write with less than this left is taken for a full disk


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (the disk is full); the previous one stays `latest`."""


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

    SIDECAR = "pd_dist_run_state.json"
    SIDECAR_KEYS = ("step", "data", "data_fingerprint", "objective", "total_steps", "schedules", "distill")

    def peek(self) -> Optional[dict]:
        """The latest checkpoint's run state as saved beside it (no weights), for checking a resume
        before DeepSpeed loads tensors of perhaps another shape; None for older checkpoints."""
        tag = self.latest()
        if tag is None:
            return None
        try:
            return json.loads((self.root / tag / self.SIDECAR).read_text())
        except (OSError, ValueError):
            return None

    def save(self, engine, step: int, state: dict) -> None:
        """Every rank writes its part; `latest` moves to the new tag only once all have (DeepSpeed's own
        `latest` is written by rank 0 before the others finish, and not atomically), so a crash
        while a checkpoint is written leaves the previous one `latest` and loadable."""
        tag = self.tag(step)
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state=state, save_latest=False)
        except (OSError, RuntimeError) as e:
            # torch.save reports a full disk as "unexpected pos" from its zip writer, not as ENOSPC.
            free = shutil.disk_usage(self.root).free if self.root.exists() else -1
            if getattr(e, "errno", None) == errno.ENOSPC or 0 <= free < DISK_FULL_BYTES:
                raise CheckpointWriteError(
                    f"checkpoint {self.root / tag}: No space left on device ({free:,} bytes free under "
                    f"{self.root}); the previous checkpoint ({self.latest() or 'none'}) stays latest. Free "
                    "space (or lower train.keep_checkpoints) and continue with --resume") from None
            raise
        self.topo.barrier()
        if self.topo.is_logger:
            side = self.root / tag / self.SIDECAR
            side.write_text(json.dumps({k: state[k] for k in self.SIDECAR_KEYS if k in state}, default=str))
            self._write_latest(tag)
            self.prune()
        self.topo.barrier()
        self.log(f"checkpoint {self.root / tag}")

    def _write_latest(self, tag: str) -> None:
        tmp = self.root / f".latest.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / "latest")
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def refuse_overwrite(self) -> None:
        """A fresh run must not start over another run's checkpoints."""
        if self.latest() is not None:
            raise ResumeError(f"{self.root} already holds checkpoints: pass --resume to continue "
                               "that run, or choose another output_dir")

    def load(self, engine, tag: Optional[str] = None) -> dict:
        """Load the latest checkpoint (or the one tagged ``tag``) into `engine`, restore the RNG, return
        the client state."""
        if tag is None and self.latest() is None:
            raise ResumeError(f"--resume: no checkpoint under {self.root}")
        if tag is not None and not (self.root / tag).is_dir():
            raise ResumeError(f"no checkpoint {tag} under {self.root}")
        path, state = engine.load_checkpoint(str(self.root), tag=tag)
        if path is None:
            raise ResumeError(f"--resume: could not load the checkpoint in {self.root}")
        set_rng_state(state["rng"])
        self.log(f"resumed from {path} at step {state['step']}")
        return state
