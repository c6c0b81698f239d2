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
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks()))


def local_ranks() -> int:
    """How many ranks the launcher started on this host (1 outside a launcher)."""
    local = int(next((os.environ[k] for k in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                                              "MPI_LOCALNRANKS") if k in os.environ), "1"))
    return max(local, 1)


class StopSignals:
    """SIGUSR1 (the warning Slurm sends before a time limit or preemption: `--signal=B:USR1@<s>`) and
    SIGTERM ask a run to stop cleanly: the trainer finishes its step, agrees with the other ranks, saves
    a checkpoint and returns; a requeued or resubmitted job then resumes from it. A second SIGTERM ends
    the process at once (the default action), for a user who means it."""

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM")):
        import signal
        import threading

        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread; nothing to stop then
        for name in signals:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        import signal

        name = signal.Signals(signum).name
        if self.received and signum == signal.SIGTERM:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = self.received or name
        print(f"pd-dist: {name} received: stopping after this step with a checkpoint", flush=True)

    def restore(self) -> None:
        import signal

        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}
