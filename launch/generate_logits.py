"""Offline logits generation entry point: `deepspeed launch/generate_logits.py --config F [--set k=v]`."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pd_dist.cli import generate_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(generate_main())
