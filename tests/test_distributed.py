"""Multi-rank training through the real `deepspeed` launcher on gloo, against single-rank references.

ZeRO 1, 2 and 3 on 2 ranks must end with the parameters of a 1-rank run on the same global batches
(DeepSpeed has had CPU/gloo bugs exactly there), in both LM-only and colocated-PD modes; a run stopped
and resumed must continue with the same losses and end with the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import assert_same_params, launch, read_initial, read_student, read_summary

pytestmark = pytest.mark.multiproc

STEPS = 4
COMMON = [f"train.steps={STEPS}", "train.save_every=0", "train.eval_every=0", "train.log_every=1",
          "train.global_batch_size=8", "optim.warmup_steps=1",
          "distill.alpha.schedule=constant", "distill.alpha.value=0.5"]


def _common(out, data, teacher, mode):
    return COMMON + [f"output_dir={out}", f"data.dir={data.path}", f"teacher.path={teacher}",
                     f"distill.mode={mode}"]


def _zero3_config(tmp_path):
    # Persistence threshold 0: every tiny parameter really is partitioned and gathered.
    p = tmp_path / "zero3_test.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 3, "contiguous_gradients": True,
                                                   "overlap_comm": False,
                                                   "stage3_param_persistence_threshold": 0}}))
    return p


@pytest.fixture(scope="module", params=["none", "colocated"])
def reference(request, tmp_path_factory, smoke_data, tiny_teacher_dir):
    """1 rank, ZeRO 0, micro 4 x accum 2, one big loss chunk: the reference run."""
    mode = request.param
    out = tmp_path_factory.mktemp(f"ref_{mode}")
    launch(1, _common(out, smoke_data, tiny_teacher_dir, mode) +
           ["train.zero_stage=0", "train.micro_batch_size=4", "train.loss_chunk_size=100000"], cwd=out)
    return mode, read_summary(out), read_student(out)


@pytest.mark.parametrize("zero,micro", [(1, 2), (2, 4), (3, 2)])
def test_zero_two_ranks_match_single_rank(reference, zero, micro, tmp_path, smoke_data, tiny_teacher_dir):
    mode, ref_summary, ref_params = reference
    out = tmp_path / "run"
    over = _common(out, smoke_data, tiny_teacher_dir, mode) + [
        f"train.zero_stage={zero}", f"train.micro_batch_size={micro}", "train.loss_chunk_size=100"]
    if zero == 3:
        over.append(f"train.deepspeed_config={_zero3_config(tmp_path)}")
    launch(2, over, cwd=tmp_path)
    summary, params = read_summary(out), read_student(out)
    assert len(summary["losses"]) == STEPS
    assert summary["losses"] == pytest.approx(ref_summary["losses"], rel=1e-5, abs=1e-6)
    assert summary["val_loss"] == pytest.approx(ref_summary["val_loss"], rel=1e-5)
    assert_same_params(params, ref_params, read_initial(smoke_data))
    if mode == "colocated":
        assert summary["teacher_top1_agreement"] is not None


def test_resume_matches_uninterrupted(tmp_path, smoke_data, tiny_teacher_dir):
    """On a blend (the embedded corpus and a JSON-lines file, 3:1): the resumed run draws the same
    samples, so it continues with the uninterrupted run's losses; both report the blend's realised mix."""
    from pd_dist.data import embedded_documents

    steps = 6
    extra = tmp_path / "extra.jsonl"
    docs = [d for i, d in enumerate(embedded_documents()) if 200 <= i < 230]
    extra.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    blend = f"[{{path: embedded, weight: 3}}, {{path: {extra}, weight: 1}}]"
    base = _common(tmp_path / "x", smoke_data, tiny_teacher_dir, "colocated")
    base = [o for o in base if not o.startswith(("output_dir=", "train.steps=", "data.dir="))] + [
        f"train.steps={steps}", "train.zero_stage=2", "train.micro_batch_size=2", "train.save_every=2",
        "distill.alpha.schedule=wsd", "distill.alpha.warmup_frac=0.3", "data.source=blend", f"data.blend={blend}",
        f"data.tokenizer={smoke_data.tokenizer_dir}", f"data.dir={tmp_path / 'blend_data'}"]
    full = tmp_path / "full"
    launch(2, base + [f"output_dir={full}"], cwd=tmp_path)
    part = tmp_path / "part"
    launch(2, base + [f"output_dir={part}", "train.exit_after_steps=3"], cwd=tmp_path)
    stopped = read_summary(part)
    assert stopped["finished"] is False and len(stopped["losses"]) == 3
    assert not (part / "student").exists()
    # Without --resume the run refuses to overwrite the checkpoints it finds.
    proc = launch(2, base + [f"output_dir={part}"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "pass --resume" in proc.stdout + proc.stderr
    launch(2, base + [f"output_dir={part}"], cwd=tmp_path, extra_args=["--resume"])
    a, b = read_summary(full), read_summary(part)
    assert b["finished"] is True
    mix = [(s["kind"], s["samples_drawn"]) for s in a["data"]["sources"]]
    assert mix == [("embedded", 36), ("files", 12)] and a["data"] == b["data"]
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-6, abs=1e-7)
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)
    assert_same_params(read_student(part), read_student(full), read_initial(smoke_data), rel=1e-6)


def test_bad_config_fails_before_any_process_group(tmp_path):
    proc = launch(2, [f"output_dir={tmp_path / 'o'}", "distill.top_p=1.5"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "distill.top_p" in out and "(0, 1]" in out
    assert "init_distributed" not in out and not (tmp_path / "o").exists()


def test_default_teacher_is_pretrained_once_then_reused(tmp_path, smoke_data):
    """No teacher.path: the run pre-trains its teacher (LM only, same trainer), caches it, and a second
    run with the same teacher settings reuses it instead of training again."""
    over = [f"data.dir={smoke_data.path}", "train.steps=2", "optim.warmup_steps=1", "teacher.pretrain_steps=3",
            "train.eval_every=0", "train.save_every=0"]
    first = launch(1, over + [f"output_dir={tmp_path / 'a'}"], cwd=tmp_path)
    text = first.stdout + first.stderr
    assert "pre-training a tiny-teacher teacher for 3 steps" in text
    export = tmp_path / "a" / "teacher" / "export"
    assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()
    assert (export / "pd_dist_teacher_stamp.txt").is_file()
    assert read_summary(tmp_path / "a")["teacher_top1_agreement"] is not None
    weights = export / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (export / "pd_dist_teacher_stamp.txt").read_text())
    # Same output_dir with student checkpoints present, and settings the cached teacher was stamped
    # with changed: refused without --resume, teacher untouched (not pre-trained again first).
    changed = ["train.log_every=1", "optim.weight_decay=0.05"]
    again = launch(1, over + changed + [f"output_dir={tmp_path / 'a'}"], cwd=tmp_path, check=False)
    assert again.returncode != 0 and "pass --resume" in again.stdout + again.stderr
    assert "pre-training a" not in again.stdout + again.stderr
    assert (weights.stat().st_mtime_ns, (export / "pd_dist_teacher_stamp.txt").read_text()) == before
    # A resume that changes how often the run logs keeps its teacher (and the stamp ignores such keys).
    resumed = launch(1, over + ["train.log_every=1", f"output_dir={tmp_path / 'a'}"], cwd=tmp_path,
                     extra_args=["--resume"])
    assert "reusing the pre-trained teacher" in resumed.stdout + resumed.stderr
    assert weights.stat().st_mtime_ns == before[0]
    import shutil

    shutil.rmtree(tmp_path / "a" / "checkpoints")
    third = launch(1, over + [f"output_dir={tmp_path / 'a'}"], cwd=tmp_path)
    assert "reusing the pre-trained teacher" in third.stdout + third.stderr


def _rank_pid(out_dir: Path, local_rank: int, timeout: float = 120) -> int:
    """The pid of the launched rank `local_rank` of the run writing to out_dir (found in /proc)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"pretrain_pd.py" in b" ".join(cmd) and f"--local_rank={local_rank}".encode() in cmd and \
                    f"output_dir={out_dir}".encode() in cmd:
                return int(d.name)
        time.sleep(0.2)
    raise AssertionError(f"rank {local_rank} of {out_dir} not found")


