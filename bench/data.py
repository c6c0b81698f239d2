"""Data preparation at growing corpus sizes: memory and time per token stay flat, the worker processes
scale, and the whole pipeline (read, parse, tokenize, write) keeps up with the tokenizer alone.

Synthetic corpora of 100 MB, 400 MB and 1.6 GB of JSON lines are cut from the embedded corpus's real
text (random slices of the standard library's sources and docs; deleted afterwards) and prepared with
`pd-dist`'s own code in a fresh process each, with one tokenizer (a byte-level BPE, vocab 8192, trained
once on the embedded corpus). The peak RSS of the whole process tree (the preparing process and its
workers) is sampled every 50 ms.

- rss_ratio: peak RSS at 1.6 GB / at 100 MB (goal <= 1.15)
- time_per_token_ratio: seconds per token at 1.6 GB / at 100 MB (goal <= 1.15)
- vs_tokenizers: tokens/s of the preparation of 100 MB with 2 workers / tokens/s of `tokenizers`'
  own encode_batch over the same documents held in memory, on the same 2 cores (goal >= 0.8)
- worker_scaling: tokens/s with 2 workers / with 1 (400 MB; the single worker's tokenizer runs on one
  thread, TOKENIZERS_PARALLELISM=false) (goal >= 1.6 on 2 cores)

    python bench/data.py [--sizes-mb 100,400,1600] [--dir /tmp/pd_bench_data]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import emit, log  # noqa: E402

FILE_MB = 200  # the corpus is written as files of at most this size


def make_corpus(root: Path, size_mb: int, seed: int) -> Path:
    from pd_dist.data import embedded_documents

    pool = [d for d in embedded_documents() if len(d) > 2000]
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    target, written, k = size_mb * 1_000_000, 0, 0
    fh = None
    while written < target:
        if fh is None or fh.tell() >= FILE_MB * 1_000_000:
            if fh:
                fh.close()
            fh = open(root / f"part-{k:03d}.jsonl", "w")
            k += 1
        d = pool[int(rng.integers(len(pool)))]
        n = int(rng.integers(500, 5000))
        a = int(rng.integers(0, max(1, len(d) - n)))
        line = json.dumps({"text": d[a:a + n], "id": written}) + "\n"
        fh.write(line)
        written += len(line)
    fh.close()
    return root


def tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_prepare(corpus: Path, out: Path, tokenizer: Path, workers: int, single_thread: bool = False) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    code = ("import json, sys, time; from pd_dist.core.configlib import build; from pd_dist.data import DataConfig, "
            "PackedDataset, prepare_data\n"
            f"cfg = build(DataConfig, {{'source': 'files', 'files': [{str(corpus)!r}], 'tokenizer': {str(tokenizer)!r}, "
            "'seq_len': 1024, 'val_samples': 8}, 'data')\n"
            f"t0 = time.perf_counter(); prepare_data(cfg, {str(out)!r}, workers={workers}, log=lambda m: None)\n"
            "dt = time.perf_counter() - t0; m = PackedDataset(" + repr(str(out)) + ").meta\n"
            "print(json.dumps({'seconds': dt, 'tokens': m['n_tokens'], 'docs': m['n_docs']}))")
    env = dict(os.environ)
    if single_thread:
        env["TOKENIZERS_PARALLELISM"] = "false"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=Path(__file__).resolve().parent.parent)
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out_s, err_s = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode:
        raise RuntimeError(f"preparation failed: {err_s[-2000:]}")
    res = json.loads(out_s.strip().splitlines()[-1])
    res.update(peak_rss=peak[0], tokens_per_s=res["tokens"] / res["seconds"], workers=workers)
    return res


def tokenizers_baseline(corpus: Path, tokenizer: Path) -> dict:
    """encode_batch of the same documents, held in memory, on all cores (the library's parallelism)."""
    code = ("import json, glob, time\nfrom tokenizers import Tokenizer\n"
            f"tok = Tokenizer.from_file({str(tokenizer / 'tokenizer.json')!r})\n"
            f"docs = [json.loads(l)['text'] for f in sorted(glob.glob({str(corpus)!r} + '/*.jsonl')) for l in open(f)]\n"
            "t0 = time.perf_counter(); n = 0\n"
            "for i in range(0, len(docs), 2048):\n"
            "    n += sum(len(e.ids) + 1 for e in tok.encode_batch(docs[i:i + 2048], add_special_tokens=False))\n"
            "dt = time.perf_counter() - t0\nprint(json.dumps({'seconds': dt, 'tokens': n}))")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["tokens_per_s"] = res["tokens"] / res["seconds"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", default="100,400,1600")
    ap.add_argument("--dir", default="/tmp/pd_bench_data")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        from pd_dist.core.configlib import build
        from pd_dist.data import DataConfig, prepare_data

        log("[bench] training the tokenizer on the embedded corpus")
        tok_data = prepare_data(build(DataConfig, {"vocab_size": 8192}, "data"), root / "tok", log=lambda m: None)
        tokenizer = tok_data / "tokenizer"
        runs = {}
        for mb in sizes:
            log(f"[bench] writing a {mb} MB corpus")
            corpus = make_corpus(root / f"corpus{mb}", mb, seed=mb)
            if mb == sizes[0]:
                base = tokenizers_baseline(corpus, tokenizer)
                log(f"[bench] tokenizers encode_batch: {base['tokens_per_s']:,.0f} tokens/s")
            runs[mb] = run_prepare(corpus, root / "out", tokenizer, workers=2)
            log(f"[bench] {mb} MB, 2 workers: {runs[mb]['tokens']:,} tokens in {runs[mb]['seconds']:.1f} s "
                f"({runs[mb]['tokens_per_s']:,.0f} tokens/s), peak RSS {runs[mb]['peak_rss'] / 2**20:,.0f} MiB")
            if mb == sizes[min(1, len(sizes) - 1)]:
                one = run_prepare(corpus, root / "out", tokenizer, workers=1, single_thread=True)
                log(f"[bench] {mb} MB, 1 worker: {one['tokens_per_s']:,.0f} tokens/s, "
                    f"peak RSS {one['peak_rss'] / 2**20:,.0f} MiB")
                scaling = runs[mb]["tokens_per_s"] / one["tokens_per_s"]
            shutil.rmtree(corpus)
            shutil.rmtree(root / "out", ignore_errors=True)
        small, large = runs[sizes[0]], runs[sizes[-1]]
        result = {
            "bench": "data",
            "rss_ratio": large["peak_rss"] / small["peak_rss"],
            "time_per_token_ratio": (large["seconds"] / large["tokens"]) / (small["seconds"] / small["tokens"]),
            "vs_tokenizers": small["tokens_per_s"] / base["tokens_per_s"],
            "worker_scaling": scaling,
            "peak_rss_mib": {str(mb): round(r["peak_rss"] / 2**20) for mb, r in runs.items()},
            "tokens_per_s": {str(mb): round(r["tokens_per_s"]) for mb, r in runs.items()},
            "tokenizers_tokens_per_s": round(base["tokens_per_s"]),
            "goals": {"rss_ratio": "<= 1.15", "time_per_token_ratio": "<= 1.15", "vs_tokenizers": ">= 0.8",
                      "worker_scaling": ">= 1.6"},
            "cores": os.cpu_count(),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    emit(result)


if __name__ == "__main__":
    main()
