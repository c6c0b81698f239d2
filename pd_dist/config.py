"""The experiment config: one YAML file -> nested typed dataclasses, validated before any process starts.

Each section is owned by the component that uses it (data.DataConfig, models.ModelConfig,
schedules.AlphaConfig, ...); this module composes them, adds the run-level sections, checks what
spans sections, and derives the DeepSpeed JSON (one source of truth for batch sizes).
"""
from __future__ import annotations

import copy
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pd_dist.core.configlib import (ConfigError, build, check_choices, doc, fail, field_docs, load_yaml, parse_override, set_path,
                        show, to_dict)
from pd_dist.data import DataConfig
from pd_dist.core.logits import SignalSpec
from pd_dist.core.losses import KDLoss
from pd_dist.models import ModelConfig
from pd_dist.core.schedules import MAX_LR, AlphaConfig, LRConfig
from pd_dist.cluster.layout import Layout, TopologyConfig, make_layout

# Where the teacher signal comes from; each value is one source class in pd_dist.signals.sources.
DistillMode = Literal["none", "colocated", "online", "offline"]
# The shipped YAML and DeepSpeed JSON files live in the package (pd_dist/configs), so a non-editable
# install finds them too; launch/configs and ds_configs in a checkout are links to them.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
DS_CONFIG_DIR = CONFIG_DIR / "deepspeed"
# Below this p_t is one-hot to fp32 precision anyway, and kept_logits / tau heads for overflow (inf - inf
# is NaN in the softmax).
MIN_TEMPERATURE = 1e-4
MIN_EPS = 1e-20
MAX_THREADS = 1024


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher. With no `path`, a teacher of `preset` is first pre-trained on the run's data
    (LM only, same trainer) and cached under <output_dir>/teacher."""
    preset: Optional[str] = field(default="small-teacher", metadata=doc(
        "architecture of the teacher pre-trained when `path` is null"))
    pretrain_steps: int = field(default=300, metadata=doc(
        "optimizer steps of the teacher's own LM pre-training (only when `path` is null)"))
    pretrain_lr: float = field(default=1e-3, metadata=doc(
        f"peak LR of the teacher's pre-training, in (0, {MAX_LR:g}]"))
    pretrain_batch_size: int = field(default=0, metadata=doc(
        "global batch (samples) of the teacher's pre-training (0 = train.global_batch_size)"))
    micro_batch_size: int = field(default=0, metadata=doc(
        "samples per teacher forward (0 = the student's micro-batch size)"))
    zero_stage: Literal[0, 3] = field(default=0, metadata=doc(
        "online: 3 partitions the teacher's weights over all teacher ranks (DeepSpeed ZeRO-3 inference; "
        "each rank still serves its own students, gathering layers as it goes; the ranks step in lockstep)"))
    pipeline_stages: int = field(default=1, metadata=doc(
        "online: ranks per teacher replica, as a forward-only DeepSpeed pipeline (the first stage takes "
        "the requests, the last answers)"))
    deepspeed_config: Optional[str] = field(default=None, metadata=doc(
        "teacher.zero_stage 3: base DeepSpeed JSON of the teacher's ZeRO-3 inference (default: the "
        "shipped ds_configs/zero3.json; its zero_optimization options apply)"))

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.pretrain_steps < 1:
            fail(f"{prefix}.pretrain_steps", self.pretrain_steps, "must be >= 1")
        if not 0 < self.pretrain_lr <= MAX_LR:
            fail(f"{prefix}.pretrain_lr", self.pretrain_lr, f"must be > 0 and <= {MAX_LR:g}")
        if self.micro_batch_size < 0:
            fail(f"{prefix}.micro_batch_size", self.micro_batch_size, "must be >= 0")
        if self.pretrain_batch_size < 0:
            fail(f"{prefix}.pretrain_batch_size", self.pretrain_batch_size, "must be >= 0")
        check_choices(self, prefix)
        if self.pipeline_stages < 1:
            fail(f"{prefix}.pipeline_stages", self.pipeline_stages, "must be >= 1")
        if self.pipeline_stages > 1 and self.zero_stage == 3:
            fail(f"{prefix}.zero_stage", self.zero_stage,
                 "cannot combine with teacher.pipeline_stages > 1 (choose one way to split the teacher)")


@dataclass
class DistillConfig:
    """How the teacher signal is produced, processed and mixed into the loss (the paper's design space)."""
    mode: DistillMode = field(default="colocated", metadata=doc(
        "where the teacher signal comes from: none (LM only), colocated (a teacher in the student's "
        "process), online (teacher ranks), offline (stored logits)"))
    top_p: float = field(default=0.95, metadata=doc("top-p truncation of teacher logits, in (0, 1]"))
    top_k: int = field(default=50, metadata=doc("top-k truncation after top-p, >= 1"))
    temperature: float = field(default=1.0, metadata=doc(
        f"tau in p_t = softmax(kept_logits / tau), >= {MIN_TEMPERATURE:g}"))
    loss: KDLoss = field(default="nll", metadata=doc("KD loss (pd_dist.core.losses)"))
    signal: str = field(default="top_p_k", metadata=doc(
        "what of the teacher's distribution trains the student (a kind registered with "
        "pd_dist.core.logits.SignalSpec): top_p_k (the paper's truncation, "
        "distill.top_p/top_k), sampled (distill.samples draws per position at distill.temperature: "
        "an unbiased estimate of the full-distribution KD gradient, pd_dist.core.logits.sample_signal) or "
        "head_tail (the exact top-p-k head plus distill.samples draws from the tail, weighted by the "
        "tail's exact mass, pd_dist.core.logits.head_tail_signal); sampled and head_tail need nll or kld"))
    samples: int = field(default=50, metadata=doc("signal sampled / head_tail: draws per position, >= 1"))
    alpha: AlphaConfig = field(default_factory=AlphaConfig, metadata=doc(
        "per-step KD share alpha in L = (1 - alpha) L_lm + alpha L_kd"))
    store: Optional[str] = field(default=None, metadata=doc(
        "offline: the teacher-logits store to train from (and where launch/generate_logits.py writes)"))
    dump_logits: bool = field(default=False, metadata=doc(
        "mode none: write this model's own top-p-k logits (generate.top_p/top_k) to distill.store as it "
        "trains (the logits of a moving model; samples never trained on come from the final model)"))
    write_through: Optional[str] = field(default=None, metadata=doc(
        "online: every teacher replica also keeps the signals it serves and, when its students are done, "
        "completes them into an offline store in this directory (samples nobody asked for filled by the "
        "teacher; generate.shard_size/encoding/include_val apply), so later runs train offline from it; "
        "with teacher_context document, a library of document stores (generate.record_tokens applies)"))
    teacher_context: Literal["window", "document"] = field(default="window", metadata=doc(
        "what the teacher reads to predict a token: window (the student's packed sample, as the student "
        "reads it: the cheapest teacher, a store that serves this data.seq_len only) or document (the "
        "token's own document from its start, in chunks of distill.teacher_seq_len: the signal is a "
        "property of (source, document, offset), so one store, kept per source, serves a student at any "
        "seq_len, seed, layout or blend; costs colocated/online runs the document prefixes before each "
        "window)"))
    teacher_seq_len: Optional[int] = field(default=None, metadata=doc(
        "teacher_context document: tokens per chunk the teacher reads a document in (null: when writing a "
        "library, the chunk of the stores already in it, else data.seq_len; when training from one, its "
        "own; a colocated or online teacher: data.seq_len)"))
    cross_tokenizer: Literal["off", "map", "uld"] = field(default="off", metadata=doc(
        "a teacher whose tokenizer differs from the student's (teacher.path's tokenizer; off: refused): "
        "student positions whose byte prefix ends where a teacher prefix ends take the teacher's "
        "distribution, the others the LM loss alone (docs/cross-tokenizer.md). map: projected onto the "
        "student's vocabulary (each teacher token to the longest student token its bytes begin with), "
        "trained with distill.loss; uld: universal logit distillation (L1 between sorted probabilities, no "
        "vocabulary map; distill.loss is then uld). Needs teacher_context document"))
    min_aligned_frac: float = field(default=0.5, metadata=doc(
        "cross_tokenizer: the least fraction of student positions that must align with a teacher position "
        "(measured on a sample of the data at start), in [0, 1]"))
    prefetch: int = field(default=2, metadata=doc(
        "online: micro-batches requested from the teacher ahead of the one training"))
    wire_dtype: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata=doc(
        "online: dtype of teacher logits on the wire (auto: bf16 on GPU, fp32 on CPU)"))

    def validate(self, prefix: str) -> None:
        check_choices(self, prefix)
        if not 0.0 < self.top_p <= 1.0:
            fail(f"{prefix}.top_p", self.top_p, "must be in (0, 1]")
        if self.top_k < 1:
            fail(f"{prefix}.top_k", self.top_k, "must be >= 1")
        if not self.temperature >= MIN_TEMPERATURE:
            fail(f"{prefix}.temperature", self.temperature, f"must be >= {MIN_TEMPERATURE:g} (> 0, and not so "
                 "small that logits / tau overflow)")
        if self.prefetch < 0:
            fail(f"{prefix}.prefetch", self.prefetch, "must be >= 0")
        if self.samples < 1:
            fail(f"{prefix}.samples", self.samples, "must be >= 1")
        if self.teacher_seq_len is not None and not 2 <= self.teacher_seq_len < 1 << 31:
            fail(f"{prefix}.teacher_seq_len", self.teacher_seq_len, "must be null or in [2, 2^31)")
        if self.teacher_seq_len is not None and self.teacher_context != "document":
            fail(f"{prefix}.teacher_seq_len", self.teacher_seq_len, "is only read with teacher_context document")
        if self.teacher_context == "document" and self.signal != "top_p_k":
            fail(f"{prefix}.teacher_context", "document", f"serves the top_p_k signal only: {self.signal} keys "
                 "its draws by sample id, which a document-keyed store does not have")
        if self.signal not in SignalSpec.kinds():
            fail(f"{prefix}.signal", self.signal, f"must be one of {', '.join(SignalSpec.kinds())}")
        if not 0.0 <= self.min_aligned_frac <= 1.0:
            fail(f"{prefix}.min_aligned_frac", self.min_aligned_frac, "must be in [0, 1]")
        if self.cross_tokenizer != "off":
            ct = f"{prefix}.cross_tokenizer"
            if self.teacher_context != "document":
                fail(ct, self.cross_tokenizer, "needs distill.teacher_context document (a window's teacher "
                     "tokens are cut where the student's window is, so its prefixes are not the document's; a "
                     "window store serves one tokenizer)")
            if self.mode == "none":
                fail(ct, self.cross_tokenizer, "needs a teacher (distill.mode colocated, online or offline)")
            if self.cross_tokenizer == "map" and self.loss in ("mse", "uld"):
                fail(f"{prefix}.loss", self.loss, "cannot train on projected probabilities (mse matches raw "
                     "logits of one vocabulary; for uld set distill.cross_tokenizer uld)")
            if self.cross_tokenizer == "uld" and self.loss not in ("nll", "uld"):
                fail(f"{prefix}.loss", self.loss, "is replaced by uld with distill.cross_tokenizer uld: leave it "
                     "nll (the default) or set uld")
            if self.write_through or self.dump_logits:
                fail(f"{prefix}.write_through" if self.write_through else f"{prefix}.dump_logits", True,
                     "is not supported with distill.cross_tokenizer: write the teacher's document store with "
                     "launch/generate_logits.py on the data prepared with the teacher's tokenizer")
        if self.signal != "top_p_k":
            if self.loss not in ("nll", "kld"):
                fail(f"{prefix}.loss", self.loss, f"must be nll or kld with distill.signal {self.signal} (its "
                     "weights estimate the cross-entropy, not logits)")
            if self.dump_logits:
                fail(f"{prefix}.signal", self.signal, "cannot be dumped by a training run (dump_logits keeps "
                     "the model's own top-p-k logits): write the store with launch/generate_logits.py")

    def signal_spec(self, seed: int) -> SignalSpec:
        """The signal of this config (SignalSpec.of distill.signal with the distill keys its kind holds);
        draws keyed by ``seed`` (train.seed)."""
        return SignalSpec.of(self.signal, top_p=self.top_p, top_k=self.top_k, samples=self.samples,
                             temperature=self.temperature, seed=seed)

    @property
    def loss_temperature(self) -> float:
        """The temperature the loss applies to the signal (SignalSpec.loss_temperature): tau for top-p-k
        logits; 1 for drawn signals (sampled, head_tail), whose log weights were formed at tau already, and
        across tokenizers (the projection forms log probabilities at tau)."""
        return 1.0 if self.cross_tokenizer != "off" else self.signal_spec(0).loss_temperature

    @property
    def kd_loss(self) -> str:
        """The KD loss the student trains with: distill.loss, or uld with cross_tokenizer uld."""
        return "uld" if self.cross_tokenizer == "uld" else self.loss