def test_a_signal_on_one_rank_stops_all_after_the_same_step_and_auto_resume_continues(tmp_path, smoke_data,
                                                                                   tiny_teacher_dir):
    """SIGUSR1 reaches only rank 1: both ranks agree to stop after the same step, checkpoint and exit
    cleanly; --auto-resume then continues from that checkpoint to the losses of an uninterrupted run (and
    starts from scratch where there is none)."""
    import signal
    import threading
    import time

    base = _common(tmp_path / "x", smoke_data, tiny_teacher_dir, "colocated")
    base = [o for o in base if not o.startswith(("output_dir=", "train.steps="))] + [
        "train.steps=150", "train.save_every=0", "train.eval_every=0", "train.log_every=1"]
    full, part = tmp_path / "full", tmp_path / "part"
    launch(2, base + [f"output_dir={full}"], cwd=tmp_path, extra_args=["--auto-resume"])  # nothing to resume

    result = {}
    th = threading.Thread(target=lambda: result.update(p=launch(2, base + [f"output_dir={part}"], cwd=tmp_path)))
    th.start()
    pid = _rank_pid(part, 1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (part / "tensorboard").exists():
        time.sleep(0.2)
    time.sleep(2.0)  # some steps in
    os.kill(pid, signal.SIGUSR1)
    th.join(timeout=600)
    out = result["p"].stdout + result["p"].stderr
    stopped = read_summary(part)
    assert stopped["finished"] is False and 0 < len(stopped["losses"]) < 150, out[-3000:]
    assert "SIGUSR1 received" in out or "stop signal (on another rank)" in out
    assert (part / "checkpoints" / "latest").read_text().strip() == f"step{len(stopped['losses']):08d}"

    launch(2, base + [f"output_dir={part}"], cwd=tmp_path, extra_args=["--auto-resume"])
    a, b = read_summary(full), read_summary(part)
    assert b["finished"] is True
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-6, abs=1e-7)


