"""The student as a DeepSpeed pipeline (train.pipeline_stages > 1): layer specs of a Llama-family
causal LM, with the fused LM + KD loss on the last stage.

The layers (pd_dist.pipeline_layers, shared with the pipelined teacher): embedding, each decoder layer,
final norm + LM head. DeepSpeed's PipelineModule builds only the layers of this rank's stage, so a stage
never materializes the whole model and every layout starts from the same weights as a data-parallel run.

The pipeline topology puts the pipe axis fastest (student-world rank r: data-parallel rank r // P,
stage r % P), the layout pd_dist.cluster.layout prints. Only the last stage computes the loss, so only it asks
the run's teacher-signal source; the data iterator gives the first stage token ids and the last stage
(targets, teacher indices, teacher values). Per-step sums computed on the last stage are broadcast to
the pipeline's other stages, so every rank reports the same statistics.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from pd_dist.config import ExperimentConfig, deepspeed_config
from pd_dist.core.logits import SparseLogits
from pd_dist.core.losses import fused_pd_loss
from pd_dist.models import check_same_tokenizer
from pd_dist.pipeline_layers import LayerWeights, hf_config, pipeline_module
from pd_dist.train.student import param_groups
from pd_dist.cluster.topology import Topology


class PipelineLoss:
    """loss_fn of the pipeline: the fused LM + KD loss of one micro-batch, and this step's sums.

    The engine divides each micro-batch's loss by the accumulation steps and averages gradients over
    data-parallel ranks; the loss handed to it is this micro-batch's share of the global token mean
    times both, so the gradient is that of the global mean (as in the data-parallel path)."""

    def __init__(self, kind: str, temperature: float, chunk_size: int):
        self.kind, self.temperature, self.chunk_size = kind, temperature, chunk_size
        self.head: Optional[nn.Linear] = None
        self.alpha, self.normalizer, self.scale = 0.0, 1.0, 1.0
        self.sums = torch.zeros(4, dtype=torch.float64)

    def __call__(self, hidden: torch.Tensor, labels) -> torch.Tensor:
        labels = labels if isinstance(labels, (tuple, list)) else (labels,)
        targets = labels[0]
        teacher = SparseLogits(labels[1], labels[2]) if len(labels) == 3 else None
        out = fused_pd_loss(hidden.flatten(0, 1), self.head.weight, targets.flatten(),
                            None if teacher is None else teacher.reshape(-1),
                            self.alpha if teacher is not None else 0.0, self.kind, self.temperature,
                            self.normalizer, chunk_size=self.chunk_size)
        self.sums += torch.stack([out.lm_sum.double(), out.kd_sum.double(), out.n_tokens.double(),
                                  out.top1_agree.double()]).cpu()
        return out.loss * self.scale


class PipelineStudent:
    """The student engine when train.pipeline_stages > 1 (the interface student.DataParallelStudent has)."""

    def __init__(self, cfg: ExperimentConfig, topo: Topology, vocab_size: int, tokenizer_dir, bf16: bool,
                 document_eos: Optional[int] = None):
        import deepspeed

        self.cfg, self.topo = cfg, topo
        conf = hf_config(cfg.model, vocab_size)
        if getattr(conf, "tie_word_embeddings", False):
            raise ValueError("train.pipeline_stages > 1 needs an untied LM head: this student ties it to the "
                             "embedding (e.g. pd-330m); train it data-parallel")
        if cfg.model.path:
            check_same_tokenizer(cfg.model.path, tokenizer_dir, "the student")
        self.conf = conf
        self.loss = PipelineLoss(cfg.distill.kd_loss, cfg.distill.loss_temperature, cfg.train.loss_chunk_size)
        module = pipeline_module(conf, LayerWeights(cfg.train.seed, conf.initializer_range, cfg.model.path),
                                 self.loss, topo.dp_size, topo.stages, loss_fn=self.loss,
                                 document_eos=document_eos)
        o = cfg.optim
        optimizer = torch.optim.AdamW(param_groups(module, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                      eps=o.eps)
        self.ds_config = deepspeed_config(cfg, topo.dp_size, bf16)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=self.ds_config)
        self.last = self.engine.is_last_stage()
        # Layer index -> HF name prefix, for the export.
        n = conf.num_hidden_layers
        self._names = {0: "model."} | {i + 1: f"model.layers.{i}." for i in range(n)} | {n + 1: None}

    @property
    def n_params(self) -> int:
        t = torch.tensor([float(sum(p.numel() for p in self.engine.module.parameters()))])
        dist.all_reduce(t, group=self.topo.pipe_group)
        return int(t.item())

    def share(self, vec: torch.Tensor) -> torch.Tensor:
        """The last stage's vector, on every stage of this pipeline. (torch.distributed's ranks here are
        role-world ranks: the last stage of this pipeline is dp_rank * P + P - 1.)"""
        P = self.topo.stages
        dist.broadcast(vec, src=self.topo.dp_rank * P + P - 1, group=self.topo.pipe_group)
        return vec

    def _batches(self, micro):
        for m in micro:
            labels = (m.targets,) if m.teacher is None else (m.targets, m.teacher.indices, m.teacher.values)
            yield m.input_ids, labels

    def train(self, micro, alpha: float, normalizer: float, head_fn=None, on_micro=None) -> torch.Tensor:
        """One optimizer step over `micro` (an iterable of MicroBatch,
        produced lazily: only the first and last stage draw from it). Returns [lm, kd, tokens, top-1]
        sums, on the last stage (zeros elsewhere: see share). Step hooks that see micro-batches
        (``head_fn``, ``on_micro``: pd_dist.train.hooks) are refused: no stage holds a whole
        micro-batch's output (the config refuses distill.dump_logits with pipelines)."""
        if head_fn is not None or on_micro is not None:
            raise ValueError("step hooks that see micro-batches need train.pipeline_stages == 1")
        self.loss.alpha, self.loss.normalizer = alpha, normalizer
        self.loss.scale = float(self.engine.gradient_accumulation_steps() * self.topo.dp_size)
        self.loss.sums.zero_()
        self.engine.train_batch(iter(self._batches(micro)))
        return self.loss.sums.clone()

    @torch.no_grad()
    def evaluate(self, micro: list) -> torch.Tensor:
        self.loss.alpha, self.loss.normalizer, self.loss.scale = 0.0, 1.0, 1.0
        self.loss.sums.zero_()
        if micro:
            self.engine.eval_batch(iter(self._batches(micro)), compute_loss=True, reduce_output=None,
                                   bcast_loss=False, num_micro_batches=len(micro))
        return self.loss.sums.clone()

    def export(self, out_dir: Path, tokenizer_dir) -> None:
        """One save_pretrained directory from all stages (gathered on the role world's rank 0)."""
        from transformers import AutoModelForCausalLM

        mine = {}
        if self.topo.dp_rank == 0:
            for idx, layer in zip(range(self.engine.module._local_start, self.engine.module._local_stop),
                                  self.engine.module.forward_funcs):
                prefix = self._names[idx]
                for name, p in layer.named_parameters():
                    if prefix is None:  # NormHeadPipe: norm.weight -> model.norm.weight, lm_head.weight
                        key = "model." + name if name.startswith("norm.") else name
                    elif idx == 0:
                        key = prefix + name
                    else:
                        key = prefix + name.removeprefix("layer.")
                    mine[key] = p.detach().to("cpu", torch.float32).clone()
            parts = [None] * self.topo.stages if self.topo.is_logger else None
            dist.gather_object(mine, parts, dst=0, group=self.topo.pipe_group)
            if self.topo.is_logger:
                state = {k: v for part in parts for k, v in part.items()}
                model = AutoModelForCausalLM.from_config(self.conf)
                model.load_state_dict(state)
                out_dir.mkdir(parents=True, exist_ok=True)
                model.save_pretrained(str(out_dir), safe_serialization=True)
                from pd_dist.data import load_tokenizer

                load_tokenizer(tokenizer_dir).save_pretrained(str(out_dir))
                (out_dir / "pd_dist_pipeline.json").write_text(json.dumps(
                    {"stages": self.topo.stages, "layers": len(self._names)}) + "\n")
        self.topo.barrier()
