"""The student as a DeepSpeed pipeline (train.pipeline_stages > 1): layer specs of a Llama-family
causal LM, with the fused LM + KD loss on the last stage.

Layers: embedding, each decoder layer, final norm + LM head. DeepSpeed's PipelineModule builds only
the layers of this rank's stage (partitioned so decoder layers spread evenly; the embedding goes with
the first stage, norm and head with the last); each layer draws its weights by its Hugging Face name
(models.init_weights) or reads them from a save_pretrained directory, so a stage never materializes
the whole model and every layout starts from the same weights as a data-parallel run.

The pipeline topology puts the pipe axis fastest (student-world rank r: data-parallel rank r // P,
stage r % P), the layout pd_dist.layout prints. Only the last stage computes the loss, so only it asks
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

from .config import ExperimentConfig, deepspeed_config
from .logits import SparseLogits
from .losses import fused_pd_loss
from .models import ModelConfig, check_same_tokenizer, init_weights, load_weights, preset_config
from .student import param_groups
from .topology import Topology


def _hf_config(model: ModelConfig, vocab_size: int):
    if model.path:
        from transformers import AutoConfig

        conf = AutoConfig.from_pretrained(model.path, local_files_only=True)
        if conf.vocab_size != vocab_size:
            raise ValueError(f"model at {model.path} has vocab_size {conf.vocab_size} but the run's "
                             f"tokenizer has {vocab_size}")
        conf._attn_implementation = "sdpa"
        return conf
    return preset_config(model, vocab_size)


class _Weights:
    """Where a layer's initial weights come from: a seeded draw by name, or a save_pretrained dir."""

    def __init__(self, seed: int, std: float, path: Optional[str]):
        self.seed, self.std, self.path = seed, std, path

    def fill(self, module: nn.Module, prefix: str) -> None:
        if self.path is None:
            init_weights(module, self.seed, self.std, prefix=prefix)
            return
        load_weights(module, self.path, prefix=prefix)


class EmbeddingPipe(nn.Module):
    def __init__(self, conf, weights: _Weights):
        super().__init__()
        self.embed_tokens = nn.Embedding(conf.vocab_size, conf.hidden_size)
        weights.fill(self, "model.")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class DecoderPipe(nn.Module):
    """One Llama decoder layer, with its rotary embedding and causal mask computed locally (each stage
    rebuilds what the HF model computes once for all layers: the same function of the positions)."""

    def __init__(self, conf, index: int, weights: _Weights):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        self.conf = conf
        self.layer = LlamaDecoderLayer(conf, index)
        self.rotary = LlamaRotaryEmbedding(config=conf)
        weights.fill(self.layer, f"model.layers.{index}.")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.conf, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=pos)
        return self.layer(hidden, attention_mask=mask, position_ids=pos,
                          position_embeddings=self.rotary(hidden, position_ids=pos))


class NormHeadPipe(nn.Module):
    """Final norm (its output travels to the loss) and the LM head, whose weight the fused loss uses."""

    def __init__(self, conf, weights: _Weights, loss: "PipelineLoss"):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.norm = LlamaRMSNorm(conf.hidden_size, eps=conf.rms_norm_eps)
        self.lm_head = nn.Linear(conf.hidden_size, conf.vocab_size, bias=False)
        weights.fill(self.norm, "model.norm.")
        weights.fill(self.lm_head, "lm_head.")
        loss.head = self.lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


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

    def __init__(self, cfg: ExperimentConfig, topo: Topology, vocab_size: int, tokenizer_dir, bf16: bool):
        import deepspeed
        from deepspeed.pipe import LayerSpec, PipelineModule
        from deepspeed.runtime.pipe.topology import ProcessTopology

        self.cfg, self.topo = cfg, topo
        conf = _hf_config(cfg.model, vocab_size)
        if getattr(conf, "tie_word_embeddings", False):
            raise ValueError("train.pipeline_stages > 1 needs an untied LM head: this student ties it to the "
                             "embedding (e.g. pd-330m); train it data-parallel")
        if cfg.model.path:
            check_same_tokenizer(cfg.model.path, tokenizer_dir, "the student")
        self.conf = conf
        weights = _Weights(cfg.train.seed, conf.initializer_range, cfg.model.path)
        self.loss = PipelineLoss(cfg.distill.loss, cfg.distill.loss_temperature, cfg.train.loss_chunk_size)
        specs = [LayerSpec(EmbeddingPipe, conf, weights)]
        specs += [LayerSpec(DecoderPipe, conf, i, weights) for i in range(conf.num_hidden_layers)]
        specs += [LayerSpec(NormHeadPipe, conf, weights, self.loss)]
        P = topo.stages
        module = PipelineModule(layers=specs, loss_fn=self.loss, partition_method="type:DecoderPipe",
                                topology=ProcessTopology(axes=["data", "pipe"], dims=[topo.dp_size, P]))
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
        for _ids, inp, tgt, teacher in micro:
            labels = (tgt,) if teacher is None else (tgt, teacher.indices, teacher.values)
            yield inp, labels

    def train(self, micro, alpha: float, normalizer: float, own_sink=None) -> torch.Tensor:
        """One optimizer step over `micro` (an iterable of (ids, input_ids, targets, teacher or None),
        produced lazily: only the first and last stage draw from it). Returns [lm, kd, tokens, top-1]
        sums, on the last stage (zeros elsewhere: see share). (own_sink: dump_logits, refused with
        pipelines by the config.)"""
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
                from .data import load_tokenizer

                load_tokenizer(tokenizer_dir).save_pretrained(str(out_dir))
                (out_dir / "pd_dist_pipeline.json").write_text(json.dumps(
                    {"stages": self.topo.stages, "layers": len(self._names)}) + "\n")
        self.topo.barrier()


