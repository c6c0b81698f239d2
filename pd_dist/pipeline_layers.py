"""A Llama-family causal LM as DeepSpeed pipeline layers, for the pipelined student
(pd_dist.train.pipeline) and the pipelined teacher (pd_dist.teacher.pipelined): embedding, each decoder
layer, final norm + LM head. Each layer draws its weights by its Hugging Face name (models.init_weights)
or reads them from a save_pretrained directory, so a stage builds only its own layers.

With data.document_mask the activations between layers are (hidden states, position ids): the embedding
computes each token's position within its document from the token ids (models.document_position_ids)
and every decoder layer rebuilds the block-diagonal causal mask from those positions (a document starts
where its position is 0), so the document structure reaches every stage at the cost of one int64 per
token, not a [T, T] mask per micro-batch and not the token ids (which would need the EOS id on every
stage). Without it the activations are the hidden states alone, as before."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from pd_dist.models import (ModelConfig, attention_mask_for, document_causal_mask, document_position_ids,
                            init_weights, load_weights, preset_config)


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
    """The token embedding; with ``document_eos`` (data.document_mask) it also gives each token's
    position within its document: the activations become (hidden, position ids)."""

    def __init__(self, conf, weights: LayerWeights, document_eos: Optional[int] = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(conf.vocab_size, conf.hidden_size)
        self.document_eos = document_eos
        weights.fill(self, "model.")

    def forward(self, input_ids: torch.Tensor):
        hidden = self.embed_tokens(input_ids)
        if self.document_eos is None:
            return hidden
        return hidden, document_position_ids(input_ids, self.document_eos)


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

    def forward(self, x):
        from transformers.masking_utils import create_causal_mask

        if isinstance(x, (tuple, list)):  # data.document_mask: (hidden, document position ids)
            hidden, pos = x
            mask = attention_mask_for(self.conf, document_causal_mask(pos), hidden.dtype)
            return self.layer(hidden, attention_mask=mask, position_ids=pos,
                              position_embeddings=self.rotary(hidden, position_ids=pos)), pos
        hidden = x
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

    def forward(self, x) -> torch.Tensor:
        return self.norm(x[0] if isinstance(x, (tuple, list)) else x)


def pipeline_module(conf, weights: LayerWeights, holder, dp_size: int, stages: int, loss_fn=None,
                    document_eos: Optional[int] = None):
    """The PipelineModule of this model over a (data, pipe) grid, pipe axis fastest; decoder layers are
    spread evenly over the stages (the embedding goes with the first, norm and head with the last).
    ``document_eos``: the EOS id when data.document_mask is on (see the module's doc)."""
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.topology import ProcessTopology

    specs = [LayerSpec(EmbeddingPipe, conf, weights, document_eos)]
    specs += [LayerSpec(DecoderPipe, conf, i, weights) for i in range(conf.num_hidden_layers)]
    specs += [LayerSpec(NormHeadPipe, conf, weights, holder)]
    return PipelineModule(layers=specs, loss_fn=loss_fn, partition_method="type:DecoderPipe",
                          topology=ProcessTopology(axes=["data", "pipe"], dims=[dp_size, stages]))
