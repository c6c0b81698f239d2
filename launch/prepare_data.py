"""Data preparation entry point: `deepspeed launch/prepare_data.py --config F [--set k=v]` (every rank
tokenizes its share of the shards; also under srun, mpirun or torchrun)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pd_dist.cli import data_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(data_main(["prepare", *sys.argv[1:]]))
