"""Benchmark: fused chunked LM+KD loss vs the naive full-logits path (forward + backward, CPU fp32).

Each path runs in its own fresh subprocess (so one path's freed memory or allocator state cannot
affect the other). A worker builds the inputs (hidden [N,H], LM-head weight [V,H], targets,
teacher top-p-k logits), records the RSS baseline, resets the RSS high-water mark, runs forward +
backward, and reports peak RSS minus (baseline + size of the weight gradient): the memory each path
needs beyond what both must hold (inputs and the LM-head weight gradient). Subtracting the weight
gradient from the naive peak is conservative for the naive path (its peak may occur before that
gradient exists). Both workers report the loss so the parent can check they compute the same thing.

Naive path: logits = hidden @ W.T (fp32), log_softmax, gather at targets and teacher indices, the
same loss formula, plain autograd. Fused path: pd_dist.core.losses.fused_pd_loss.

Prints one JSON line last on stdout: mem_ratio = naive peak / chunked peak, time_ratio = chunked
time / naive time, plus raw numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Timer, cpu_seconds, emit, log, peak_bytes, reset_peak, rss_bytes  # noqa: E402

# Chunk of 1024 tokens: its fp32 logits buffer (1024 x 151552 x 4 B = 592 MiB) is 1/4 of the naive
# path's logits tensor, which gives mem_ratio ~9 (>= 6 with margin; 512 gives ~18). Tuned at the
# default sizes: GEMM throughput per chunk was flat from 256 to 1024 rows, while larger chunks halve
# the read-modify-write passes over the 1.2 GiB weight gradient (one per chunk).
DEFAULT_CHUNK = 1024


def make_inputs(args):
    import torch
    from pd_dist.core.logits import truncate
    from pd_dist.core.losses import IGNORE_INDEX

    g = torch.Generator().manual_seed(1234)
    n, h, v = args.tokens, args.hidden, args.vocab
    hidden = torch.randn(n, h, generator=g)
    # Scale so student logits have std ~1.5, like a trained LM head rather than a random one.
    weight = torch.randn(v, h, generator=g).mul_(1.5 / h ** 0.5)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::17] = IGNORE_INDEX  # a few ignored positions, as padding/document boundaries would give
    # Teacher logits randn*3, truncated block by block (the [block, V] temporaries are freed before
    # the memory baseline is taken).
    parts = []
    for s in range(0, n, 128):
        t = torch.randn(min(128, n - s), v, generator=g).mul_(3.0)
        parts.append(truncate(t, args.top_p, args.k))
        del t
    from pd_dist.core.logits import SparseLogits
    teacher = SparseLogits.cat(parts)
    return hidden, weight, targets, teacher


def naive_loss(hidden, weight, targets, teacher, alpha, kind, temperature, normalizer):
    import torch
    from pd_dist.core.logits import teacher_log_probs
    from pd_dist.core.losses import IGNORE_INDEX, pd_loss_reference

    if kind not in ("nll", "kld"):  # other kinds: the package's unchunked autograd reference
        return pd_loss_reference(hidden, weight, targets, teacher, alpha, kind, temperature,
                                 normalizer).loss
    logits = hidden @ weight.t()
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != IGNORE_INDEX
    y = torch.where(valid, targets, torch.zeros_like(targets))
    lm = -logp.gather(1, y[:, None]).squeeze(1)
    mask = teacher.mask
    logp_t = teacher_log_probs(teacher.values, mask, temperature)
    p_t = torch.where(mask, logp_t.exp(), torch.zeros_like(logp_t))
    lq = logp.gather(1, teacher.indices)
    if kind == "nll":
        kd = -torch.where(mask, p_t * lq, torch.zeros_like(lq)).sum(-1)
    else:
        kd = torch.where(mask, p_t * (logp_t - lq), torch.zeros_like(lq)).sum(-1)
    lm = torch.where(valid, lm, torch.zeros_like(lm))
    kd = torch.where(valid, kd, torch.zeros_like(kd))
    return ((1 - alpha) * lm.sum() + alpha * kd.sum()) / normalizer


def worker(args) -> dict:
    import torch
    from pd_dist.core.losses import IGNORE_INDEX, fused_pd_loss

    torch.set_num_threads(args.threads or torch.get_num_threads())
    hidden, weight, targets, teacher = make_inputs(args)
    normalizer = float((targets != IGNORE_INDEX).sum())
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    grad_w_bytes = weight.numel() * weight.element_size()
    baseline = rss_bytes()
    method = reset_peak()
    times, cpu_times, loss_val = [], [], None
    for r in range(args.repeats):
        hidden.grad = None
        weight.grad = None
        cpu0 = cpu_seconds()
        with Timer() as t:
            if args.worker == "chunked":
                loss = fused_pd_loss(hidden, weight, targets, teacher, args.alpha, args.kind,
                                     args.temperature, normalizer, chunk_size=args.chunk_size).loss
            else:
                loss = naive_loss(hidden, weight, targets, teacher, args.alpha, args.kind,
                                  args.temperature, normalizer)
            loss.backward()
        times.append(t.seconds)
        cpu_times.append(cpu_seconds() - cpu0)
        loss_val = float(loss.detach())
        del loss
        log(f"[{args.worker}] repeat {r}: {t.seconds:.2f}s wall, {cpu_times[-1]:.2f}s cpu, loss={loss_val:.6f}")
    peak = peak_bytes(method)
    grad_h = hidden.grad
    return {
        "path": args.worker, "times_s": times, "time_s": min(times), "cpu_s": min(cpu_times),
        "loss": loss_val,
        "peak_rss_bytes": peak, "baseline_rss_bytes": baseline, "grad_w_bytes": grad_w_bytes,
        "peak_above_bytes": peak - baseline - grad_w_bytes, "peak_method": method,
        "grad_h_norm": float(grad_h.norm()), "grad_w_norm": float(weight.grad.norm()),
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=151552)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--kind", default="kld")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per path (min is reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--worker", choices=("chunked", "naive"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0

    res = {}
    for path in ("chunked", "naive"):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", path] + sys.argv[1:]
        log(f"running {path} path in a subprocess ...")
        out = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True).stdout
        res[path] = json.loads(out.strip().splitlines()[-1])
    c, n = res["chunked"], res["naive"]
    rel = abs(c["loss"] - n["loss"]) / max(abs(n["loss"]), 1e-12)
    grel = max(abs(c["grad_h_norm"] - n["grad_h_norm"]) / n["grad_h_norm"],
               abs(c["grad_w_norm"] - n["grad_w_norm"]) / n["grad_w_norm"])
    mib = 1 << 20
    result = {
        "mem_ratio": n["peak_above_bytes"] / max(c["peak_above_bytes"], 1),
        "time_ratio": c["time_s"] / n["time_s"],
        # process CPU seconds (user+sys): less sensitive than wall time to other jobs on a shared machine
        "cpu_time_ratio": c["cpu_s"] / n["cpu_s"],
        "chunked_cpu_s": c["cpu_s"], "naive_cpu_s": n["cpu_s"],
        "chunked_time_s": c["time_s"], "naive_time_s": n["time_s"],
        "chunked_times_s": c["times_s"], "naive_times_s": n["times_s"],
        "chunked_peak_above_mib": c["peak_above_bytes"] / mib,
        "naive_peak_above_mib": n["peak_above_bytes"] / mib,
        "baseline_rss_mib": {"chunked": c["baseline_rss_bytes"] / mib, "naive": n["baseline_rss_bytes"] / mib},
        "grad_w_mib": c["grad_w_bytes"] / mib,
        "peak_method": c["peak_method"],
        "loss_rel_diff": rel, "grad_norm_rel_diff": grel,
        "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "k": args.k,
        "top_p": args.top_p, "kind": args.kind, "alpha": args.alpha, "chunk_size": args.chunk_size,
        "dtype": "float32", "repeats": args.repeats, "torch_threads": c["threads"],
    }
    emit(result)
    if rel > 1e-4 or grel > 1e-3:
        log(f"ERROR: chunked and naive disagree (loss rel {rel:.2e}, grad-norm rel {grel:.2e})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
