"""A loopback "cluster" for tests: `deepspeed --hostfile` fanning out over pdsh/ssh on one machine.

The real multi-node launcher ssh-es into every host of the hostfile (pdsh) and starts
``deepspeed.launcher.launch`` there. `LoopbackCluster` reproduces that on one machine, as recorded in
shared/cluster-testing.md: one sshd of its own listening on loopback addresses (127.0.0.2, 127.0.0.3),
key login, and host names (node1, node2) mapped in ~/.ssh/config, never in /etc/hosts.

What it touches outside its work directory, and restores on exit (also after a failure, and on the next
start after a crash, from the owner pid recorded in the added text):
- ~/.ssh/authorized_keys: one appended line, tagged with a unique id, removed again;
- ~/.ssh/config: one block between ``# >>> pd-dist loopback-cluster`` / ``# <<< ...`` markers, put at
  the top (ssh takes the first value it finds) and removed again; what was there stays as it was;
- ~/.ssh itself, and those two files, if they did not exist before (removed again when left empty);
- /run/sshd (sshd's privilege-separation directory) is created if missing and left in place.
The user key, host key, known-hosts file, sshd config, log and pid file live in the work directory.
sshd runs in the foreground as our child; on exit it and every process started under it (the remote
"ranks" of a launch) are ended by PID. One cluster at a time per machine (a file lock), because the
host names and addresses are shared.

Usage::

    reason = ensure_cluster_packages()
    if reason: skip_or_fail(reason)
    with LoopbackCluster(workdir=tmp_path / "cluster") as c:
        c.deepspeed_env(run_dir)
        proc = c.launch(script, ["--flag"], cwd=run_dir, timeout=300)
"""
from __future__ import annotations

import fcntl
import functools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

