"""Pre-training distillation entry point: `deepspeed launch/pretrain_pd.py [--config F] [--set k=v]`."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pd_dist.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
