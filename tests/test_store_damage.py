"""Damaged and forged stores, generated rather than hand-picked: blocks forged with valid checksums (NaN,
+-inf, negative, out-of-vocabulary or repeated indices) are refused by the decoder and reported by verify;
every byte region of a small store is corrupted (bit flips at many offsets, truncations, deletions) and the
completeness check names exactly the damaged shards, whose rewrite restores the store byte for byte."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pd_dist.core.logits import truncate
from pd_dist.store import LogitsStore, StoreError, shard_ranges, verify_store, write_manifest
from pd_dist.store.codec import (_HDR, HEADER_BYTES, LAYOUT_VALUE, N_STREAMS, CodecError, _f32_ord, _from_planes,
                                 _pack, _unzigzag, _zigzag, decode_block, default_encoding, encode_block,
                                 zstd_compressor, zstd_decompressor)
from pd_dist.store.format import FOOTER, FOOTER_MAGIC, HEADER, TABLE_DTYPE, parse_shard

from test_store import K, N, T, V, full_logits, make_meta, write_store

U64 = np.uint64


# ------------------------------------------------------------------------------------ forged blocks
def _streams(raw: bytes) -> tuple[list[np.ndarray], int, int]:
    """A block's six streams as uint64 arrays, its n_kept and its layout flag (the decoder's first steps)."""
    h = _HDR.unpack_from(raw, 0)
    n_kept, planes, flags, lens = h[1], h[2:8], h[8], h[9:15]
    out, pos, zd = [], HEADER_BYTES, zstd_decompressor()
    for i in range(N_STREAMS):
        seg = raw[pos:pos + lens[i]]
        pos += lens[i]
        if flags >> i & 1:
            seg = zd.decompress(seg, max_output_size=1 << 24)
        n = len(seg) // planes[i]
        out.append(_from_planes(seg, n, planes[i], np.uint64))
    return out, n_kept, flags & LAYOUT_VALUE


def _repack(streams: list[np.ndarray], n_kept: int, layout_flag: int) -> bytes:
    return _pack([(np.asarray(x, U64), len(x)) for x in streams], n_kept, layout_flag, zstd_compressor(3))


def _f32_bits(x: float) -> int:
    return int(np.array([x], np.float32).view(np.uint32)[0])


def _ord(bits) -> int:
    return int(_f32_ord(np.array([bits], np.uint32).view(np.float32))[0])


def _forge(raw: bytes, kind: str, rng: np.random.Generator, vocab: int) -> tuple[bytes, int]:
    """``raw`` with one token's entry made into ``kind``, streams re-packed (the block is well formed and
    any checksum computed over it agrees). Returns (forged block, token)."""
    s, n_kept, value_layout = _streams(raw)
    counts = s[0].astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    kept2 = np.flatnonzero(counts >= 2)
    t = int(rng.choice(kept2))
    j = int(starts[t]) + int(rng.integers(1, counts[t]))  # an entry after the token's first
    if kind in ("nan", "+inf", "-inf", "lse-nan"):
        # the token's max (stored as fp32 bits) or its lse (stored as ord(lse) - ord(max)), the other kept
        lse_ord = _ord(s[1][t]) + int(_unzigzag(s[2][t:t + 1])[0])
        if kind == "lse-nan":
            lse_ord = _ord(_f32_bits(float("nan")))
        else:
            s[1][t] = _f32_bits({"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}[kind])
        s[2][t] = _zigzag(np.array([lse_ord - _ord(s[1][t])]))[0]
    elif kind == "negative":
        if value_layout:
            s[3][j] = U64((1 << 64) - int(rng.integers(1, 1000)))  # 8 byte planes: a negative int64
        else:
            s[3][j] = U64((1 << 64) - 1)
    elif kind == "beyond-vocab":
        s[3][j] = U64(vocab + int(rng.integers(0, 1000)))
    elif kind == "duplicate":  # only the value-order layout can say it (index deltas are >= 0)
        s[3][j] = s[3][j - 1]
    else:
        raise ValueError(kind)
    return _repack(s, n_kept, value_layout), t


FORGERIES = ["nan", "+inf", "-inf", "lse-nan", "negative", "beyond-vocab", "duplicate"]
NEEDLE = {"nan": "not finite", "+inf": "not finite", "-inf": "not finite", "lse-nan": "lse",
          "negative": "out", "beyond-vocab": "out", "duplicate": "kept twice"}


def _cases(n: int):
    """(encoding, layout, forgery, seed): every forgery in every layout it can be said in, n seeds each."""
    for name in ("qgap", "exact"):
        for layout in ("index", "value"):
            for kind in FORGERIES:
                if kind == "duplicate" and layout == "index":
                    continue
                for seed in range(n):
                    yield name, layout, kind, seed


@pytest.mark.parametrize("name,layout,kind,seed", list(_cases(4)))
def test_decoder_refuses_forged_blocks(name, layout, kind, seed):
    rng = np.random.default_rng(seed * 131 + FORGERIES.index(kind))
    enc = default_encoding(name)
    full = full_logits("peaked", 1, seed=100 + seed)[0]
    ref = truncate(full, 0.95, K)
    lse = torch.logsumexp(full, -1).numpy()
    raw, _ = encode_block(ref.values.numpy(), ref.indices.numpy(), lse, V, enc, zstd_compressor(3), layout)
    decode_block(_repack(*_streams(raw)), T, K, enc, zd=zstd_decompressor(), vocab_size=V)  # re-packing is sound
    forged, t = _forge(raw, kind, rng, V)
    with pytest.raises(CodecError) as e:
        decode_block(forged, T, K, enc, zd=zstd_decompressor(), vocab_size=V)
    assert NEEDLE[kind] in str(e.value) and f"token {t}:" in str(e.value), str(e.value)


def _replace_block(path: Path, j: int, block: bytes) -> None:
    """Rewrite shard ``path`` with its block ``j`` replaced, table, trailer and footer checksums recomputed:
    what a buggy or forging writer leaves."""
    buf = path.read_bytes()
    lay = parse_shard(buf, len(buf), str(path))
    blocks = [buf[int(r["offset"]):int(r["offset"]) + int(r["nbytes"])] for r in lay.table]
    blocks[j] = block
    table = lay.table.copy()
    pos = HEADER.size
    for i, b in enumerate(blocks):
        table[i]["offset"], table[i]["nbytes"], table[i]["crc"] = pos, len(b), zlib.crc32(b)
        pos += len(b)
    trailer = table.tobytes() + lay.hist.astype("<u8").tobytes()
    header = buf[:HEADER.size]
    path.write_bytes(header + b"".join(blocks) + trailer +
                     FOOTER.pack(pos, len(blocks), lay.k, zlib.crc32(trailer), zlib.crc32(header), FOOTER_MAGIC))


@pytest.mark.parametrize("layout", ["index", "value"])
def test_forged_blocks_are_reported_by_verify_and_the_reader(tmp_path, layout):
    """Each forgery written into a store by a forging writer (table crc32, footer and manifest sha256 all
    recomputed): verify names the shard and the sample, the reader refuses it naming the sample."""
    meta = make_meta()
    full = full_logits("peaked", N, seed=7)
    enc = meta.resolved().value_encoding
    for n, kind in enumerate(k for k in FORGERIES if not (k == "duplicate" and layout == "index")):
        rng = np.random.default_rng(n)
        root = write_store(tmp_path / f"{layout}-{kind}", full, meta)
        sid = int(rng.integers(0, N))
        shard, j = sid // meta.shard_size, sid % meta.shard_size
        ref = truncate(full[sid], 0.95, K)
        raw, _ = encode_block(ref.values.numpy(), ref.indices.numpy(), torch.logsumexp(full[sid], -1).numpy(),
                              V, enc, zstd_compressor(3), layout)
        forged, _t = _forge(raw, kind, rng, V)
        path = root / "shards" / f"shard-{shard:05d}.bin"
        _replace_block(path, j, forged)
        write_manifest(root, meta)  # sizes and sha256 agree with the forged shard
        faults = verify_store(root)
        assert len(faults) == 1, (kind, faults)
        assert path.name in faults[0] and f"sample {sid}:" in faults[0] and NEEDLE[kind] in faults[0], faults
        store = LogitsStore(root)
        with pytest.raises(StoreError) as e:
            store.get(sid)
        assert path.name in str(e.value) and f"sample {sid}:" in str(e.value) and "\n" not in str(e.value)
        for other in range(N):
            if other != sid:
                store.get(other)


# --------------------------------------------------------------------------------- damage and repair
SHARDS = 3  # N = 10 samples of 4: shards of 4, 4 and 2 samples
REGIONS = ("header", "blocks", "table", "hist", "footer")


def _regions(path: Path) -> dict[str, tuple[int, int]]:
    """Byte ranges [start, end) of a shard file's parts."""
    buf = path.read_bytes()
    lay = parse_shard(buf, len(buf), str(path))
    t_off = int(lay.table["offset"][-1] + lay.table["nbytes"][-1])
    t_end = t_off + len(lay.table) * TABLE_DTYPE.itemsize
    return {"header": (0, HEADER.size), "blocks": (HEADER.size, t_off), "table": (t_off, t_end),
            "hist": (t_end, len(buf) - FOOTER.size), "footer": (len(buf) - FOOTER.size, len(buf))}


