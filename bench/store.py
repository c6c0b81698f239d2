"""Benchmark: the offline teacher-logits store (pd_dist.store): bytes per token and read throughput.

Teacher logits come from (first that applies):
  1. --teacher PATH (a save_pretrained dir) + --data PATH (a prepared data dir: tokens.bin, meta.json);
  2. the embedded default run's trained teacher, runs/default/teacher/export + runs/default/data;
  3. a synthetic Zipf-like generator (clearly labelled: teacher_source = "synthetic-zipf"): logit =
     -s * log(U), U ~ Uniform(0, 1) per entry, s ~ Uniform(1, 2.5) per token (as bench/truncate.py), so
     the r-th largest probability is ~ r^-s and the kept indices are uniformly random (the hardest case
     for index coding; a trained LM's top tokens are far more predictable and peaked).

Measured, at top-0.95-50 and top-0.95-100 (default value encoding qgap, step 2^-8: TV <= 9.84e-4 per
token at tau = 1, see pd_dist.store.codec):
  * bytes per token of the shard files (headers, tables and footers included; the manifest, a few KB
    per store whatever its size, is left out), against the naive layout: int32 index + fp16 value per
    kept entry + a 1-byte count per token, and the paper's ~150 B/token (15 TB per 100B tokens);
  * sampled_bytes_per_token: the sampled signal of 50 draws at tau 1 (distill.signal sampled, stored
    as exact draw counts), and sampled_vs_top_p_k, its ratio to top-0.95-50; head_tail_bytes_per_token
    for a top-0.95-20 head plus 30 tail draws (qgap), the same 50-entry budget;
  * bytes_per_token_151k: the same at top-0.95-50 for a random-weights tiny-teacher with a 151552
    vocabulary whose LM head is scaled up so its distributions are far from uniform (reported only);
  * format3_bytes_per_token: the same top-0.95-50 logits as one source's stream in a document store
    (format 3, records of --record-tokens positions), and format3_vs_format2, its ratio to format 2;
    format3_read_tokens_per_s: windows of seq_len read at random positions (each decodes the records it
    spans), and its ratio to format 2's sample reads;
  * fidelity of each signal (top-0.95-50, top-0.95-100, sampled, head_tail) against the teacher's full
    distribution on every position of --fidelity-samples samples, read back from its store: head mass,
    TV, KL(p_hat || p), tail-smoothed KL(p || p_tail), JSD (pd_dist.core.fidelity), beside its bytes per
    token, so truncation can be chosen by fidelity per byte;
  * read_tokens_per_s: tokens/s decoded by get_batch (batch 8) in a random sample order, one process
    (includes the crc32 check, zstd and the vectorized decode); read_vs_consume when
    --consume-tokens-per-s is given (the student's consumption rate).

Prints one JSON line last on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import emit, log  # noqa: E402
from pd_dist.core.fidelity import mean_fidelity, signal_fidelity  # noqa: E402
from pd_dist.core.logits import SignalSpec, sample_keys, truncate  # noqa: E402
from pd_dist.store import LogitsStore, ShardWriter, StoreMeta, shard_ranges, store_info, write_manifest  # noqa: E402

PAPER_BYTES_PER_TOKEN = 150.0  # ~15 TB per 100B tokens at top-0.95-100 over a ~150k vocabulary
DEFAULT_TEACHER = REPO / "runs" / "default" / "teacher" / "export"
DEFAULT_DATA = REPO / "runs" / "default" / "data"


def zipf_logits(tokens: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    s = torch.empty(tokens, 1).uniform_(1.0, 2.5, generator=g)
    u = torch.rand(tokens, vocab, generator=g, dtype=torch.float32).clamp_min_(1e-30)
    return u.log_().mul_(-s)


class Source:
    """Yields full-vocabulary teacher logits [seq_len, V] per sample."""

    def __init__(self, args):
        teacher, data = args.teacher, args.data
        if (teacher is None) != (data is None):
            raise SystemExit("--teacher and --data go together")
        if teacher is None and (DEFAULT_TEACHER / "config.json").is_file() and (DEFAULT_DATA / "meta.json").is_file():
            teacher, data = DEFAULT_TEACHER, DEFAULT_DATA
            self.name = "default-teacher"
        elif teacher is not None:
            self.name = "teacher-path"
        else:
            self.name = "synthetic-zipf"
        self.model = None
        if teacher is not None:
            from pd_dist.data import PackedDataset
            from pd_dist.models import ModelConfig, build_model

            self.ds = PackedDataset(data)
            self.vocab = self.ds.vocab_size
            self.seq_len = self.ds.seq_len
            self.model = build_model(ModelConfig(path=str(teacher)), self.vocab, seed=0).eval()
            self.teacher_path = str(teacher)
            self.data_path = str(data)
            n = self.ds.n_train
            self.ids = np.random.default_rng(0).choice(n, size=min(n, args.samples), replace=False)
        else:
            self.vocab, self.seq_len = args.vocab, args.seq_len
            self.teacher_path = None
            self.data_path = None
            self.ids = np.arange(args.samples)
        self.g = torch.Generator().manual_seed(0)

    def __len__(self):
        return len(self.ids)

    def logits(self, j: int) -> torch.Tensor:
        if self.model is None:
            return zipf_logits(self.seq_len, self.vocab, self.g)
        x = torch.from_numpy(self.ds.sample(int(self.ids[j]))[None, :-1])
        with torch.no_grad():
            return self.model(input_ids=x).logits[0].float()


def build_stores(root: Path, full: list[torch.Tensor], vocab: int, seq_len: int, settings, shard_size: int):
    """Write one store per (top_p, top_k) in ``settings`` from the same full logits."""
    n = len(full)
    metas = {}
    for p, k in settings:
        metas[(p, k)] = StoreMeta(teacher={"name": "bench", "config_hash": "-", "weights_hash": "-"},
                                  tokenizer_hash="-", data_fingerprint="-", seq_len=seq_len, vocab_size=vocab,
                                  top_p=p, top_k=k, n_samples=n, shard_size=shard_size)
    for (p, k), meta in metas.items():
        d = root / f"top{p}-{k}"
        for i, (a, b) in enumerate(shard_ranges(n, shard_size)):
            with ShardWriter(d, meta, i) as w:
                for s in range(a, b):
                    w.add(s, truncate(full[s], p, k, keep_lse=True))
                w.finish()
        write_manifest(d, meta)
    return {key: root / f"top{key[0]}-{key[1]}" for key in metas}


def build_document_store(root: Path, full: list[torch.Tensor], vocab: int, record: int, shard_size: int) -> Path:
    """The same logits as one source's stream in a document store (format 3) at top-0.95-50: the samples
    back to back, cut into records of ``record`` positions (the last one padded as generation pads it)."""
    stream = torch.cat(full)
    n_tok = stream.shape[0]
    n_rec = -(-n_tok // record)
    meta = StoreMeta(teacher={"name": "bench", "config_hash": "-", "weights_hash": "-"}, tokenizer_hash="-",
                     data_fingerprint="-", seq_len=record, vocab_size=vocab, top_p=0.95, top_k=50,
                     n_samples=n_rec, shard_size=shard_size * max(1, full[0].shape[0] // record),
                     context="document", teacher_seq_len=full[0].shape[0], n_tokens=n_tok, source="bench").resolved()
    d = root / "document"
    for i, (a, b) in enumerate(shard_ranges(n_rec, meta.shard_size)):
        with ShardWriter(d, meta, i) as w:
            for r in range(a, b):
                rows = torch.arange(r * record, (r + 1) * record).clamp_max(n_tok - 1)
                w.add(r, truncate(stream[rows], 0.95, 50, keep_lse=True))
            w.finish()
    write_manifest(d, meta)
    return d


def read_spans_throughput(d: Path, seconds: float, batch: int, length: int) -> float:
    """Tokens/s of get_spans(batch random windows of ``length``) from a document store, one process."""
    store = LogitsStore(d)
    rng = np.random.default_rng(1)
    top = store.meta.n_tokens - length
    store.get_spans(rng.integers(0, top, batch), length)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        store.get_spans(rng.integers(0, top, batch), length)
        n += batch * length
    return n / (time.perf_counter() - t0)


DRAWN = {"sampled": SignalSpec("sampled", 1.0, 50, 50, 1.0, 0),  # 50 draws: the top-50 budget
         "head_tail": SignalSpec("head_tail", 0.95, 20, 30, 1.0, 0)}  # top-0.95-20 head + 30 tail draws


def build_drawn_stores(root: Path, full: list[torch.Tensor], vocab: int, seq_len: int, shard_size: int):
    """One store per drawn signal in DRAWN (default encodings: counts for sampled, qgap for head_tail)."""
    n = len(full)
    out = {}
    for name, spec in DRAWN.items():
        top_p, top_k = (1.0, spec.samples) if spec.kind == "sampled" else (spec.top_p, spec.top_k)
        meta = StoreMeta(teacher={"name": "bench", "config_hash": "-", "weights_hash": "-"}, tokenizer_hash="-",
                         data_fingerprint="-", seq_len=seq_len, vocab_size=vocab, top_p=top_p, top_k=top_k,
                         n_samples=n, shard_size=shard_size, signal={"kind": spec.kind, **spec.params()}).resolved()
        d = out[name] = root / name
        for i, (a, b) in enumerate(shard_ranges(n, shard_size)):
            with ShardWriter(d, meta, i) as w:
                for s in range(a, b):
                    w.add(s, spec.form(full[s], sample_keys(spec.seed, torch.tensor([s]), seq_len)[0]))
                w.finish()
        write_manifest(d, meta)
    return out


def fidelity_of(d: Path, full: list[torch.Tensor], samples: int) -> dict:
    """The store's signal against the teacher's full distribution (pd_dist.core.fidelity), averaged over
    every position of its first ``samples`` samples, read back from the store as training reads it."""
    store = LogitsStore(d)
    spec = store.meta.signal_spec
    tau, loss_tau = float(getattr(spec, "temperature", 1.0)), float(spec.loss_temperature)
    parts = [signal_fidelity(full[s], store.get_batch([s])[0].without_lse(), tau, loss_tau)
             for s in range(min(samples, len(full)))]
    return {k: round(v, 5) for k, v in mean_fidelity(parts).items()}


def size_summary(d: Path) -> dict:
    info = store_info(d)
    tokens, kept = info["tokens"], info["kept_entries"]
    ours = info["shard_bytes"] / tokens
    naive = (6 * kept + tokens) / tokens
    return {"bytes_per_token": round(ours, 3), "naive_bytes_per_token": round(naive, 3),
            "ratio_vs_naive": round(ours / naive, 4), "bytes_per_kept_entry": round(info["shard_bytes"] / kept, 3),
            "kept_per_token_mean": round(kept / tokens, 2), "kept_per_token_p50": info["kept_per_token"]["p50"],
            "kept_per_token_p90": info["kept_per_token"]["p90"], "vs_paper_150": round(ours / PAPER_BYTES_PER_TOKEN, 4)}


def read_throughput(d: Path, seconds: float, batch: int) -> float:
    store = LogitsStore(d)
    n = len(store)
    rng = np.random.default_rng(1)
    store.get_batch(rng.integers(0, n, batch))  # map shards, warm caches
    tokens, t0 = 0, time.perf_counter()
    while True:
        order = rng.permutation(n)
        for s in range(0, n - batch + 1, batch):
            store.get_batch(order[s:s + batch])
            tokens += batch * store.meta.seq_len
        el = time.perf_counter() - t0
        if el >= seconds:
            return tokens / el


def vocab_151k(args, root: Path) -> dict:
    from pd_dist.models import ModelConfig, build_model

    V = 151552
    model = build_model(ModelConfig(preset="tiny-teacher"), V, seed=0).eval()
    with torch.no_grad():
        # A fresh init gives near-uniform distributions over 151k entries; scale the head so that the
        # top-0.95 set is small enough to be of interest, like a trained model's.
        model.get_output_embeddings().weight.mul_(args.head_scale_151k)
    g = torch.Generator().manual_seed(1)
    full = []
    for _ in range(args.samples_151k):
        x = torch.randint(0, V, (1, args.seq_len_151k), generator=g)
        with torch.no_grad():
            full.append(model(input_ids=x).logits[0].float())
    stores = build_stores(root / "v151k", full, V, args.seq_len_151k, [(0.95, 50)], args.samples_151k)
    return size_summary(stores[(0.95, 50)])


def generation_overhead(teacher_dir: Path, data_dir: Path, samples: int, micro: int) -> dict:
    """Generation (forward + top-p-k + lse + encode + write, as launch/generate_logits.py does it)
    against a bare teacher forward (body + LM head, full logits, nothing else) on the same batches."""
    from pd_dist.data import PackedDataset
    from pd_dist.teacher.stores import write_shard
    from pd_dist.models import ModelConfig, build_model
    from pd_dist.teacher.inference import FrozenTeacher

    data = PackedDataset(data_dir)
    model = build_model(ModelConfig(path=str(teacher_dir)), data.vocab_size, seed=0).eval()
    samples = min(samples, data.n_train)
    batches = [torch.from_numpy(data.batch(np.arange(s, min(s + micro, samples))))[:, :-1]
               for s in range(0, samples, micro)]
    with torch.no_grad():
        model(batches[0])  # warm-up
        t0 = time.perf_counter()
        for b in batches:
            model(b).logits.float()
        bare = time.perf_counter() - t0
    meta = StoreMeta(teacher={"name": "bench", "config_hash": "-", "weights_hash": "-"},
                     tokenizer_hash=data.meta["tokenizer_hash"], data_fingerprint=data.fingerprint,
                     seq_len=data.seq_len, vocab_size=data.vocab_size, top_p=0.95, top_k=50,
                     n_samples=samples, shard_size=samples).resolved()
    with tempfile.TemporaryDirectory(prefix="pd_gen_bench_") as tmp:
        t0 = time.perf_counter()
        teacher = FrozenTeacher(model, torch.device("cpu"), torch.float32, SignalSpec.of("top_p_k", top_p=0.95, top_k=50),
                                1024, keep_lse=True)
        write_shard(Path(tmp), meta, 0, data, teacher, micro)
        gen = time.perf_counter() - t0
    tokens = samples * data.seq_len
    return {"gen_overhead": round(gen / bare - 1, 4), "bare_forward_s": round(bare, 3),
            "generation_s": round(gen, 3), "gen_tokens_per_s": round(tokens / gen),
            "bare_tokens_per_s": round(tokens / bare), "gen_samples": samples, "gen_micro_batch": micro}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, default=None, help="HF save_pretrained teacher directory")
    ap.add_argument("--data", type=Path, default=None, help="prepared data directory (tokens.bin, meta.json)")
    ap.add_argument("--samples", type=int, default=64, help="samples of teacher logits to store")
    ap.add_argument("--vocab", type=int, default=8192, help="synthetic source: vocabulary")
    ap.add_argument("--seq-len", type=int, default=256, help="synthetic source: tokens per sample")
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--record-tokens", type=int, default=256, help="format 3: positions per record")
    ap.add_argument("--samples-151k", type=int, default=8)
    ap.add_argument("--seq-len-151k", type=int, default=256)
    ap.add_argument("--head-scale-151k", type=float, default=60.0)
    ap.add_argument("--read-seconds", type=float, default=5.0)
    ap.add_argument("--read-batch", type=int, default=8)
    ap.add_argument("--consume-tokens-per-s", type=float, default=None,
                    help="the student's training consumption (tokens/s) to compare the read rate with")
    ap.add_argument("--skip-151k", action="store_true")
    ap.add_argument("--fidelity-samples", type=int, default=16, help="samples the fidelity figures average over")
    ap.add_argument("--gen-samples", type=int, default=128, help="samples for the generation-overhead run")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    t0 = time.perf_counter()
    src = Source(args)
    log(f"source: {src.name} (vocab {src.vocab}, seq_len {src.seq_len}, {len(src)} samples)")
    full = [src.logits(j) for j in range(len(src))]
    log(f"teacher logits computed ({time.perf_counter() - t0:.1f}s)")
    result = {"teacher_source": src.name, "teacher_path": src.teacher_path, "vocab_size": src.vocab,
              "seq_len": src.seq_len, "samples": len(src), "encoding": "qgap step 2^-8 (TV <= 9.84e-4 at tau=1)",
              "paper_bytes_per_token": PAPER_BYTES_PER_TOKEN}
    with tempfile.TemporaryDirectory(prefix="pd_store_bench_") as tmp:
        root = Path(tmp)
        stores = build_stores(root, full, src.vocab, src.seq_len, [(0.95, 50), (0.95, 100)], args.shard_size)
        drawn = build_drawn_stores(root, full, src.vocab, src.seq_len, args.shard_size)
        document = build_document_store(root, full, src.vocab, args.record_tokens, args.shard_size)
        fidelity = {f"top{p}_{k}": fidelity_of(d, full, args.fidelity_samples) for (p, k), d in stores.items()}
        fidelity.update({name: fidelity_of(d, full, args.fidelity_samples) for name, d in drawn.items()})
        del full
        log(f"stores written ({time.perf_counter() - t0:.1f}s)")
        for (p, k), d in stores.items():
            s = size_summary(d)
            result[f"top{p}_{k}"] = s
            log(f"top-{p}-{k}: {s}")
        for name, d in drawn.items():
            info = store_info(d)
            result[name] = {"signal": DRAWN[name].describe(), "encoding": info["encoding"]["name"],
                            "bytes_per_token": round(info["shard_bytes"] / info["tokens"], 3),
                            "kept_per_token_mean": round(info["kept_per_token"]["mean"], 2)}
            log(f"{name}: {result[name]}")
        for name, f in fidelity.items():  # beside bytes per token: fidelity per byte
            result[name]["fidelity"] = f
            log(f"{name}: fidelity {f}, {result[name]['bytes_per_token']} B/token")
        result["fidelity_setting"] = (f"every position of {min(args.fidelity_samples, len(src))} samples; p at the "
                                      "signal's tau, p_hat as training targets it (pd_dist.core.fidelity)")
        result["sampled_bytes_per_token"] = result["sampled"]["bytes_per_token"]
        result["sampled_vs_top_p_k"] = round(result["sampled_bytes_per_token"]
                                             / result["top0.95_50"]["bytes_per_token"], 4)
        result["head_tail_bytes_per_token"] = result["head_tail"]["bytes_per_token"]
        result["bytes_ratio"] = result["top0.95_50"]["ratio_vs_naive"]
        result["bytes_per_token"] = result["top0.95_50"]["bytes_per_token"]
        rate = read_throughput(stores[(0.95, 50)], args.read_seconds, args.read_batch)
        result["read_tokens_per_s"] = round(rate)
        result["read_setting"] = f"get_batch({args.read_batch}) random order, top-0.95-50, 1 process"
        log(f"read: {rate:,.0f} tokens/s")
        info3 = store_info(document)
        result["format3_bytes_per_token"] = round(info3["shard_bytes"] / info3["tokens"], 3)
        result["format3_vs_format2"] = round(result["format3_bytes_per_token"] / result["bytes_per_token"], 4)
        rate3 = read_spans_throughput(document, args.read_seconds, args.read_batch, src.seq_len)
        result["format3_read_tokens_per_s"] = round(rate3)
        result["format3_read_vs_format2"] = round(rate3 / rate, 3)
        result["format3_setting"] = (f"records of {args.record_tokens} positions; get_spans({args.read_batch} random "
                                     f"windows of {src.seq_len}), top-0.95-50, 1 process")
        log(f"format 3: {result['format3_bytes_per_token']} B/token ({result['format3_vs_format2']}x format 2), "
            f"read {rate3:,.0f} tokens/s ({result['format3_read_vs_format2']}x format 2)")
        consume = args.consume_tokens_per_s
        summary = REPO / "runs" / "default" / "summary.json"
        if consume is None and src.name == "default-teacher" and summary.is_file():
            import json

            consume = json.loads(summary.read_text()).get("tokens_per_sec")
            result["consume_source"] = f"{summary} (the default run's student tokens/s)"
        if consume:
            result["consume_tokens_per_s"] = round(consume)
            result["read_vs_consume"] = round(rate / consume, 2)
        if not args.skip_151k:
            s = vocab_151k(args, root)
            result["bytes_per_token_151k"] = s["bytes_per_token"]
            result["v151k_top0.95_50"] = s
            log(f"151k vocab: {s}")
    if src.teacher_path:
        g = generation_overhead(Path(src.teacher_path), Path(src.data_path), args.gen_samples, 8)
        result.update(g)
        log(f"generation: {g}")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