def test_runs_leave_no_shared_memory_behind(tmp_path, smoke_data, tiny_teacher_dir):
    """DeepSpeed's CPU allreduce workspace (69 MB per rank in /dev/shm) is unlinked once every rank has
    mapped it: finished runs must not fill the RAM-backed /dev/shm."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*"))
    base = _common(tmp_path / "x", smoke_data, tiny_teacher_dir, "colocated")
    base = [o for o in base if not o.startswith(("output_dir=", "train.steps="))] + ["train.steps=2"]
    launch(2, base + [f"output_dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert read_summary(tmp_path / "r")["finished"]
    assert set(shm.glob("deepspeed_allreduce_buffer_*")) - before == set()


def _listening(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp{,6} write them) listening on ``port``."""
    out = set()
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(f).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if state == "0A" and int(p, 16) == port:
                out.add(addr)
    return out


def test_the_job_store_listens_on_master_addr_only():
    """torch's TCPStore listens on every interface and has no authentication; the job's listens on
    MASTER_ADDR (here 127.0.0.1) and still serves its clients."""
    import datetime

    import torch.distributed as dist

    from conftest import free_port
    from pd_dist.cluster.topology import LaunchEnv, _listen_socket, job_store

    port = free_port()
    env = LaunchEnv(0, 2, 0, "127.0.0.1", port, "test", "node0")
    store = job_store(env, datetime.timedelta(seconds=10))
    assert _listening(port) == {"0100007F"}  # 127.0.0.1, not 00000000 (all) or :: (all, v6)
    client = dist.TCPStore("127.0.0.1", port, 2, False, timeout=datetime.timedelta(seconds=10))
    client.set("k", "v")
    assert store.get("k") == b"v"
    # an address that is not this host's (TEST-NET-1): the store falls back to every interface
    assert _listen_socket("192.0.2.1", free_port()) is None
    with pytest.raises(RuntimeError, match="does not resolve"):
        _listen_socket("no-such-host.invalid", free_port())
    with pytest.raises(RuntimeError, match=f"cannot listen on MASTER_ADDR 127.0.0.1 port {port}"):
        job_store(env, datetime.timedelta(seconds=10))  # the port is taken by the first store


def test_a_host_name_resolving_to_loopback_still_lets_other_nodes_in(monkeypatch):
    """MASTER_ADDR is this host's name, which resolves to loopback here (as Debian's `127.0.1.1 node1`
    line does): in a job of several hosts the store listens on every interface, and a client on
    another host (another network namespace, reaching this one at its real address) gets in; in a
    job the launcher says is on this host alone it still listens on loopback only."""
    import datetime
    import socket as sk
    import subprocess
    import sys

    from conftest import free_port
    from pd_dist.cluster.topology import LaunchEnv, job_store, loopback_name

    name = sk.gethostname()
    if not loopback_name(name):
        pytest.skip(f"this host's name {name} does not resolve to loopback here")
    for k in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(k, raising=False)
    port = free_port()
    store = job_store(LaunchEnv(0, 2, 0, name, port, "test", "node0"), datetime.timedelta(seconds=10))
    assert _listening(port) & {"00000000", "00000000000000000000000000000000"}, _listening(port)
    del store
    monkeypatch.setenv("LOCAL_SIZE", "2")
    port = free_port()
    store = job_store(LaunchEnv(0, 2, 0, name, port, "test", "node0"), datetime.timedelta(seconds=10))
    assert _listening(port) <= {"0100007F", "00000000000000000000000000000001"}, _listening(port)
    del store

    from test_faults import _TwoHosts

    server = ("import datetime, sys; from pd_dist.cluster.topology import LaunchEnv, job_store\n"
              f"s = job_store(LaunchEnv(0, 2, 0, {name!r}, {port}, 'test', 'node0'), datetime.timedelta(seconds=30))\n"
              "s.set('ready', '1'); print(s.get('from_b').decode(), flush=True)")
    with _TwoHosts(str((os.getpid() + 7) % 10000)) as net:
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE")}
        a = subprocess.Popen(["ip", "netns", "exec", net.ns[0], sys.executable, "-c", server], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client = ("import datetime; import torch.distributed as dist\n"
                  f"c = dist.TCPStore({net.addr[0]!r}, {port}, 2, False, timeout=datetime.timedelta(seconds=30))\n"
                  "c.set('from_b', 'hello'); print(c.get('ready').decode())")
        b = subprocess.run(["ip", "netns", "exec", net.ns[1], sys.executable, "-c", client], env=env,
                           capture_output=True, text=True, timeout=90)
        out, err = a.communicate(timeout=90)
        assert b.returncode == 0 and b.stdout.strip() == "1", b.stderr[-2000:]
        assert a.returncode == 0 and out.strip().endswith("hello"), err[-2000:]
        assert "resolves to loopback on this host" in out
