"""Orchestration: everything between parsing a config and tearing the process groups down.

- prepare the packed data (one rank prepares, the others wait);
- obtain the teacher: load `teacher.path`, or pre-train the default teacher once (LM only, with the
  same trainer) and cache it under <output_dir>/teacher;
- on a teacher rank (online mode): serve teacher signals to the students paired with it;
- with `baseline`: pre-train the same student LM-only on the same tokens once (cached under
  <output_dir>/baseline), the yardstick for the distilled student;
- on a student rank: build the run's teacher-signal source, train, export, compare the teacher, the
  LM-only student and the distilled student on the same held-out samples, write summary.json, and
  (distill.dump_logits) turn the run's own logits into a store.

Entry points (pd_dist.cli) call only this layer and pd_dist.teacher.generate.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from collections.abc import Sequence
from typing import Callable, Optional

import torch
import torch.nn as nn

from pd_dist.cluster.bridge import STARTUP_TIMEOUT_S
from pd_dist.cluster.topology import Topology
from pd_dist.config import BaselineConfig, ExperimentConfig
from pd_dist.core.compute_gain import (branch_step, check_shared_prefix, compute_balance, curve_lengths,
                                       curve_multiplier, describe_balance, describe_multiplier)
from pd_dist.core.configlib import to_dict
from pd_dist.core.monitor import Monitor
from pd_dist.core.runtime import StopSignals, device, set_threads
from pd_dist.data import DataError, PackedDataset, prepare_data
from pd_dist.models import (ModelConfig, build_model, check_same_tokenizer, model_shape, tokenizer_hash,
                            weights_digest)
from pd_dist.store import StoreError, store_info
from pd_dist.store.library import library_stores
from pd_dist.signals.sources import SOURCES, NoTeacher, SourceContext, build_source
from pd_dist.teacher.crosstok import CrossTokenizer
from pd_dist.teacher.generate import run_generation
from pd_dist.teacher.serve import serve_teacher
from pd_dist.teacher.stores import LogitsDump
from pd_dist.train.checkpoint import CheckpointManager, ResumeError, objective
from pd_dist.train.trainer import Trainer, TrainResult

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------- data
def prepare_run_data(cfg: ExperimentConfig, topo: Topology, log: Log = print, key: str = "pd/data") -> PackedDataset:
    """One rank prepares (or reuses) the packed data; the others wait and then read it.

    In online mode the first teacher rank prepares and publishes the outcome in the job's store under
    ``key``, so the two roles never write the same files."""
    data_dir = Path(cfg.data.dir) if cfg.data.dir else Path(cfg.output_dir) / "data"
    preparer = topo.role_rank == 0 and (not topo.online or topo.role == "teacher")
    err = None
    if preparer:
        try:  # the only rank at work: all the host's cores tokenize
            prepare_data(cfg.data, data_dir, log=log, workers=cfg.data.prepare_workers or os.cpu_count() or 1)
        except Exception as e:  # reported on every rank below, raised here
            err = e
    if topo.online:
        if preparer:
            topo.store.set(key, "ok" if err is None else f"error: {err}")
        else:
            topo.store.wait([key], datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
        status = topo.store.get(key).decode()
        if err is not None:
            raise err
        if status != "ok":
            raise DataError(f"data preparation failed on the first teacher rank: {status[7:]}")
        return PackedDataset(data_dir)
    ok = torch.tensor([0.0 if err else 1.0])
    topo.barrier()
    topo.role_sum(ok)
    if err is not None:
        raise err
    if ok.item() < topo.role_size:
        raise DataError("data preparation failed on rank 0 (its log says why)")
    return PackedDataset(data_dir)


def teacher_view_data(cfg: ExperimentConfig, topo: Topology, log: Log = print) -> Optional[PackedDataset]:
    """With distill.cross_tokenizer, the run's data prepared with the teacher's tokenizer (teacher.path's),
    beside the run's own data directory in ``<dir>-teacher-<tokenizer hash>``: the same sources, caps
    and documents, tokenized as the teacher reads them (and as the teacher's document stores were
    written). None otherwise."""
    if cfg.distill.cross_tokenizer == "off":
        return None
    tok = Path(cfg.teacher.path)
    if not (tok / "tokenizer.json").is_file():
        raise DataError(f"teacher.path {tok} has no tokenizer.json: distill.cross_tokenizer needs the teacher's "
                        "own (fast) tokenizer saved with it")
    base = Path(cfg.data.dir) if cfg.data.dir else Path(cfg.output_dir) / "data"
    tc = copy.copy(cfg)
    tc.data = dataclasses.replace(cfg.data, tokenizer=str(tok), dir=str(teacher_view_dir(base, tok)))
    return prepare_run_data(tc, topo, log=log, key="pd/teacher_data")


def teacher_view_dir(data_dir: Path, teacher_path) -> Path:
    """Where the data of ``data_dir`` prepared with the tokenizer of ``teacher_path`` lives."""
    return data_dir.parent / f"{data_dir.name}-teacher-{tokenizer_hash(teacher_path)}"


def data_summary(data: PackedDataset, sampler, steps: int) -> dict:
    """What the run trained on, for summary.json: each source with its weight, its share of the blend
    schedule and its share of the samples this run drew; and what a cap cut."""
    drawn = sampler.mix(steps * sampler.global_batch)
    total = max(1, sum(drawn))
    return {"fingerprint": data.fingerprint, "n_tokens": data.meta["n_tokens"], "truncated": data.meta["truncated"],
            "sources": [{"label": e["label"], "kind": e["kind"], "weight": e["weight"], "share": e["share"],
                         "samples_drawn": n, "realised_share": n / total, "n_tokens": e["n_tokens"],
                         "n_train": e["n_train"], "n_val": e["n_val"]} for e, n in zip(data.sources, drawn)]}


def describe_data(data: PackedDataset, samples: int) -> str:
    """The run's data in one line at start: sources and the realised mix of the samples it will draw."""
    line = f"[data] {data.meta['n_tokens'] / 1e6:.2f}M tokens, {data.n_train:,} training samples"
    if len(data.sources) > 1:
        drawn = data.sampler(1, 0).mix(samples)
        line += "; blend (weight -> share of this run's samples): " + ", ".join(
            f"{e['label']} {e['weight']:g} -> {100 * n / max(1, samples):.2f}%" for e, n in zip(data.sources, drawn))
    for t in data.meta["truncated"]:
        line += (f"; data.max_chars cut {t['source']} after {t['documents']:,} documents "
                 f"({t['characters']:,} characters)")
    return line


# ---------------------------------------------------------------------------------------- teacher
def teacher_run_config(cfg: ExperimentConfig, data_dir: Path) -> ExperimentConfig:
    """The LM-only run that pre-trains the default teacher: same data and trainer, teacher shape."""
    tc = copy.deepcopy(cfg)
    tc.output_dir = str(Path(cfg.output_dir) / "teacher")
    tc.model = ModelConfig(preset=cfg.teacher.preset, path=None,
                           max_position_embeddings=cfg.teacher.max_position_embeddings,
                           rope_theta=cfg.teacher.rope_theta)
    tc.distill = dataclasses.replace(cfg.distill, mode="none", dump_logits=False)
    tc.train = dataclasses.replace(cfg.train, steps=cfg.teacher.pretrain_steps, exit_after_steps=0,
                                   global_batch_size=cfg.teacher.pretrain_batch_size or cfg.train.global_batch_size)
    tc.optim = dataclasses.replace(cfg.optim, lr=cfg.teacher.pretrain_lr)
    tc.data = dataclasses.replace(cfg.data, dir=str(data_dir))
    return tc


def baseline_run_config(cfg: ExperimentConfig, data_dir: Path) -> ExperimentConfig:
    """The LM-only twin of a distillation run: the same student, tokens, schedule and seed, no teacher."""
    bc = copy.deepcopy(cfg)
    bc.output_dir = str(Path(cfg.output_dir) / "baseline")
    bc.baseline = BaselineConfig()
    bc.distill = dataclasses.replace(cfg.distill, mode="none", dump_logits=False)
    bc.train = dataclasses.replace(cfg.train, exit_after_steps=0)
    bc.data = dataclasses.replace(cfg.data, dir=str(data_dir))
    return bc


def teacher_export_dir(cfg: ExperimentConfig) -> Path:
    """Where the teacher's weights are: teacher.path, or the cached pre-trained default."""
    return Path(cfg.teacher.path) if cfg.teacher.path else Path(cfg.output_dir) / "teacher" / "export"


# How often a run logs, evaluates, saves and stops, and on how many threads: not what it trains to.
OPERATIONAL_TRAIN_KEYS = ("log_every", "eval_every", "save_every", "keep_checkpoints", "threads",
                          "exit_after_steps", "peak_tflops")


def _run_stamp(rc: ExperimentConfig, data: PackedDataset) -> str:
    """What a cached LM-only run's result depends on: model, training (not its operational keys),
    optimizer and the data."""
    train = {k: v for k, v in to_dict(rc.train).items() if k not in OPERATIONAL_TRAIN_KEYS}
    blob = json.dumps({"model": to_dict(rc.model), "train": train, "optim": to_dict(rc.optim),
                       "data": data.fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached_lm_run(rc: ExperimentConfig, topo: Topology, data: PackedDataset, export: Path, name: str,
                   starting: str, reusing: str, log: Log, need_summary: bool = False,
                   keep_existing: bool = False) -> dict:
    """Run the LM-only config `rc` once and cache it: the export carries a stamp of what it depends on,
    and a later call with the same inputs reuses it. With `keep_existing` a cached export is kept
    whatever its stamp (the run it belongs to is being resumed: retraining would replace what the
    checkpoint was trained with). Returns the run's summary ({} if none was kept)."""
    stamp = _run_stamp(rc, data)
    stamp_file = export / f"pd_dist_{name}_stamp.txt"
    summary_file = Path(rc.output_dir) / "summary.json"
    cached = stamp_file.read_text().strip() if stamp_file.is_file() else None
    if cached is not None and (cached == stamp or keep_existing) and (summary_file.is_file() or not need_summary):
        if topo.is_logger:
            log(f"[{name}] {reusing}" + ("" if cached == stamp else
                                         " (the run has checkpoints: its own is kept, although its inputs changed)"))
        return json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if topo.is_logger:
        log(f"[{name}] {starting}")
        ck = Path(rc.output_dir) / "checkpoints"
        if ck.exists():  # a stale or interrupted run: its config no longer matches
            shutil.rmtree(ck)
    topo.barrier()
    trainer = Trainer(rc, topo, data, NoTeacher(), run_name=name)
    try:
        result = trainer.fit(export_dir=export)
    finally:
        trainer.close()
    summary = dataclasses.asdict(result)
    if topo.is_logger:
        summary_file.write_text(json.dumps(summary, indent=1))
        stamp_file.write_text(stamp + "\n")
    topo.barrier()
    return summary


def teacher_weights(cfg: ExperimentConfig, topo: Topology, data: PackedDataset, log: Log = print) -> ModelConfig:
    """Where the teacher's weights are: teacher.path, or the default teacher, pre-trained here once and
    cached (every rank of the role world must call this when it may pre-train: training is collective)."""
    if cfg.teacher.path:
        check_same_tokenizer(cfg.teacher.path, data.tokenizer_dir, "the teacher")
        return cfg.teacher
    export = teacher_export_dir(cfg)
    tc = teacher_run_config(cfg, data.path)
    # A run with student checkpoints (a resume, or a fresh start that will be refused) keeps its teacher.
    resuming = (Path(cfg.output_dir) / "checkpoints" / "latest").is_file()
    _cached_lm_run(tc, topo, data, export, "teacher",
                   f"no teacher.path: pre-training a {tc.model.preset} teacher for {tc.train.steps} steps "
                   f"(LM only) in {tc.output_dir}", f"reusing the pre-trained teacher in {export}", log,
                   keep_existing=resuming)
    return ModelConfig(path=str(export))


def obtain_teacher(cfg: ExperimentConfig, topo: Topology, data: PackedDataset, log: Log = print) -> nn.Module:
    """The teacher model: loaded from teacher.path, or pre-trained here once and cached."""
    return build_model(teacher_weights(cfg, topo, data, log), data.vocab_size, seed=cfg.train.seed)


def obtain_baseline(cfg: ExperimentConfig, topo: Topology, data: PackedDataset, log: Log = print) -> dict:
    """The summary of the run's LM-only twin (pre-trained here once and cached), with ``lm_curve``: the
    held-out losses of LM-only runs of several lengths (baseline.points, up to baseline.extend x the
    run's; None with one point) that the compute-equivalent gain is read from."""
    bc = baseline_run_config(cfg, data.path)
    lengths = _lengths(cfg, topo, log)
    if lengths == [bc.train.steps]:
        summary = _cached_lm_run(bc, topo, data, Path(bc.output_dir) / "student", "baseline",
                                 f"pre-training the LM-only baseline: the same student on the same tokens, "
                                 f"{bc.train.steps} steps, in {bc.output_dir}",
                                 f"reusing the LM-only baseline in {bc.output_dir}", log, need_summary=True)
        return {**summary, "lm_curve": None}
    return _lm_curve(bc, lengths, topo, data, log)


def _lengths(cfg: ExperimentConfig, topo: Topology, log: Log) -> list[int]:
    """The LM-only curve's run lengths for cfg's baseline (just train.steps where there is no curve)."""
    lengths = curve_lengths(cfg.train.steps, cfg.baseline.extend, cfg.baseline.points, cfg.optim.warmup_steps)
    if len(lengths) > 1 and branch_step(cfg.train.steps, cfg.optim) is None:
        if topo.is_logger:
            log(f"[baseline] optim.lr_schedule {cfg.optim.lr_schedule}: no LM-only curve (each of its points "
                "would be a whole run of its own; wsd or constant share one trunk), so no token multiplier")
        return [cfg.train.steps]
    return lengths


def _lm_curve(bc: ExperimentConfig, lengths: list[int], topo: Topology, data: PackedDataset, log: Log,
              resume: bool | str = False) -> dict:
    """The LM-only runs of ``lengths`` steps as one stable trunk (the longest) and a decay branched off it
    for each shorter one (core.compute_gain). The run of bc's own length is the twin, in bc.output_dir
    with its export; the others under <output_dir>/curve. Cached as a whole by the inputs and lengths;
    the trunk's branch checkpoints are deleted once the branches ran. The trunk keeps
    train.exit_after_steps and continues with ``resume`` (an unfinished trunk returns its unfinished
    summary and no curve); the decays, short, run whole."""
    out, T = Path(bc.output_dir), bc.train.steps
    trunk_len = lengths[-1]
    at = {b: check_shared_prefix(b, trunk_len, bc.optim) for b in lengths if b < trunk_len}
    stamp = f"{_run_stamp(bc, data)}-curve-{'.'.join(map(str, lengths))}"
    stamp_file, curve_file = out / "student" / "pd_dist_baseline_stamp.txt", out / "lm_curve.json"
    if stamp_file.is_file() and stamp_file.read_text().strip() == stamp and curve_file.is_file():
        if topo.is_logger:
            log(f"[baseline] reusing the LM-only baseline and its curve in {out}")
        return {**json.loads((out / "summary.json").read_text()), "lm_curve": json.loads(curve_file.read_text())}
    tokens = bc.train.global_batch_size * data.seq_len
    trunk_dir = out if trunk_len == T else out / "curve" / "trunk"
    resume = bool(resume) and CheckpointManager(trunk_dir / "checkpoints", 0, topo, log).latest() is not None
    if topo.is_logger:
        log(f"[baseline] {'continuing' if resume else 'pre-training'} the LM-only baseline and its curve: the same "
            f"student on the same tokens, held-out loss of runs of {', '.join(map(str, lengths))} steps "
            f"(x{tokens:,} tokens; a {trunk_len}-step stable trunk and a decay off it for each shorter one), in {out}")
        for d in ([] if resume else [out / "checkpoints", out / "curve"]):
            shutil.rmtree(d, ignore_errors=True)
    topo.barrier()

    def run(steps: int, where: Path, branch: Optional[tuple[Path, str]], save_at=(), export=None) -> TrainResult:
        rc = copy.deepcopy(bc)
        rc.output_dir = str(where)
        rc.train = dataclasses.replace(bc.train, steps=steps, keep_checkpoints=0 if save_at else 1,
                                       save_every=0 if branch else bc.train.save_every,
                                       eval_every=0 if branch else bc.train.eval_every,
                                       exit_after_steps=0 if branch else bc.train.exit_after_steps)
        if branch and topo.is_logger:
            shutil.rmtree(where / "checkpoints", ignore_errors=True)
        topo.barrier()
        trainer = Trainer(rc, topo, data, NoTeacher(), run_name=f"baseline {steps}", branch_from=branch,
                          save_at=save_at, resume=resume and not branch)
        try:
            return trainer.fit(export_dir=export)
        finally:
            trainer.close()

    trunk = run(trunk_len, trunk_dir, None, save_at=sorted({s for s in at.values() if s > 0}),
                export=out / "student" if trunk_len == T else None)
    if not trunk.finished:
        return {**dataclasses.asdict(trunk), "lm_curve": None}
    results = {trunk_len: trunk}
    ck = trunk_dir / "checkpoints"
    for b in sorted(at):
        where = out if b == T else out / "curve" / f"steps{b}"
        src = (ck, CheckpointManager.tag(at[b])) if at[b] > 0 else None
        results[b] = run(b, where, src, export=out / "student" if b == T else None)
        if b != T and topo.is_logger:
            shutil.rmtree(where / "checkpoints", ignore_errors=True)
    if topo.is_logger:
        for s in set(at.values()) - {trunk_len}:  # the trunk's branch points: used
            shutil.rmtree(ck / CheckpointManager.tag(s), ignore_errors=True)
    curve = {"lengths": lengths, "tokens_per_step": tokens, "schedule": bc.optim.lr_schedule,
             "points": [{"steps": b, "tokens": b * tokens, "val_loss": results[b].val_loss,
                         "branched_at": at.get(b)} for b in lengths]}
    summary = dataclasses.asdict(results[T])
    if topo.is_logger:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        curve_file.write_text(json.dumps(curve, indent=1))
        stamp_file.write_text(stamp + "\n")
    topo.barrier()
    return {**summary, "lm_curve": curve}


# ------------------------------------------------------------------------------------- generation
def generate_store(cfg: ExperimentConfig, topo: Topology, log: Log = print) -> Path:
    """The generation job (launch/generate_logits.py): prepare the data, obtain the teacher (pre-training
    the default one here once, cached), then write the store over every rank."""
    set_threads(cfg.train.threads)
    if not cfg.distill.store:
        raise ValueError("set distill.store: the directory the teacher-logits store is written to")
    say = log if topo.dp_rank == 0 else (lambda *_: None)
    data = prepare_run_data(cfg, topo, log=say)
    tdata = teacher_view_data(cfg, topo, log=say)
    if tdata is not None:  # across tokenizers: the teacher's library, from the data as its tokenizer cuts it
        say(f"[generate] distill.cross_tokenizer: writing the teacher's document stores from {tdata.path} (the "
            "run's data in the teacher's tokenizer); every student tokenizer maps from them at load")
        data, cfg = tdata, copy.copy(cfg)
        cfg.distill = dataclasses.replace(cfg.distill, cross_tokenizer="off")
    return run_generation(cfg, topo, data, teacher_weights(cfg, topo, data, log=say), log=log)


# ------------------------------------------------------------------------------------- experiment
def run_experiment(cfg: ExperimentConfig, topo: Topology, resume: bool | str = False, log: Log = print,
                   resume_overrides: Sequence[str] = ()) -> Optional[TrainResult]:
    """Everything the entry point does between parsing and tearing down. `resume`: True, False or
    "auto" (resume when checkpoints exist). `resume_overrides`: objective keys a resume may change
    (checkpoint.objective). SIGUSR1/SIGTERM stop the students after a step with a checkpoint (teacher
    ranks keep serving until their students are done)."""
    stop = StopSignals()
    try:
        return _run_experiment(cfg, topo, resume, log, resume_overrides, stop)
    finally:
        stop.restore()


def _run_experiment(cfg, topo, resume, log, resume_overrides, stop) -> Optional[TrainResult]:
    set_threads(cfg.train.threads)
    say = log if topo.role_rank == 0 else (lambda *_: None)
    data = prepare_run_data(cfg, topo, log=say)
    tdata = teacher_view_data(cfg, topo, log=say)  # distill.cross_tokenizer: what the teacher reads
    pair = CrossTokenizer.build(cfg, data, tdata, log=say) if tdata is not None else None
    if topo.role == "teacher":
        serve_teacher(cfg, topo, data, teacher_weights(cfg, topo, tdata or data, log=say), log=say, pair=pair)
        return None
    lengths = _lengths(cfg, topo, say) if cfg.distill.mode == "none" and cfg.baseline else []
    if len(lengths) > 1:
        # An LM-only run with `baseline` on is its own twin and records its LM-only curve (a sweep's
        # baselines: the points' token multipliers are read off it). Its trunk resumes; its decays rerun.
        s = _lm_curve(cfg, lengths, topo, data, say, resume=resume)
        result = TrainResult(**{k: v for k, v in s.items() if k != "lm_curve"})
        if topo.is_logger and result.finished:
            report(cfg, result, log=say)
        elif topo.is_logger:
            (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(s, indent=1))
        return result
    ctx = SourceContext(cfg, topo, data, device(), teacher=lambda: obtain_teacher(cfg, topo, tdata or data, log=say),
                        log=say, pair=pair)
    reports_as = SOURCES[cfg.distill.mode]
    say(describe_data(data, cfg.train.steps * cfg.train.global_batch_size))
    if topo.is_last_stage:
        source = build_source(ctx)
    else:
        # A pipeline's other stages compute no loss and need no teacher signal; a teacher that must
        # be pre-trained first is still trained by every rank together.
        if cfg.distill.mode == "colocated":
            teacher_weights(cfg, topo, tdata or data, log=say)
        source = NoTeacher()
    # The yardstick: the same student trained LM-only (an online teacher waits for its first request).
    baseline = obtain_baseline(cfg, topo, data, log=say) if cfg.baseline and cfg.distill.mode != "none" else None
    export = Path(cfg.output_dir) / "student"
    # Step hooks: distill.dump_logits spools the student's own logits as it trains and, once the run
    # finished and exported, makes them a store (when the trainer is closed).
    hooks = [LogitsDump(cfg, topo, data, export, log=say)] if cfg.distill.dump_logits else []
    try:
        trainer = Trainer(cfg, topo, data, source, resume=resume, reports_as=reports_as,
                          objective_keys=objective(cfg, teacher_digest(cfg), pair_hashes(pair)),
                          resume_overrides=resume_overrides,
                          stop=stop, hooks=hooks)
    except ResumeError:
        source.close()  # an online teacher is told this student is done, not left waiting
        raise
    try:
        result = trainer.fit(export_dir=export)
        if result.finished:
            teacher_loss = _teacher_val_loss(topo, source)
            if topo.is_logger:
                done = result
                result = compare(result, teacher_loss, baseline, lambda m: run_balance(
                    cfg, data.vocab_size, data.seq_len, done.steps, done.compute, m))
        source.close(finished=result.finished)
    finally:
        trainer.close()
    extra = source.summary()
    if topo.is_logger:
        summary = dict(dataclasses.asdict(result), data=data_summary(data, trainer.sampler, result.steps), **extra)
        (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    if result.finished and topo.is_logger:
        report(cfg, result, log=say)
        ct = extra.get("cross_tokenizer")
        if ct and ct.get("aligned_frac") is not None:
            mass = "" if ct.get("mapped_mass") is None else f", {ct['mapped_mass']:.2%} of the teacher's mass mapped"
            say(f"  across tokenizers ({ct['how']}): {ct['aligned_frac']:.1%} of the student's positions took the "
                f"teacher's signal{mass}; the teacher's own loss is per teacher token, so none is shown")
    return result


def pair_hashes(pair: Optional[CrossTokenizer]) -> Optional[tuple[str, str]]:
    """(teacher, student) tokenizer hashes of a cross-tokenizer run, for checkpoint.objective."""
    return None if pair is None else (pair.summary["teacher_tokenizer"], pair.summary["student_tokenizer"])


def teacher_digest(cfg: ExperimentConfig) -> Optional[str]:
    """Which teacher the run distils, as checkpoint.objective records it: the weights digest of the
    teacher's directory (models.weights_digest), or for an offline run the teacher hash its store was
    generated with; None where this rank cannot read either (an online teacher's path may exist only on
    the teacher's node)."""
    mode = cfg.distill.mode
    if mode in ("colocated", "online"):
        d = teacher_export_dir(cfg)
        return weights_digest(d) if (d / "config.json").is_file() else None
    if mode == "offline":
        manifest = Path(cfg.distill.store) / "manifest.json"
        try:
            return json.loads(manifest.read_text())["teacher"]["weights_hash"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def _teacher_val_loss(topo: Topology, source) -> Optional[float]:
    """The teacher's held-out loss on the logging rank: asked of its own source, or (a pipeline, whose
    first stage logs) of the source on the last stage of the first pipeline."""
    if topo.stages == 1:
        return source.teacher_val_loss() if topo.is_logger else None
    box = [source.teacher_val_loss() if topo.role_rank == topo.stages - 1 else None]
    torch.distributed.broadcast_object_list(box, src=topo.stages - 1)
    return box[0]


def teacher_spent(cfg: ExperimentConfig, vocab_size: int, seq_len: int, compute: Optional[dict]
                  ) -> tuple[Optional[float], Optional[float]]:
    """(teacher FLOPs spent on this run, the whole generation job's FLOPs): colocated, the forwards this
    process counted; online, a forward of every trained token; offline, the same as its share of the
    store, whose generation is a forward of every stored token (a document store's chunk prefixes not
    counted). None where the teacher's shape or the store cannot be read here."""
    c, mode = compute or {}, cfg.distill.mode
    if mode == "colocated" or not c.get("student_flops_per_token"):
        return c.get("teacher_flops"), None
    tdir = teacher_export_dir(cfg)
    try:
        shape = model_shape(ModelConfig(path=str(tdir)) if (tdir / "config.json").is_file() else
                            ModelConfig(preset=cfg.teacher.preset), vocab_size)
    except (OSError, ValueError, KeyError):
        return None, None
    document = cfg.distill.teacher_context == "document"
    per = shape.forward_flops((cfg.distill.teacher_seq_len or seq_len) if document else seq_len)
    spent = per * c["student_flops"] / c["student_flops_per_token"]
    if mode != "offline":
        return spent, None
    stored = 0
    for path in library_stores(cfg.distill.store) or [cfg.distill.store]:
        try:
            stored += store_info(path)["tokens"]
        except StoreError:
            pass
    return spent, (per * stored if stored else None)


def run_balance(cfg: ExperimentConfig, vocab_size: int, seq_len: int, steps: int, compute: Optional[dict],
                multiplier: Optional[float]) -> Optional[dict]:
    """The compute balance (core.compute_gain.compute_balance) of a run of ``steps`` steps with the figures
    ``compute`` (summary.json's) and token ``multiplier``; None without compute figures. A resumed run's
    meter counted its last launch's steps only: the run's totals are taken at the same cost per step."""
    if not compute or not compute.get("steps"):
        return None
    scale = steps / compute["steps"]
    teacher, generation = teacher_spent(cfg, vocab_size, seq_len, compute)
    return compute_balance(multiplier, compute["student_flops"] * scale, cfg.distill.mode,
                           None if teacher is None else teacher * scale, generation)


def compare(result: TrainResult, teacher_val_loss: Optional[float], baseline: Optional[dict],
            balance: Callable[[Optional[float]], Optional[dict]] = lambda m: None) -> TrainResult:
    """The distilled student against its teacher and its LM-only twin, on the same held-out samples.
    pd_gain is the paper's relative improvement in loss, (LM - PD) / LM (> 0: distillation helped). With
    the twin's LM-only curve: the token multiplier (LM-only tokens matching the student's loss over its
    own) and the compute balance, ``balance(multiplier)`` (run_balance for this run)."""
    lm = baseline["val_loss"] if baseline else None
    result = dataclasses.replace(result, teacher_val_loss=teacher_val_loss, lm_only_val_loss=lm,
                                 pd_gain=None if lm is None else (lm - result.val_loss) / lm)
    curve = (baseline or {}).get("lm_curve")
    if not curve or not math.isfinite(result.val_loss):
        return result
    m = curve_multiplier(curve, result.val_loss, result.steps)
    return dataclasses.replace(result, pd_token_multiplier=m["multiplier"], token_multiplier=m,
                               compute_balance=balance(m["multiplier"]))


def report(cfg: ExperimentConfig, r: TrainResult, log: Log) -> None:
    """The run's final lines, and the comparison's scalars in TensorBoard (logging rank)."""
    agree = r.teacher_top1_agreement
    lines = [f"done | student val_loss {r.val_loss:.4f} (ppl {r.val_ppl:.1f})"
             + (f" | top-1 agreement with teacher {agree:.3f}" if agree is not None else "")]
    if r.teacher_val_loss is not None or r.lm_only_val_loss is not None:
        def fig(loss):
            return "n/a" if loss is None else f"{loss:.4f} (ppl {math.exp(min(loss, 50.0)):.1f})"

        lines.append(f"  held-out loss on the same {cfg.data.val_samples} samples: teacher "
                     f"{fig(r.teacher_val_loss)} | LM-only student {fig(r.lm_only_val_loss)} | "
                     f"distilled student {fig(r.val_loss)}")
    if r.pd_gain is not None:
        ppl_gain = 1.0 - math.exp(r.val_loss - r.lm_only_val_loss)
        lines.append(f"  PD gain over LM-only pre-training: {r.pd_gain:+.2%} in loss, (LM - PD) / LM "
                     f"({ppl_gain:+.2%} in perplexity)")
    if r.token_multiplier is not None:
        lines.append("  " + describe_multiplier(r.token_multiplier, r.token_multiplier["extend"]))
    if r.compute_balance is not None:
        lines.append("  " + describe_balance(r.compute_balance))
    c = r.compute or {}
    if c.get("seconds") and cfg.distill.mode != "none":
        what = {"colocated": "its forwards", "online": "its answers"}.get(cfg.distill.mode, "store reads")
        lines.append(f"  measured on this rank: {c['seconds']:.1f}s of steps over {c['steps']} steps, "
                     f"{c['signal_seconds']:.1f}s ({c['signal_seconds'] / c['seconds']:.0%}) of them waiting for the "
                     f"teacher's signal ({what})")
    lines += [f"  TensorBoard: tensorboard --logdir {r.tensorboard_dir}", f"  student (HF format): {r.export_dir}"]
    log("\n".join(lines))
    scalars = {"eval/teacher_val_loss": r.teacher_val_loss, "eval/lm_only_val_loss": r.lm_only_val_loss,
               "eval/pd_gain": r.pd_gain, "eval/pd_token_multiplier": r.pd_token_multiplier}
    if any(v is not None for v in scalars.values()):
        tb = Monitor(True, Path(r.tensorboard_dir))
        tb.scalars(r.steps, scalars)
        tb.close()