@dataclass
class GenerateConfig:
    """The offline generation job (launch/generate_logits.py): how the store is written."""
    top_p: Optional[float] = field(default=None, metadata=doc(
        "top-p of the stored logits (null = distill.top_p); a wider store serves narrower runs"))
    top_k: Optional[int] = field(default=None, metadata=doc("top-k stored (null = distill.top_k)"))
    shard_size: int = field(default=256, metadata=doc("samples per shard (the unit of resumption)"))
    micro_batch_size: int = field(default=0, metadata=doc(
        "samples per teacher forward (0 = train.micro_batch_size)"))
    compress: bool = field(default=True, metadata=doc("zstd-compress sample blocks where it pays"))
    encoding: Literal["auto", "qgap", "exact"] = field(default="auto", metadata=doc(
        "how stored values are encoded (pd_dist.store.codec): auto (qgap: logits quantized to 2^-8 of "
        "the token's max, or for the sampled signal its exact draw counts), qgap, or exact (lossless fp32)"))
    include_val: bool = field(default=True, metadata=doc(
        "also store the held-out samples, so evaluation reports KD loss and teacher agreement"))
    record_tokens: int = field(default=256, metadata=doc(
        "distill.teacher_context document: stream positions per stored record (the unit a window is read "
        "in: a window of L tokens decodes about L + record_tokens of them; smaller records read faster "
        "and compress worse: 128 cost 2.1% more bytes per token than 256 on the default teacher)"))
    fidelity_positions: int = field(default=512, metadata=doc(
        "positions the job's closing line measures the stored signal's fidelity on (head mass, TV, KL both "
        "ways, JSD against the teacher's full distribution, beside bytes per token; 0 = not measured)"))

    def validate(self, prefix: str) -> None:
        check_choices(self, prefix)
        if not 0 <= self.fidelity_positions <= 1 << 20:
            fail(f"{prefix}.fidelity_positions", self.fidelity_positions, "must be in [0, 2^20]")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            fail(f"{prefix}.top_p", self.top_p, "must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            fail(f"{prefix}.top_k", self.top_k, "must be >= 1")
        if self.shard_size < 1:
            fail(f"{prefix}.shard_size", self.shard_size, "must be >= 1")
        if not 1 <= self.record_tokens <= 1 << 20:
            fail(f"{prefix}.record_tokens", self.record_tokens, "must be in [1, 2^20]")
        if self.micro_batch_size < 0:
            fail(f"{prefix}.micro_batch_size", self.micro_batch_size, "must be >= 0")


@dataclass
class OptimConfig(LRConfig):
    """The per-step learning-rate schedule (schedules.LRConfig) and AdamW."""
    weight_decay: float = field(default=0.1, metadata=doc(
        "AdamW weight decay (not on norms), >= 0; lr x weight_decay < 1 (and teacher.pretrain_lr x it)"))
    beta1: float = field(default=0.9, metadata=doc("AdamW beta1"))
    beta2: float = field(default=0.95, metadata=doc("AdamW beta2"))
    eps: float = field(default=1e-8, metadata=doc(f"AdamW epsilon, >= {MIN_EPS:g}"))

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.weight_decay < 0:
            fail(f"{prefix}.weight_decay", self.weight_decay, "must be >= 0")
        if self.lr * self.weight_decay >= 1:  # AdamW scales every weight by 1 - lr x weight_decay per step
            fail(f"{prefix}.weight_decay", self.weight_decay,
                 f"times optim.lr ({self.lr:g}) must be < 1 (each step scales the weights by 1 - lr x weight_decay)")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(f"{prefix}.{name}", getattr(self, name), "must be in [0, 1)")
        if not self.eps >= MIN_EPS:  # smaller: a gradient whose square underflows fp32 is divided by ~eps
            fail(f"{prefix}.eps", self.eps, f"must be >= {MIN_EPS:g} (> 0, and not so small that a tiny "
                 "gradient is divided by ~0)")


@dataclass
class TrainConfig:
    """Steps, batch sizes, precision, ZeRO and the logging / evaluation / checkpoint cadence."""
    steps: int = field(default=300, metadata=doc("optimizer steps"))
    global_batch_size: int = field(default=16, metadata=doc(
        "samples per optimizer step over all data-parallel ranks"))
    micro_batch_size: int = field(default=8, metadata=doc(
        "samples per forward on one rank; accumulation = global / (micro * data-parallel size)"))
    grad_clip: float = field(default=1.0, metadata=doc("global gradient-norm clip (0 = off)"))
    seed: int = field(default=1234, metadata=doc("seed for initialisation and data order, in [0, 2^63)",
                                                 int_bits=63))
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata=doc(
        "training dtype (auto: bf16 on GPU, fp32 on CPU)"))
    zero_stage: int = field(default=1, metadata=doc(
        "ZeRO stage 0-3 (stage 3 builds the student partitioned, inside deepspeed.zero.Init)"))
    pipeline_stages: int = field(default=1, metadata=doc(
        "student pipeline stages (DeepSpeed PipelineModule; with ZeRO 0-1): each data-parallel replica "
        "of the student is this many consecutive ranks"))
    deepspeed_config: Optional[str] = field(default=None, metadata=doc(
        "base DeepSpeed JSON (default: the shipped ds_configs/zero<stage>.json); batch fields are derived"))
    loss_chunk_size: int = field(default=1024, metadata=doc(
        "tokens per chunk of the fused LM-head + loss pass (bounds the [chunk, vocab] logits)"))
    log_every: int = field(default=10, metadata=doc("console/TensorBoard line every N steps"))
    eval_every: int = field(default=100, metadata=doc("evaluate every N steps (0 = only at the end)"))
    save_every: int = field(default=100, metadata=doc("checkpoint every N steps (0 = only at the end)"))
    keep_checkpoints: int = field(default=2, metadata=doc("newest checkpoints kept (0 = keep all)"))
    threads: int = field(default=0, metadata=doc(
        f"torch CPU threads per rank, <= {MAX_THREADS} (0 = the host's cores divided by the ranks on it)"))
    exit_after_steps: int = field(default=0, metadata=doc(
        "save a checkpoint and stop after this many steps of this launch (0 = run to the end); "
        "for time-limited allocations: relaunch with --resume"))
    peak_tflops: Optional[float] = field(default=None, metadata=doc(
        "the device's dense peak TFLOPs for perf/mfu (null: known CUDA devices by name; CPU: no MFU)"))

    def validate(self, prefix: str) -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size", "loss_chunk_size", "log_every"):
            if getattr(self, name) < 1:
                fail(f"{prefix}.{name}", getattr(self, name), "must be >= 1")
        if self.peak_tflops is not None and not 0 < self.peak_tflops < 1e7:
            fail(f"{prefix}.peak_tflops", self.peak_tflops, "must be null or in (0, 1e7)")
        for name in ("eval_every", "save_every", "keep_checkpoints", "threads", "exit_after_steps"):
            if getattr(self, name) < 0:
                fail(f"{prefix}.{name}", getattr(self, name), "must be >= 0")
        if self.threads > MAX_THREADS:
            fail(f"{prefix}.threads", self.threads, f"must be in [0, {MAX_THREADS}]")
        if self.global_batch_size % self.micro_batch_size:
            fail(f"{prefix}.global_batch_size", self.global_batch_size,
                 f"must be a multiple of train.micro_batch_size ({self.micro_batch_size})")
        if self.grad_clip < 0:
            fail(f"{prefix}.grad_clip", self.grad_clip, "must be >= 0")
        check_choices(self, prefix)
        if self.zero_stage not in (0, 1, 2, 3):
            fail(f"{prefix}.zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        if self.pipeline_stages < 1:
            fail(f"{prefix}.pipeline_stages", self.pipeline_stages, "must be >= 1")
        if self.pipeline_stages > 1 and self.zero_stage > 1:
            fail(f"{prefix}.zero_stage", self.zero_stage,
                 "must be 0 or 1 with train.pipeline_stages > 1 (DeepSpeed pipelines support ZeRO-1 only)")
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            fail(f"{prefix}.deepspeed_config", self.deepspeed_config, "file not found")


@dataclass
class BaselineConfig:
    """The LM-only twin of a distillation run, and the loss-against-tokens curve the compute-equivalent
    gain is read from. ``baseline: true`` / ``false`` is short for ``baseline.enabled``."""
    enabled: bool = field(default=False, metadata=doc(
        "also pre-train the same student LM-only on the same tokens and schedule (cached in "
        "<output_dir>/baseline) and report the distilled student's gain over it, (LM - PD) / LM in loss"))
    extend: float = field(default=1.0, metadata=doc(
        "the LM-only curve reaches this many times the run's token budget (>= 1; e.g. 2.0), so the tokens "
        "LM-only needs to match the distilled student are measured, not extrapolated"))
    points: int = field(default=8, metadata=doc(
        "held-out losses on the LM-only curve, each that of a run of its own length (wsd: a decay branched "
        "off one stable trunk; constant: the trunk itself); 1 = the twin alone, no curve"))

    @classmethod
    def from_bool(cls, on: bool) -> "BaselineConfig":
        return cls(enabled=on)

    def __bool__(self) -> bool:
        return self.enabled

    def validate(self, prefix: str) -> None:
        if not 1.0 <= self.extend <= 100.0:
            fail(f"{prefix}.extend", self.extend, "must be in [1, 100] (a multiple of the run's token budget)")
        if not 1 <= self.points <= 64:
            fail(f"{prefix}.points", self.points, "must be in [1, 64]")


@dataclass
class ExperimentConfig:
    """A whole pre-training-distillation run."""
    output_dir: str = field(default="runs/default", metadata=doc(
        "where checkpoints, TensorBoard logs, the export and the resolved config go"))
    baseline: BaselineConfig = field(default_factory=BaselineConfig, metadata=doc(
        "the LM-only twin and its loss curve (`baseline: true` is short for baseline.enabled)"))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=doc("the student"))
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata=doc("the teacher"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig, metadata=doc(
        "teacher/student rank split (online mode)"))
    generate: GenerateConfig = field(default_factory=GenerateConfig, metadata=doc(
        "offline logits generation"))

    def validate(self, prefix: str) -> None:
        if not str(self.output_dir).strip():
            fail("output_dir", self.output_dir, "must name a directory")
        if not 0 <= self.train.seed < 2 ** 63:
            fail("train.seed", self.train.seed, "must be in [0, 2^63)")
        # Every schedule warms up first (schedules.lr_at): a warmup as long as the run is all the run is,
        # so the schedule asked for (constant, cosine or wsd decay) never happens.
        runs = [("train.steps", self.train.steps)]
        if self.pretrains_teacher():
            runs.append(("teacher.pretrain_steps", self.teacher.pretrain_steps))
        for key, steps in runs:
            if self.optim.warmup_steps and self.optim.warmup_steps >= steps:
                fail("optim.warmup_steps", self.optim.warmup_steps,
                     f"must be shorter than the run ({key} = {steps}): the {self.optim.lr_schedule} schedule "
                     "would never start")
        if self.pretrains_teacher() and self.teacher.pretrain_lr * self.optim.weight_decay >= 1:
            fail("optim.weight_decay", self.optim.weight_decay,
                 f"times teacher.pretrain_lr ({self.teacher.pretrain_lr:g}) must be < 1 (each step scales the "
                 "weights by 1 - lr x weight_decay)")
        if self.distill.dump_logits:
            if self.distill.mode != "none":
                fail("distill.dump_logits", True, "needs distill.mode none (the run's own logits are dumped)")
            if not self.distill.store:
                fail("distill.store", None, "must name the store that distill.dump_logits writes")
            if self.train.pipeline_stages > 1:
                fail("distill.dump_logits", True, "is not supported with train.pipeline_stages > 1")
        pb = self.teacher.pretrain_batch_size
        if pb and pb % self.train.micro_batch_size:
            fail("teacher.pretrain_batch_size", pb,
                 f"must be a multiple of train.micro_batch_size ({self.train.micro_batch_size})")
        g = self.generate
        if self.distill.write_through:
            wt = self.distill.write_through
            if self.distill.mode != "online":
                fail("distill.write_through", wt, "needs distill.mode online (a teacher rank writes it)")
            if self.teacher.zero_stage == 3 or self.teacher.pipeline_stages > 1:
                fail("distill.write_through", wt, "is not supported with ZeRO-3 or pipelined teachers yet")
        if g.top_p is not None or g.top_k is not None:  # a narrower stored truncation: where it cannot apply
            why = ("does not apply to distill.write_through, which stores the signal as it is served"
                   if self.distill.write_through else
                   f"narrows top-p-k stores only: the {self.distill.signal} signal is stored as distill draws it"
                   if self.distill.signal != "top_p_k" else None)
            if why:
                fail("generate.top_p" if g.top_p is not None else "generate.top_k",
                     g.top_p if g.top_p is not None else g.top_k, why)
            # Offline, this config's run trains from the store its generation writes, which can be narrowed
            # on load but not widened (store.reader.check_compatible would refuse it once the run started).
            offline = self.distill.mode == "offline"
            if offline and g.top_p is not None and g.top_p < self.distill.top_p:
                fail("generate.top_p", g.top_p, f"must be >= distill.top_p ({self.distill.top_p:g}): a store "
                     "truncated narrower than the run cannot be widened on load")
            if offline and g.top_k is not None and g.top_k < self.distill.top_k:
                fail("generate.top_k", g.top_k, f"must be >= distill.top_k ({self.distill.top_k}): a store "
                     "keeping fewer entries than the run asks cannot be widened on load")
        if self.distill.signal == "sampled" and g.encoding == "qgap":
            fail("generate.encoding", "qgap", "would round the sampled signal's weights: use auto (its exact "
                 "draw counts) or exact")
        if self.distill.signal != "top_p_k" and (self.train.pipeline_stages > 1 or self.teacher.pipeline_stages > 1):
            fail("distill.signal", self.distill.signal, "is not supported with pipelined students or teachers yet")
        if self.distill.teacher_context == "document" and self.distill.dump_logits:
            # A dump keeps the logits the model computes on its training windows; in document context a
            # token's signal must come from its own document read in chunks, which those windows are not.
            fail("distill.dump_logits", True, "keeps the logits of the run's training windows (window context); "
                 "for document stores of this model, run launch/generate_logits.py with distill.teacher_context "
                 "document and teacher.path set to its exported student")
        if self.distill.teacher_context == "document":
            not_yet = ("teacher.pipeline_stages" if self.teacher.pipeline_stages > 1 else
                       "teacher.zero_stage" if self.teacher.zero_stage == 3 and self.distill.mode == "online" else None)
            if not_yet:
                fail(not_yet, getattr(self.teacher, not_yet.split(".")[1]), "is not supported with "
                     "distill.teacher_context document yet (write a document store with launch/generate_logits.py)")
        if self.topology.teacher_failover and self.distill.mode == "online":
            # Those teacher ranks step in lockstep collectives: with one of them gone the others hang.
            if self.teacher.zero_stage == 3:
                fail("topology.teacher_failover", True, "cannot work with teacher.zero_stage 3 (every teacher "
                     "rank's forward needs the weights of all of them)")
            if self.teacher.pipeline_stages > 1:
                fail("topology.teacher_failover", True, "cannot work with teacher.pipeline_stages > 1 (the "
                     "replicas' stages run in lockstep)")
        if self.distill.cross_tokenizer != "off":
            if not self.teacher.path:
                fail("distill.cross_tokenizer", self.distill.cross_tokenizer, "needs teacher.path: a teacher "
                     "with its own tokenizer (the default teacher is pre-trained with the student's; offline, "
                     "only its tokenizer files are read)")
            if self.data.source == "indexed":
                fail("distill.cross_tokenizer", self.distill.cross_tokenizer, "needs text sources: indexed data "
                     "holds one tokenizer's ids, and the teacher must tokenize the text itself")
        if self.distill.mode == "offline" and not self.distill.store:
            fail("distill.store", self.distill.store, "must name a teacher-logits store when distill.mode is offline")

    def pretrains_teacher(self) -> bool:
        """Whether a run (or the generation job) of this config may pre-train the default teacher
        (run.teacher_run_config: teacher.pretrain_steps with the run's optim and trainer)."""
        return self.teacher.path is None and self.distill.mode != "none"

    def stored_truncation(self) -> tuple[float, int]:
        """(top_p, top_k) of the logits a store written by this run keeps (generation, dump_logits):
        generate.top_p / generate.top_k, each defaulting to distill's."""
        g, d = self.generate, self.distill
        return (g.top_p if g.top_p is not None else d.top_p, g.top_k if g.top_k is not None else d.top_k)

    def layout_args(self) -> dict:
        """What of this config decides the rank layout (pd_dist.cluster.layout.make_layout's keywords)."""
        return dict(online=self.distill.mode == "online", student_stages=self.train.pipeline_stages,
                    teacher_stages=self.teacher.pipeline_stages, teacher_zero3=self.teacher.zero_stage == 3)

    def layout(self, world_size: int, nodes: Optional[list[str]] = None) -> Layout:
        """Where every rank of a `world_size`-rank job on `nodes` sits (refuses an impossible layout)."""
        return make_layout(self.topology, world_size, nodes, **self.layout_args())

    def check_world(self, dp_size: int) -> None:
        """Batch sizes must divide over the data-parallel ranks (known from the launcher's env)."""
        t = self.train
        per_step = t.micro_batch_size * dp_size
        if t.global_batch_size % per_step:
            fail("train.global_batch_size", t.global_batch_size,
                 f"must be a multiple of micro_batch_size x data-parallel size = "
                 f"{t.micro_batch_size} x {dp_size} = {per_step}")

    def grad_accum(self, dp_size: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * dp_size)


