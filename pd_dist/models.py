"""Student and teacher models: Hugging Face causal LMs built from presets or loaded from local paths.

Presets reproduce the paper's student shapes (Llama-style, grouped-query attention) plus tiny shapes for
tests and CPU runs. The vocabulary always comes from the run's tokenizer, never from the preset, so
teacher and student share it by construction; a model loaded from a path is checked against it.
Nothing is ever fetched from a hub: paths are loaded with ``local_files_only=True``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from pd_dist.core.configlib import doc, fail
from pd_dist.store.format import sha256_file

# name: (hidden, ffn, layers, heads, kv_heads, tie_embeddings). Paper Table: 330M .. 6.8B students.
PRESETS: dict[str, tuple[int, int, int, int, int, bool]] = {
    "pd-330m": (1024, 4096, 12, 16, 2, True),
    "pd-670m": (1024, 4096, 24, 16, 2, False),
    "pd-1.9b": (2048, 6912, 24, 16, 2, False),
    "pd-3.8b": (3072, 8192, 28, 24, 8, False),
    "pd-6.8b": (4096, 12800, 28, 32, 8, False),
    # CPU-sized shapes: the embedded default run and the tests.
    "small-teacher": (256, 768, 4, 8, 2, False),
    "medium-student": (192, 576, 3, 6, 2, False),
    "small-student": (128, 384, 2, 4, 2, False),
    "mini-student": (64, 192, 2, 4, 2, False),
    "tiny-teacher": (64, 128, 2, 4, 2, False),
    "tiny-student": (32, 64, 2, 4, 2, False),
}


@dataclass
class ModelConfig:
    """Which causal LM to train (the student) or to distil from (the teacher)."""
    preset: Optional[str] = field(default="small-student", metadata=doc(
        "architecture preset (" + ", ".join(PRESETS) + "); ignored when `path` is set"))
    path: Optional[str] = field(default=None, metadata=doc(
        "local directory of a Hugging Face causal LM (save_pretrained format); overrides `preset`"))
    max_position_embeddings: int = field(default=4096, metadata=doc(
        "RoPE position limit for preset models (the paper trains at 4096)"))
    rope_theta: float = field(default=10000.0, metadata=doc("RoPE base for preset models, >= 1"))

    def validate(self, prefix: str) -> None:
        if self.path is None:
            if self.preset not in PRESETS:
                fail(f"{prefix}.preset", self.preset,
                     "must be one of " + ", ".join(PRESETS) + " (or set `path`)")
        if self.max_position_embeddings < 1:
            fail(f"{prefix}.max_position_embeddings", self.max_position_embeddings, "must be >= 1")
        # The rotary frequencies are rope_theta ** (-2i / d): a base below 1 inverts them, and one near 0
        # makes them overflow to inf in fp32.
        if not self.rope_theta >= 1:
            fail(f"{prefix}.rope_theta", self.rope_theta, "must be >= 1")


def partitioned_builder(cfg: ModelConfig, vocab_size: int, seed: int, dtype: torch.dtype = torch.float32):
    """A zero-argument function that builds the model inside ``deepspeed.zero.Init``: each parameter is
    partitioned as it is created, then drawn (init_weights) or read from the path's safetensors one
    tensor at a time, so no rank ever holds the whole model. Everything that imports or reads files is
    done here, outside the zero.Init context (which patches tensor construction)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.path:
        conf = AutoConfig.from_pretrained(str(cfg.path), local_files_only=True)
        conf._attn_implementation = "sdpa"
        if conf.vocab_size != vocab_size:
            raise ValueError(f"model at {cfg.path} has vocab_size {conf.vocab_size} but the run's tokenizer "
                             f"has {vocab_size}: teacher, student and data must share one tokenizer")
    else:
        conf = preset_config(cfg, vocab_size)
    cls = AutoModelForCausalLM._model_mapping[type(conf)]  # imports the modeling module now

    def build():
        model = cls(conf).to(dtype)
        if cfg.path:
            load_weights(model, cfg.path, partitioned=True)
        else:
            init_weights(model, seed, conf.initializer_range, partitioned=True)
        return model
    return build


@torch.no_grad()
def load_weights(module: torch.nn.Module, path, partitioned: bool = False, prefix: str = "") -> None:
    """Copy the tensors of a save_pretrained directory's safetensors into `module`'s parameters by name
    (`prefix`: the module's name inside the whole model). Every parameter must be found."""
    import contextlib

    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no safetensors weights")
    index = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            index.update({name: f for name in fh.keys()})
    for name, p in module.named_parameters():
        if prefix + name not in index:
            raise KeyError(f"{path}: no tensor {prefix + name!r}")
        ctx = contextlib.nullcontext()
        if partitioned:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters([p], modifier_rank=0)
        with ctx, safe_open(str(index[prefix + name]), framework="pt") as fh:
            p.copy_(fh.get_tensor(prefix + name))


