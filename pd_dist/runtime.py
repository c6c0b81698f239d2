"""Process-level facts every layer asks for: the compute device, the training dtype, CPU threads."""
from __future__ import annotations

import os

import torch


def device() -> torch.device:
    """This rank's accelerator (the CPU when there is none), as DeepSpeed's accelerator sees it."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def use_bf16(precision: str) -> bool:
    """train.precision: auto means bf16 on CUDA and fp32 elsewhere."""
    if precision == "auto":
        return torch.cuda.is_available()
    return precision == "bf16"


def model_dtype(precision: str) -> torch.dtype:
    """The dtype frozen models (teachers) run in under train.precision."""
    return torch.bfloat16 if use_bf16(precision) else torch.float32


def set_threads(threads: int) -> None:
    """train.threads, or on CPU the host's cores shared by the ranks on it (no oversubscription)."""
    if threads:
        torch.set_num_threads(threads)
    elif not torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