class TeacherPipeline:
    """A teacher replica as a forward-only DeepSpeed pipeline on the teacher world (teacher.pipeline_stages
    > 1): the same layer specs as the student's, no loss, no optimizer; `__call__(micro_batches, n)` runs
    n micro-batches through it (online.StagedTeacherServer's forward) and, on the last stage, truncates
    each output to top-p-k with the head weight that lives there."""

    def __init__(self, weights_cfg, topo: Topology, vocab_size: int, micro_batch: int, dtype: torch.dtype,
                 top_p: float, top_k: int, chunk_size: int, seed: int):
        import deepspeed
        from deepspeed.pipe import LayerSpec, PipelineModule
        from deepspeed.runtime.pipe.topology import ProcessTopology

        from .inference import sparse_logits_from_hidden

        conf = _hf_config(weights_cfg, vocab_size)
        if getattr(conf, "tie_word_embeddings", False):
            raise ValueError("teacher.pipeline_stages > 1 needs a teacher with an untied LM head")
        weights = _Weights(seed, conf.initializer_range, weights_cfg.path)
        self.holder = PipelineLoss("nll", 1.0, chunk_size)  # only its .head is used: the last stage's LM head
        specs = [LayerSpec(EmbeddingPipe, conf, weights)]
        specs += [LayerSpec(DecoderPipe, conf, i, weights) for i in range(conf.num_hidden_layers)]
        specs += [LayerSpec(NormHeadPipe, conf, weights, self.holder)]
        module = PipelineModule(layers=specs, loss_fn=None, partition_method="type:DecoderPipe",
                                topology=ProcessTopology(axes=["data", "pipe"], dims=[topo.dp_size, topo.stages]))
        module.requires_grad_(False)
        ds = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "bf16": {"enabled": dtype == torch.bfloat16}, "steps_per_print": 10 ** 9}
        self.engine, _, _, _ = deepspeed.initialize(model=module, config=ds)
        self.engine.eval()
        self.truncate = lambda h: sparse_logits_from_hidden(h, self.holder.head.weight, top_p, top_k, chunk_size)
        self.micro_batch, self.seq_label = micro_batch, None

    @torch.no_grad()
    def val_loss(self, data) -> Optional[float]:
        """Mean next-token cross-entropy over the held-out samples (on the last stage; None elsewhere).
        Every stage of every replica must call it: the pipeline runs it as one batch."""
        val = data.val_ids()
        windows = [torch.from_numpy(data.batch(val[s:s + self.micro_batch])) for s in range(0, len(val),
                                                                                             self.micro_batch)]
        padded = []
        for w in windows:
            t = torch.zeros(self.micro_batch, w.shape[1] - 1, dtype=torch.int64)
            t[:len(w)] = w[:, :-1]
            padded.append(t)
        outs = self.engine.eval_batch(iter([(t, torch.zeros(1, dtype=torch.int64)) for t in padded]),
                                      compute_loss=False, reduce_output=None, bcast_loss=False,
                                      num_micro_batches=len(padded))
        if not self.engine.is_last_stage():
            return None
        total, count = 0.0, 0
        w_head = self.holder.head.weight
        for h, w in zip(outs, windows):
            hidden = h[:len(w)].flatten(0, 1)
            targets = w[:, 1:].flatten().to(hidden.device)
            for s in range(0, hidden.shape[0], self.holder.chunk_size):
                z = (hidden[s:s + self.holder.chunk_size] @ w_head.T).float()
                total += torch.nn.functional.cross_entropy(z, targets[s:s + self.holder.chunk_size],
                                                           reduction="sum").item()
            count += targets.numel()
        return total / count

    @torch.no_grad()
    def __call__(self, micro_batches, n: int):
        if self.seq_label is None:
            self.seq_label = torch.zeros(1, dtype=torch.int64)
        items = [((micro_batches[i] if micro_batches is not None else self.seq_label), self.seq_label)
                 for i in range(n)]
        outs = self.engine.eval_batch(iter(items), compute_loss=False, reduce_output=None, bcast_loss=False,
                                      num_micro_batches=n)
        if not self.engine.is_last_stage():
            return None
        return [self.truncate(h) for h in outs]
