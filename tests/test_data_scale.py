"""Data at scale: every input format streamed into Megatron-format shards, the same bytes for any worker
or rank count and after a kill -9 and rerun; megatron-core reads what pd-dist writes and pd-dist trains
on what megatron-core writes; blends keep their proportions; every bad input is one line naming the
file and line or row; caps are applied in document order and recorded."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pd_dist.core.configlib import build
from pd_dist.data import (DataConfig, DataError, GlobalBatchSampler, PackedDataset, blend_counts, blend_schedule,
                          embedded_documents, load_tokenizer, prepare_data)
from pd_dist.data.indexed import IndexedWriter, read_index

REPO = Path(__file__).resolve().parent.parent
QUIET = dict(log=lambda *_: None)


def _docs(n: int, start: int = 0) -> list[str]:
    """Real text: pieces of the standard library, cut to varied lengths."""
    out = []
    for i, d in enumerate(embedded_documents()):
        if i < start:
            continue
        for j in range(0, min(len(d), 6000), 1500):
            out.append(d[j:j + 300 + (i * 37 + j) % 1200])
            if len(out) == n:
                return out
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Every raw format at once, in a directory: jsonl, jsonl.gz, jsonl.zst, a JSON array, parquet, txt, md,
    and a save_to_disk dataset. Returns (dir, the documents in the order pd-dist reads them)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root = tmp_path_factory.mktemp("corpus")
    docs = _docs(420)
    parts = {}
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs[:150])))
    parts["a.jsonl"] = docs[:150]
    with gzip.open(root / "b.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps({"text": d}) + "\n" for d in docs[150:190])
    parts["b.jsonl.gz"] = docs[150:190]
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": d}) + "\n" for d in docs[190:230]).encode()))
    parts["c.jsonl.zst"] = docs[190:230]
    (root / "d.json").write_text(json.dumps([{"text": d} for d in docs[230:250]]))
    parts["d.json"] = docs[230:250]
    pq.write_table(pa.table({"text": docs[250:330]}), root / "e.parquet", row_group_size=10)
    parts["e.parquet"] = docs[250:330]
    datasets.Dataset.from_dict({"text": docs[330:400]}).save_to_disk(str(root / "f_hf"))
    parts["f_hf"] = docs[330:400]
    for i, d in enumerate(docs[400:420]):
        (root / f"g{i:02d}.txt").write_text(d)
        parts[f"g{i:02d}.txt"] = [d]
    order = [d for name in sorted(parts) for d in parts[name]]
    return root, order


def _cfg(files, **kw):
    base = {"source": "files", "files": [str(f) for f in files], "vocab_size": 400, "seq_len": 32,
            "val_samples": 4, "shard_bytes": 8192}
    base.update(kw)
    return build(DataConfig, base, "data")


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One worker, one rank: the reference preparation of the corpus."""
    root, _ = corpus
    out = prepare_data(_cfg([root]), tmp_path_factory.mktemp("ref") / "data", workers=1, **QUIET)
    return out


def test_every_format_streams_every_document_once(corpus, reference):
    _, order = corpus
    ds = PackedDataset(reference)
    tok = load_tokenizer(ds.tokenizer_dir)
    eos = tok.eos_token_id
    expect = [t for d in order for t in tok(d, add_special_tokens=False)["input_ids"] + [eos]]
    assert np.array_equal(ds.stream(), np.asarray(expect))
    assert ds.meta["n_docs"] == len(order)
    shards = ds.sources[0]["prefixes"]
    assert len(shards) > 10, "small shard_bytes must cut the corpus into many shards"
    # Samples tile the stream across shard boundaries: the targets of consecutive samples are the
    # stream shifted by one.
    L = ds.seq_len
    got = np.concatenate([ds.sample(i)[1:] for i in range(ds.n_train)])
    assert np.array_equal(got, np.asarray(expect[1:ds.n_train * L + 1]))