def build_model(cfg: ModelConfig, vocab_size: int, seed: int, dtype: torch.dtype = torch.float32):
    """Build (preset, seeded init: see init_weights) or load (path) a causal LM whose vocabulary is
    ``vocab_size``. (partitioned_builder does the same inside deepspeed.zero.Init.)"""
    from transformers import AutoModelForCausalLM

    if cfg.path:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model path {path} has no config.json (expected a save_pretrained dir)")
        model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=dtype, attn_implementation="sdpa")
        if model.config.vocab_size != vocab_size:
            raise ValueError(
                f"model at {path} has vocab_size {model.config.vocab_size} but the run's tokenizer has "
                f"{vocab_size}: teacher, student and data must share one tokenizer")
        return model
    conf = preset_config(cfg, vocab_size)
    with torch.device("meta"):  # shapes only: the weights are drawn below, one generator per tensor
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives tied parameters separate storage again
    body = model.get_decoder()
    body.rotary_emb = type(body.rotary_emb)(config=conf)  # its buffers were left unset by to_empty
    init_weights(model, seed, conf.initializer_range)
    return model.to(dtype)


def preset_config(cfg: ModelConfig, vocab_size: int):
    """The Hugging Face LlamaConfig of a preset at the run's vocabulary."""
    from transformers import LlamaConfig

    hidden, ffn, layers, heads, kv, tied = PRESETS[cfg.preset]
    conf = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        attention_bias=False, mlp_bias=False, initializer_range=0.02, use_cache=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    conf._attn_implementation = "sdpa"
    return conf


def _param_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def init_weights(module: torch.nn.Module, seed: int, std: float, prefix: str = "",
                 partitioned: bool = False) -> None:
    """Llama's initialisation (matrices ~ N(0, std), norm weights 1), with each tensor drawn from its
    own generator seeded by (seed, its name in the whole model). So a tensor's initial value does not
    depend on which other tensors a process builds: every data-parallel rank, a pipeline stage that
    builds only its own layers, and a ZeRO-3 rank holding a shard all start from the same weights.
    `prefix` is the module's name inside the whole model; `partitioned`: ZeRO-3 parameters (each one
    is gathered, drawn on rank 0 and scattered back)."""
    import contextlib

    for name, p in module.named_parameters():
        ctx = contextlib.nullcontext()
        if partitioned:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters([p], modifier_rank=0)
        with ctx:
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                g = torch.Generator().manual_seed(_param_seed(seed, prefix + name))
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)


def model_identity(model_dir: Path, name: str) -> dict:
    """Name, config hash and weights hash of a save_pretrained directory."""
    weights = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not weights:
        raise FileNotFoundError(f"no weight files in {model_dir}")
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.pop("transformers_version", None)  # not part of the model
    return {"name": name, "config_hash": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest(),
            "weights_hash": hashlib.sha256("".join(f"{p.name}:{sha256_file(p)}" for p in weights)
                                           .encode()).hexdigest()}


