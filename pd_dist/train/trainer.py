"""The training loop: one student engine, one teacher-signal source, the step, evaluation and export.

One step: the data-parallel ranks take their shares of a deterministic global batch, count the valid
target tokens of the whole global batch (one all_reduce), and for each micro-batch ask the source for
the teacher signal, then run the student's fused chunked LM-head + LM/KD loss. Each micro-batch's loss
is its token sum divided by the global count, so gradient accumulation, data parallelism and chunking
all give the gradient of the same global mean. Where the signal comes from (nowhere, a colocated
teacher, teacher ranks, a store) is the source's business (pd_dist.signals.sources); checkpoint state is
pd_dist.train.checkpoint's; obtaining teachers and running whole experiments is pd_dist.run's.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from pd_dist.train.checkpoint import CheckpointManager, ResumeError, check_run_state, objective, run_state
from pd_dist.config import ExperimentConfig, dump_config
from pd_dist.data import MicroBatchPlan, PackedDataset
from pd_dist.core.flops import ComputeMeter, device_peak_tflops
from pd_dist.models import model_shape
from pd_dist.core.losses import IGNORE_INDEX
from pd_dist.core.monitor import Monitor, StepTimer, fmt_duration
from pd_dist.core.runtime import StopSignals, device, use_bf16
from pd_dist.core.schedules import alpha_at, lr_at
from pd_dist.signals.sources import SignalSource
from pd_dist.train.hooks import StepHook
from pd_dist.train.pipeline import PipelineStudent
from pd_dist.train.batch import MicroBatch
from pd_dist.train.student import DataParallelStudent, held_out_figures
from pd_dist.cluster.topology import Topology


@dataclasses.dataclass
class TrainResult:
    steps: int
    final_train_loss: float
    val_loss: float
    val_ppl: float
    teacher_top1_agreement: Optional[float]
    export_dir: Optional[str]
    tensorboard_dir: str
    losses: list[float]
    finished: bool = True
    tokens_per_sec: Optional[float] = None  # tokens / seconds over this launch's steps after its first
    # Filled by the orchestration when known: the same held-out samples through the teacher and the
    # student's LM-only twin, and the relative gain (LM - PD) / LM in loss.
    teacher_val_loss: Optional[float] = None
    lm_only_val_loss: Optional[float] = None
    pd_gain: Optional[float] = None
    # FLOPs per token and the run's totals (pd_dist.core.flops.ComputeMeter.summary)
    compute: Optional[dict] = None
    # With an LM-only curve (baseline.points > 1): the LM-only tokens that match this student's held-out
    # loss over its own (core.compute_gain.token_multiplier: the figure and how it was read), and the
    # compute balance (compute_gain.compute_balance).
    pd_token_multiplier: Optional[float] = None
    token_multiplier: Optional[dict] = None
    compute_balance: Optional[dict] = None


def build_student(cfg: ExperimentConfig, topo: Topology, vocab_size: int, tokenizer_dir, bf16: bool,
                  document_eos: Optional[int] = None):
    """The run's student engine: a DeepSpeed pipeline when train.pipeline_stages > 1, else data-parallel.
    ``document_eos``: data.document_mask's EOS id (PackedDataset.document_eos)."""
    if cfg.train.pipeline_stages > 1:
        return PipelineStudent(cfg, topo, vocab_size, tokenizer_dir, bf16, document_eos)
    return DataParallelStudent(cfg, topo, vocab_size, tokenizer_dir, bf16, document_eos)


def signalled_micro_batch(data: PackedDataset, source: SignalSource, ids: np.ndarray,
                          dev: torch.device) -> MicroBatch:
    """The MicroBatch of the samples ``ids`` on ``dev`` (what the student engines' train and evaluate
    take), with the signal asked of ``source``: the trainer's step and evaluation, and ``pd-dist eval``."""
    batch = torch.from_numpy(data.batch(ids)).to(dev)
    inp, tgt = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    sig = source.signal(ids, inp)
    return MicroBatch(ids, inp, tgt, None if sig is None else sig.to(dev))