def _damage_cases() -> list[tuple]:
    """(what, target, region, fraction, bit, shards expected damaged, manifest expected damaged), drawn from
    a seeded generator: bit flips at many offsets of every region of every shard and of the manifest,
    truncations into every region, deletions, and two shards at once."""
    rng = np.random.default_rng(2024)
    cases = []
    for s in range(SHARDS):
        for region in REGIONS:
            for _ in range(4):
                cases.append(("flip", s, region, float(rng.random()), int(rng.integers(8)), {s}, False))
            cases.append(("truncate", s, region, float(rng.random()), 0, {s}, False))
        cases.append(("delete", s, None, 0.0, 0, {s}, False))
        cases.append(("empty", s, None, 0.0, 0, {s}, False))
    for _ in range(40):
        cases.append(("flip", "manifest", None, float(rng.random()), int(rng.integers(8)), set(), True))
    for frac in [0.0, *rng.random(6).tolist(), 0.9999]:
        cases.append(("truncate", "manifest", None, frac, 0, set(), True))
    cases.append(("delete", "manifest", None, 0.0, 0, set(), True))
    cases.append(("garbage", "manifest", None, 0.0, 0, set(), True))
    cases.append(("delete", "shards", None, 0.0, 0, set(range(SHARDS)), False))
    for a, b in [(0, 1), (1, 2), (0, 2)]:
        cases.append(("flip2", (a, b), "blocks", float(rng.random()), int(rng.integers(8)), {a, b}, False))
    return cases