def weights_digest(model_dir: Path, window: int = 1 << 20) -> str:
    """A cheap fingerprint of a save_pretrained directory's weights: each weight file's name, size and
    sha256 of three `window`-byte slices (start, middle, end). It tells one trained model from another
    (training changes every tensor) in milliseconds even for a 140 GB teacher; it is not a guard
    against a deliberate edit of a few bytes (model_identity hashes everything)."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files in {model_dir}")
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}:".encode())
        with open(f, "rb") as fh:
            for offset in sorted({0, max(0, size // 2 - window // 2), max(0, size - window)}):
                fh.seek(offset)
                h.update(fh.read(window))
    return h.hexdigest()


def count_params(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += getattr(p, "ds_numel", p.numel())
    return n


def tokenizer_hash(tokenizer_dir: str | os.PathLike) -> str:
    """Hash of the tokenizer's vocabulary and merges: equal hashes mean identical token ids."""
    p = Path(tokenizer_dir) / "tokenizer.json"
    data = json.loads(p.read_text())
    model = data.get("model", {})
    blob = json.dumps({"vocab": model.get("vocab"), "merges": model.get("merges"),
                       "added": data.get("added_tokens")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_same_tokenizer(model_path: str | os.PathLike, run_tokenizer_dir: str | os.PathLike,
                         what: str) -> None:
    """If a model directory ships a tokenizer, it must be the run's tokenizer."""
    mp = Path(model_path)
    if (mp / "tokenizer.json").is_file():
        a, b = tokenizer_hash(mp), tokenizer_hash(run_tokenizer_dir)
        if a != b:
            raise ValueError(
                f"{what} at {mp} was trained with a different tokenizer (hash {a}) than the run's "
                f"({b} at {run_tokenizer_dir}): " + ("set distill.cross_tokenizer map (or uld) to distil across "
                "tokenizers, or give a teacher of the run's tokenizer" if what == "the teacher" else
                "teacher and student must share vocabulary and tokenizer"))


def final_norm_and_head(model):
    """(decoder body returning final hidden states, LM head Linear) of an HF causal LM."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError("pd-dist needs a causal LM with a bias-free linear LM head")
    return body, head


def preset_param_count(preset: str, vocab_size: int) -> int:
    """Parameters of a preset at a vocabulary, counted on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(preset_config(ModelConfig(preset=preset), vocab_size))
    return count_params(model)


# ----------------------------------------------------------------------------------- document masking
# data.document_mask: a packed window holds several documents (each ends with EOS); with the mask each
# token attends only to the earlier tokens of its own document and its position restarts at 0 where its
# document starts (the Llama 3 recipe). The window's first document usually began in an earlier window:
# its positions start at 0 at the window's start.

def document_position_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Position ids [B, T] (int64) restarting at 0 at the window's start and right after each EOS."""
    B, T = input_ids.shape
    idx = torch.arange(T, device=input_ids.device).expand(B, T)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    start_of = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_of


def document_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """The block-diagonal causal mask [B, 1, T, T] (bool, True: may attend) of document position ids
    (document_position_ids: a document starts exactly where its position is 0). It is a function of the
    positions alone, so a pipeline stage rebuilds it from the positions it receives."""
    doc = (position_ids == 0).cumsum(dim=1)
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal).unsqueeze(1)


def attention_mask_for(conf, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True: may attend) in the form the model's attention takes as a prepared 4D mask:
    sdpa takes it as it is, eager adds it to the scores (0 or the dtype's lowest value)."""
    impl = getattr(conf, "_attn_implementation", None) or "sdpa"
    if impl == "sdpa":
        return mask
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(f"data.document_mask needs sdpa or eager attention, this model uses {impl!r}")


def document_inputs(conf, input_ids: torch.Tensor, eos_id: int, dtype: torch.dtype) -> dict:
    """Keyword arguments (position_ids, attention_mask) of a Llama-family decoder body for document
    masking of the packed windows ``input_ids`` [B, T]."""
    pos = document_position_ids(input_ids, eos_id)
    return {"position_ids": pos, "attention_mask": attention_mask_for(conf, document_causal_mask(pos), dtype)}


def body_hidden_at(body, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The decoder body's final hidden states [B, T, H] of rows packed with independent sequences:
    each sequence starts where ``position_ids`` is 0 and attends to itself alone."""
    dtype = body.get_input_embeddings().weight.dtype
    mask = attention_mask_for(body.config, document_causal_mask(position_ids), dtype)
    return body(input_ids=input_ids, position_ids=position_ids, attention_mask=mask).last_hidden_state


def body_hidden(body, input_ids: torch.Tensor, document_eos: Optional[int] = None) -> torch.Tensor:
    """The decoder body's final hidden states [B, T, H] of token windows; with ``document_eos`` (the
    EOS id, data.document_mask) each document of a window is attended to on its own."""
    if document_eos is None:
        return body(input_ids=input_ids).last_hidden_state
    dtype = body.get_input_embeddings().weight.dtype
    masked = document_inputs(body.config, input_ids, document_eos, dtype)
    return body(input_ids=input_ids, **masked).last_hidden_state


def model_shape(model_cfg: ModelConfig, vocab_size: int):
    """The FLOP-counting Shape (pd_dist.core.flops) of a ModelConfig: its preset at ``vocab_size``, or the
    config.json of its ``path``."""
    from pd_dist.core.flops import Shape

    if model_cfg.path:
        c = json.loads((Path(model_cfg.path) / "config.json").read_text())
        heads = int(c["num_attention_heads"])
        return Shape(int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_hidden_layers"]), heads,
                     int(c.get("num_key_value_heads") or heads), int(c.get("vocab_size", vocab_size)))
    hidden, ffn, layers, heads, kv, _ = PRESETS[model_cfg.preset]
    return Shape(hidden, ffn, layers, heads, kv, int(vocab_size))
