"""Benchmark: the sampled teacher signal (distill.signal sampled) against top-p-k truncation.

On the same Zipf-like teacher logits as bench/truncate.py, per token: the time to form the signal
(sample_signal with n draws vs truncate at top-0.95-k), the distinct tokens a sampled position keeps,
the bridge's wire bytes per token of each (a sampled signal travels at width n, like top-k with k = n),
and how far each signal's target is from the teacher's full distribution (the KD gradient is
q - target, so this is its error; mean L1 over tokens). Per token the sampled target is noisier, but
averaged over independent draws it converges to the teacher's distribution, while the top-p-k target
stays where it is (it never sees the tail): the `mean_of_200_*` figures. Prints one JSON line last on stdout.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import Timer, emit, log  # noqa: E402
from truncate import zipf_logits  # noqa: E402
from pd_dist.cluster.bridge import WireSpec  # noqa: E402
from pd_dist.core.logits import SignalSpec, sample_keys, sample_signal, target_probs, truncate  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--n", type=int, default=50, help="draws per position (and k of the top-p-k signal)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    z = zipf_logits(args.tokens, args.vocab, seed=0)
    keys = sample_keys(0, torch.arange(args.tokens), 1).reshape(-1)
    t_top, t_smp = [], []
    for r in range(args.repeats):
        with Timer() as t:
            top = truncate(z, 0.95, args.n)
        t_top.append(t.seconds)
        with Timer() as t:
            smp = sample_signal(z, keys, args.n, 1.0)
        t_smp.append(t.seconds)
        log(f"run {r}: truncate {t_top[-1]:.3f}s, sample_signal {t_smp[-1]:.3f}s")
    p = torch.softmax(z.double(), -1)

    def dense(sig, tau):
        w = torch.zeros_like(p)
        return w.scatter_add_(-1, sig.indices, target_probs(sig, tau).double())
    err_top = (dense(top, 1.0) - p).abs().sum(-1).mean().item()
    err_smp = (dense(smp, 1.0) - p).abs().sum(-1).mean().item()
    # Bias: average the sampled targets of 8 tokens over 200 independent draws each (other keys); the
    # top-p-k target of a token is the same every time, so its error is all bias.
    few, m = z[:8], 200
    reps = sample_signal(few.repeat(m, 1), sample_keys(1, torch.arange(8 * m), 1).reshape(-1), args.n, 1.0)
    w = torch.zeros(8 * m, args.vocab, dtype=torch.float64).scatter_add_(
        -1, reps.indices, target_probs(reps, 1.0).double()).reshape(m, 8, -1).mean(0)
    bias_smp = (w - p[:8]).abs().sum(-1).mean().item()
    bias_top = (dense(top, 1.0)[:8] - p[:8]).abs().sum(-1).mean().item()
    wire = WireSpec(args.vocab, "h", 4096, SignalSpec.of("sampled", samples=args.n), "bf16", 4, n_samples=1).bytes_per_token()
    result = {"tokens": args.tokens, "vocab": args.vocab, "n": args.n,
              "truncate_s": min(t_top), "sample_signal_s": min(t_smp),
              "sampled_over_truncate_time": min(t_smp) / min(t_top),
              "sampled_distinct_per_token": smp.counts().float().mean().item(),
              "top_p_k_kept_per_token": top.counts().float().mean().item(),
              "wire_bytes_per_token_bf16": wire,
              "target_l1_error_top_p_k": err_top, "target_l1_error_sampled": err_smp,
              "mean_of_200_l1_error_top_p_k": bias_top, "mean_of_200_l1_error_sampled": bias_smp}
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
