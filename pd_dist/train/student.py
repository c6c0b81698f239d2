"""The student as DeepSpeed trains it: a causal LM whose forward returns the fused LM + KD loss.

The engine's forward takes the micro-batch's tokens, its targets and the teacher signal as one
SparseLogits (or None), and returns a :class:`StudentOutput`. The LM head is applied chunk by chunk
inside the loss, never as a full [tokens, vocab] matmul.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn as nn

from pd_dist.config import ExperimentConfig, deepspeed_config
from pd_dist.core.logits import SparseLogits
from pd_dist.core.losses import fused_pd_loss
from pd_dist.models import (body_hidden, build_model, check_same_tokenizer, count_params, final_norm_and_head,
                            partitioned_builder)
from pd_dist.cluster.topology import Topology


class StudentOutput(NamedTuple):
    """What one micro-batch's forward gives. A NamedTuple, so DeepSpeed's ZeRO-3 hooks (which walk
    tuples) see the loss tensor; the sums are detached."""
    loss: torch.Tensor        # differentiable: this micro-batch's share of the global mean loss
    lm_sum: torch.Tensor      # sum of LM cross-entropy over valid target tokens
    kd_sum: torch.Tensor      # sum of KD loss over valid target tokens (0 without a teacher)
    n_tokens: torch.Tensor    # valid target tokens
    top1_agree: torch.Tensor  # valid tokens where the student's argmax is the teacher's top-1
    head_output: Any = None   # what the forward's head_fn made of the hidden states (step hooks)


class PDStudent(nn.Module):
    """The student wrapped so that the engine's forward returns the fused LM+KD loss.

    The LM head's weight is used outside the head's own forward: under ZeRO-3 it is registered as an
    external parameter of this module so it is gathered for our forward and backward.
    ``document_eos``: data.document_mask's EOS id (each document of a window attended to on its own)."""

    def __init__(self, model: nn.Module, kind: str, temperature: float, chunk_size: int,
                 document_eos: Optional[int] = None):
        super().__init__()
        self.model = model
        self.kind, self.temperature, self.chunk_size = kind, temperature, chunk_size
        self.document_eos = document_eos

    def register_for_zero3(self) -> None:
        import deepspeed

        _, head = final_norm_and_head(self.model)
        deepspeed.zero.register_external_parameter(self, head.weight)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, teacher: Optional[SparseLogits] = None,
                alpha: float = 0.0, normalizer: float = 1.0,
                head_fn: Optional[Callable[[torch.Tensor, torch.Tensor], Any]] = None) -> StudentOutput:
        """The fused loss of one micro-batch. ``head_fn(hidden [B, T, H], head_weight [V, H])``: run
        without grad on the detached hidden states, its result returned as ``head_output`` (step
        hooks: pd_dist.train.hooks); inside forward, so ZeRO-3 has the head weight gathered."""
        body, head = final_norm_and_head(self.model)
        hidden = body_hidden(body, input_ids, self.document_eos)
        out = fused_pd_loss(hidden.flatten(0, 1), head.weight, targets.flatten(),
                            None if teacher is None else teacher.reshape(-1), alpha, self.kind,
                            self.temperature, normalizer, chunk_size=self.chunk_size)
        extra = None
        if head_fn is not None:
            with torch.no_grad():
                extra = head_fn(hidden.detach(), head.weight)
        return StudentOutput(out.loss, out.lm_sum, out.kd_sum, out.n_tokens, out.top1_agree, extra)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms and biases (1-D tensors). A parameter built inside
    zero.Init is an empty placeholder; its real shape is ds_shape."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class DataParallelStudent:
    """The student engine when train.pipeline_stages == 1: data parallelism with ZeRO 0-3.

    Under ZeRO-3 the model is built inside deepspeed.zero.Init on the student world, so each rank only
    ever holds its shard of the weights (models.init_weights draws each tensor by name, so the shards
    hold exactly what a stage-0 run starts from); a model loaded from a path is partitioned as loaded."""

    def __init__(self, cfg: ExperimentConfig, topo: Topology, vocab_size: int, tokenizer_dir, bf16: bool,
                 document_eos: Optional[int] = None):
        import deepspeed

        self.cfg, self.topo = cfg, topo
        self.ds_config = deepspeed_config(cfg, topo.dp_size, bf16)
        if cfg.train.zero_stage == 3:
            build = partitioned_builder(cfg.model, vocab_size, seed=cfg.train.seed)
            with deepspeed.zero.Init(config_dict_or_path=self.ds_config, data_parallel_group=topo.dp_group):
                model = build()
        else:
            model = build_model(cfg.model, vocab_size, seed=cfg.train.seed)
        if cfg.model.path:
            check_same_tokenizer(cfg.model.path, tokenizer_dir, "the student")
        module = PDStudent(model, cfg.distill.kd_loss, cfg.distill.loss_temperature, cfg.train.loss_chunk_size,
                           document_eos)
        if cfg.train.zero_stage == 3:
            module.register_for_zero3()
        o = cfg.optim
        optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                      eps=o.eps)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=self.ds_config)

    @property
    def n_params(self) -> int:
        return count_params(self.engine.module.model)

    def share(self, vec: torch.Tensor) -> torch.Tensor:
        """Per-step figures are computed on every rank here (a pipeline's come from its last stage)."""
        return vec

    def train(self, micro, alpha: float, normalizer: float, head_fn=None, on_micro=None) -> torch.Tensor:
        """One optimizer step over `micro`, an iterable of MicroBatch (pd_dist.train.batch).
        Returns this rank's [lm, kd, tokens, top-1] sums. Step hooks (pd_dist.train.hooks): ``head_fn``
        goes to the forward (PDStudent.forward), ``on_micro(ids, output)`` is called after each
        micro-batch's forward, before its backward."""
        # The engine averages gradients over data-parallel ranks; each rank's loss is its share of
        # the global token sum, so scale by dp size and let the average undo it.
        scale = float(self.topo.dp_size)
        sums = torch.zeros(4, dtype=torch.float64)
        for m in micro:
            out = self.engine(m.input_ids, m.targets, teacher=m.teacher, alpha=alpha, normalizer=normalizer,
                              head_fn=head_fn)
            if on_micro is not None:
                on_micro(m.ids, out)
            self.engine.backward(out.loss * scale, scale_wrt_gas=False)
            self.engine.step()
            sums += _sums(out)
        return sums

    @torch.no_grad()
    def evaluate(self, micro) -> torch.Tensor:
        """This rank's [lm, kd, tokens, top-1] sums over `micro` (held_out_sums, in eval mode)."""
        self.engine.eval()
        sums = held_out_sums(self.engine, micro)
        self.engine.train()
        return sums

    def export(self, out_dir: Path, tokenizer_dir) -> None:
        """save_pretrained (safetensors) of the student, with the run's tokenizer, from one rank."""
        import contextlib

        import deepspeed

        model = self.engine.module.model
        ctx = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None) \
            if self.cfg.train.zero_stage == 3 else contextlib.nullcontext()
        with ctx:
            if self.topo.is_logger:
                out_dir.mkdir(parents=True, exist_ok=True)
                state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
                model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
                from pd_dist.data import load_tokenizer

                load_tokenizer(tokenizer_dir).save_pretrained(str(out_dir))
        self.topo.barrier()


