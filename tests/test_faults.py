"""Faults through the real launcher (deepspeed, 2 ranks): a rank killed mid-step, a crash while a
checkpoint is written, a disk that fills. Each must end the run with a clear line and leave a state a
restart continues from exactly; the faults are injected by tests/fault_launch.py around the real code."""
from __future__ import annotations

import json
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import REPO, SMOKE, launch, read_summary

pytestmark = pytest.mark.multiproc
FAULTY = REPO / "tests" / "fault_launch.py"


def _base(tmp_path, smoke_data, tiny_teacher_dir, steps=30):
    return [f"data.dir={smoke_data.path}", f"teacher.path={tiny_teacher_dir}", f"train.steps={steps}",
            "train.save_every=10", "train.eval_every=0", "train.log_every=5", "topology.peer_timeout_s=20"]


def _ledger(d: Path) -> dict[int, list[int]]:
    """step -> the sample ids one launch trained on at that step, over all its ranks (a rank may draw a
    step's micro-batches more than once; each draw is the same)."""
    per_rank: dict[tuple[str, int], list[int]] = {}
    for f in d.glob("rank*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            key = (f.name, r["step"])
            assert per_rank.setdefault(key, r["ids"]) == r["ids"], key
    out: dict[int, list[int]] = defaultdict(list)
    for (_, step), ids in per_rank.items():
        out[step] += ids
    return {k: sorted(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, smoke_data, tiny_teacher_dir):
    """The uninterrupted run both restart tests must reproduce, with its sample ledger."""
    d = tmp_path_factory.mktemp("reference")
    launch(2, _base(d, smoke_data, tiny_teacher_dir) + [f"output_dir={d / 'ref'}"], cwd=d, script=FAULTY,
           env_extra={"PD_LEDGER": str(d / "ledger-ref")})
    return d


def test_a_student_rank_killed_mid_step_ends_the_job_and_a_restart_resumes_exactly(
        reference, tmp_path, smoke_data, tiny_teacher_dir):
    base = _base(tmp_path, smoke_data, tiny_teacher_dir)
    run = tmp_path / "run"
    proc = launch(2, base + [f"output_dir={run}"], cwd=tmp_path, script=FAULTY, check=False,
                  env_extra={"PD_FAULT": "kill:1:15", "PD_LEDGER": str(tmp_path / "ledger-killed")})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    # One line names the rank that died: the deepspeed launcher's (it ends the job as soon as a rank
    # exits badly) or, where the survivors outlive it (srun), the survivors' own (its heartbeat stopped).
    named = [ln for ln in out.splitlines() if ("--local_rank=1'" in ln and "return code = -9" in ln)
             or ("rank 1 (" in ln and "stopped mid-run" in ln)]
    assert named, out[-3000:]
    assert "Timed out" not in out and "silent for" not in out  # ended by the death, not a timeout
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000010"
    launch(2, base + [f"output_dir={run}"], cwd=tmp_path, script=FAULTY, extra_args=["--resume"],
           env_extra={"PD_LEDGER": str(tmp_path / "ledger-resumed")})
    a, b = read_summary(reference / "ref"), read_summary(run)
    assert b["finished"] and b["losses"] == pytest.approx(a["losses"], rel=1e-6, abs=1e-7)
    # The sample ledger (steps counted from 0): the resumed run trained steps 0-9 before the kill and
    # 10-29 after it on exactly the samples of the uninterrupted run, none skipped and none repeated;
    # steps 10-14 were drawn twice (by the killed launch, then after the restart) with the same samples.
    ref, killed = _ledger(reference / "ledger-ref"), _ledger(tmp_path / "ledger-killed")
    resumed = _ledger(tmp_path / "ledger-resumed")
    assert sorted(ref) == list(range(30)) and sorted(killed) == list(range(15)) and sorted(resumed) == list(range(10, 30))
    trained = {**{s: killed[s] for s in range(10)}, **resumed}
    assert trained == ref
    assert all(killed[s] == resumed[s] for s in range(10, 15))
    assert sum(len(v) for v in trained.values()) == 30 * 8


def test_a_crash_while_a_checkpoint_is_written_leaves_the_previous_one_latest(
        reference, tmp_path, smoke_data, tiny_teacher_dir):
    base = _base(tmp_path, smoke_data, tiny_teacher_dir)
    run = tmp_path / "run"
    proc = launch(2, base + [f"output_dir={run}"], cwd=tmp_path, script=FAULTY, check=False,
                  env_extra={"PD_FAULT": "torn:1:20"})
    assert proc.returncode != 0
    ck = run / "checkpoints"
    torn = list((ck / "step00000020").glob("*zero_pp_rank_1_*optim_states.pt"))
    assert torn, sorted(p.name for p in (ck / "step00000020").iterdir())  # the torn write is there
    assert (ck / "latest").read_text().strip() == "step00000010"
    launch(2, base + [f"output_dir={run}"], cwd=tmp_path, extra_args=["--resume"])
    a, b = read_summary(reference / "ref"), read_summary(run)
    assert b["finished"] and b["losses"] == pytest.approx(a["losses"], rel=1e-6, abs=1e-7)


def _small_fs(path: Path, size: str):
    """A size-limited tmpfs mounted at ``path`` (root only); skips where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:200]}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full_while_writing_a_checkpoint_is_a_clear_error(tmp_path, smoke_data, tiny_teacher_dir):
    full = tmp_path / "full"
    _small_fs(full, "600k")  # room for the config and logs, not for a checkpoint
    try:
        base = _base(tmp_path, smoke_data, tiny_teacher_dir)
        proc = launch(2, base + [f"output_dir={full / 'run'}"], cwd=tmp_path, check=False, timeout=300)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "No space left on device" in out, out[-3000:]
        assert not (full / "run" / "checkpoints" / "latest").exists()  # nothing half-written counts
    finally:
        _umount(full)


def _generate(tmp_path, smoke_data, tiny_teacher_dir, store: Path, out: Path) -> subprocess.CompletedProcess:
    from conftest import deepspeed_cmd, free_port

    sets = [f"data.dir={smoke_data.path}", f"teacher.path={tiny_teacher_dir}", f"distill.store={store}",
            "distill.mode=offline", f"output_dir={out}", "generate.shard_size=8"]
    cmd = deepspeed_cmd() + ["--num_gpus", "1", "--master_port", str(free_port()),
                             str(REPO / "launch" / "generate_logits.py"), "--config", str(SMOKE)]
    return subprocess.run(cmd + [a for o in sets for a in ("--set", o)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def test_disk_full_while_writing_a_store_shard_is_a_clear_error(tmp_path, smoke_data, tiny_teacher_dir):
    from pd_dist.store import verify_store

    ref = tmp_path / "ref-store"
    r = _generate(tmp_path, smoke_data, tiny_teacher_dir, ref, tmp_path / "gen-ref")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    shard_bytes = sum(p.stat().st_size for p in (ref / "shards").glob("shard-*.bin"))
    full = tmp_path / "full"
    _small_fs(full, f"{shard_bytes // 2 // 1024}k")  # room for about half the shards
    try:
        r = _generate(tmp_path, smoke_data, tiny_teacher_dir, full / "store", tmp_path / "gen")
        out = r.stdout + r.stderr
        assert r.returncode != 0
        assert "No space left on device" in out, out[-3000:]
        assert not (full / "store" / "manifest.json").exists()
        assert not list((full / "store" / "shards").glob(".*.tmp"))  # the partial shard is removed
        written = sorted(p.name for p in (full / "store" / "shards").glob("shard-*.bin"))
        assert written, "no shard fit: make the file system larger"
        shutil.copytree(full / "store", tmp_path / "store")
    finally:
        _umount(full)
    # Rerun on a disk with room: the complete shards are kept, the rest written; the store is the
    # reference store, byte for byte.
    r = _generate(tmp_path, smoke_data, tiny_teacher_dir, tmp_path / "store", tmp_path / "gen")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"({len(written)} complete already)" in out, out[-3000:]
    assert verify_store(tmp_path / "store") == []
    for p in sorted((ref / "shards").glob("shard-*.bin")):
        assert (tmp_path / "store" / "shards" / p.name).read_bytes() == p.read_bytes(), p.name
