"""Script files a launcher starts by path (deepspeed, srun, mpirun, torchrun), installed with the package.

`pd-dist sweep` starts these, so a sweep works from a wheel install as well as from a checkout; the
checkout's launch/*.py call the same functions. `entry_script("pretrain_pd")` is the path of one."""
from __future__ import annotations

from pathlib import Path

ENTRY_DIR = Path(__file__).resolve().parent


def entry_script(name: str) -> Path:
    """The installed file of entry point `name` (pretrain_pd, generate_logits, prepare_data)."""
    path = ENTRY_DIR / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no entry script {name!r} in {ENTRY_DIR}")
    return path