def _apply(root: Path, what: str, target, region, frac: float, bit: int) -> None:
    import shutil

    def shard(i):
        return root / "shards" / f"shard-{i:05d}.bin"

    def flip(path, lo, hi):
        buf = bytearray(path.read_bytes())
        buf[lo + min(int(frac * (hi - lo)), hi - lo - 1)] ^= 1 << bit
        path.write_bytes(bytes(buf))

    if what == "flip2":
        for i in target:
            flip(shard(i), *_regions(shard(i))[region])
        return
    path = root / "manifest.json" if target == "manifest" else root / "shards" if target == "shards" else shard(target)
    if what == "delete":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif what == "empty":
        path.write_bytes(b"")
    elif what == "garbage":
        path.write_bytes(b"\xff\xfe not json {")
    else:
        lo, hi = (0, path.stat().st_size) if region is None else _regions(path)[region]
        if what == "flip":
            flip(path, lo, hi)
        else:  # truncate inside the region
            with open(path, "r+b") as fh:
                fh.truncate(lo + int(frac * (hi - lo)))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    meta = make_meta()
    full = full_logits("peaked", N, seed=31)
    root = write_store(tmp_path_factory.mktemp("pristine") / "store", full, meta)
    assert meta.n_shards == SHARDS and verify_store(root) == []
    return root, meta, full


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rewrite(root: Path, meta, full, shards) -> None:
    """What a rerun of the generation does: rewrite the shards, then the manifest."""
    from test_store import stored

    from pd_dist.store import ShardWriter

    for i in shards:
        a, b = shard_ranges(meta.n_samples, meta.shard_size)[i]
        with ShardWriter(root, meta, i) as w:
            for s in range(a, b):
                w.add(s, stored(full[s], meta.top_p, meta.top_k))
            w.finish()
    write_manifest(root, meta)