def _sum_stats(topo: Topology, *vals: torch.Tensor) -> list[float]:
    """Sum scalars (or one stacked vector) over data-parallel ranks in one all_reduce."""
    t = torch.cat([v.detach().double().reshape(-1).cpu() for v in vals])
    topo.all_reduce_sum(t)
    return t.tolist()


class Trainer:
    """Builds the student engine and runs the loop for one ExperimentConfig on one Topology.

    `reports_as`: the source class whose figures this rank reports (a pipeline's non-last stages hold no
    source of their own; their per-step figures come from the last stage). `hooks`: step hooks
    (pd_dist.train.hooks.StepHook), called at each step and micro-batch and closed by :meth:`close`.
    `branch_from`: (checkpoints directory, tag) of another run of this config but for its length,
    continued from there under this run's own schedule (the LM-only curve's decay branches; the caller
    checks the schedules agree up to it). `save_at`: steps to checkpoint at besides train.save_every."""

    def __init__(self, cfg: ExperimentConfig, topo: Topology, data: PackedDataset, source: SignalSource,
                 run_name: str = "student", resume: bool | str = False,
                 reports_as: Optional[type[SignalSource]] = None,
                 objective_keys: Optional[dict] = None, resume_overrides: Sequence[str] = (),
                 stop: Optional[StopSignals] = None, hooks: Sequence[StepHook] = (),
                 branch_from: Optional[tuple[Path, str]] = None, save_at: Sequence[int] = ()):
        self.cfg, self.topo, self.data, self.source = cfg, topo, data, source
        self.hooks, self.finished = list(hooks), False
        self.reports = reports_as or type(source)
        self.out = Path(cfg.output_dir)
        self.device = device()
        self.bf16 = use_bf16(cfg.train.precision)
        self.monitor = Monitor(topo.is_logger, self.out / "tensorboard", prefix=f"[{run_name}] ")
        self.checkpoints = CheckpointManager(self.out / "checkpoints", cfg.train.keep_checkpoints, topo,
                                             self.monitor.print)
        cfg.check_world(topo.dp_size)
        self.accum = cfg.grad_accum(topo.dp_size)
        self.sampler = data.sampler(cfg.train.global_batch_size, cfg.train.seed)
        self.student = build_student(cfg, topo, data.vocab_size, data.tokenizer_dir, self.bf16,
                                     data.document_eos(cfg.data.document_mask))
        self.engine = self.student.engine
        self.n_params = self.student.n_params
        teacher = getattr(source, "teacher_shape", None)
        self.meter = ComputeMeter(model_shape(cfg.model, data.vocab_size), data.seq_len, topo.role_size, teacher,
                                  getattr(source, "teacher_context", 0), device_peak_tflops(cfg.train.peak_tflops))
        self.start_step, self.losses = 0, []
        self.objective = objective_keys if objective_keys is not None else objective(cfg)
        self.stop, self.stopped_by = stop, None
        if resume == "auto":  # resume when there is something to resume (a requeued job), else start
            resume = self.checkpoints.latest() is not None
        self.save_at = set(save_at)
        if branch_from is not None:
            self.checkpoints.refuse_overwrite()
            trunk = CheckpointManager(Path(branch_from[0]), 0, topo, self.monitor.print)
            state = trunk.load(self.engine, tag=branch_from[1])
            # The trunk is this run but for its length: same data, order and objective.
            self._check_resume({**state, "total_steps": cfg.train.steps}, (), record=False)
            self.start_step, self.losses = state["step"], list(state.get("losses", []))
        elif resume:
            early = self.checkpoints.peek()
            if early is not None:  # refused before DeepSpeed loads tensors (another model would not fit)
                self._check_resume(early, resume_overrides, record=False)
            state = self.checkpoints.load(self.engine)
            self._check_resume(state, resume_overrides)
            self.start_step, self.losses = state["step"], list(state.get("losses", []))
        elif not resume:
            self.checkpoints.refuse_overwrite()
        t = cfg.train
        self.stop_at = min(t.steps, self.start_step + t.exit_after_steps) if t.exit_after_steps else t.steps
        source.plan(MicroBatchPlan(self.sampler, self.start_step, self.stop_at, topo.dp_rank, topo.dp_size,
                                   t.micro_batch_size))
        if source.describe():
            self.monitor.print(source.describe())
        if topo.is_logger:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_config(cfg))
            (self.out / "deepspeed_config.json").write_text(json.dumps(self.student.ds_config, indent=1))

    # ------------------------------------------------------------------------------ one step
    def _hook_calls(self) -> tuple:
        """(head_fn, on_micro) for the student's train: None, None without hooks. ``head_fn`` gives the
        tuple of every hook's head_output (None for a hook without one); ``on_micro`` hands each hook
        the micro-batch's output with its own entry of that tuple as ``head_output``."""
        if not self.hooks:
            return None, None
        fns = [getattr(h, "head_output", None) for h in self.hooks]
        def heads(hidden, weight):
            return tuple(None if f is None else f(hidden, weight) for f in fns)
        head_fn = heads if any(f is not None for f in fns) else None

        def on_micro(ids, out):
            for i, hook in enumerate(self.hooks):
                hook.on_micro_batch(ids, out._replace(head_output=None if head_fn is None else out.head_output[i]))
        return head_fn, on_micro

    def _micro(self, ids: np.ndarray) -> MicroBatch:
        """One micro-batch (tokens, targets and teacher signal or None), on the device."""
        return signalled_micro_batch(self.data, self.source, ids, self.device)

    def save(self, step: int) -> None:
        self.checkpoints.save(self.engine, step, run_state(self.cfg, step, self.sampler, self.data.fingerprint,
                                                           self.losses, self.objective))

    def _agreed_stop(self) -> bool:
        """Whether any rank of this role's world has been asked to stop (one tiny all-reduce per step, so
        every rank stops after the same step even when the signal reached them at different times)."""
        flag = torch.tensor([1.0 if self.stop.received else 0.0],
                            device=self.device if self.topo.backend == "nccl" else "cpu")
        self.topo.role_sum(flag)
        if flag.item() > 0:
            self.stopped_by = self.stop.received or "a stop signal (on another rank)"
            return True
        return False

    def _check_resume(self, state: dict, overrides: Sequence[str], record: bool = True) -> None:
        """check_run_state on every rank, agreed over the role world (a teacher digest may be readable
        on some hosts only), then the changes --resume-override let through recorded in the run's
        directory."""
        try:
            accepted, error = check_run_state(state, self.cfg, self.sampler, self.data.fingerprint,
                                              self.objective, overrides), None
        except (RuntimeError, ValueError) as e:
            accepted, error = [], str(e)
        errors = [None] * self.topo.role_size
        torch.distributed.all_gather_object(errors, error)
        if any(errors):
            raise ResumeError(next(e for e in errors if e))
        if accepted and record and self.topo.is_logger:
            with open(self.out / "resume_overrides.jsonl", "a") as f:
                for key, old, new in accepted:
                    f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": state["step"],
                                        "key": key, "checkpoint": old, "now": new}) + "\n")
                    self.monitor.print(f"--resume-override {key}: {old!r} in the checkpoint, now {new!r} "
                                       f"(recorded in {self.out / 'resume_overrides.jsonl'})")

    def train_step(self, step: int) -> dict:
        cfg, source = self.cfg, self.source
        has = self.reports.has_signal
        alpha = alpha_at(step, cfg.train.steps, cfg.distill.alpha) if has else 0.0
        lr = lr_at(step, cfg.train.steps, cfg.optim)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        micro_ids = self.sampler.micro_batches(step, self.topo.dp_rank, self.topo.dp_size,
                                               cfg.train.micro_batch_size)
        waited0 = source.waited_s
        n_local = float(sum(int((self.data.batch(ids)[:, 1:] != IGNORE_INDEX).sum()) for ids in micro_ids))
        (normalizer,) = _sum_stats(self.topo, torch.tensor(n_local))
        for hook in self.hooks:
            hook.on_step(step)
        sums = self.student.train((self._micro(ids) for ids in micro_ids), alpha, normalizer,
                                  *self._hook_calls())
        shared = self.student.share(torch.cat([sums, torch.tensor([source.waited_s - waited0],
                                                                  dtype=torch.float64)]))
        lm_sum, kd_sum, n_tok, top1 = _sum_stats(self.topo, shared[:4])
        lm, kd = lm_sum / n_tok, kd_sum / n_tok
        grad_norm = self.engine.get_global_grad_norm()
        return {"train/loss": (1 - alpha) * lm + alpha * kd if has else lm,
                "train/lm_loss": lm, "train/kd_loss": kd if has else None,
                "train/alpha": alpha, "train/lr": lr,
                "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                "train/teacher_top1_agreement": top1 / n_tok if has else None,
                "tokens": n_tok, "signal_wait": float(shared[4])}

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        mb = self.cfg.train.micro_batch_size
        # All held-out samples (data.val_samples), sharded over ranks: the same set at any dp size.
        val = self.data.val_ids()[self.topo.dp_rank::self.topo.dp_size]
        micro = [self._micro(val[s:s + mb]) for s in range(0, len(val), mb)]
        unsignalled = float(sum(m.teacher is None for m in micro))
        sums = self.student.evaluate(micro)
        shared = self.student.share(torch.cat([sums, torch.tensor([unsignalled], dtype=torch.float64)]))
        *totals, unsignalled = _sum_stats(self.topo, shared)
        figures = held_out_figures(totals, with_kd=self.reports.has_signal and unsignalled == 0)
        return {f"eval/{k}": v for k, v in figures.items()}

    def export(self, out_dir: Path) -> None:
        """save_pretrained (safetensors) of the student with the run's tokenizer (one directory)."""
        self.student.export(out_dir, self.data.tokenizer_dir)

    # ------------------------------------------------------------------------------ loop
    def _log_step(self, done: int, stats: dict, scalars: dict, dt: float, timer: StepTimer) -> None:
        t = self.cfg.train
        kd = ""
        if self.reports.has_signal:
            kd = f" lm {stats['train/lm_loss']:.4f} kd {stats['train/kd_loss']:.4f} alpha {stats['train/alpha']:.3f}"
        metric = self.reports.wait_metric
        if metric:
            kd += f" | {metric.split('/')[1].removesuffix('_frac').replace('_', ' ')} {scalars[metric]:.0%}"
        gn = stats["train/grad_norm"]
        self.monitor.print(f"step {done}/{t.steps} | loss {stats['train/loss']:.4f}{kd} | lr "
                           f"{stats['train/lr']:.2e} | gnorm {gn if gn is None else f'{gn:.3f}'} | "
                           f"{scalars['perf/tokens_per_sec']:,.0f} tok/s | {dt:.2f}s/step | ETA "
                           f"{fmt_duration(timer.eta(t.steps - done))}")

    def _eval_and_print(self, step: int, label: str) -> dict:
        ev = self.evaluate()
        self.monitor.scalars(step, ev)
        self.monitor.print(label + " | " + " | ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in ev.items()))
        return ev

    def fit(self, export_dir: Optional[Path] = None) -> TrainResult:
        t, m = self.cfg.train, self.monitor
        d = self.cfg.distill
        spec = d.signal_spec(0)
        signal = f" ({spec.describe(seed=False)})" if spec.drawn and self.source.has_signal else ""
        m.print(f"{self.n_params / 1e6:.2f}M params | mode {d.mode}{signal} | dp {self.topo.dp_size} x "
                f"micro {t.micro_batch_size} x accum {self.accum} = {t.global_batch_size} samples "
                f"({t.global_batch_size * self.data.seq_len} tokens)/step | ZeRO {t.zero_stage} | "
                + (f"pipeline {self.topo.stages} stages | " if self.topo.stages > 1 else "") +
                f"{'bf16' if self.bf16 else 'fp32'} | {t.steps} steps")
        timer, last, timed = StepTimer(), {}, [0.0, 0.0]  # tokens and seconds after the first step
        teacher_tokens = getattr(self.source, "teacher_tokens", 0.0)
        for step in range(self.start_step, self.stop_at):
            stats = self.train_step(step)
            dt = timer.lap()
            ran = getattr(self.source, "teacher_tokens", 0.0)
            self.losses.append(stats["train/loss"])
            last, done = stats, step + 1
            scalars = {k: v for k, v in stats.items() if "/" in k}
            scalars["perf/step_time"] = dt
            scalars["perf/tokens_per_sec"] = stats["tokens"] / dt
            if self.reports.wait_metric:
                scalars[self.reports.wait_metric] = stats["signal_wait"] / dt
            scalars.update(self.source.scalars())
            scalars.update(self.meter.step(stats["tokens"], dt, ran - teacher_tokens, stats["signal_wait"]))
            teacher_tokens = ran
            if step > self.start_step:
                timed[0] += stats["tokens"]
                timed[1] += dt
            m.scalars(done, scalars)
            if done % t.log_every == 0 or done == t.steps or step == self.start_step:
                self._log_step(done, stats, scalars, dt, timer)
            if t.eval_every and done % t.eval_every == 0 and done != t.steps:
                self._eval_and_print(done, "eval")
                timer.reset()
            if (t.save_every and done % t.save_every == 0 or done in self.save_at) and done != t.steps:
                self.save(done)
                timer.reset()
            if self.stop is not None and done < self.stop_at and self._agreed_stop():
                self.stop_at = done
                break
        result = TrainResult(steps=self.stop_at, final_train_loss=last.get("train/loss", float("nan")),
                             val_loss=float("nan"), val_ppl=float("nan"), teacher_top1_agreement=None,
                             export_dir=None, tensorboard_dir=str(self.out / "tensorboard"),
                             losses=list(self.losses), finished=self.stop_at == t.steps,
                             tokens_per_sec=timed[0] / timed[1] if timed[1] else None,
                             compute=self.meter.summary())
        if not result.finished:
            if self.checkpoints.latest() != self.checkpoints.tag(self.stop_at):
                self.save(self.stop_at)
            why = f"{self.stopped_by} received" if self.stopped_by else "train.exit_after_steps"
            m.print(f"stopping after {self.stop_at} steps ({why}); continue with --resume")
            m.flush()
            return result
        ev = self._eval_and_print(t.steps, "final eval")
        if self.start_step < t.steps or self.checkpoints.latest() != self.checkpoints.tag(t.steps):
            self.save(t.steps)
        if export_dir is not None:
            self.export(export_dir)
            m.print(f"exported to {export_dir}")
        self.finished = True
        m.flush()
        return dataclasses.replace(result, val_loss=ev["eval/val_loss"], val_ppl=ev["eval/ppl"],
                                   teacher_top1_agreement=ev.get("eval/teacher_top1_agreement"),
                                   export_dir=str(export_dir) if export_dir else None)

    def close(self) -> None:
        """Release the engine and logs, then close the step hooks (``finished``: fit trained to the last
        step and exported, so a hook may complete what it built, e.g. a dump's store). The source is its
        owner's to close (after a finished run: an online source then tells its teacher this student is
        done)."""
        self.monitor.close()
        try:
            if hasattr(self.engine, "destroy"):
                self.engine.destroy()
        finally:
            for hook in self.hooks:
                hook.close(self.finished)
