"""Pre-training distillation entry point, started by path by a launcher:
`deepspeed <this file> --config F [--set k=v]` (also srun, mpirun or torchrun)."""
import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, sys.path[0] is this folder inside the package; the folder holding pd_dist is
    # what imports need (a checkout used without installing, too).
    sys.path[0] = str(Path(__file__).resolve().parents[2])
    from pd_dist.cli import train_main

    sys.exit(train_main())