def test_same_bytes_for_any_worker_or_rank_count(corpus, reference, tmp_path):
    root, _ = corpus
    want = _tree(reference)
    two = prepare_data(_cfg([root]), tmp_path / "w2", workers=2, **QUIET)
    assert _tree(two) == want
    # Three ranks on a shared directory (threads here; processes through the launcher below).
    out = tmp_path / "r3"
    errors = []

    def rank(r):
        try:
            prepare_data(_cfg([root]), out, rank=r, world=3, workers=1, **QUIET)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert _tree(out) == want


def test_kill_9_then_rerun_keeps_finished_shards_and_ends_identical(tmp_path):
    src = tmp_path / "big.jsonl"
    docs = _docs(2000)
    with open(src, "w") as fh:
        for k in range(4):
            fh.writelines(json.dumps({"text": f"{k} {d}"}) + "\n" for d in docs)
    args = dict(shard_bytes=65536)
    ref = prepare_data(_cfg([src], **args), tmp_path / "ref", workers=1, **QUIET)
    out = tmp_path / "killed"
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from tests.test_data_scale import _cfg; "
            f"from pd_dist.data import prepare_data; "
            f"prepare_data(_cfg([{str(src)!r}], shard_bytes=65536), {str(out)!r}, workers=1)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("src-*/shard-*.json"))) < 4:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(out.glob("src-*/shard-*.json"))
    n_shards = len(PackedDataset(ref).sources[0]["prefixes"])
    assert 4 <= len(done) < n_shards, "the kill must land mid-way"
    assert not (out / "meta.json").exists(), "an interrupted preparation must never look finished"
    with pytest.raises(DataError, match="no prepared data"):
        PackedDataset(out)
    kept = {p.name: p.with_suffix(".bin").stat().st_mtime_ns for p in done}
    log = []
    prepare_data(_cfg([src], **args), out, workers=2, log=log.append)
    assert any(f"{len(done)} complete already" in m for m in log), log
    for name, mtime in kept.items():
        assert (next(out.glob("src-*")) / name).with_suffix(".bin").stat().st_mtime_ns == mtime
    assert _tree(out) == _tree(ref)


def test_prepared_shards_open_with_megatron_core(reference):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = PackedDataset(reference)
    src = ds.sources[0]
    stream = ds.stream()
    at = 0
    for prefix in src["prefixes"]:
        m = IndexedDataset(str(reference / src["dir"] / prefix))
        idx = read_index(reference / src["dir"] / prefix)
        assert len(m) == idx.n_docs and np.array_equal(m.document_indices, idx.doc_index)
        for i in range(len(m)):
            doc = np.asarray(m[i])
            assert np.array_equal(doc, stream[at:at + len(doc)])
            at += len(doc)
    assert at == len(stream)