def load_config(path: Optional[str | os.PathLike] = None, overrides: list[str] = ()) -> ExperimentConfig:
    """YAML file (default launch/configs/default.yaml) plus `a.b=c` overrides -> validated config."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {e.start})") from None
    data = load_yaml(text, str(path))
    if data is None:
        raise ConfigError(f"config file {path} is empty (or only comments): it would run the built-in "
                          "defaults; give the keys to change, or drop --config to use the default file")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for ov in overrides:
        key, value = parse_override(ov)
        set_path(data, key, value)
    cfg = build(ExperimentConfig, data)
    check_deepspeed_bases(cfg)
    return cfg


def config_from_dict(data: dict) -> ExperimentConfig:
    return build(ExperimentConfig, copy.deepcopy(data))


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


CONFIG_DOC_HEADER = """# Configuration keys

An experiment is one YAML file (`launch/configs/default.yaml` when `--config` is not given) plus
`--set key.path=value` overrides, parsed as YAML values (`--set distill.top_k=20`,
`--set data.files='[a.jsonl, b.txt]'`). Unknown keys and bad values are refused before any process
group starts, with one line naming the key and what is allowed. The resolved config is written to
`<output_dir>/config.yaml` and the derived DeepSpeed JSON to `<output_dir>/deepspeed_config.json`.