PACKAGES = ("openssh-server", "openssh-client", "pdsh")
SSHD = "/usr/sbin/sshd"
LOCK_FILE = Path(tempfile.gettempdir()) / "pd-dist-loopback-cluster.lock"
MARK_BEGIN = "# >>> pd-dist loopback-cluster"
MARK_END = "# <<< pd-dist loopback-cluster"
KEY_TAG = "pd-dist-loopback-cluster"
DEFAULT_HOSTS = {"node1": "127.0.0.2", "node2": "127.0.0.3"}
VENV_BIN = Path(sys.executable).parent


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def skip_or_fail(reason: str) -> None:
    """Skip the calling test with ``reason``; in CI (CI=true) fail instead: CI must run these tests."""
    import pytest

    if in_ci():
        pytest.fail(f"cluster test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _missing_tools() -> list[str]:
    need = {"sshd": Path(SSHD).is_file(), "ssh": bool(shutil.which("ssh")),
            "ssh-keygen": bool(shutil.which("ssh-keygen")), "pdsh": bool(shutil.which("pdsh"))}
    return [k for k, ok in need.items() if not ok]


@functools.lru_cache(maxsize=None)
def ensure_cluster_packages() -> Optional[str]:
    """Install openssh-server, openssh-client and pdsh with apt-get if any tool is missing.

    Returns None when everything is there (installing if needed), else why it cannot be (use
    `skip_or_fail`, which fails in CI instead of skipping)."""
    missing = _missing_tools()
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"missing {', '.join(missing)} and not root, cannot apt-get install {' '.join(PACKAGES)}"
    return apt_install(PACKAGES, _missing_tools)


def apt_install(packages: tuple[str, ...] | list[str], missing_tools) -> Optional[str]:
    """apt-get update + install `packages` (noninteractive, waiting for the dpkg lock); None when
    `missing_tools()` is empty afterwards, else why not."""
    missing = missing_tools()
    if not shutil.which("apt-get"):
        return f"missing {', '.join(missing)} and no apt-get to install {' '.join(packages)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock_wait = ["-o", "DPkg::Lock::Timeout=300"]
    for cmd in (["apt-get", *lock_wait, "update", "-q"],
                ["apt-get", *lock_wait, "install", "-y", "-q", "--no-install-recommends", *packages]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out"
        if proc.returncode != 0:
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
            return f"`{' '.join(cmd)}` failed ({proc.returncode}): {tail}"
    missing = missing_tools()
    return f"still missing after install: {', '.join(missing)}" if missing else None


def deepspeed_cmd() -> list[str]:
    exe = VENV_BIN / "deepspeed"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def free_port(addrs=("127.0.0.1",)) -> int:
    """A TCP port free on every address in ``addrs`` (at the time of asking)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((addrs[0], 0))
            port = s.getsockname()[1]
            ok = True
            for a in addrs[1:]:
                with socket.socket() as t:
                    try:
                        t.bind((a, port))
                    except OSError:
                        ok = False
            if ok:
                return port
    raise RuntimeError(f"no port free on all of {addrs}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_running(pid: int) -> bool:
    """Alive and not a zombie (a killed process re-parented to init may linger as one for a moment)."""
    return _pid_alive(pid) and not _is_zombie(pid)


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces and parentheses.
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def _descendants(pid: int) -> list[int]:
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_pids(pids: list[int], grace: float = 3.0) -> None:
    """SIGTERM, wait up to ``grace`` s, then SIGKILL whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = []
        for p in pids:
            try:
                os.kill(p, sig)
                live.append(p)
            except ProcessLookupError:
                pass
        if not live:
            return
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 1.0)
        while time.monotonic() < deadline and any(pid_running(p) for p in live):
            time.sleep(0.05)
        pids = [p for p in live if pid_running(p)]


def acquire_file_lock(path, timeout: float, owner: str) -> int:
    """An exclusive flock on `path` (machine-wide: one fixture of a kind at a time); returns the fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise RuntimeError(f"another {owner} holds {path} for > {timeout} s")
            time.sleep(0.5)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] == "Z"
    except (OSError, ValueError, IndexError):
        return False


def _ssh_home() -> Path:
    # ssh and sshd take the home directory from the password database, not from $HOME.
    return Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh"


def _write_private(path: Path, text: str) -> None:
    existed = path.exists()
    path.write_text(text)
    if not existed:
        os.chmod(path, 0o600)


class LoopbackCluster:
    """sshd on loopback addresses posing as hosts ``node1``/``node2``; a context manager."""

    def __init__(self, hosts: Optional[dict[str, str]] = None, workdir: Optional[Path] = None,
                 port: Optional[int] = None, lock_timeout: float = 900.0):
        self.hosts = dict(DEFAULT_HOSTS if hosts is None else hosts)
        if not self.hosts:
            raise ValueError("LoopbackCluster needs at least one host")
        for name, addr in self.hosts.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                raise ValueError(f"bad host name {name!r}")
            if not addr.startswith("127."):
                raise ValueError(f"host {name} address {addr} is not a loopback address (127.0.0.0/8)")
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="pd-cluster-") if workdir is None else workdir).resolve()
        self.port = port
        self.lock_timeout = lock_timeout
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.sshd: Optional[subprocess.Popen] = None
        self._lock_fd: Optional[int] = None
        self._created: list[Path] = []  # files/dirs under ~/.ssh that did not exist before
        self._key_line: Optional[str] = None
        self._ak_newline_added = False
        self._config_added = False
        self.ssh_dir = _ssh_home()
        self.key = self.workdir / "id_ed25519"
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.sshd_config = self.workdir / "sshd_config"
        self.sshd_log = self.workdir / "sshd.log"
        self.pid_file = self.workdir / "sshd.pid"
        self.known_hosts = self.workdir / "known_hosts"

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> "LoopbackCluster":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def master_addr(self) -> str:
        return next(iter(self.hosts.values()))

    def _start(self) -> None:
        reason = ensure_cluster_packages()
        if reason:
            raise RuntimeError(f"LoopbackCluster: {reason}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        self._purge_stale()
        addrs = list(self.hosts.values())
        if self.port is None:
            self.port = free_port(addrs)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        for key in (self.key, self.host_key):
            for p in (key, key.with_name(key.name + ".pub")):
                p.unlink(missing_ok=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{KEY_TAG} {self.id}",
                            "-f", str(key)], check=True, capture_output=True)
        self.known_hosts.write_text("")
        listen = "".join(f"ListenAddress {a}:{self.port}\n" for a in addrs)
        self.sshd_config.write_text(
            f"# sshd of a pd-dist LoopbackCluster ({self.id}); started and stopped by tests/cluster.py\n"
            f"Port {self.port}\n{listen}"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.pid_file}\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "AuthorizedKeysFile .ssh/authorized_keys\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "UseDNS no\n"
            "X11Forwarding no\n"
            "PrintMotd no\n"
            "MaxStartups 200\n"
            "MaxSessions 100\n"
            "LogLevel VERBOSE\n")
        test = subprocess.run([SSHD, "-t", "-f", str(self.sshd_config)], capture_output=True, text=True)
        if test.returncode != 0:
            raise RuntimeError(f"sshd rejected its config {self.sshd_config}: {test.stderr.strip()}")
        self._add_authorized_key()
        self._add_ssh_config()
        self.sshd = subprocess.Popen([SSHD, "-D", "-f", str(self.sshd_config), "-E", str(self.sshd_log)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self._rewrite_config_block()  # now with sshd's pid, so a crashed run's sshd can be ended later
        self._wait_ready()

    def _acquire_lock(self) -> None:
        self._lock_fd = acquire_file_lock(LOCK_FILE, self.lock_timeout, "LoopbackCluster")

    # -- ~/.ssh edits ----------------------------------------------------------------------------
    def _ensure_ssh_dir(self) -> None:
        if not self.ssh_dir.exists():
            self.ssh_dir.mkdir(mode=0o700)
            self._created.append(self.ssh_dir)

    def _add_authorized_key(self) -> None:
        self._ensure_ssh_dir()
        ak = self.ssh_dir / "authorized_keys"
        line = self.key.with_name(self.key.name + ".pub").read_text().strip()
        if not ak.exists():
            self._created.append(ak)
            _write_private(ak, "")
        text = ak.read_text()
        self._ak_newline_added = bool(text) and not text.endswith("\n")
        if self._ak_newline_added:
            text += "\n"
        _write_private(ak, text + line + "\n")
        self._key_line = line

    def _config_block(self) -> str:
        sshd_pid = self.sshd.pid if self.sshd is not None else 0
        lines = [f"{MARK_BEGIN} {self.id} owner_pid={os.getpid()} sshd_pid={sshd_pid} "
                 f"sshd_config={self.sshd_config} (added by tests/cluster.py, removed on exit)"]
        for name, addr in self.hosts.items():
            lines += [f"Host {name}", f"    HostName {addr}", f"    Port {self.port}", "    User root"
                      if os.geteuid() == 0 else f"    User {pwd.getpwuid(os.getuid()).pw_name}",
                      f"    IdentityFile {self.key}", "    IdentitiesOnly yes", "    BatchMode yes",
                      "    StrictHostKeyChecking no", f"    UserKnownHostsFile {self.known_hosts}",
                      "    LogLevel ERROR", "    ConnectTimeout 10"]
        # Settings that came before any Host line in the original file applied to every host: keep that.
        lines += ["Host *", f"{MARK_END} {self.id}"]
        return "\n".join(lines) + "\n"

    def _add_ssh_config(self) -> None:
        self._ensure_ssh_dir()
        cfg = self.ssh_dir / "config"
        if not cfg.exists():
            self._created.append(cfg)
            _write_private(cfg, "")
        _write_private(cfg, self._config_block() + cfg.read_text())
        self._config_added = True

    def _rewrite_config_block(self) -> None:
        cfg = self.ssh_dir / "config"
        text = _remove_blocks(cfg.read_text(), lambda ident, _hdr: ident == self.id)
        _write_private(cfg, self._config_block() + text)

    def _remove_ssh_edits(self) -> None:
        ak, cfg = self.ssh_dir / "authorized_keys", self.ssh_dir / "config"
        if self._key_line is not None and ak.exists():
            lines = ak.read_text().splitlines(keepends=True)
            text = "".join(line for line in lines if line.strip() != self._key_line)
            if self._ak_newline_added and text.endswith("\n"):
                text = text[:-1]  # the file ended without a newline before we appended
            _write_private(ak, text)
            self._key_line = None
        if self._config_added and cfg.exists():
            _write_private(cfg, _remove_blocks(cfg.read_text(), lambda ident, _hdr: ident == self.id))
            self._config_added = False
        for p in reversed(self._created):  # files first, then the directory
            try:
                if p.is_dir():
                    p.rmdir()  # only if empty
                elif p.stat().st_size == 0:
                    p.unlink()
            except OSError:
                pass
        self._created = []

    def _purge_stale(self) -> None:
        """Undo what a crashed earlier LoopbackCluster (its owner process gone) left in ~/.ssh."""
        cfg, ak = self.ssh_dir / "config", self.ssh_dir / "authorized_keys"
        stale: list[str] = []
        if cfg.exists():
            def dead(ident: str, header: str) -> bool:
                m = re.search(r"owner_pid=(\d+) sshd_pid=(\d+) sshd_config=(\S+)", header)
                if not m or _pid_alive(int(m.group(1))):
                    return False
                stale.append(ident)
                sshd_pid, conf = int(m.group(2)), m.group(3)
                try:  # its sshd, if still running with that config: end it (and its sessions) by pid
                    if sshd_pid and conf in Path(f"/proc/{sshd_pid}/cmdline").read_text():
                        _kill_pids(_descendants(sshd_pid) + [sshd_pid])
                except OSError:
                    pass
                return True
            _write_private(cfg, _remove_blocks(cfg.read_text(), dead))
        if ak.exists():
            keep = []
            for line in ak.read_text().splitlines(keepends=True):
                m = re.search(rf"{KEY_TAG} ((\d+)-[0-9a-f]+)\s*$", line)
                if m and (m.group(1) in stale or not _pid_alive(int(m.group(2)))):
                    continue
                keep.append(line)
            _write_private(ak, "".join(keep))

    # -- sshd ------------------------------------------------------------------------------------
    def ssh_cmd(self, host: str, *command: str) -> list[str]:
        return ["ssh", "-o", "BatchMode=yes", host, *command]

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        for name in self.hosts:
            while True:
                if self.sshd.poll() is not None:
                    raise RuntimeError(f"sshd exited ({self.sshd.returncode}): {self._log_tail()}")
                proc = subprocess.run(self.ssh_cmd(name, "true"), capture_output=True, text=True,
                                      timeout=30, stdin=subprocess.DEVNULL)
                if proc.returncode == 0:
                    break
                last = proc.stderr.strip()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cannot ssh to {name} ({self.hosts[name]}:{self.port}) after "
                                       f"{timeout:.0f} s: {last}; sshd log: {self._log_tail()}")
                time.sleep(0.2)

    def _log_tail(self, n: int = 15) -> str:
        try:
            return " | ".join(self.sshd_log.read_text().strip().splitlines()[-n:])
        except OSError:
            return "(no log)"

    def kill_sessions(self) -> None:
        """End every process running under our sshd (remote shells and the ranks they started)."""
        if self.sshd is not None and self.sshd.poll() is None:
            _kill_pids(_descendants(self.sshd.pid))

    def close(self) -> None:
        """Stop sshd and its sessions by PID, undo the ~/.ssh edits, release the lock. Idempotent."""
        try:
            if self.sshd is not None:
                try:
                    if self.sshd.poll() is None:
                        _kill_pids(_descendants(self.sshd.pid) + [self.sshd.pid])
                    self.sshd.wait(timeout=10)
                except (subprocess.TimeoutExpired, OSError):
                    pass
                self.sshd = None
        finally:
            try:
                self._remove_ssh_edits()
            finally:
                if self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                    os.close(self._lock_fd)
                    self._lock_fd = None
                if self._own_workdir:
                    shutil.rmtree(self.workdir, ignore_errors=True)

    # -- launching -------------------------------------------------------------------------------
    def hostfile(self, slots: int = 1) -> Path:
        """``node1 slots=N`` / ``node2 slots=N``, in the work directory."""
        path = self.workdir / f"hostfile_slots{slots}"
        path.write_text("".join(f"{name} slots={slots}\n" for name in self.hosts))
        return path

    def deepspeed_env(self, cwd: Path, extra: Optional[dict[str, str]] = None) -> Path:
        """Write ``cwd/.deepspeed_env``: what the remote ranks must see beyond what the launcher exports.

        PATH puts the venv first: otherwise the remote side finds another ninja and re-compiles
        DeepSpeed's shm op on every launch. The launcher itself already exports PYTHON* (PYTHONPATH
        gets the launch directory prepended) and the accelerator's variables."""
        env = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"}
        env.update(extra or {})
        lines = []
        for k, v in env.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) or "\n" in str(v):
                raise ValueError(f".deepspeed_env: bad entry {k!r}={v!r}")
            lines.append(f"{k}={v}\n")  # the launcher reads KEY=VALUE lines; no comments, no blank lines
        path = Path(cwd) / ".deepspeed_env"
        path.write_text("".join(lines))
        return path

    def launch(self, script: Path, args: list[str], cwd: Path, timeout: float,
               master_addr: Optional[str] = None, slots: int = 1, master_port: Optional[int] = None,
               launcher_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        """`deepspeed --hostfile H --master_addr A --master_port P script args` from ``cwd``.

        Writes ``cwd/.deepspeed_env`` (see `deepspeed_env`) unless one is there. On timeout, the
        launcher's process group and every remote rank are killed and TimeoutExpired is raised."""
        if self.sshd is None:
            raise RuntimeError("LoopbackCluster is not running (use it as a context manager)")
        cwd = Path(cwd)
        if not (cwd / ".deepspeed_env").exists():
            self.deepspeed_env(cwd)
        addr = master_addr or self.master_addr
        port = master_port or free_port((addr,))
        cmd = deepspeed_cmd() + ["--hostfile", str(self.hostfile(slots)), "--master_addr", addr,
                                 "--master_port", str(port), *launcher_args, str(script), *map(str, args)]
        env = dict(os.environ)
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.kill_sessions()
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err)
        except BaseException:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.kill_sessions()
            proc.wait()
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _remove_blocks(text: str, should_remove) -> str:
    """Drop marker-delimited blocks whose ``should_remove(id, header_line)`` is true."""
    out, skipping = [], None
    for line in text.splitlines(keepends=True):
        if skipping is None and line.startswith(MARK_BEGIN):
            rest = line[len(MARK_BEGIN):].split()
            ident = rest[0] if rest else ""
            if should_remove(ident, line):
                skipping = ident
                continue
        if skipping is not None:
            if line.startswith(MARK_END) and line[len(MARK_END):].split()[:1] == [skipping]:
                skipping = None
            continue
        out.append(line)
    return "".join(out)
