"""The loopback cluster fixture: `deepspeed --hostfile` over pdsh/ssh to "hosts" node1/node2 on one machine.

A 2-"host" gloo all_reduce launched exactly as on a cluster, plus the fixture's own promises: ssh lands
on the right address per host name, sshd is gone and ~/.ssh is as before after exit, also on failure.
"""
from __future__ import annotations

import json
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from cluster import (LoopbackCluster, MARK_BEGIN, MARK_END, _descendants, _remove_blocks, _ssh_home,
                     ensure_cluster_packages, pid_running, skip_or_fail)

ALLREDUCE = textwrap.dedent("""\
    import argparse, json, os, socket, sys
    from pathlib import Path

    import torch
    import torch.distributed as dist

    argparse.ArgumentParser().parse_known_args()  # the launcher passes --local_rank
    dist.init_process_group("gloo")  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the launcher
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    ssh = os.environ.get("SSH_CONNECTION", "").split()
    info = {
        "rank": rank, "world_size": world, "allreduce": t.item(),
        "local_rank": int(os.environ.get("LOCAL_RANK", -1)),
        "node_rank": int(os.environ.get("CROSS_RANK", -1)),
        "hostname": socket.gethostname(),
        "ssh_server_addr": ssh[2] if len(ssh) == 4 else None,  # which loopback "host" we were started on
        "master_addr": os.environ.get("MASTER_ADDR"), "master_port": os.environ.get("MASTER_PORT"),
        "path0": os.environ.get("PATH", "").split(os.pathsep)[0], "python": sys.executable,
        "cwd": os.getcwd(),
    }
    Path(f"rank{rank}.json").write_text(json.dumps(info))
    dist.barrier()
    dist.destroy_process_group()
""")


def _ssh_snapshot() -> dict[str, str | None]:
    d = _ssh_home()
    if not d.exists():
        return {"<dir>": None}
    return {p.name: p.read_text() for p in sorted(d.iterdir()) if p.is_file()} | {
        "<mode>": oct(d.stat().st_mode)}


@pytest.fixture(scope="module")
def cluster_ready():
    reason = ensure_cluster_packages()
    if reason:
        skip_or_fail(reason)


@pytest.mark.cluster
@pytest.mark.multiproc
def test_deepspeed_hostfile_allreduce_over_ssh(cluster_ready, tmp_path):
    before = _ssh_snapshot()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = run_dir / "allreduce.py"
    script.write_text(ALLREDUCE)
    t0 = time.monotonic()
    with LoopbackCluster(workdir=tmp_path / "cluster") as c:
        sshd_pid = c.sshd.pid
        assert c.hostfile().read_text() == "node1 slots=1\nnode2 slots=1\n"
        # ssh by host name lands on that host's loopback address, through our sshd.
        for name, addr in c.hosts.items():
            out = subprocess.run(c.ssh_cmd(name, "echo $SSH_CONNECTION"), capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            assert out[2:4] == [addr, str(c.port)], out
        c.deepspeed_env(run_dir)
        env_lines = (run_dir / ".deepspeed_env").read_text().splitlines()
        assert env_lines[0].startswith("PATH=") and all("=" in line for line in env_lines)
        started = time.monotonic()
        proc = c.launch(script, [], cwd=run_dir, timeout=300)
        launch_s = time.monotonic() - started
        log = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        assert proc.returncode == 0, log
        assert "pdsh" in proc.stdout + proc.stderr, log  # really went through the multi-node runner
    print(f"cluster up+launch+down {time.monotonic() - t0:.1f} s (launch {launch_s:.1f} s)")

    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(2)]
    for r, info in enumerate(ranks):
        assert info["rank"] == r and info["world_size"] == 2, info
        assert info["allreduce"] == 3.0, info  # 1 + 2
        assert info["master_addr"] == "127.0.0.2", info
        assert info["local_rank"] == 0 and info["node_rank"] == r, info  # one rank per "host"
        assert info["cwd"] == str(run_dir), info
        assert Path(info["path0"]) == Path(info["python"]).parent, info  # .deepspeed_env's PATH applied
    assert [i["ssh_server_addr"] for i in ranks] == ["127.0.0.2", "127.0.0.3"], ranks
    # Cleanup: sshd gone, ~/.ssh as before.
    assert not pid_running(sshd_pid)
    assert _ssh_snapshot() == before


@pytest.mark.cluster
def test_cleanup_after_failure(cluster_ready, tmp_path):
    before = _ssh_snapshot()
    with pytest.raises(RuntimeError, match="boom"):
        with LoopbackCluster(workdir=tmp_path / "cluster") as c:
            sshd_pid = c.sshd.pid
            # A remote session left running (like a hung rank) must be ended too.
            sleeper = subprocess.Popen(c.ssh_cmd("node2", "sleep 300"), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while len(_descendants(sshd_pid)) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            remote = _descendants(sshd_pid)
            assert remote, "the remote sleep did not start"
            cfg = (_ssh_home() / "config").read_text()
            assert cfg.startswith(MARK_BEGIN) and "Host node2" in cfg
            raise RuntimeError("boom")
    assert not pid_running(sshd_pid)
    assert not any(pid_running(p) for p in remote)
    sleeper.wait(timeout=10)  # its connection was closed
    assert _ssh_snapshot() == before


@pytest.mark.cluster
@pytest.mark.multiproc
def test_launch_timeout_kills_remote_ranks(cluster_ready, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = run_dir / "hang.py"
    script.write_text("import os, pathlib, time\n"
                      "pathlib.Path(f'pid{os.environ[\"RANK\"]}').write_text(str(os.getpid()))\n"
                      "time.sleep(600)\n")
    with LoopbackCluster(workdir=tmp_path / "cluster") as c:
        with pytest.raises(subprocess.TimeoutExpired):
            c.launch(script, [], cwd=run_dir, timeout=25)
        pids = [int((run_dir / f"pid{r}").read_text()) for r in range(2) if (run_dir / f"pid{r}").exists()]
        assert pids, "no rank started within the timeout"
        assert not any(pid_running(p) for p in pids)
        assert pid_running(c.sshd.pid)  # the cluster itself stays usable


def test_config_block_edit_keeps_user_config():
    """Pure text check of the ~/.ssh/config edit, no sshd: our block on top, then the user's, verbatim."""
    user = "ForwardAgent no\nHost build\n    HostName 10.0.0.5\n"
    ours = (f"{MARK_BEGIN} abc owner_pid=1 sshd_pid=2 sshd_config=/x\nHost node1\n    HostName 127.0.0.2\n"
            f"Host *\n{MARK_END} abc\n")
    other = f"{MARK_BEGIN} zzz owner_pid=3 sshd_pid=4 sshd_config=/y\nHost node9\n{MARK_END} zzz\n"
    text = ours + other + user
    assert _remove_blocks(text, lambda i, _h: i == "abc") == other + user
    assert _remove_blocks(text, lambda i, _h: True) == user
    assert _remove_blocks(user, lambda i, _h: True) == user
