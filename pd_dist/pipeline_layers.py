"""A Llama-family causal LM as DeepSpeed pipeline layers, for the pipelined student
(pd_dist.train.pipeline) and the pipelined teacher (pd_dist.teacher.pipelined): embedding, each decoder
layer, final norm + LM head. Each layer draws its weights by its Hugging Face name (models.init_weights)
or reads them from a save_pretrained directory, so a stage builds only its own layers."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from pd_dist.models import ModelConfig, init_weights, load_weights, preset_config


def hf_config(model: ModelConfig, vocab_size: int):
    if model.path:
        from transformers import AutoConfig

        conf = AutoConfig.from_pretrained(model.path, local_files_only=True)
        if conf.vocab_size != vocab_size:
            raise ValueError(f"model at {model.path} has vocab_size {conf.vocab_size} but the run's "
                             f"tokenizer has {vocab_size}")
        conf._attn_implementation = "sdpa"
        return conf
    return preset_config(model, vocab_size)


class LayerWeights:
    """Where a layer's initial weights come from: a seeded draw by name, or a save_pretrained dir."""

    def __init__(self, seed: int, std: float, path: Optional[str]):
        self.seed, self.std, self.path = seed, std, path

    def fill(self, module: nn.Module, prefix: str) -> None:
        if self.path is None:
            init_weights(module, self.seed, self.std, prefix=prefix)
            return
        load_weights(module, self.path, prefix=prefix)


class EmbeddingPipe(nn.Module):
    def __init__(self, conf, weights: LayerWeights):
        super().__init__()
        self.embed_tokens = nn.Embedding(conf.vocab_size, conf.hidden_size)
        weights.fill(self, "model.")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class DecoderPipe(nn.Module):
    """One Llama decoder layer, with its rotary embedding and causal mask computed locally (each stage
    rebuilds what the HF model computes once for all layers: the same function of the positions)."""

    def __init__(self, conf, index: int, weights: LayerWeights):
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
    """Final norm (its output travels on) and the LM head, handed to ``holder.head``: the fused loss (a
    student) or the top-p-k truncation (a teacher) multiplies by its weight in chunks, never this module."""

    def __init__(self, conf, weights: LayerWeights, holder):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.norm = LlamaRMSNorm(conf.hidden_size, eps=conf.rms_norm_eps)
        self.lm_head = nn.Linear(conf.hidden_size, conf.vocab_size, bias=False)
        weights.fill(self.norm, "model.norm.")
        weights.fill(self.lm_head, "lm_head.")
        holder.head = self.lm_head  # the loss (student) or the truncation (teacher) uses it

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


def pipeline_module(conf, weights: LayerWeights, holder, dp_size: int, stages: int, loss_fn=None):
    """The PipelineModule of this model over a (data, pipe) grid, pipe axis fastest; decoder layers are
    spread evenly over the stages (the embedding goes with the first, norm and head with the last)."""
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.topology import ProcessTopology

    specs = [LayerSpec(EmbeddingPipe, conf, weights)]
    specs += [LayerSpec(DecoderPipe, conf, i, weights) for i in range(conf.num_hidden_layers)]
    specs += [LayerSpec(NormHeadPipe, conf, weights, holder)]
    return PipelineModule(layers=specs, loss_fn=loss_fn, partition_method="type:DecoderPipe",
                          topology=ProcessTopology(axes=["data", "pipe"], dims=[dp_size, stages]))
