"""Step hooks: what a run does beside training, at each step, without the trainer knowing what it is.

The orchestration (pd_dist.run) builds the hooks and hands them to the Trainer, which calls every hook
the same way:

- ``on_step(step)`` before the step's micro-batches run (``step`` counts from 0);
- ``on_micro_batch(ids, output)`` after each micro-batch's forward, before its backward: ``ids`` are
  the micro-batch's sample ids, ``output`` its :class:`pd_dist.train.student.StudentOutput`, whose
  ``head_output`` is what this hook's ``head_output`` callable made of the forward's hidden states (None
  when the hook has none);
- ``close(finished)`` once, when the trainer is closed (after the export; ``finished``: the run
  trained to its last step), whatever happened before: the hook completes or releases what it holds.

``head_output``: None, or ``fn(hidden [B, T, H], head_weight [V, H])`` run inside the student's forward
without grad (where ZeRO-3 has the LM head's weight gathered), for a hook that needs something of the
student's own logits; the student gets the callable and never imports what computes it.

Hooks that see micro-batches need a data-parallel student (train.pipeline_stages == 1): a pipeline's
stages never hold a whole micro-batch's output. The one hook today is distill.dump_logits
(pd_dist.teacher.stores.LogitsDump).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch


class StepHook(Protocol):
    """The interface the trainer calls (see the module docstring); hooks implement it by shape, so a
    lower layer's class (which cannot import this one) can be one."""
    head_output: Optional[Callable[[torch.Tensor, torch.Tensor], Any]]

    def on_step(self, step: int) -> None: ...

    def on_micro_batch(self, ids: np.ndarray, output: Any) -> None: ...

    def close(self, finished: bool) -> None: ...