@pytest.mark.parametrize("what,target,region,frac,bit,damaged,manifest_damaged", _damage_cases())
def test_rerun_finds_and_repairs_exactly_the_damage(tmp_path, pristine, what, target, region, frac, bit, damaged,
                                                    manifest_damaged):
    import shutil

    from pd_dist.teacher.stores import store_is_complete, store_state

    src, meta, full = pristine
    root = tmp_path / "store"
    shutil.copytree(src, root)
    _apply(root, what, target, region, frac, bit)
    assert _files(root) != _files(src)
    found = store_state(root, meta)
    assert set(found.shards) == damaged, found.all()
    assert bool(found.manifest) == manifest_damaged, found.manifest
    assert not found.sound and not store_is_complete(root, meta)
    if what != "delete" or target != "manifest":  # verify agrees that something is wrong
        assert verify_store(root)
    _rewrite(root, meta, full, sorted(found.shards))
    assert _files(root) == _files(src)
    assert verify_store(root) == [] and store_is_complete(root, meta)


def _manifest_edits() -> list[tuple[str, str]]:
    keys = sorted(set(make_meta().to_dict()) | {"format", "format_version", "meta_digest", "shards", "stats"})
    return [(k, how) for k in keys for how in ("drop", "null", "list", "string")]


@pytest.mark.parametrize("key,how", _manifest_edits())
def test_a_manifest_lacking_or_mistyping_a_field_is_damaged_not_fatal(tmp_path, pristine, key, how):
    """Every top-level field of the manifest dropped or of another JSON type: the rerun's check treats the
    manifest as damaged (no traceback, no refusal), finds the shards sound, and rewriting the manifest
    restores the store."""
    import json
    import shutil

    from pd_dist.teacher.stores import store_state

    src, meta, full = pristine
    root = tmp_path / "store"
    shutil.copytree(src, root)
    man = json.loads((root / "manifest.json").read_text())
    if how == "drop":
        del man[key]
    else:
        man[key] = {"null": None, "list": [1, "x"], "string": "x"}[how]
    (root / "manifest.json").write_text(json.dumps(man))
    found = store_state(root, meta)
    assert found.shards == {} and len(found.manifest) == 1 and "manifest.json" in found.manifest[0]
    assert "\n" not in found.manifest[0]
    faults = verify_store(root)
    assert len(faults) == 1 and "manifest.json" in faults[0]
    try:  # the reader refuses it naming the file, or (an edit that means the same: encoding null is the
        store = LogitsStore(root)  # default encoding) reads what the store holds
    except StoreError as e:
        assert "manifest.json" in str(e) and "\n" not in str(e)
    else:
        good = LogitsStore(src)
        for i in range(N):
            assert torch.equal(store.get(i).values, good.get(i).values)
    _rewrite(root, meta, full, [])
    assert _files(root) == _files(src)


# ----------------------------------------------------------------------------------- smaller faults
def _copy(pristine, tmp_path) -> tuple[Path, object, torch.Tensor]:
    import shutil

    src, meta, full = pristine
    root = tmp_path / "store"
    shutil.copytree(src, root)
    return root, meta, full


def _one_line(call, exc=StoreError) -> str:
    with pytest.raises(exc) as e:
        call()
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


@pytest.mark.parametrize("code", ["EACCES", "EIO"])
@pytest.mark.parametrize("target", ["manifest.json", "shards/shard-00001.bin"])
def test_unreadable_files_are_one_line_not_a_traceback(tmp_path, pristine, monkeypatch, capsys, code, target):
    """A file that is there but cannot be read (permissions, I/O): the reader, info and verify say so in one
    line naming it; `pd-dist store verify` exits 2 (could not check), `store info` 1."""
    import builtins
    import errno
    import io
    import os

    from pd_dist.cli import store_main
    from pd_dist.teacher.stores import store_state
    from pd_dist.store import StoreCheckError, store_info

    root, meta, _ = _copy(pristine, tmp_path)
    bad = str(root / target)
    err = OSError(getattr(errno, code), os.strerror(getattr(errno, code)), bad)

    def failing(fn):
        def wrapped(path, *a, **kw):
            if str(path) == bad:
                raise err
            return fn(path, *a, **kw)
        return wrapped

    monkeypatch.setattr(builtins, "open", failing(builtins.open))
    monkeypatch.setattr(io, "open", failing(io.open))  # pathlib's
    monkeypatch.setattr(os, "stat", failing(os.stat))
    calls = [lambda: LogitsStore(root).get(5), lambda: store_info(root)] if target == "manifest.json" else \
        [lambda: LogitsStore(root), lambda: LogitsStore(root, verify=True)]
    for call in calls:
        assert target.split("/")[-1] in _one_line(call)
    assert "could not read" in _one_line(lambda: verify_store(root), StoreCheckError)
    assert "could not read" in _one_line(lambda: store_state(root, meta), StoreCheckError)
    assert store_main(["verify", str(root)]) == 2
    if target == "manifest.json":
        assert store_main(["info", str(root)]) == 1
    err_out = capsys.readouterr().err
    assert err_out.count("\n") == err_out.count("pd-dist:") and "Traceback" not in err_out


