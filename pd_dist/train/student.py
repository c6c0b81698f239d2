"""The student as DeepSpeed trains it: a causal LM whose forward returns the fused LM + KD loss.

The engine's forward takes the micro-batch's tokens, its targets and the teacher signal as one
SparseLogits (or None), and returns a :class:`StudentOutput`. The LM head is applied chunk by chunk
inside the loss, never as a full [tokens, vocab] matmul.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from pd_dist.config import ExperimentConfig, deepspeed_config
from pd_dist.teacher.inference import sparse_logits_from_hidden
from pd_dist.core.logits import SignalSpec, SparseLogits
from pd_dist.core.losses import fused_pd_loss
from pd_dist.models import build_model, check_same_tokenizer, count_params, final_norm_and_head, partitioned_builder
from pd_dist.cluster.topology import Topology


class StudentOutput(NamedTuple):
    """What one micro-batch's forward gives. A NamedTuple, so DeepSpeed's ZeRO-3 hooks (which walk
    tuples) see the loss tensor; the sums are detached."""
    loss: torch.Tensor        # differentiable: this micro-batch's share of the global mean loss
    lm_sum: torch.Tensor      # sum of LM cross-entropy over valid target tokens
    kd_sum: torch.Tensor      # sum of KD loss over valid target tokens (0 without a teacher)
    n_tokens: torch.Tensor    # valid target tokens
    top1_agree: torch.Tensor  # valid tokens where the student's argmax is the teacher's top-1
    own: Optional[SparseLogits] = None  # the student's own truncated logits (distill.dump_logits)


class PDStudent(nn.Module):
    """The student wrapped so that the engine's forward returns the fused LM+KD loss.

    The LM head's weight is used outside the head's own forward: under ZeRO-3 it is registered as an
    external parameter of this module so it is gathered for our forward and backward."""

    def __init__(self, model: nn.Module, kind: str, temperature: float, chunk_size: int):
        super().__init__()
        self.model = model
        self.kind, self.temperature, self.chunk_size = kind, temperature, chunk_size

    def register_for_zero3(self) -> None:
        import deepspeed

        _, head = final_norm_and_head(self.model)
        deepspeed.zero.register_external_parameter(self, head.weight)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, teacher: Optional[SparseLogits] = None,
                alpha: float = 0.0, normalizer: float = 1.0,
                own_signal: Optional[SignalSpec] = None) -> StudentOutput:
        body, head = final_norm_and_head(self.model)
        hidden = body(input_ids=input_ids).last_hidden_state
        out = fused_pd_loss(hidden.flatten(0, 1), head.weight, targets.flatten(),
                            None if teacher is None else teacher.reshape(-1), alpha, self.kind,
                            self.temperature, normalizer, chunk_size=self.chunk_size)
        own = None
        if own_signal is not None:
            # This model's own truncated logits as it is now: one more chunked head pass without grad,
            # inside forward so ZeRO-3 has the head weight gathered.
            own = sparse_logits_from_hidden(hidden.detach(), head.weight, own_signal, self.chunk_size,
                                            keep_lse=True)
        return StudentOutput(out.loss, out.lm_sum, out.kd_sum, out.n_tokens, out.top1_agree, own)


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

    def __init__(self, cfg: ExperimentConfig, topo: Topology, vocab_size: int, tokenizer_dir, bf16: bool):
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
        module = PDStudent(model, cfg.distill.loss, cfg.distill.loss_temperature, cfg.train.loss_chunk_size)
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

    def train(self, micro, alpha: float, normalizer: float, own_sink=None) -> torch.Tensor:
        """One optimizer step over `micro`, an iterable of MicroBatch.
        Returns this rank's [lm, kd, tokens, top-1] sums. own_sink(ids, own logits): dump_logits."""
        # The engine averages gradients over data-parallel ranks; each rank's loss is its share of
        # the global token sum, so scale by dp size and let the average undo it.
        scale = float(self.topo.dp_size)
        own = None if own_sink is None else own_sink.signal
        sums = torch.zeros(4, dtype=torch.float64)
        for m in micro:
            out = self.engine(m.input_ids, m.targets, teacher=m.teacher, alpha=alpha, normalizer=normalizer,
                              own_signal=own)
            if own_sink is not None:
                own_sink(m.ids, out.own)
            self.engine.backward(out.loss * scale, scale_wrt_gas=False)
            self.engine.step()
            sums += _sums(out)
        return sums

    @torch.no_grad()
    def evaluate(self, micro) -> torch.Tensor:
        sums = torch.zeros(4, dtype=torch.float64)
        self.engine.eval()
        for m in micro:
            sums += _sums(self.engine(m.input_ids, m.targets, teacher=m.teacher))
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
