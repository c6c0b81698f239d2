"""Faults through the real launcher (deepspeed, 2 ranks): a rank killed mid-step, a crash while a
checkpoint is written, a disk that fills. Each must end the run with a clear line and leave a state a
restart continues from exactly; the faults are injected by tests/fault_launch.py around the real code."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
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
    from cluster import skip_or_fail

    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        skip_or_fail(f"cannot mount a tmpfs here: {r.stderr.strip()[:200]}")


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


class _TwoHosts:
    """Two network namespaces joined by one veth pair (10.213.<n>.1 and .2): two hosts with their own
    network stacks, so taking one end down is a real partition (no connection closes, packets vanish)."""

    def __init__(self, tag: str):
        self.ns = [f"pd{tag}a", f"pd{tag}b"]
        self.dev = [f"pd{tag}x", f"pd{tag}y"]
        self.addr = [f"10.213.{int(tag) % 250}.1", f"10.213.{int(tag) % 250}.2"]

    def _ip(self, *args, ns=None):
        cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")

    def __enter__(self):
        from cluster import apt_install, skip_or_fail

        reason = apt_install(["iproute2"], lambda: [] if shutil.which("ip") else ["ip"]) \
            if shutil.which("ip") is None else None
        if reason:
            skip_or_fail(reason)
        try:
            for ns in self.ns:
                self._ip("netns", "add", ns)
                self._ip("link", "set", "lo", "up", ns=ns)
            self._ip("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
            for ns, dev, addr in zip(self.ns, self.dev, self.addr):
                self._ip("link", "set", dev, "netns", ns)
                self._ip("addr", "add", f"{addr}/24", "dev", dev, ns=ns)
                self._ip("link", "set", dev, "up", ns=ns)
        except RuntimeError as e:
            self.__exit__()
            from cluster import skip_or_fail

            skip_or_fail(f"cannot create network namespaces here: {e}")
        return self

    def cut(self, i: int) -> None:
        self._ip("link", "set", self.dev[i], "down", ns=self.ns[i])

    def __exit__(self, *exc):
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_a_cut_link_between_teacher_and_student_hosts_ends_both_within_the_timeout(
        tmp_path, smoke_data, tiny_teacher_dir):
    """Online mode, the teacher on one host and the student on another (each in its own network
    namespace, started as srun or mpirun would: RANK/WORLD_SIZE/MASTER_ADDR). The link is cut mid-run:
    the student fails waiting for logits and the teacher notices the student's heartbeat stopped, both
    with one line, well before the test's own deadline."""
    import os
    import sys
    import threading

    from conftest import free_port

    sets = _base(tmp_path, smoke_data, tiny_teacher_dir, steps=400) + [
        "distill.mode=online", f"output_dir={tmp_path / 'run'}", "topology.peer_timeout_s=10",
        "train.log_every=1", "train.save_every=0"]
    with _TwoHosts(str(os.getpid() % 10000)) as net:
        port = free_port()
        procs, outs = [], []
        for rank in (0, 1):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
            env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", CROSS_RANK=str(rank),
                       MASTER_ADDR=net.addr[0], MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=net.dev[rank],
                       PYTHONUNBUFFERED="1")
            cmd = ["ip", "netns", "exec", net.ns[rank], sys.executable, str(REPO / "launch" / "pretrain_pd.py"),
                   "--config", str(SMOKE)] + [a for o in sets for a in ("--set", o)]
            procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
            outs.append([])
        for p, out in zip(procs, outs):
            threading.Thread(target=lambda p=p, out=out: out.extend(p.stdout), daemon=True).start()
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and not any("step 20/400" in ln for ln in outs[1]):
                assert all(p.poll() is None for p in procs), "".join(outs[0][-40:] + outs[1][-40:])
                time.sleep(0.2)
            assert any("step 20/400" in ln for ln in outs[1]), "".join(outs[1][-40:])
            net.cut(1)
            codes = [p.wait(timeout=120) for p in procs]  # the 10 s peer timeout, not a hang
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        student, teacher = "".join(outs[1]), "".join(outs[0])
        assert codes[1] != 0 and codes[0] != 0, (codes, teacher[-2000:], student[-2000:])
        assert any("pd-dist: rank 1:" in ln and "teacher rank 0" in ln and "silent for 10s" in ln
                   for ln in student.splitlines()), student[-3000:]
        assert any("pd-dist: rank 0:" in ln and "student rank 1" in ln and "no heartbeat" in ln
                   for ln in teacher.splitlines()), teacher[-3000:]
        assert "step 400/400" not in student
