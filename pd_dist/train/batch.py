"""One micro-batch as the students train on it: its sample ids, tokens, targets and teacher signal."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pd_dist.core.logits import SparseLogits


@dataclass
class MicroBatch:
    """A micro-batch on the device: ``ids`` the sample ids (int64 [B], what dump_logits files its own
    logits under), ``input_ids`` and ``targets`` int64 [B, T], and ``teacher`` the teacher's signal
    (SparseLogits [B, T, k]) or None where there is none (LM only, or held-out samples nobody holds a
    signal for)."""
    ids: np.ndarray
    input_ids: torch.Tensor
    targets: torch.Tensor
    teacher: Optional[SparseLogits] = None

    def __post_init__(self):
        if self.input_ids.shape != self.targets.shape:
            raise ValueError(f"MicroBatch: input_ids shape {tuple(self.input_ids.shape)} != targets shape "
                             f"{tuple(self.targets.shape)}")
        if len(self.ids) != self.input_ids.shape[0]:
            raise ValueError(f"MicroBatch: {len(self.ids)} sample ids for {self.input_ids.shape[0]} rows")
        if self.teacher is not None and tuple(self.teacher.shape) != tuple(self.input_ids.shape):
            raise ValueError(f"MicroBatch: teacher signal of leading shape {tuple(self.teacher.shape)} for "
                             f"input_ids of shape {tuple(self.input_ids.shape)}")
