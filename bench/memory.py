"""Memory guide: measure a student train step's peak memory at small scale, fit its terms, project layouts.

Measured (CPU, fp32, each point in a fresh subprocess): the peak RSS rise of two optimizer steps of the
student exactly as the engine runs it (`student.PDStudent`: HF Llama body + the fused chunked LM+KD
loss against a top-50 teacher signal; AdamW over `student.param_groups`) for several model shapes and
micro-batch sizes. Fitted by least squares:

    peak = a + b * params + c * tokens * hidden * layers

`b` is bytes per parameter (fp32 weights 4 + gradients 4 + Adam moments 8 = 16 expected), `c` bytes of
saved activations per token per hidden unit per layer, `a` the fixed part (the loss's [chunk, vocab]
buffers, allocator slack). The fit is checked on a held-out shape (`holdout_err`).

Projected (the table in docs/memory.md, `--markdown`): per-rank memory of the paper's students
(330M-6.8B) and of 9B/32B/70B teachers on 80 GB GPUs, bf16 mixed precision, under pd-dist's layouts:

- student, ZeRO stage z over d data-parallel ranks: bf16 weights 2 B, bf16 gradients 2 B, fp32 master
  weights + Adam moments 12 B per parameter, partitioned as ZeRO partitions them (stage 1: the 12 B;
  stage 2: + gradients; stage 3: + weights); a pipeline of s stages holds 1/s of the layers, and its
  first stage keeps up to s micro-batches of activations in flight (1F1B), so activations per rank are
  those of one micro-batch through the whole model;
- activations: the fitted `c`, halved for bf16, linear in sequence length (memory-efficient attention,
  as on GPU; CPU's attention at seq 256 hides no seq^2 term in `c`), plus the loss's fp32
  [chunk, vocab] buffers (3 of them at train.loss_chunk_size 1024);
- teacher (forward only, no optimizer): bf16 weights, 1/N of them per rank under `teacher.zero_stage: 3`
  (plus two gathered decoder layers in flight) or `teacher.pipeline_stages: N`, one layer's
  activations for its batch of requests and the truncation's fp32 [chunk, vocab] buffer.

Last line: one JSON object (fit, hold-out error, and the projected GiB per rank).

    python bench/memory.py               # ~1 minute on 2 cores
    python bench/memory.py --markdown    # also print the docs table
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, log, peak_bytes, reset_peak, rss_bytes  # noqa: E402

# (hidden, ffn, layers, heads, kv_heads) of the measured shapes: ffn/hidden = 3 like the paper's (3.1-4).
# Each shape at a handful of tokens (where parameters dominate) and at 2048 (where activations do), so
# the two terms are not collinear.
FIT_SHAPES = [(128, 384, 2, 4, 2), (256, 768, 4, 8, 2), (384, 1152, 6, 8, 2), (256, 768, 8, 8, 2),
              (512, 1536, 8, 8, 2)]
HOLDOUT_SHAPE = (320, 960, 5, 8, 2)
FIT_TOKENS = [64, 8 * 256]
VOCAB = 4096
GiB = 1024 ** 3

# The paper's vocabulary (GLM-4's tokenizer, shared by student and teacher) and its teachers' shapes:
# GLM-4-9B, a 32B of Qwen2.5-32B's shape and a 70B of Llama-3-70B's shape (hidden, ffn, layers, heads, kv).
PAPER_VOCAB = 151552
TEACHERS = {"9b": (4096, 13696, 40, 32, 2), "32b": (5120, 27648, 64, 40, 8), "70b": (8192, 28672, 80, 64, 8)}
SEQ = 4096
GPU_BYTES = 80 * 10 ** 9


def _worker(shape, tokens: int) -> dict:
    import torch
    from pd_dist import models
    from pd_dist.core.logits import truncate
    from pd_dist.models import ModelConfig, build_model, count_params
    from pd_dist.train.student import PDStudent, param_groups

    torch.manual_seed(0)
    seq = min(tokens, 256)
    batch = tokens // seq
    models.PRESETS["bench-shape"] = (*shape, False)  # this subprocess only
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    tgt = torch.randint(0, VOCAB, (batch, seq), generator=g)
    teacher = truncate(torch.randn(batch * seq, VOCAB, generator=g) * 3, 0.95, 50).reshape(batch, seq)
    base = rss_bytes()
    method = reset_peak()
    model = build_model(ModelConfig(preset="bench-shape"), VOCAB, seed=1)
    module = PDStudent(model, "nll", 1.0, 1024)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    for _ in range(2):  # the second step has Adam's moments allocated
        out = module(ids, tgt, teacher=teacher, alpha=0.5, normalizer=float(tokens))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"params": count_params(model), "tokens": tokens, "hidden": shape[0], "layers": shape[2],
            "peak_bytes": peak_bytes(method) - base, "method": method}


def measure(shape, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps([list(shape), tokens])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"worker {shape} x {tokens} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit(points: list[dict]) -> tuple[float, float, float]:
    import numpy as np

    x = np.array([[1.0, p["params"], p["tokens"] * p["hidden"] * p["layers"]] for p in points])
    y = np.array([p["peak_bytes"] for p in points], dtype=float)
    a, b, c = np.linalg.lstsq(x, y, rcond=None)[0]
    return float(a), float(b), float(c)


def llama_params(hidden: int, ffn: int, layers: int, heads: int, kv: int, vocab: int, tied: bool) -> int:
    head_dim = hidden // heads
    attn = hidden * hidden * 2 + hidden * kv * head_dim * 2  # q, o + k, v
    per_layer = attn + 3 * hidden * ffn + 2 * hidden
    return layers * per_layer + vocab * hidden * (1 if tied else 2) + hidden


def student_gib(shape, zero: int, dp: int, stages: int, micro: int, c_bf16: float) -> float:
    from pd_dist.models import PRESETS

    hidden, ffn, layers, heads, kv, tied = PRESETS[shape]
    p = llama_params(hidden, ffn, layers, heads, kv, PAPER_VOCAB, tied) / stages
    weights, grads, optim = 2 * p, 2 * p, 12 * p
    if zero >= 1:
        optim /= dp
    if zero >= 2:
        grads /= dp
    if zero >= 3:
        weights /= dp
    acts = c_bf16 * micro * SEQ * hidden * layers  # 1F1B: s in-flight micro-batches x 1/s of the layers
    loss_buffers = 3 * 1024 * PAPER_VOCAB * 4
    return (weights + grads + optim + acts + loss_buffers) / GiB


def teacher_gib(shape, zero3: int, stages: int, tokens: int) -> float:
    hidden, ffn, layers, heads, kv = shape
    p = llama_params(hidden, ffn, layers, heads, kv, PAPER_VOCAB, False)
    per_layer = (p - 2 * PAPER_VOCAB * hidden) / layers
    n = max(zero3, stages)
    weights = 2 * p / n + (2 * 2 * per_layer if zero3 > 1 else 0)
    acts = tokens * (4 * hidden + 3 * ffn) * 2
    return (weights + acts + 1024 * PAPER_VOCAB * 4) / GiB


def markdown(c_bf16: float) -> str:
    lines = ["| student | params | 1 GPU, ZeRO-0 | 8 GPUs, ZeRO-1 | 8 GPUs, ZeRO-3 | 2 stages x 4 dp, ZeRO-1 |",
             "|---|---|---|---|---|---|"]
    from pd_dist.models import PRESETS

    for name in ("pd-330m", "pd-670m", "pd-1.9b", "pd-3.8b", "pd-6.8b"):
        h, f, l, hd, kv, tied = PRESETS[name]
        cells = [student_gib(name, 0, 1, 1, 1, c_bf16), student_gib(name, 1, 8, 1, 1, c_bf16),
                 student_gib(name, 3, 8, 1, 1, c_bf16), student_gib(name, 1, 4, 2, 1, c_bf16)]
        p = llama_params(h, f, l, hd, kv, PAPER_VOCAB, tied)
        lines.append(f"| {name} | {p / 1e9:.2f}B | " + " | ".join(_cell(x) for x in cells) + " |")
    lines += ["", "| teacher | params | 1 GPU | ZeRO-3 over 2 | ZeRO-3 over 4 | ZeRO-3 over 8 | 2 stages | 4 stages | 8 stages |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, shape in TEACHERS.items():
        p = llama_params(*shape, PAPER_VOCAB, False)
        cells = [teacher_gib(shape, 1, 1, 4 * SEQ)] + [teacher_gib(shape, n, 1, 4 * SEQ) for n in (2, 4, 8)] \
            + [teacher_gib(shape, 1, n, 4 * SEQ) for n in (2, 4, 8)]
        lines.append(f"| {name} | {p / 1e9:.1f}B | " + " | ".join(_cell(x) for x in cells) + " |")
    return "\n".join(lines)


def _cell(gib: float) -> str:
    return f"{gib:.0f}" + ("" if gib * GiB <= GPU_BYTES else " (no)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--markdown", action="store_true", help="print the docs/memory.md tables to stderr")
    args = ap.parse_args()
    if args.worker:
        shape, tokens = json.loads(args.worker)
        print(json.dumps(_worker(tuple(shape), tokens)))
        return 0
    points = []
    for shape in FIT_SHAPES:
        for tokens in FIT_TOKENS:
            points.append(measure(shape, tokens))
            log(f"shape {shape} x {tokens} tokens: {points[-1]['params'] / 1e6:.2f}M params, "
                f"peak +{points[-1]['peak_bytes'] / 2**20:.0f} MiB")
    a, b, c = fit(points)
    held = measure(HOLDOUT_SHAPE, FIT_TOKENS[-1])
    predicted = a + b * held["params"] + c * held["tokens"] * held["hidden"] * held["layers"]
    holdout_err = (predicted - held["peak_bytes"]) / held["peak_bytes"]
    log(f"fit: {a / 2**20:.0f} MiB + {b:.1f} B/param + {c:.1f} B/(token x hidden x layer); "
        f"hold-out {HOLDOUT_SHAPE}: measured {held['peak_bytes'] / 2**20:.0f} MiB, predicted "
        f"{predicted / 2**20:.0f} MiB ({holdout_err:+.1%})")
    c_bf16 = c / 2
    if args.markdown:
        log(markdown(c_bf16))
    from pd_dist.models import PRESETS

    emit({"fixed_mib": a / 2**20, "bytes_per_param": b, "act_bytes_per_token_hidden_layer_fp32": c,
          "holdout_err": holdout_err, "method": held["method"], "points": points,
          "student_gib_zero1_dp8": {n: round(student_gib(n, 1, 8, 1, 1, c_bf16), 1)
                                    for n in PRESETS if n.startswith("pd-")},
          "teacher_gib_zero3": {n: {k: round(teacher_gib(s, k, 1, 4 * SEQ), 1) for k in (1, 2, 4, 8)}
                                for n, s in TEACHERS.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
