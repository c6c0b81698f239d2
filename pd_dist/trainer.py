"""Student training on the DeepSpeed engine, LM-only (mode none) or with a colocated teacher.

One step: the data-parallel ranks take their shares of a deterministic global batch, count the valid
target tokens of the whole global batch (one all_reduce), and for each micro-batch run the student body,
then the fused chunked LM-head + LM/KD loss. Each micro-batch's loss is its token sum divided by the
global count, so gradient accumulation, data parallelism and chunking all give the gradient of the same
global mean. The teacher (colocated) runs forward under no_grad and is truncated to top-p-k on the fly.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .config import ExperimentConfig, deepspeed_config, dump_config
from .configlib import to_dict
from .data import GlobalBatchSampler, PackedDataset, prepare_data
from .logits import SparseLogits, truncate
from .losses import IGNORE_INDEX, fused_pd_loss
from .models import ModelConfig, build_model, check_same_tokenizer, count_params, final_norm_and_head
from .monitor import Monitor, StepTimer, fmt_duration
from .schedules import alpha_at, check_schedule_state, lr_at, schedule_state
from .topology import Topology
from .bridge import WireSpec
from .online import STARTUP_TIMEOUT_S, PrefetchingTeacher, TeacherClient, TeacherServer


class PDStudent(nn.Module):
    """The student wrapped so that the engine's forward returns the fused LM+KD loss.

    The LM head is applied chunk by chunk inside the loss, never as a full [tokens, vocab] matmul, so
    its weight is used outside the head's own forward: under ZeRO-3 it is registered as an external
    parameter of this module so it is gathered for our forward and backward.
    """

    def __init__(self, model: nn.Module, kind: str, temperature: float, chunk_size: int):
        super().__init__()
        self.model = model
        self.kind, self.temperature, self.chunk_size = kind, temperature, chunk_size

    def register_for_zero3(self) -> None:
        import deepspeed

        _, head = final_norm_and_head(self.model)
        deepspeed.zero.register_external_parameter(self, head.weight)

    def forward(self, input_ids, targets, teacher_indices=None, teacher_values=None,
                alpha: float = 0.0, normalizer: float = 1.0, dump_top_p: float = 0.0, dump_top_k: int = 0):
        body, head = final_norm_and_head(self.model)
        hidden = body(input_ids=input_ids).last_hidden_state
        teacher = None
        if teacher_indices is not None:
            teacher = SparseLogits(teacher_indices.flatten(0, -2), teacher_values.flatten(0, -2))
        out = fused_pd_loss(hidden.flatten(0, 1), head.weight, targets.flatten(), teacher, alpha,
                            self.kind, self.temperature, normalizer, chunk_size=self.chunk_size)
        if dump_top_k:
            # distill.dump_logits: this model's own truncated logits as it is now (one more chunked
            # head pass without grad, inside forward so ZeRO-3 has the head weight gathered).
            sparse, lse = sparse_logits_from_hidden(hidden.detach(), head, dump_top_p, dump_top_k,
                                                    self.chunk_size)
            return (out.loss, out.lm_sum, out.kd_sum, out.n_tokens, out.top1_agree,
                    sparse.indices, sparse.values, lse)
        return out.loss, out.lm_sum, out.kd_sum, out.n_tokens, out.top1_agree


@torch.no_grad()
def sparse_logits_from_hidden(hidden: torch.Tensor, head: nn.Module, top_p: float, top_k: int,
                              chunk_size: int) -> tuple[SparseLogits, torch.Tensor]:
    """Top-p-k truncation of head(hidden) chunk by chunk, and the full-vocabulary logsumexp per token
    (what an offline store keeps so a wider store can be re-truncated exactly)."""
    lead = hidden.shape[:-1]
    hidden = hidden.flatten(0, -2)
    parts, lses = [], []
    for s in range(0, hidden.shape[0], chunk_size):
        # Truncated in the head's dtype (topk on bf16 is exact; the normalizer is fp32 inside).
        sparse, lse = truncate(hidden[s:s + chunk_size] @ head.weight.T, top_p, top_k, return_lse=True)
        parts.append(sparse)
        lses.append(lse)
    return SparseLogits.cat(parts).reshape(*lead), torch.cat(lses).reshape(lead)


@torch.no_grad()
def teacher_sparse_logits(teacher: nn.Module, input_ids: torch.Tensor, top_p: float, top_k: int,
                          chunk_size: int, with_lse: bool = False):
    """Teacher forward, then top-p-k truncation chunk by chunk (no full [tokens, vocab] logits kept)."""
    body, head = final_norm_and_head(teacher)
    hidden = body(input_ids=input_ids).last_hidden_state
    sparse, lse = sparse_logits_from_hidden(hidden, head, top_p, top_k, chunk_size)
    return (sparse, lse) if with_lse else sparse


class OfflineMicroBatches(torch.utils.data.Dataset):
    """Micro-batch j of the training plan: its tokens and its stored teacher logits.

    Read in DataLoader workers (each maps the store and the token file itself), so decoding and
    re-truncation run ahead of the step that needs them."""

    def __init__(self, plan: list[np.ndarray], data: PackedDataset, store):
        self.plan, self.data, self.store = plan, data, store

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, j: int):
        ids = self.plan[j]
        sparse, _ = self.store.get_batch(ids)
        return torch.from_numpy(ids), torch.from_numpy(self.data.batch(ids)), sparse.indices, sparse.values


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _use_bf16(cfg: ExperimentConfig) -> bool:
    p = cfg.train.precision
    if p == "auto":
        return torch.cuda.is_available()
    return p == "bf16"


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms and biases (1-D tensors)."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class CheckpointDir:
    """DeepSpeed checkpoints under <output_dir>/checkpoints, tags `step<N>`, newest N kept."""

    def __init__(self, root: Path, keep: int):
        self.root, self.keep = root, keep

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
    tokens_per_sec: Optional[float] = None  # mean over the steps of this launch, first step excluded


def _sum_stats(topo: Topology, *vals: torch.Tensor) -> list[float]:
    """Sum scalars (or one stacked vector) over data-parallel ranks in one all_reduce."""
    t = torch.cat([v.detach().double().reshape(-1).cpu() for v in vals])
    topo.all_reduce_sum(t)
    return t.tolist()


class Trainer:
    """Builds the engine and runs the loop for one ExperimentConfig on one Topology."""

    def __init__(self, cfg: ExperimentConfig, topo: Topology, data: PackedDataset,
                 teacher: Optional[nn.Module] = None, run_name: str = "student", resume: bool = False,
                 client: Optional[TeacherClient] = None):
        import deepspeed

        self.cfg, self.topo, self.data, self.teacher = cfg, topo, data, teacher
        self.client = client
        self.out = Path(cfg.output_dir)
        self.device = _device()
        self.bf16 = _use_bf16(cfg)
        self.mode = cfg.distill.mode
        if self.mode == "colocated" and teacher is None:
            raise ValueError("distill.mode colocated needs a teacher model")
        if self.mode == "online" and client is None:
            raise ValueError("distill.mode online needs a teacher client")
        if self.mode != "colocated":
            self.teacher = None
        self.has_teacher = self.mode != "none"
        self.monitor = Monitor(topo.is_logger, self.out / "tensorboard", prefix=f"[{run_name}] ")
        self.ckpt = CheckpointDir(self.out / "checkpoints", cfg.train.keep_checkpoints)
        dp = topo.dp_size
        cfg.check_world(dp)
        self.accum = cfg.grad_accum(dp)
        self.sampler = GlobalBatchSampler(data.n_train, cfg.train.global_batch_size, cfg.train.seed)

        model = build_model(cfg.model, data.vocab_size, seed=cfg.train.seed)
        if cfg.model.path:
            check_same_tokenizer(cfg.model.path, data.tokenizer_dir, "the student")
        self.n_params = count_params(model)
        module = PDStudent(model, cfg.distill.loss, cfg.distill.temperature, cfg.train.loss_chunk_size)
        if cfg.train.zero_stage == 3:
            module.register_for_zero3()
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                      betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
        self.ds_config = deepspeed_config(cfg, dp, self.bf16)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=self.ds_config)
        if self.teacher is not None:
            self.teacher.to(self.device, dtype=torch.bfloat16 if self.bf16 else torch.float32)
            self.teacher.eval().requires_grad_(False)
        self.start_step = 0
        self.stop_at = cfg.train.steps
        self.losses: list[float] = []
        self.remote: Optional[PrefetchingTeacher] = None
        if resume:
            self._load()
        elif self.ckpt.latest() is not None:
            raise RuntimeError(f"{self.ckpt.root} already holds checkpoints: pass --resume to continue "
                               "that run, or choose another output_dir")
        if cfg.train.exit_after_steps:
            self.stop_at = min(cfg.train.steps, self.start_step + cfg.train.exit_after_steps)
        if self.client is not None:
            self.remote = PrefetchingTeacher(self.client, self._plan(), self._tokens_of, cfg.distill.prefetch)
        self.dump = None
        if cfg.distill.dump_logits:
            from .dump import LogitsDump

            self.dump_p = cfg.generate.top_p if cfg.generate.top_p is not None else cfg.distill.top_p
            self.dump_k = min(cfg.generate.top_k if cfg.generate.top_k is not None else cfg.distill.top_k,
                              data.vocab_size)
            self.dump = LogitsDump(Path(cfg.distill.store), topo.dp_rank, data.seq_len, self.dump_k)
        self.store = None
        self._offline_it = None
        self.data_wait = 0.0
        if self.mode == "offline":
            from .store import open_for_training

            d = cfg.distill
            self.store = open_for_training(d.store, data_fingerprint=data.fingerprint,
                                           tokenizer_hash=data.meta["tokenizer_hash"], seq_len=data.seq_len,
                                           vocab_size=data.vocab_size, top_p=d.top_p, top_k=d.top_k)
            self.monitor.print(f"offline logits: {d.store} ({len(self.store)} samples, stored top-"
                               f"{self.store.meta.top_p}-{self.store.meta.top_k}, used top-{d.top_p}-{d.top_k})")
        if topo.is_logger:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_config(cfg))
            (self.out / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=1))

    # ------------------------------------------------------------------------------ checkpoints
    def _client_state(self, step: int) -> dict:
        return {"step": step, "data": self.sampler.state(step), "data_fingerprint": self.data.fingerprint,
                "schedules": schedule_state(self.cfg.distill.alpha, self.cfg.optim.lr_config()),
                "distill": to_dict(self.cfg.distill), "losses": list(self.losses),
                "rng": _rng_state(), "total_steps": self.cfg.train.steps}

    def save(self, step: int) -> None:
        tag = self.ckpt.tag(step)
        self.engine.save_checkpoint(str(self.ckpt.root), tag=tag, client_state=self._client_state(step))
        self.topo.barrier()
        if self.topo.is_logger:
            self.ckpt.prune()
        self.monitor.print(f"checkpoint {self.ckpt.root / tag}")

    def _load(self) -> None:
        if self.ckpt.latest() is None:
            raise RuntimeError(f"--resume: no checkpoint under {self.ckpt.root}")
        path, state = self.engine.load_checkpoint(str(self.ckpt.root))
        if path is None:
            raise RuntimeError(f"--resume: could not load the checkpoint in {self.ckpt.root}")
        if state["data_fingerprint"] != self.data.fingerprint:
            raise RuntimeError("--resume: the checkpoint was trained on other data (fingerprint "
                               f"{state['data_fingerprint']}, now {self.data.fingerprint})")
        if state["total_steps"] != self.cfg.train.steps:
            raise RuntimeError(f"--resume: the checkpoint's run has train.steps={state['total_steps']}, "
                               f"now {self.cfg.train.steps}; schedules would not continue")
        self.sampler.check_state(state["data"])
        check_schedule_state(state["schedules"], self.cfg.distill.alpha, self.cfg.optim.lr_config())
        _set_rng_state(state["rng"])
        self.start_step = state["step"]
        self.losses = list(state.get("losses", []))
        self.monitor.print(f"resumed from {path} at step {self.start_step}")

    # ------------------------------------------------------------------------------ one step
    def _micro_inputs(self, ids: np.ndarray):
        batch = torch.from_numpy(self.data.batch(ids)).to(self.device)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def _plan(self):
        """Every training micro-batch this rank will run, in order: what the online client prefetches."""
        for step in range(self.start_step, self.stop_at):
            yield from self.sampler.micro_batches(step, self.topo.dp_rank, self.topo.dp_size,
                                                  self.cfg.train.micro_batch_size)

    def _offline_loader(self):
        from torch.utils.data import DataLoader

        plan = list(self._plan())
        workers = self.cfg.data.loader_workers
        loader = DataLoader(OfflineMicroBatches(plan, self.data, self.store), batch_size=None, shuffle=False,
                            num_workers=workers, prefetch_factor=4 if workers else None,
                            persistent_workers=False)
        return iter(loader)

    def _offline_micro(self, expected: np.ndarray):
        if self._offline_it is None:
            self._offline_it = self._offline_loader()
        t0 = time.perf_counter()
        ids, batch, idx, val = next(self._offline_it)
        self.data_wait += time.perf_counter() - t0
        if not np.array_equal(ids.numpy(), expected):
            raise RuntimeError("offline loader out of step with the training plan")
        batch = batch.to(self.device)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), idx.to(self.device), val.to(self.device)

    def _tokens_of(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.data.batch(ids))[:, :-1]

    def _teacher_for(self, input_ids, ids: np.ndarray, training: bool):
        if not self.has_teacher:
            return None, None
        if self.teacher is not None:
            t = teacher_sparse_logits(self.teacher, input_ids, self.cfg.distill.top_p, self.cfg.distill.top_k,
                                      self.cfg.train.loss_chunk_size)
        elif self.store is not None:  # evaluation; training batches come from the loader
            if int(np.max(ids)) >= len(self.store):
                return None, None  # the store holds no logits for the held-out samples
            t, _ = self.store.get_batch(ids)
        elif training:
            t = self.remote.next(ids)
        else:
            t = self.remote.now(ids, input_ids.cpu())
        return t.indices.to(self.device), t.values.to(self.device)

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        total = cfg.train.steps
        alpha = alpha_at(step, total, cfg.distill.alpha) if self.has_teacher else 0.0
        lr = lr_at(step, total, cfg.optim.lr_config())
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        micro_ids = self.sampler.micro_batches(step, self.topo.dp_rank, self.topo.dp_size,
                                               cfg.train.micro_batch_size)
        dw0 = self.data_wait
        if self.store is not None:
            micro = [self._offline_micro(ids) for ids in micro_ids]
        else:
            micro = [self._micro_inputs(ids) + (None, None) for ids in micro_ids]
        wait0 = self.client.wait_time if self.client is not None else 0.0
        n_local = torch.tensor(float(sum(int((m[1] != IGNORE_INDEX).sum()) for m in micro)))
        (normalizer,) = _sum_stats(self.topo, n_local)
        # The engine averages gradients over data-parallel ranks; each rank's loss is its share of
        # the global token sum, so scale by dp size and let the average undo it.
        scale = float(self.topo.dp_size)
        sums = torch.zeros(4, dtype=torch.float64)
        t_teacher = 0.0
        for ids, (inp, tgt, t_idx, t_val) in zip(micro_ids, micro):
            if t_idx is None:
                t0 = time.perf_counter()
                t_idx, t_val = self._teacher_for(inp, ids, training=True)
                t_teacher += time.perf_counter() - t0
            if self.dump is not None:
                loss, lm_sum, kd_sum, n_tok, top1, d_idx, d_val, d_lse = self.engine(
                    inp, tgt, t_idx, t_val, alpha, normalizer, self.dump_p, self.dump_k)
                self.dump.add(step, ids, d_idx, d_val, d_lse)
            else:
                loss, lm_sum, kd_sum, n_tok, top1 = self.engine(inp, tgt, t_idx, t_val, alpha, normalizer)
            self.engine.backward(loss * scale, scale_wrt_gas=False)
            self.engine.step()
            sums += torch.stack([lm_sum.double(), kd_sum.double(), n_tok.double(), top1.double()]).cpu()
        lm_sum, kd_sum, n_tok, top1 = _sum_stats(self.topo, sums)
        lm, kd = lm_sum / n_tok, kd_sum / n_tok
        grad_norm = self.engine.get_global_grad_norm()
        has = self.has_teacher
        out = {"train/loss": (1 - alpha) * lm + alpha * kd if has else lm,
               "train/lm_loss": lm, "train/kd_loss": kd if has else None,
               "train/alpha": alpha, "train/lr": lr,
               "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
               "train/teacher_top1_agreement": top1 / n_tok if has else None,
               "tokens": n_tok, "teacher_time": t_teacher}
        if self.client is not None:
            out["teacher_wait"] = self.client.wait_time - wait0
        out["data_wait"] = self.data_wait - dw0
        return out

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        cfg = self.cfg
        mb = cfg.train.micro_batch_size
        # All held-out samples (data.val_samples), sharded over ranks: the same set at any dp size.
        val = self.data.val_ids()[self.topo.dp_rank::self.topo.dp_size]
        self.engine.eval()
        sums = torch.zeros(4, dtype=torch.float64)
        for s in range(0, len(val), mb):
            inp, tgt = self._micro_inputs(val[s:s + mb])
            t_idx, t_val = self._teacher_for(inp, val[s:s + mb], training=False)
            _, lm_sum, kd_sum, n_tok, top1 = self.engine(inp, tgt, t_idx, t_val, 0.0, 1.0)
            sums += torch.stack([lm_sum.double(), kd_sum.double(), n_tok.double(), top1.double()]).cpu()
        self.engine.train()
        lm_sum, kd_sum, n_tok, top1 = _sum_stats(self.topo, sums)
        val_loss = lm_sum / max(n_tok, 1.0)
        out = {"eval/val_loss": val_loss, "eval/ppl": math.exp(min(val_loss, 50.0))}
        if self.has_teacher and (self.store is None or int(self.data.val_ids().max()) < len(self.store)):
            out["eval/val_kd_loss"] = kd_sum / max(n_tok, 1.0)
            out["eval/teacher_top1_agreement"] = top1 / max(n_tok, 1.0)
        return out

    # ------------------------------------------------------------------------------ export
    def export(self, out_dir: Path) -> None:
        """save_pretrained (safetensors) of the student, with the run's tokenizer, from one rank."""
        import deepspeed

        model = self.engine.module.model
        params = list(model.parameters())
        if self.cfg.train.zero_stage == 3:
            ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            if self.topo.is_logger:
                out_dir.mkdir(parents=True, exist_ok=True)
                state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
                model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
                from .data import load_tokenizer

                load_tokenizer(self.data.tokenizer_dir).save_pretrained(str(out_dir))
        self.topo.barrier()

    # ------------------------------------------------------------------------------ loop
    def fit(self, export_dir: Optional[Path] = None) -> TrainResult:
        t = self.cfg.train
        m = self.monitor
        tokens_per_step = t.global_batch_size * self.data.seq_len
        m.print(f"{self.n_params / 1e6:.2f}M params | mode {self.mode} | dp {self.topo.dp_size} x micro "
                f"{t.micro_batch_size} x accum {self.accum} = {t.global_batch_size} samples "
                f"({tokens_per_step} tokens)/step | ZeRO {t.zero_stage} | "
                f"{'bf16' if self.bf16 else 'fp32'} | {t.steps} steps")
        timer = StepTimer()
        last = {}
        self._rates: list[float] = []
        stop_at = self.stop_at
        for step in range(self.start_step, stop_at):
            stats = self.train_step(step)
            dt = timer.lap()
            self.losses.append(stats["train/loss"])
            last = stats
            done = step + 1
            scalars = {k: v for k, v in stats.items() if "/" in k}
            scalars["perf/step_time"] = dt
            scalars["perf/tokens_per_sec"] = stats["tokens"] / dt
            if step > self.start_step:
                self._rates.append(scalars["perf/tokens_per_sec"])
            if self.teacher is not None:
                scalars["perf/teacher_time_frac"] = stats["teacher_time"] / dt
            if self.store is not None:
                scalars["perf/data_wait_frac"] = stats["data_wait"] / dt
            if self.client is not None:
                scalars["perf/teacher_wait_frac"] = stats["teacher_wait"] / dt
                scalars["comm/bytes_per_token"] = self.client.spec.bytes_per_token()
            m.scalars(done, scalars)
            if done % t.log_every == 0 or done == t.steps or step == self.start_step:
                kd = f" lm {stats['train/lm_loss']:.4f} kd {stats['train/kd_loss']:.4f} alpha " \
                     f"{stats['train/alpha']:.3f}" if self.has_teacher else ""
                if self.client is not None:
                    kd += f" | teacher wait {scalars['perf/teacher_wait_frac']:.0%}"
                gn = stats["train/grad_norm"]
                m.print(f"step {done}/{t.steps} | loss {stats['train/loss']:.4f}{kd} | lr "
                        f"{stats['train/lr']:.2e} | gnorm {gn if gn is None else f'{gn:.3f}'} | "
                        f"{scalars['perf/tokens_per_sec']:,.0f} tok/s | {dt:.2f}s/step | ETA "
                        f"{fmt_duration(timer.eta(t.steps - done))}")
            if t.eval_every and done % t.eval_every == 0 and done != t.steps:
                ev = self.evaluate()
                m.scalars(done, ev)
                m.print("eval | " + " | ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in ev.items()))
                timer.reset()
            if t.save_every and done % t.save_every == 0 and done != t.steps:
                self.save(done)
                timer.reset()
        if stop_at < t.steps:
            if self.ckpt.latest() != self.ckpt.tag(stop_at):
                self.save(stop_at)
            m.print(f"stopping after {stop_at} steps (train.exit_after_steps); continue with --resume")
            m.flush()
            return TrainResult(steps=stop_at, final_train_loss=last.get("train/loss", float("nan")),
                               val_loss=float("nan"), val_ppl=float("nan"), teacher_top1_agreement=None,
                               export_dir=None, tensorboard_dir=str(self.out / "tensorboard"),
                               losses=list(self.losses), finished=False)
        ev = self.evaluate()
        m.scalars(t.steps, ev)
        m.print("final eval | " + " | ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in ev.items()))
        if self.start_step < t.steps or self.ckpt.latest() != self.ckpt.tag(t.steps):
            self.save(t.steps)
        if export_dir is not None:
            self.export(export_dir)
            m.print(f"exported to {export_dir}")
        if self.dump is not None:
            self._finish_dump(export_dir)
        m.flush()
        return TrainResult(
            steps=t.steps, final_train_loss=last.get("train/loss", float("nan")),
            val_loss=ev["eval/val_loss"], val_ppl=ev["eval/ppl"],
            teacher_top1_agreement=ev.get("eval/teacher_top1_agreement"),
            tokens_per_sec=sum(self._rates) / len(self._rates) if self._rates else None,
            export_dir=str(export_dir) if export_dir else None,
            tensorboard_dir=str(self.out / "tensorboard"), losses=list(self.losses))

    def _finish_dump(self, export_dir: Optional[Path]) -> None:
        """Turn the spools into a store; samples never trained on come from the exported final model."""
        from .dump import build_store
        from .generate import teacher_identity
        from .store import StoreMeta

        self.dump.close()
        if export_dir is None:
            raise RuntimeError("distill.dump_logits needs the final export to fill untrained samples")
        cfg, data = self.cfg, self.data
        final = build_model(ModelConfig(path=str(export_dir)), data.vocab_size, seed=0).to(self.device).eval()
        ident = teacher_identity(export_dir, f"{cfg.output_dir} during training (moving model, "
                                             f"{cfg.train.steps} steps; dump_logits)")
        meta = StoreMeta(teacher=ident, tokenizer_hash=data.meta["tokenizer_hash"],
                         data_fingerprint=data.fingerprint, seq_len=data.seq_len, vocab_size=data.vocab_size,
                         top_p=self.dump_p, top_k=self.dump_k,
                         n_samples=data.n_train + (data.n_val if cfg.generate.include_val else 0),
                         shard_size=cfg.generate.shard_size).resolved()

        def final_logits(tokens):
            return teacher_sparse_logits(final, tokens.to(self.device), self.dump_p, self.dump_k,
                                         cfg.train.loss_chunk_size, with_lse=True)

        build_store(Path(cfg.distill.store), meta, self.topo, data, final_logits,
                    cfg.generate.micro_batch_size or cfg.train.micro_batch_size, log=self.monitor.print)

    def close(self) -> None:
        if self.dump is not None:
            self.dump.close()
        self.monitor.close()
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()


# ---------------------------------------------------------------------------------- orchestration
def prepare_run_data(cfg: ExperimentConfig, topo: Topology, log=print) -> PackedDataset:
    """One rank prepares (or reuses) the packed data; the others wait and then read it.

    In online mode the first teacher rank prepares and publishes the outcome in the job's store, so the
    two roles never write the same files."""
    data_dir = Path(cfg.data.dir) if cfg.data.dir else Path(cfg.output_dir) / "data"
    preparer = topo.dp_rank == 0 and (not topo.online or topo.role == "teacher")
    err = None
    if preparer:
        try:
            prepare_data(cfg.data, data_dir, log=log)
        except Exception as e:  # reported on every rank below, raised here
            err = e
    if topo.online:
        store = topo._store
        if preparer:
            store.set("pd/data", "ok" if err is None else f"error: {err}")
        else:
            store.wait(["pd/data"], __import__("datetime").timedelta(seconds=STARTUP_TIMEOUT_S))
        status = store.get("pd/data").decode()
        if err is not None:
            raise err
        if status != "ok":
            raise RuntimeError(f"data preparation failed on the first teacher rank: {status[7:]}")
        return PackedDataset(data_dir)
    ok = torch.tensor([0.0 if err else 1.0])
    topo.barrier()
    topo.all_reduce_sum(ok)
    if err is not None:
        raise err
    if ok.item() < topo.dp_size:
        raise RuntimeError("data preparation failed on rank 0 (see its error)")
    return PackedDataset(data_dir)


def wire_spec(cfg: ExperimentConfig, data: PackedDataset) -> WireSpec:
    d = cfg.distill
    dtype = d.wire_dtype if d.wire_dtype != "auto" else ("bf16" if torch.cuda.is_available() else "fp32")
    return WireSpec(vocab_size=data.vocab_size, tokenizer_hash=data.meta["tokenizer_hash"],
                    seq_len=data.seq_len, top_k=d.top_k, top_p=d.top_p, value_dtype=dtype,
                    micro_batch=cfg.train.micro_batch_size)


def serve_teacher(cfg: ExperimentConfig, topo: Topology, data: PackedDataset, log=print) -> None:
    """A teacher rank: obtain the teacher (pre-training it on the teacher world if needed), then serve."""
    model = obtain_teacher(cfg, topo, data, log=log)
    device = _device()
    bf16 = _use_bf16(cfg)
    model.to(device, dtype=torch.bfloat16 if bf16 else torch.float32).eval().requires_grad_(False)
    d, chunk = cfg.distill, cfg.train.loss_chunk_size

    def logits_fn(m, tokens):
        return teacher_sparse_logits(m, tokens.to(device), d.top_p, d.top_k, chunk)

    spec = wire_spec(cfg, data)
    max_batch = cfg.teacher.micro_batch_size or cfg.train.micro_batch_size * topo.students_per_teacher
    me = f"[teacher {topo.rank}] "
    # One event directory per teacher replica: their throughputs differ.
    tb = Monitor(True, Path(cfg.output_dir) / "tensorboard" / f"teacher{topo.rank}")
    server = TeacherServer(topo, spec, model, logits_fn, max_batch, log=lambda s: print(me + s, flush=True),
                           metrics=lambda n, d: (tb.scalars(n, d), tb.flush()))
    print(f"{me}serving students {server.students} ({spec.bytes_per_token():.0f} wire bytes/token, "
          f"{spec.value_dtype} values)", flush=True)
    try:
        stats = server.serve()
    finally:
        tb.close()
    el = time.perf_counter() - stats.started
    print(f"{me}done: {stats.requests} requests, {stats.tokens} tokens, {stats.tokens / max(el, 1e-9):,.0f} "
          f"tok/s, forward busy {stats.forward_s / max(el, 1e-9):.0%}", flush=True)


def teacher_run_config(cfg: ExperimentConfig, data_dir: Path) -> ExperimentConfig:
    """The LM-only run that pre-trains the default teacher: same data and trainer, teacher shape."""
    tc = copy.deepcopy(cfg)
    tc.output_dir = str(Path(cfg.output_dir) / "teacher")
    tc.model = ModelConfig(preset=cfg.teacher.preset, path=None,
                           max_position_embeddings=cfg.teacher.max_position_embeddings,
                           rope_theta=cfg.teacher.rope_theta)
    tc.distill = dataclasses.replace(cfg.distill, mode="none")
    tc.train = dataclasses.replace(cfg.train, steps=cfg.teacher.pretrain_steps, exit_after_steps=0)
    tc.optim = dataclasses.replace(cfg.optim, lr=cfg.teacher.pretrain_lr)
    tc.data = dataclasses.replace(cfg.data, dir=str(data_dir))
    return tc


def teacher_export_dir(cfg: ExperimentConfig) -> Path:
    """Where the teacher's weights are: teacher.path, or the cached pre-trained default."""
    return Path(cfg.teacher.path) if cfg.teacher.path else Path(cfg.output_dir) / "teacher" / "export"


def _teacher_stamp(tc: ExperimentConfig, data: PackedDataset) -> str:
    blob = json.dumps({"model": to_dict(tc.model), "train": to_dict(tc.train), "optim": to_dict(tc.optim),
                       "data": data.fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def obtain_teacher(cfg: ExperimentConfig, topo: Topology, data: PackedDataset,
                   log=print) -> nn.Module:
    """The teacher model: loaded from teacher.path, or pre-trained here once and cached."""
    if cfg.teacher.path:
        check_same_tokenizer(cfg.teacher.path, data.tokenizer_dir, "the teacher")
        return build_model(cfg.teacher, data.vocab_size, seed=cfg.train.seed)
    tc = teacher_run_config(cfg, data.path)
    export = teacher_export_dir(cfg)
    stamp = _teacher_stamp(tc, data)
    stamp_file = export / "pd_dist_teacher_stamp.txt"
    if stamp_file.is_file() and stamp_file.read_text().strip() == stamp:
        if topo.is_logger:
            log(f"[teacher] reusing the pre-trained teacher in {export}")
    else:
        if topo.is_logger:
            log(f"[teacher] no teacher.path: pre-training a {tc.model.preset} teacher for "
                f"{tc.train.steps} steps (LM only) in {tc.output_dir}")
            ck = Path(tc.output_dir) / "checkpoints"
            if ck.exists():  # a stale or interrupted teacher run: its config no longer matches
                shutil.rmtree(ck)
        topo.barrier()
        trainer = Trainer(tc, topo, data, run_name="teacher")
        try:
            trainer.fit(export_dir=export)
        finally:
            trainer.close()
        if topo.is_logger:
            stamp_file.write_text(stamp + "\n")
        topo.barrier()
    return build_model(ModelConfig(path=str(export)), data.vocab_size, seed=cfg.train.seed)


def set_threads(cfg: ExperimentConfig) -> None:
    """train.threads, or on CPU the host's cores shared by the ranks on it (no oversubscription)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    elif not torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


def run_experiment(cfg: ExperimentConfig, topo: Topology, resume: bool = False,
                   log=print) -> Optional[TrainResult]:
    """Everything the entry point does between parsing and tearing down."""
    set_threads(cfg)
    say = log if topo.dp_rank == 0 else (lambda *_: None)
    data = prepare_run_data(cfg, topo, log=say)
    if topo.role == "teacher":
        serve_teacher(cfg, topo, data, log=say)
        return None
    teacher = obtain_teacher(cfg, topo, data, log=say) if cfg.distill.mode == "colocated" else None
    client = TeacherClient(topo, wire_spec(cfg, data)) if cfg.distill.mode == "online" else None
    trainer = Trainer(cfg, topo, data, teacher=teacher, resume=resume, client=client)
    try:
        result = trainer.fit(export_dir=Path(cfg.output_dir) / "student")
        if client is not None:
            client.close()
    finally:
        trainer.close()
    if topo.is_logger and not result.finished:
        (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(dataclasses.asdict(result), indent=1))
    elif topo.is_logger:
        (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(dataclasses.asdict(result), indent=1))
        agree = result.teacher_top1_agreement
        say(f"done | student val_loss {result.val_loss:.4f} (ppl {result.val_ppl:.1f})"
            + (f" | top-1 agreement with teacher {agree:.3f}" if agree is not None else "")
            + f"\n  TensorBoard: tensorboard --logdir {result.tensorboard_dir}"
            + f"\n  student (HF format): {result.export_dir}")
    return result
