"""Shared benchmark helpers: JSON result line, progress logging, peak-RSS measurement.

Peak memory is measured from the kernel's per-process RSS high-water mark (VmHWM in
/proc/self/status). Writing "5" to /proc/self/clear_refs resets VmHWM to the current RSS, so a
worker can allocate its inputs, reset the mark, run the measured code and read how far RSS rose
above that baseline. RSS counts every page actually touched; glibc serves large blocks (>= 32 MiB at the latest)
with mmap and unmaps them on free, so freed [N, V]-sized temporaries do not linger in RSS. Where clear_refs is not writable we
fall back to getrusage's ru_maxrss, which is only honest when nothing before the baseline peaked
higher; workers therefore build their inputs without large temporaries.
"""
from __future__ import annotations

import json
import resource
import sys
import time


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(result: dict) -> None:
    """Print the single JSON result line (last line of stdout)."""
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=True), flush=True)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is None:
        raise RuntimeError("cannot read VmRSS from /proc/self/status")
    return kib * 1024


def reset_peak() -> str:
    """Reset the RSS high-water mark to the current RSS. Returns the method used for peak_bytes()."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


def peak_bytes(method: str) -> int:
    if method == "VmHWM":
        kib = _status_kib("VmHWM")
        if kib is not None:
            return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def launch_entry(script: str, overrides: list[str], cwd) -> str:
    """One rank of the real entry point launch/<script> through the deepspeed launcher, with ``--set``
    overrides; its output, or SystemExit with the tail of its log when it fails."""
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    exe = Path(sys.executable).parent / "deepspeed"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd += ["--num_gpus", "1", str(repo / "launch" / script)]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit("launch failed:\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-40:]))
    return proc.stdout + proc.stderr


def default_teacher(default_dir):
    """The embedded default run's teacher (``<default_dir>/teacher/export``), pre-trained by running the
    default first when missing."""
    from pathlib import Path

    teacher = Path(default_dir) / "teacher" / "export"
    if not (teacher / "config.json").is_file():
        log(f"no teacher in {teacher}: running the default first (it pre-trains and caches the teacher)")
        launch_entry("pretrain_pd.py", [f"output_dir={default_dir}"], cwd=Path(__file__).resolve().parent.parent)
    return teacher
