"""Metrics: namespaced TensorBoard scalars and console progress lines, written by one rank only."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Optional


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds + 0.5)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Monitor:
    """TensorBoard + console on the logging rank; every call is a no-op on other ranks."""

    def __init__(self, enabled: bool, tb_dir: Optional[Path], stream=None, prefix: str = ""):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.prefix = prefix
        self.writer = None
        if enabled and tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(tb_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(tag, float(value), step)

    def print(self, text: str) -> None:
        if self.enabled:
            print(f"{self.prefix}{text}", file=self.stream, flush=True)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class StepTimer:
    """Wall time per step and an ETA from the mean of the steps timed so far (first step excluded:
    it carries one-off start-up costs)."""

    def __init__(self):
        self.t_last = time.perf_counter()
        self.times: list[float] = []

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t_last = now - self.t_last, now
        self.times.append(dt)
        return dt

    def reset(self) -> None:
        self.t_last = time.perf_counter()

    def eta(self, steps_left: int) -> float:
        recent = self.times[1:][-50:] or self.times
        return steps_left * (sum(recent) / len(recent)) if recent else float("nan")
