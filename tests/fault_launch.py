"""launch/pretrain_pd.py with one fault injected, for the fault tests (tests/test_faults.py).

The faults are patched in here, around the real code, so pd-dist itself carries no test hooks:

  PD_FAULT=kill:RANK:STEP        SIGKILL rank RANK in the middle of step STEP (between its forward and
                                 backward), as the OOM killer or a dead node would
  PD_FAULT=torn:RANK:STEP        rank RANK writes its part of the step-STEP checkpoint, cuts its ZeRO
                                 shard in half (a crash mid-write), waits 2 s and dies
  PD_FAULT=killserve:RANK:N      SIGKILL teacher rank RANK (online mode) as it is about to send its N-th
                                 answer, so its students have requests in flight
  PD_LEDGER=DIR                  every rank appends (step, its sample ids) to DIR/rank<R>.jsonl
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RANK = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))  # srun sets no RANK


def _ledger(directory: str) -> None:
    from pd_dist.data import GlobalBatchSampler as Sampler

    orig = Sampler.micro_batches
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    def recorded(self, step, dp_rank, dp_size, micro_batch):
        mbs = orig(self, step, dp_rank, dp_size, micro_batch)
        with open(out / f"rank{RANK}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "pid": os.getpid(), "ids": [int(i) for m in mbs for i in m]}) + "\n")
        return mbs
    Sampler.micro_batches = recorded


def _kill(rank: int, step: int) -> None:
    import deepspeed.runtime.engine as eng

    orig = eng.DeepSpeedEngine.backward

    def backward(self, *a, **kw):
        if RANK == rank and self.global_steps + 1 == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, *a, **kw)
    eng.DeepSpeedEngine.backward = backward


def _killserve(rank: int, n: int) -> None:
    import pd_dist.teacher.server as online

    orig, sent = online.encode_response, [0]

    def encode(*a, **kw):
        sent[0] += 1
        if RANK == rank and sent[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(*a, **kw)
    online.encode_response = encode


def _torn(rank: int, step: int) -> None:
    import deepspeed.runtime.engine as eng

    orig = eng.DeepSpeedEngine._save_zero_checkpoint

    def save_zero(self, save_path, tag):
        orig(self, save_path, tag)
        if RANK == rank and tag == f"step{step:08d}":
            for f in Path(save_path, tag).glob(f"*zero_pp_rank_{rank}_*optim_states.pt"):
                os.truncate(f, f.stat().st_size // 2)
            time.sleep(2.0)  # the other ranks finish their part meanwhile
            os._exit(9)
    eng.DeepSpeedEngine._save_zero_checkpoint = save_zero


if os.environ.get("PD_LEDGER"):
    _ledger(os.environ["PD_LEDGER"])
fault = os.environ.get("PD_FAULT", "")
if fault:
    kind, r, s = fault.split(":")
    {"kill": _kill, "torn": _torn, "killserve": _killserve}[kind](int(r), int(s))

from pd_dist.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