def test_a_looping_link_is_a_missing_file(tmp_path, pristine):
    """A shard whose name is a symlink loop holds no shard: missing for the reader and verify, rewritten by a
    rerun (which replaces the link); a looping manifest is no manifest."""
    from pd_dist.teacher.stores import store_state

    root, meta, full = _copy(pristine, tmp_path)
    path = root / "shards" / "shard-00001.bin"
    path.unlink()
    path.symlink_to(path.name)
    with pytest.raises(StoreError, match="missing shard .*shard-00001.bin"):
        LogitsStore(root)
    faults = verify_store(root)
    assert len(faults) == 1 and "shard-00001.bin: missing shard" in faults[0]
    found = store_state(root, meta)
    assert set(found.shards) == {1} and found.missing == {1} and not found.manifest
    _rewrite(root, meta, full, [1])
    assert _files(root) == _files(pristine[0]) and not path.is_symlink()
    (root / "manifest.json").unlink()
    (root / "manifest.json").symlink_to("manifest.json")
    from pd_dist.store import StoreCheckError

    assert "no manifest" in _one_line(lambda: verify_store(root), StoreCheckError)
    assert "no manifest" in _one_line(lambda: LogitsStore(root))
    assert set(store_state(root, meta).shards) == set()


def _edit_meta(root: Path, **fields) -> None:
    """Set manifest fields and recompute its meta_digest, as a writer claiming them would."""
    import json

    from pd_dist.store import StoreMeta

    path = root / "manifest.json"
    man = json.loads(path.read_text())
    man.update(fields)
    man["meta_digest"] = StoreMeta.from_dict(man).resolved().digest()
    path.write_text(json.dumps(man))