YAML merge keys (`<<: *anchor`) are read (explicit keys win over merged ones); a key given twice in one
mapping, a list or mapping as a key, control characters and nesting deeper than 64 levels are refused.
Integers must lie in [-2^31, 2^31) unless a key says more (`train.seed`, character and byte counts), and
every number must be 0 or of a magnitude fp32 represents (1.175e-38 to 3.403e38); keys whose meaning
needs a narrower range say so below.

The DeepSpeed JSON files in `ds_configs/` hold only what is DeepSpeed's own (ZeRO options); batch
sizes, gradient clipping, precision and the ZeRO stage come from the experiment config. Both base files
(`train.deepspeed_config` and `teacher.deepspeed_config`, or the shipped files they default to) are read
and checked when the config loads: a JSON object, no `optimizer` or `scheduler`, no `fp16`/`amp`, the
ZeRO stage of its role, `gradient_accumulation_steps` `"auto"`, and the other derived fields `"auto"` or
equal to the experiment's (the teacher's: `"auto"` only).

Generated by `pd-dist config --doc > docs/config.md` (a test checks it is current):

"""


def config_doc() -> str:
    """docs/config.md: the header above and the table of every key."""
    return CONFIG_DOC_HEADER + config_keys_markdown() + "\n"


def config_keys_markdown() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tname, default, text in field_docs(ExperimentConfig):
        rows.append(f"| `{key}` | {tname} | `{default!r}` | {text} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------- DeepSpeed config
DERIVED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
           "gradient_clipping")


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def deepspeed_base(cfg: ExperimentConfig, role: Literal["train", "teacher"] = "train") -> tuple[Path, dict]:
    """(path, contents) of a base DeepSpeed JSON, read and checked against the experiment: the student's
    (role "train": train.deepspeed_config, default the shipped zero<train.zero_stage>.json) or the ZeRO-3
    teacher's (role "teacher": teacher.deepspeed_config, default the shipped zero3.json; only its
    zero_optimization options are used).

    The file must be UTF-8 JSON holding an object (no duplicate keys, no NaN); hold no `optimizer` or
    `scheduler` (pd-dist builds AdamW from `optim` and sets the LR per step); `zero_optimization`, if
    given, is a mapping whose `stage`, if given, is the role's stage; `fp16` and `amp` are not enabled
    and `bf16.enabled` is "auto" or absent, or matches a train.precision of bf16 or fp32 (the precision is
    train.precision's). The DERIVED batch fields are "auto" or absent, except that the student's
    train_batch_size, train_micro_batch_size_per_gpu and gradient_clipping may equal what the experiment
    gives (train_batch_size: also the teacher's pre-training batch when this config pre-trains one).
    Anything else is one ConfigError line naming the key and the file."""
    key = f"{role}.deepspeed_config"
    given = cfg.train.deepspeed_config if role == "train" else cfg.teacher.deepspeed_config
    stage = cfg.train.zero_stage if role == "train" else 3
    path = Path(given) if given else DS_CONFIG_DIR / f"zero{stage}.json"

    def bad(what: str) -> typing.NoReturn:
        fail(key, str(path), what if given else f"{what} (the shipped default for zero stage {stage}: reinstall "
             "pd-dist)")

    if not path.is_file():
        bad("file not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        bad(f"cannot be read ({e.strerror})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad(f"not UTF-8 JSON text (byte {e.start})")
    if not text.strip():
        bad("is empty: give a JSON object ({} for DeepSpeed's own defaults)")
    try:
        ds = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        bad(f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})")
    except _DuplicateKey as e:
        bad(f"not valid JSON (key {e.args[0]!r} given twice in one object)")
    except (ValueError, RecursionError) as e:
        bad(f"not valid JSON ({'nested too deeply' if isinstance(e, RecursionError) else e})")
    if not isinstance(ds, dict):
        bad(f"must hold a JSON object at the top level, not {show(ds)}")
    for k in ("optimizer", "scheduler"):
        if k in ds:
            bad(f"remove '{k}': pd-dist builds AdamW from the `optim` section and sets the LR per step")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        bad(f"'zero_optimization' = {show(zero)} must be a JSON object of ZeRO options")
    have = zero.get("stage", stage)
    if not (_is_count(have) and have == stage):
        bad(f"zero_optimization.stage = {show(have)} but train.zero_stage = {stage}" if role == "train" else
            f"zero_optimization.stage = {show(have)} but the teacher's ZeRO inference is stage 3")
    for k in ("fp16", "amp"):
        sec = ds.get(k, {})
        if not isinstance(sec, dict) or sec.get("enabled", False) is not False:
            bad(f"'{k}' must not be enabled: the precision is train.precision's (fp32 or bf16)")
    sec = ds.get("bf16", {})
    enabled = sec.get("enabled", "auto") if isinstance(sec, dict) else sec
    want_bf16 = {"bf16": True, "fp32": False}.get(cfg.train.precision)
    if enabled != "auto" and enabled is not want_bf16:  # with precision auto only the device decides
        bad(f"'bf16' enabled = {show(enabled)} but train.precision is {cfg.train.precision}; give \"auto\" or "
            "leave it out")
    if role == "teacher":
        for k in DERIVED:
            if ds.get(k, "auto") != "auto":
                bad(f"'{k}' = {show(ds[k])}: the teacher's inference engine sets its own batch fields; give "
                    "\"auto\" or leave it out")
        return path, ds
    t = cfg.train
    runs = [("train.global_batch_size", t.global_batch_size)]
    if cfg.pretrains_teacher() and cfg.teacher.pretrain_batch_size:
        runs.append(("teacher.pretrain_batch_size", cfg.teacher.pretrain_batch_size))
    fixed = {"train_micro_batch_size_per_gpu": [("train.micro_batch_size", t.micro_batch_size)],
             "gradient_clipping": [("train.grad_clip", t.grad_clip)], "train_batch_size": runs}
    for k, wants in fixed.items():
        v = ds.get(k, "auto")
        for src, want in wants:
            if v != "auto" and (isinstance(v, bool) or v != want):
                bad(f"'{k}' = {show(v)} but the experiment config gives {want!r} ({src}); set it to \"auto\" "
                    "(derived) or change the experiment config")
    gas = ds.get("gradient_accumulation_steps", "auto")
    if gas != "auto":  # it depends on the data-parallel size, which differs between the runs of one config
        bad(f"'gradient_accumulation_steps' = {show(gas)} must be \"auto\": pd-dist derives it as "
            "train.global_batch_size / (train.micro_batch_size x data-parallel ranks)")
    return path, ds


def check_deepspeed_bases(cfg: ExperimentConfig) -> None:
    """Read and check both base DeepSpeed JSON files of a config (see :func:`deepspeed_base`), so that a
    bad one is refused before any process group, data preparation or teacher pre-training starts."""
    deepspeed_base(cfg, "train")
    deepspeed_base(cfg, "teacher")


def deepspeed_config(cfg: ExperimentConfig, dp_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for this run: the base file (checked by :func:`deepspeed_base`) with batch
    sizes, clipping, ZeRO stage and precision filled in from the experiment config and the data-parallel
    size. A base that sets them differently is an error (values "auto" or absent are filled)."""
    t = cfg.train
    _, ds = deepspeed_base(cfg, "train")
    want = {"train_batch_size": t.global_batch_size,
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": cfg.grad_accum(dp_size),
            "gradient_clipping": t.grad_clip}
    ds.update(want)  # deepspeed_base refused a base that gives them otherwise
    ds.setdefault("zero_optimization", {})["stage"] = t.zero_stage
    ds["bf16"] = {"enabled": bool(bf16)}
    ds.setdefault("steps_per_print", 10 ** 9)  # pd-dist prints its own progress lines
    ds.setdefault("wall_clock_breakdown", False)
    # Save/load on every rank without a world-wide tag all_reduce: tags are derived from the step.
    ds.setdefault("checkpoint", {}).setdefault("tag_validation", "Ignore")
    return ds
