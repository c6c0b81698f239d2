"""A teacher replica as a forward-only DeepSpeed pipeline (teacher.pipeline_stages > 1): the student's
layer specs (pd_dist.pipeline_layers) with no loss and no optimizer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from pd_dist.cluster.topology import Topology
from pd_dist.core.logits import SignalSpec
from pd_dist.pipeline_layers import LayerWeights, hf_config, pipeline_module
from pd_dist.teacher.inference import sparse_logits_from_hidden


@dataclass
class _Head:
    """Where the last stage's LM head is handed (NormHeadPipe sets it), and the chunk its products use."""
    chunk_size: int
    head: Optional[nn.Linear] = None


class TeacherPipeline:
    """A teacher replica as a forward-only DeepSpeed pipeline on the teacher world (teacher.pipeline_stages
    > 1): the same layer specs as the student's, no loss, no optimizer; `__call__(micro_batches, n)` runs
    n micro-batches through it (teacher.server.StagedTeacherServer's forward) and, on the last stage, forms
    each output into ``signal`` (top-p-k truncation) with the head weight that lives there.
    ``document_eos``: data.document_mask's EOS id (pd_dist.pipeline_layers)."""

    def __init__(self, weights_cfg, topo: Topology, vocab_size: int, micro_batch: int, dtype: torch.dtype,
                 signal: SignalSpec, chunk_size: int, seed: int, document_eos: Optional[int] = None):
        import deepspeed

        if not isinstance(signal, SignalSpec) or signal.drawn:
            raise ValueError(f"TeacherPipeline: signal must be an undrawn SignalSpec (a drawn one needs sample "
                             f"ids, which a pipeline's micro-batches do not carry), got {signal!r}")

        conf = hf_config(weights_cfg, vocab_size)
        if getattr(conf, "tie_word_embeddings", False):
            raise ValueError("teacher.pipeline_stages > 1 needs a teacher with an untied LM head")
        self.holder = _Head(chunk_size)  # the last stage's LM head lands here
        module = pipeline_module(conf, LayerWeights(seed, conf.initializer_range, weights_cfg.path), self.holder,
                                 topo.dp_size, topo.stages, document_eos=document_eos)
        module.requires_grad_(False)
        ds = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "bf16": {"enabled": dtype == torch.bfloat16}, "steps_per_print": 10 ** 9}
        self.engine, _, _, _ = deepspeed.initialize(model=module, config=ds)
        self.engine.eval()
        self.signal = signal
        self.truncate = lambda h: sparse_logits_from_hidden(h, self.holder.head.weight, signal, chunk_size)
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