@pytest.mark.parametrize("claim", [
    dict(n_samples=10 ** 9),  # 250 million shards of 4, three listed
    dict(n_samples=10 ** 9, shard_size=1),
    dict(n_samples=10 ** 9, shard_size=10 ** 9),  # one shard of 10^9 samples: its listed range disagrees
    dict(n_samples=10 ** 9, shard_size=4 * 10 ** 8),  # three shards, as many as listed
])
def test_a_manifest_claiming_huge_counts_is_refused_before_allocating(tmp_path, pristine, claim):
    import json
    import tracemalloc

    from pd_dist.store import store_info

    root, _, _ = _copy(pristine, tmp_path)
    _edit_meta(root, **claim)
    if claim.get("shard_size") == 4 * 10 ** 8:  # list shards of the claimed ranges, keeping their real sizes
        man = json.loads((root / "manifest.json").read_text())
        for i, s in enumerate(man["shards"]):
            s["first"], s["end"] = i * 4 * 10 ** 8, min((i + 1) * 4 * 10 ** 8, 10 ** 9)
        (root / "manifest.json").write_text(json.dumps(man))
    tracemalloc.start()
    try:
        for call in (lambda: LogitsStore(root), lambda: store_info(root)):
            msg = _one_line(call)
            assert "manifest.json" in msg
        faults = verify_store(root)
        assert len(faults) == 1 and "manifest.json" in faults[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak


def test_a_stray_shard_file_is_a_fault_and_a_rerun_refuses_it(tmp_path, pristine):
    """A shard-*.bin that is none of the store's shards: verify reports it (write_manifest refuses it), and a
    rerun refuses in one line naming it rather than writing shards it cannot list."""
    import shutil

    from pd_dist.teacher.stores import store_is_complete

    root, meta, _ = _copy(pristine, tmp_path)
    for name in ("shard-00007.bin", "shard-0001.bin", "shard-00001x.bin"):
        stray = root / "shards" / name
        shutil.copy(root / "shards" / "shard-00000.bin", stray)
        faults = verify_store(root)
        assert len(faults) == 1 and name in faults[0] and "unexpected shard file" in faults[0]
        assert name in _one_line(lambda: store_is_complete(root, meta))
        with pytest.raises(StoreError, match=name):
            write_manifest(root, meta)
        stray.unlink()
    assert verify_store(root) == [] and store_is_complete(root, meta)


def test_a_store_for_other_inputs_is_refused_even_when_damaged(tmp_path, pristine):
    """An intact manifest for other inputs is refused (as before); so is a directory whose manifest is
    damaged or absent but whose intact shards were written for other inputs. A foreign shard inside an
    intact store of the run's inputs is only a damaged shard."""
    from pd_dist.teacher.stores import store_is_complete, store_state

    root, meta, full = _copy(pristine, tmp_path)
    other = make_meta(teacher={"name": "tiny", "config_hash": "c0ffee", "weights_hash": "0ther"})
    msg = "already holds a store for other inputs"
    assert msg in _one_line(lambda: store_is_complete(root, other))
    (root / "manifest.json").write_bytes(b"{ not json")
    assert msg in _one_line(lambda: store_is_complete(root, other))
    (root / "manifest.json").unlink()
    assert msg in _one_line(lambda: store_is_complete(root, other))
    assert set(store_state(root, meta).shards) == set()  # for its own inputs: only the manifest is missing
    # an intact store of the run's inputs with one shard of another store's
    root2, _, _ = _copy(pristine, tmp_path / "2")
    foreign = write_store(tmp_path / "foreign", full, other)
    (root2 / "shards" / "shard-00002.bin").write_bytes((foreign / "shards" / "shard-00002.bin").read_bytes())
    found = store_state(root2, meta)
    assert set(found.shards) == {2} and found.foreign == {2}
    _rewrite(root2, meta, full, [2])
    assert _files(root2) == _files(pristine[0])


def test_write_through_completion_rewrites_exactly_the_damaged_shards(tmp_path, pristine):
    """distill.write_through over a finished, damaged store: store_state names the damaged shard, and
    completing the store (spool.complete_store, the teacher filling what no spool holds) rewrites that
    shard and the manifest, leaving the others untouched: the store is byte-identical again."""
    import os

    from pd_dist.core.logits import SparseLogits
    from pd_dist.teacher.stores import SPOOL_DIR, complete_store, store_state
    from test_store import stored

    root, meta, full = _copy(pristine, tmp_path)
    path = root / "shards" / "shard-00001.bin"
    raw = bytearray(path.read_bytes())
    raw[200] ^= 64
    path.write_bytes(bytes(raw))
    found = store_state(root, meta)
    assert set(found.shards) == {1} and not found.manifest
    untouched = {i: os.stat(root / "shards" / f"shard-{i:05d}.bin").st_mtime_ns for i in (0, 2)}
    asked = []

    class Data:  # the packed data: only batch(ids) is used
        def batch(self, ids):
            return np.zeros((len(ids), T + 1), np.int64)

    def teacher(tokens, ids):
        asked.extend(int(i) for i in ids)
        parts = [stored(full[int(i)], meta.top_p, meta.top_k) for i in ids]
        return SparseLogits(torch.stack([p.indices for p in parts]), torch.stack([p.values for p in parts]),
                            torch.stack([p.lse for p in parts]))

    (root / SPOOL_DIR).mkdir()  # what the run's WriteThrough made (nothing kept: all filled)
    complete_store(root, meta, Data(), teacher, 3, source="write_through", fill_from="the teacher", log=lambda s: None)
    assert sorted(asked) == list(range(4, 8))  # shard 1's samples only
    assert {i: os.stat(root / "shards" / f"shard-{i:05d}.bin").st_mtime_ns for i in (0, 2)} == untouched
    files = _files(root)
    del files["write_through_info.json"]
    assert files == _files(pristine[0]) and verify_store(root) == []