def test_megatron_core_data_trains_as_it_is(tmp_path, reference):
    """A dataset built by megatron-core's own builder (several sequences per document, int32) is read
    with no conversion: the stream is its sequences in order."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tok_dir = PackedDataset(reference).tokenizer_dir
    tok = load_tokenizer(tok_dir)
    rng = np.random.default_rng(0)
    parts = []
    for name, dtype in (("web", np.int32), ("code", np.uint16)):
        prefix = str(tmp_path / f"{name}_text_document")
        b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
        for d in _docs(60, start=5 if name == "web" else 40):
            ids = tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            cut = int(rng.integers(1, len(ids)))
            b.add_document(torch.tensor(ids), [cut, len(ids) - cut])
            parts.append(ids)
        b.finalize(prefix + ".idx")
    cfg = build(DataConfig, {"source": "indexed", "prefixes": [str(tmp_path / "web_text_document"),
                                                               str(tmp_path / "code_text_document")],
                             "tokenizer": str(tok_dir), "seq_len": 32, "val_samples": 4}, "data")
    ds = PackedDataset(prepare_data(cfg, tmp_path / "prep", **QUIET))
    assert np.array_equal(ds.stream(), np.concatenate(parts))
    assert ds.meta["n_docs"] == 120 and ds.sources[0]["dir"] is None
    assert not list((tmp_path / "prep").glob("src-*")), "indexed data is not copied"


# ------------------------------------------------------------------------------------------ blends
@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1, 1], [0.5, 0.3, 0.2], [0.62, 0.21, 0.11, 0.06],
                                     [0.9, 0.05, 0.05], [0.333, 0.333, 0.334]])
def test_blend_holds_its_share_in_any_1000_samples(weights):
    counts = blend_counts(weights)
    assert sum(counts) == 10_000
    src, rank = blend_schedule(counts)
    seq = np.concatenate([src, src, src])  # the schedule repeats: windows across a period boundary too
    onehot = np.eye(len(counts), dtype=np.int64)[seq]
    cum = np.concatenate([np.zeros((1, len(counts)), np.int64), np.cumsum(onehot, axis=0)])
    window = cum[1000:] - cum[:-1000]
    share = np.asarray(counts) / 10_000 * 1000
    dev = np.abs(window - share).max()
    assert dev <= 1.0 + 1e-9, f"a window of 1000 is {dev:.3f} samples off its share"
    # Ranks count each source's draws in order within the period.
    for s in range(len(counts)):
        assert np.array_equal(rank[src == s], np.arange(counts[s]))


def test_blend_order_is_the_same_for_any_dp_size_and_after_resume():
    s = GlobalBatchSampler(300, 24, seed=3, blend=[(100, 5000), (120, 3000), (80, 2000)])
    for step in range(0, 40, 3):
        whole = s.global_batch_ids(step)
        for dp in (1, 2, 4):
            got = np.concatenate([np.concatenate(s.micro_batches(step, r, dp, 3)) for r in range(dp)])
            assert np.array_equal(got, whole)
        assert np.array_equal(GlobalBatchSampler(300, 24, 3, blend=s.blend).global_batch_ids(step), whole)
    ids = s.position_ids(0, 10_000 * 2)
    src = s.source_of(ids)
    assert np.bincount(src).tolist() == [10_000, 6_000, 4_000] == s.mix(20_000)
    # Each source cycles through its own samples: a permutation per epoch of that source.
    first = ids[src == 2][:80]
    assert sorted(first.tolist()) == list(range(220, 300))
    with pytest.raises(ValueError, match="blend"):
        GlobalBatchSampler(300, 24, 3).check_state(s.state(5))


def test_blend_of_files_and_embedded(corpus, tmp_path):
    root, _ = corpus
    cfg = build(DataConfig, {"source": "blend", "blend": [
        {"path": str(root / "a.jsonl"), "weight": 3}, {"path": "embedded", "weight": 1}],
        "max_chars": 200_000, "vocab_size": 400, "seq_len": 32, "val_samples": 8}, "data")
    log = []
    ds = PackedDataset(prepare_data(cfg, tmp_path / "b", log=log.append))
    assert [e["kind"] for e in ds.sources] == ["files", "embedded"]
    assert [e["blend_count"] for e in ds.sources] == [7500, 2500] and [e["n_val"] for e in ds.sources] == [6, 2]
    assert any("cut the embedded corpus" in m or "cut embedded" in m for m in log), log
    assert ds.meta["truncated"] and ds.meta["truncated"][0]["source"] == "embedded"
    sampler = ds.sampler(16, seed=1)
    ids = np.concatenate([sampler.global_batch_ids(k) for k in range(25)])
    src = sampler.source_of(ids)
    assert np.bincount(src).tolist() == [300, 100]
    for i in ids[:40]:  # a sample of source s is a window of source s's stream
        s, w = ds.locate(int(i))
        assert s == int(sampler.source_of(np.asarray([i]))[0])
        assert np.array_equal(ds.sample(int(i)), ds.stream(s)[w * 32:w * 32 + 33])
    # The fingerprint covers the blend: other weights, another fingerprint.
    cfg2 = build(DataConfig, dict(json.loads(json.dumps({"source": "blend", "blend": [
        {"path": str(root / "a.jsonl"), "weight": 1}, {"path": "embedded", "weight": 1}],
        "max_chars": 200_000, "vocab_size": 400, "seq_len": 32, "val_samples": 8}))), "data")
    other = PackedDataset(prepare_data(cfg2, tmp_path / "b", **QUIET))
    assert other.fingerprint != ds.fingerprint


# -------------------------------------------------------------------------------------------- caps
def test_user_sources_are_read_whole_and_a_cap_cuts_in_document_order(tmp_path):
    src = tmp_path / "c.jsonl"
    docs = _docs(400)
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    whole = PackedDataset(prepare_data(_cfg([src]), tmp_path / "whole", **QUIET))
    assert whole.meta["n_docs"] == len(docs) and not whole.meta["truncated"]
    cap = sum(len(d) for d in docs[:123]) - 5  # reached inside document 123 (index 122)
    log = []
    capped = PackedDataset(prepare_data(_cfg([src], max_chars=cap, tokenizer=str(whole.tokenizer_dir)),
                                        tmp_path / "cap", workers=2, log=log.append))
    assert capped.meta["n_docs"] == 123
    t = capped.meta["truncated"][0]
    assert t["documents"] == 123 and t["characters"] == sum(len(d) for d in docs[:123]) and t["max_chars"] == cap
    assert any("data.max_chars=" in m and "cut" in m for m in log)
    tok = load_tokenizer(whole.tokenizer_dir)
    n = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs[:123])
    assert np.array_equal(capped.stream(), whole.stream()[:n])
    shards = capped.sources[0]["prefixes"]
    assert len(shards) > 1 and len(shards) < len(whole.sources[0]["prefixes"])


# --------------------------------------------------------------------------------------- bad input
def _bad_cases(tmp: Path, tok_dir: str):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = json.dumps({"text": "a document of some words " * 20})
    cases = []

    def jsonl(name, lines):
        p = tmp / name
        p.write_text("\n".join(lines) + "\n")
        return p

    cases.append(("missing file", {"files": [str(tmp / "nope.jsonl")]}, r"nope\.jsonl matches no file"))
    cases.append(("empty glob", {"files": [str(tmp / "none*.jsonl")]}, r"none\*\.jsonl matches no file"))
    (tmp / "notes.csv").write_text("a,b\n")
    cases.append(("unsupported type", {"files": [str(tmp / "notes.csv")]}, r"notes\.csv is not of a supported type"))
    p = jsonl("badjson.jsonl", [good] * 300 + ['{"text": "unterminated'] + [good] * 5)
    cases.append(("bad JSON in a later shard", {"files": [str(p)]}, r"badjson\.jsonl, line 301: not valid JSON"))
    p = jsonl("nocol.jsonl", [good] * 40 + [json.dumps({"body": "x"})])
    cases.append(("missing field", {"files": [str(p)]}, r"nocol\.jsonl, line 41: no field 'text'"))
    p = jsonl("notstr.jsonl", [good, json.dumps({"text": 5})])
    cases.append(("field not a string", {"files": [str(p)]}, r"notstr\.jsonl, line 2: field 'text' is a int"))
    p = jsonl("empty.jsonl", ["", json.dumps({"text": ""})])
    cases.append(("empty corpus", {"files": [str(p)]}, r"empty"))
    gz = tmp / "broken.jsonl.gz"
    blob = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in _docs(50)).encode())
    gz.write_bytes(blob[:len(blob) // 2])
    cases.append(("truncated gzip", {"files": [str(gz)]}, r"broken\.jsonl\.gz, line \d+: cannot decompress"))
    pq.write_table(pa.table({"body": ["x"]}), tmp / "nocol.parquet")
    cases.append(("parquet without the column", {"files": [str(tmp / "nocol.parquet")]},
                  r"nocol\.parquet: no column 'text'"))
    (tmp / "junk.parquet").write_bytes(b"not parquet at all")
    cases.append(("not parquet", {"files": [str(tmp / "junk.parquet")]}, r"junk\.parquet: not a readable parquet"))
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5, 99999]]}).save_to_disk(str(tmp / "toks_hf"))
    cases.append(("pre-tokenized id beyond the vocabulary",
                  {"files": [str(tmp / "toks_hf")], "tokenizer": tok_dir},
                  r"toks_hf, row 1: token id 99999 is outside the tokenizer's vocabulary of \d+"))
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp / "nocol_hf"))
    cases.append(("save_to_disk without the column", {"files": [str(tmp / "nocol_hf")]},
                  r"nocol_hf: no column 'text' and no 'input_ids'"))
    # Indexed data: a .idx that does not match its .bin, a bad header, ids beyond the vocabulary, a
    # dtype too small for the vocabulary.
    def indexed(name, docs, dtype):
        w = IndexedWriter(tmp / name, dtype)
        w.add_documents([np.asarray(d, dtype) for d in docs])
        w.finish()
        return str(tmp / name)

    short = indexed("short", [[1, 2, 3], [4, 5]], np.uint16)
    with open(short + ".bin", "ab") as fh:
        fh.write(b"\0\0")
    cases.append(("idx not matching bin", {"source": "indexed", "prefixes": [short], "tokenizer": tok_dir},
                  r"short\.bin: 12 B, but .*short\.idx describes 10 B .* does not match its \.bin"))
    hdr = indexed("hdr", [[1, 2, 3]], np.uint16)
    raw = bytearray(Path(hdr + ".idx").read_bytes())
    raw[0:4] = b"XXXX"
    Path(hdr + ".idx").write_bytes(bytes(raw))
    cases.append(("bad idx header", {"source": "indexed", "prefixes": [hdr], "tokenizer": tok_dir},
                  r"hdr\.idx: not a Megatron indexed dataset index"))
    big = indexed("big", [[1, 2, 3] * 10, [7, 60000, 2]], np.uint16)
    cases.append(("indexed id beyond the vocabulary", {"source": "indexed", "prefixes": [big], "tokenizer": tok_dir},
                  r"big\.bin: token id 60000 at token 31 is outside the tokenizer's vocabulary"))
    small = indexed("small", [[1, 2, 3] * 20], np.uint8)
    cases.append(("dtype too small", {"source": "indexed", "prefixes": [small], "tokenizer": tok_dir},
                  r"small\.idx: dtype uint8 holds ids up to 255, too small for the tokenizer's vocabulary"))
    cases.append(("missing indexed file", {"source": "indexed", "prefixes": [str(tmp / "absent")],
                                           "tokenizer": tok_dir}, r"absent\.bin does not exist"))
    cases.append(("indexed data without a tokenizer", {"source": "blend", "blend": [{"path": big}]},
                  r"data\.tokenizer: indexed data needs the tokenizer"))
    return cases


def test_every_bad_input_is_one_line_naming_the_file(tmp_path, reference):
    tok_dir = str(PackedDataset(reference).tokenizer_dir)
    for name, over, pattern in _bad_cases(tmp_path, tok_dir):
        base = {"source": "files", "vocab_size": 400, "seq_len": 8, "val_samples": 1, "shard_bytes": 4096}
        base.update(over)
        cfg = build(DataConfig, base, "data")
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        with pytest.raises(DataError) as info:
            prepare_data(cfg, out, **QUIET)
        msg = str(info.value)
        assert "\n" not in msg and __import__("re").search(pattern, msg), f"{name}: {msg}"
        assert not (out / "meta.json").exists(), f"{name}: a failed preparation must not look finished"


def test_cli_reports_bad_data_in_one_line_with_exit_2(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    proc = subprocess.run([sys.executable, "-m", "pd_dist.cli", "data", "prepare", "--config",
                           str(REPO / "launch/configs/smoke.yaml"), "--set", "data.source=files",
                           "--set", f"data.files=[{bad}]", "--set", "data.max_chars=null",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pd-dist: ") and "x.jsonl, line 2: not valid JSON" in last


@pytest.mark.multiproc
def test_multi_rank_prepare_through_the_launcher(corpus, reference, tmp_path):
    from conftest import deepspeed_cmd, free_port

    root, _ = corpus
    out = tmp_path / "launched"
    cmd = deepspeed_cmd() + ["--num_gpus", "2", "--master_port", str(free_port()),
                             str(REPO / "launch" / "prepare_data.py"), "--config", str(REPO / "launch/configs/smoke.yaml"),
                             "--out", str(out), "--set", "data.source=files", "--set", f"data.files=[{root}]",
                             "--set", "data.max_chars=null", "--set", "data.vocab_size=400", "--set", "data.seq_len=32",
                             "--set", "data.val_samples=4", "--set", "data.shard_bytes=8192",
                             "--set", "data.prepare_workers=1"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 1:" in proc.stdout, "both ranks must have tokenized shards"
    assert _tree(out) == _tree(reference)