def _sums(out: StudentOutput) -> torch.Tensor:
    return torch.stack([out.lm_sum.double(), out.kd_sum.double(), out.n_tokens.double(),
                        out.top1_agree.double()]).cpu()


@torch.no_grad()
def held_out_sums(student, micro) -> torch.Tensor:
    """[lm, kd, tokens, top-1] sums (float64) of the fused loss over ``micro``, an iterable of
    MicroBatch (pd_dist.train.batch).

    ``student`` is a :class:`PDStudent` or a DeepSpeed engine wrapping one (the caller sets eval mode).
    The held-out evaluation of a run (DataParallelStudent.evaluate) and of its exported student
    (``pd-dist eval``, pd_dist.explore.evaluate) are both this loop: alpha is 0, so the KD sum and the
    top-1 agreement are measured, not trained, and each micro-batch's sums are added in float64."""
    sums = torch.zeros(4, dtype=torch.float64)
    for m in micro:
        sums += _sums(student(m.input_ids, m.targets, teacher=m.teacher))
    return sums


def held_out_figures(sums, with_kd: bool) -> dict[str, float]:
    """The held-out figures of [lm, kd, tokens, top-1] sums (summed over ranks): ``val_loss`` (mean LM
    cross-entropy per valid target token, nats), ``ppl`` (exp of it, capped at exp(50)), and with
    ``with_kd`` (every micro-batch had a teacher signal) ``val_kd_loss`` and ``teacher_top1_agreement``
    (means per token). No tokens gives a loss of 0 (divided by max(tokens, 1))."""
    lm_sum, kd_sum, n_tok, top1 = (float(v) for v in sums)
    val_loss = lm_sum / max(n_tok, 1.0)
    out = {"val_loss": val_loss, "ppl": math.exp(min(val_loss, 50.0))}
    if with_kd:
        out["val_kd_loss"] = kd_sum / max(n_tok, 1.0)
        out["teacher_top1_agreement"] = top1 / max(n_tok, 1.0)
    return out
