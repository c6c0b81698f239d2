"""One-GPU benchmark: student throughput and MFU for LM-only, offline, colocated and online PD, and truncation speed.

On one CUDA GPU, bf16: a pd-1.9b-shaped student (seq 2048, micro-batch 4) and a twice larger teacher
(pd-3.8b's shape, random weights saved with save_pretrained: throughput does not depend on what the
teacher knows), on the embedded corpus tokenized with an 8192-token BPE. Each arm is the real entry
point started as its own job (`launch/pretrain_pd.py`, RANK/WORLD_SIZE/LOCAL_RANK set as torchrun
would), and its student tokens/s is the median of its per-step rates (TensorBoard) after the first
quarter of its steps:

- `lm_only`: distill.mode none;
- `offline`: the store generated first (`launch/generate_logits.py`, not timed), then trained from;
- `colocated`: the teacher's forward in the student's process;
- `online`: two processes on the same GPU (both LOCAL_RANK 0): rank 0 serves the teacher, rank 1
  trains; their role worlds are separate communicators, so one GPU hosts both.

MFU = tokens/s x (6 N + 12 L H S) / peak bf16 FLOP/s, with N the student's parameters less its input
embedding (the PaLM appendix's count). `truncate_hbm_frac`: top-0.95-50 truncation of bf16
[1024, 151552] logits chunks (the paper's vocabulary) timed on the GPU, against the time to read them
once at the card's HBM bandwidth. Peaks come from the card's name (H200, H100, A100, L40S) or
--peak-tflops / --hbm-gbps. Goals: MFU >= 0.40, offline_over_lm >= 0.97, truncate_hbm_frac >= 0.5.

Without CUDA it says so in one line and exits 0, unless --tiny: the same jobs on tiny shapes on the
CPU (tests run this), whose MFU and HBM fractions are against nominal peaks and mean nothing.
Last line: one JSON object.

    python bench/gpu.py              # on a GPU machine: ~10 minutes
    python bench/gpu.py --tiny       # the logic on CPU, ~2 minutes
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, log  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Dense bf16 tensor-core FLOP/s and HBM bytes/s by card (vendor data sheets; SXM parts).
CARDS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12), "L40S": (362e12, 0.864e12)}
FULL = dict(student="pd-1.9b", teacher="pd-3.8b", seq=2048, micro=4, steps=20, vocab=8192, precision="bf16",
            max_chars=6_000_000, trunc_rows=1024, trunc_vocab=151552, trunc_iters=50)
TINY = dict(student="tiny-student", teacher="tiny-teacher", seq=64, micro=4, steps=6, vocab=512, precision="fp32",
            max_chars=300_000, trunc_rows=256, trunc_vocab=4096, trunc_iters=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(script: str, cfg: Path, overrides: list[str], nprocs: int = 1) -> None:
    """One job: nprocs processes of launch/<script>, all on LOCAL_RANK 0 (one device)."""
    port = _free_port()
    procs = []
    for rank in range(nprocs):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, str(REPO / "launch" / script), "--config", str(cfg)]
        for o in overrides:
            cmd += ["--set", o]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate()[0] for p in procs]
    for p, out in zip(procs, outs):
        if p.returncode:
            raise SystemExit(f"{script} {' '.join(overrides)} failed ({p.returncode}):\n"
                             + "\n".join(out.splitlines()[-30:]))


def _config(work: Path, s: dict) -> Path:
    import yaml

    cfg = {"output_dir": str(work / "unused"),
           "data": {"source": "embedded", "max_chars": s["max_chars"], "vocab_size": s["vocab"],
                    "seq_len": s["seq"], "val_samples": 8, "dir": str(work / "data")},
           "model": {"preset": s["student"]}, "teacher": {"path": str(work / "teacher")},
           "train": {"steps": s["steps"], "global_batch_size": s["micro"], "micro_batch_size": s["micro"],
                     "zero_stage": 1, "precision": s["precision"], "log_every": max(1, s["steps"] // 4),
                     "eval_every": 0, "save_every": 0},
           "optim": {"warmup_steps": 2},
           "distill": {"mode": "colocated", "store": str(work / "store"), "top_p": 0.95, "top_k": 50,
                       "loss": "nll", "alpha": {"schedule": "constant", "value": 0.5}},
           "generate": {"micro_batch_size": s["micro"]},
           "topology": {"peer_timeout_s": 600}, "baseline": False}
    path = work / "gpu_bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _teacher(work: Path, s: dict) -> None:
    """A random teacher of the teacher's shape at the run's vocabulary, saved as a local HF model."""
    from pd_dist.data import load_tokenizer
    from pd_dist.models import ModelConfig, build_model

    if (work / "teacher" / "config.json").is_file():
        return
    vocab = len(load_tokenizer(work / "data" / "tokenizer"))
    build_model(ModelConfig(preset=s["teacher"]), vocab, seed=0).save_pretrained(str(work / "teacher"))


def _tokens_per_sec(out: Path) -> float:
    """Median of the run's per-step perf/tokens_per_sec (TensorBoard) over its steps after the first
    quarter: warm-up (allocator, kernel selection, the online prefetch filling) is left out."""
    import statistics

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    rates = [e.value for e in acc.Scalars("perf/tokens_per_sec")]
    if len(rates) < 2:
        raise SystemExit(f"{out}/tensorboard has {len(rates)} perf/tokens_per_sec points")
    return statistics.median(rates[len(rates) // 4:])


def _flops_per_token(s: dict, vocab: int) -> float:
    from pd_dist.models import PRESETS, preset_param_count

    hidden, _, layers, *_ = PRESETS[s["student"]]
    n = preset_param_count(s["student"], vocab) - vocab * hidden  # less the input embedding
    return 6 * n + 12 * layers * hidden * s["seq"]


def _truncate_seconds(s: dict, device: str) -> tuple[float, int]:
    import torch
    from pd_dist.core.logits import truncate

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = (torch.randn(s["trunc_rows"], s["trunc_vocab"], device=device) * 3).to(dtype)
    for _ in range(3):
        truncate(x, 0.95, 50)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(s["trunc_iters"]):
        truncate(x, 0.95, 50)
    sync()
    return (time.perf_counter() - t0) / s["trunc_iters"], x.numel() * x.element_size()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="run the logic on tiny shapes on the CPU")
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_gpu"))
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak (default: from the card)")
    ap.add_argument("--hbm-gbps", type=float, default=None, help="HBM bandwidth in GB/s (default: from the card)")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("bench/gpu.py: no CUDA device here; nothing measured (--tiny runs its logic on the CPU)")
        return 0
    s = dict(TINY if args.tiny else FULL)
    name = torch.cuda.get_device_name(0) if cuda and not args.tiny else "cpu (tiny, nominal peaks)"
    card = next((v for k, v in CARDS.items() if k in name), None)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (card[0] if card and not args.tiny else 1e12)
    hbm = args.hbm_gbps * 1e9 if args.hbm_gbps else (card[1] if card and not args.tiny else 1e11)
    if cuda and not args.tiny and card is None and not (args.peak_tflops and args.hbm_gbps):
        raise SystemExit(f"unknown card {name!r}: give --peak-tflops and --hbm-gbps")
    work = Path(args.work) / ("tiny" if args.tiny else "full")
    work.mkdir(parents=True, exist_ok=True)
    cfg = _config(work, s)
    t0 = time.perf_counter()
    log(f"[gpu bench] {name}: preparing data and a random {s['teacher']} teacher in {work}")
    from pd_dist.config import load_config
    from pd_dist.data import prepare_data

    prepare_data(load_config(str(cfg), []).data, work / "data", log=log)
    _teacher(work, s)
    from pd_dist.data import load_tokenizer

    vocab = len(load_tokenizer(work / "data" / "tokenizer"))
    rates = {}
    arms = [("lm_only", ["distill.mode=none"], 1), ("colocated", ["distill.mode=colocated"], 1),
            ("offline", ["distill.mode=offline"], 1), ("online", ["distill.mode=online"], 2)]
    for arm, extra, nprocs in arms:
        out = work / arm
        if not (out / "summary.json").is_file():
            if arm == "offline" and not (work / "store" / "manifest.json").is_file():
                log("[gpu bench] generating the offline store (not timed)")
                _run("generate_logits.py", cfg, [*extra, f"output_dir={out}"])
            log(f"[gpu bench] {arm}: {s['steps']} steps")
            _run("pretrain_pd.py", cfg, [*extra, f"output_dir={out}"], nprocs)
        rates[arm] = _tokens_per_sec(out)
        log(f"[gpu bench] {arm}: {rates[arm]:,.0f} student tokens/s")
    flops = _flops_per_token(s, vocab)
    sec, nbytes = _truncate_seconds(s, "cuda" if cuda and not args.tiny else "cpu")
    emit({"device": name, "tiny": args.tiny, "student": s["student"], "teacher": s["teacher"], "seq": s["seq"],
          "micro_batch": s["micro"], "vocab": vocab, "tokens_per_sec": rates,
          "mfu_lm_only": rates["lm_only"] * flops / peak,
          "offline_over_lm": rates["offline"] / rates["lm_only"],
          "colocated_over_lm": rates["colocated"] / rates["lm_only"],
          "online_over_lm": rates["online"] / rates["lm_only"],
          "truncate_hbm_frac": (nbytes / hbm) / sec, "truncate_gbps": nbytes / sec / 1e9,
          "peak_tflops": peak / 1e12, "hbm_gbps": hbm / 1e9, "wall_s": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
