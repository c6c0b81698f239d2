"""Floating-point operations of the Llama-family models pd-dist trains, from their shapes.

Counted as in PaLM's model-FLOPs (Chowdhery et al., 2022, appendix B): a token's forward costs 2 FLOPs
per weight of every matrix it is multiplied by (the attention projections, the MLP, the LM head; not the
embedding lookup, norms or activations) plus, per layer, 4 x context x (heads x head_dim) for the
attention scores and the weighted values (the full context, as a dense kernel computes it; causal
masking is not halved). Training costs 3 forwards (forward, and a backward of twice the forward).
A recomputed or wasted forward is not counted: these are model FLOPs, the numerator of MFU.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """What the FLOP count reads of a model: widths, depth, heads and the vocabulary."""
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def matmul_params(self) -> int:
        """Weights a token is multiplied by: per layer q and o (hidden x heads*head_dim), k and v
        (hidden x kv_heads*head_dim), the SwiGLU MLP (3 x hidden x ffn); and the LM head."""
        h, d = self.hidden, self.head_dim
        per_layer = 2 * h * self.heads * d + 2 * h * self.kv_heads * d + 3 * h * self.ffn
        return self.layers * per_layer + h * self.vocab

    def forward_flops(self, context: int) -> float:
        """FLOPs of one token's forward with ``context`` positions attended to (the sequence length)."""
        if context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
        return 2.0 * self.matmul_params() + 4.0 * self.layers * context * self.heads * self.head_dim

    def train_flops(self, context: int) -> float:
        """FLOPs of one token's forward and backward (3 forwards)."""
        return 3.0 * self.forward_flops(context)


def shape_of_hf(config) -> Shape:
    """The Shape of a Hugging Face Llama-family config object (a loaded model's ``.config``)."""
    heads = int(config.num_attention_heads)
    return Shape(int(config.hidden_size), int(config.intermediate_size), int(config.num_hidden_layers), heads,
                 int(getattr(config, "num_key_value_heads", None) or heads), int(config.vocab_size))


# Dense bf16 peaks (TFLOPs) of devices whose name the CUDA driver reports; others need train.peak_tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def device_peak_tflops(configured: float | None) -> float | None:
    """train.peak_tflops, else the table's figure for the CUDA device's name, else None (CPU: no
    meaningful peak, so MFU is not reported)."""
    if configured:
        return float(configured)
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class ComputeMeter:
    """Per-step compute figures of a student rank (TensorBoard ``perf/``) and the run's totals.

    ``student``: the student's Shape, trained at ``context`` tokens; ``ranks``: the student world
    (achieved TFLOPs are per rank). A colocated teacher in this process (``teacher``, read at
    ``teacher_context``) adds its forwards: the tokens it actually ran, which the source counts."""

    def __init__(self, student: Shape, context: int, ranks: int, teacher: Shape | None = None,
                 teacher_context: int = 0, peak_tflops: float | None = None):
        self.per_token = student.train_flops(context)
        self.teacher_per_token = teacher.forward_flops(teacher_context) if teacher is not None else None
        self.ranks, self.peak = max(ranks, 1), peak_tflops
        self.student_flops = self.teacher_flops = 0.0
        self.steps, self.seconds, self.signal_seconds = 0, 0.0, 0.0

    def step(self, tokens: float, seconds: float, teacher_tokens: float = 0.0, teacher_seconds: float = 0.0) -> dict:
        """Scalars of one step: ``tokens`` trained over all ranks in ``seconds``; this rank's teacher ran
        ``teacher_tokens`` in ``teacher_seconds`` of it."""
        s = tokens * self.per_token
        self.student_flops += s
        self.steps += 1
        self.seconds += seconds
        self.signal_seconds += teacher_seconds
        out = {"perf/student_tflops": s / self.ranks / max(seconds, 1e-12) / 1e12}
        local = s / self.ranks
        if self.teacher_per_token is not None and teacher_tokens:
            t = teacher_tokens * self.teacher_per_token
            self.teacher_flops += t * self.ranks
            out["perf/teacher_tflops"] = t / max(teacher_seconds, 1e-12) / 1e12
            out["perf/teacher_share"] = t / (t + local)
            local += t
        if self.peak:
            out["perf/mfu"] = local / max(seconds, 1e-12) / 1e12 / self.peak
        return out

    def summary(self) -> dict:
        """summary.json's ``compute``: FLOPs per token and the totals of this launch's ``steps`` (a
        colocated teacher's forwards measured from the tokens it ran; other teachers are not counted
        here), and its measured seconds: the steps', and of them those spent waiting for the teacher's
        signal on this rank (colocated: the teacher's forwards; online: its answers; offline: the store's
        reads)."""
        return {"student_flops_per_token": self.per_token, "student_flops": self.student_flops,
                "teacher_flops_per_token": self.teacher_per_token,
                "teacher_flops": self.teacher_flops if self.teacher_per_token is not None else None,
                "peak_tflops": self.peak, "steps": self.steps, "seconds": self.seconds,
                "signal_seconds": self.signal_seconds}
