"""A single-host Slurm cluster for tests: munged, slurmctld and slurmd started by the test, on loopback.

`LoopbackSlurm` follows the recipe in shared/cluster-testing.md ("A single-host Slurm cluster"): one
node named after this machine's host name at NodeAddr=127.0.0.1, CPUs = nproc, one default partition,
no accounting, ``proctrack/linuxproc`` + ``task/none`` (no cgroups), ``MpiDefault=none``. Everything
lives in its work directory: slurm.conf, state and spool directories, pid and log files; clients find
the cluster through ``SLURM_CONF`` (never /etc/slurm/slurm.conf), and the controller and slurmd listen on
free ports, so a system Slurm (if any) is neither used nor disturbed.

munged runs as user munge with its own socket, pid, log and seed files in a private directory
(``AuthInfo=socket=...`` points Slurm at it), so a system munged on /run/munge is left alone; the key is
the package's /etc/munge/munge.key.

Cleanup: the three daemons are our children and are ended by PID. slurmstepd and the job's processes
are not (slurmd detaches them), so every process we start carries ``PD_DIST_SLURM=<owner pid>-<id>`` in
its environment, which slurmd, slurmstepd and the job inherit; on exit, and on the next start after a
crash (owner pid gone), the processes carrying a tag are found in /proc and ended by PID. One cluster at
a time per machine (a file lock), since the node name is the host name.

Usage::

    reason = ensure_slurm_packages()
    if reason: skip_or_fail(reason)
    with LoopbackSlurm(tmp_path / "slurm") as s:
        job_id, output, code = s.submit(script, ["--flag"], env={...}, cwd=repo, timeout=300)
"""
from __future__ import annotations

import fcntl
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

from cluster import _descendants, _kill_pids, acquire_file_lock, apt_install, free_port, in_ci, pid_running, skip_or_fail  # noqa: F401  (re-exported)

PACKAGES = ("slurm-wlm", "munge")
MUNGED = "/usr/sbin/munged"
SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
MUNGE_KEY = "/etc/munge/munge.key"
CLIENTS = ("sbatch", "sinfo", "scontrol", "scancel", "srun")
LOCK_FILE = Path(tempfile.gettempdir()) / "pd-dist-loopback-slurm.lock"
TAG = "PD_DIST_SLURM"
VENV_BIN = Path(sys.executable).parent
# Launcher/rank variables of the calling process that must not leak into the job (a test run under
# deepspeed or inside a Slurm allocation would otherwise hand the ranks the wrong identity).
_LEAKY = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR",
          "MASTER_PORT", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMI_SIZE")


def _missing_tools() -> list[str]:
    need = {"munged": Path(MUNGED).is_file(), "slurmctld": Path(SLURMCTLD).is_file(),
            "slurmd": Path(SLURMD).is_file(), "munge.key": Path(MUNGE_KEY).is_file()}
    need.update({c: bool(shutil.which(c)) for c in CLIENTS})
    return [k for k, ok in need.items() if not ok]


@functools.lru_cache(maxsize=None)
def ensure_slurm_packages() -> Optional[str]:
    """Install slurm-wlm and munge with apt-get if anything is missing.

    Returns None when everything is there (installing if needed), else why it cannot be (use
    `skip_or_fail`, which fails in CI instead of skipping). Installing starts no daemon we rely on."""
    if os.geteuid() != 0:
        return "LoopbackSlurm needs root (slurmd runs as root, munged as user munge)"
    missing = _missing_tools()
    if not missing:
        return None
    return apt_install(PACKAGES, _missing_tools)


# -- processes ---------------------------------------------------------------------------------------
def _tagged_processes() -> dict[int, str]:
    """pid -> value of the PD_DIST_SLURM tag, for every process whose environment carries one."""
    out: dict[int, str] = {}
    needle = f"\0{TAG}=".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = b"\0" + (d / "environ").read_bytes()
        except OSError:
            continue
        i = env.find(needle)
        if i >= 0:
            j = env.find(b"\0", i + 1)
            out[int(d.name)] = env[i + len(needle):j if j >= 0 else None].decode(errors="replace")
    out.pop(os.getpid(), None)
    return out


def _terminate(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, wait up to ``grace`` s, then SIGKILL whatever is left (zombies count as gone)."""
    _kill_pids(pids, grace=grace)


def _owner_alive(tag: str) -> bool:
    m = re.match(r"(\d+)-", tag)
    if not m:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, n: int = 15) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return "(no log)"


class LoopbackSlurm:
    """munged + slurmctld + slurmd for one node (this host) on 127.0.0.1; a context manager."""

    def __init__(self, workdir: Optional[Path] = None, cpus: Optional[int] = None, real_memory_mb: int = 4000,
                 partition: str = "debug", lock_timeout: float = 900.0, ready_timeout: float = 60.0,
                 cred_expire: Optional[int] = None):
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="pd-slurm-") if workdir is None else workdir).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.real_memory_mb = real_memory_mb
        self.partition = partition
        self.lock_timeout = lock_timeout
        self.ready_timeout = ready_timeout
        # Slurm's credential lifetime (default 120 s) also holds a requeued job back for that long.
        self.cred_expire = cred_expire
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.node = socket.gethostname().split(".")[0]  # slurmd takes its node name from the short host name
        self.conf = self.workdir / "slurm.conf"
        self.munge_dir: Optional[Path] = None
        self.munged: Optional[subprocess.Popen] = None
        self.slurmctld: Optional[subprocess.Popen] = None
        self.slurmd: Optional[subprocess.Popen] = None
        self._lock_fd: Optional[int] = None
        self._logs: list = []
        self.last_state: Optional[str] = None

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> "LoopbackSlurm":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def daemons(self) -> dict[str, subprocess.Popen]:
        return {n: p for n, p in (("munged", self.munged), ("slurmctld", self.slurmctld),
                                  ("slurmd", self.slurmd)) if p is not None}

    def env(self, extra: Optional[dict] = None) -> dict[str, str]:
        """The environment for Slurm clients (and, through sbatch's --export=ALL, for the job): ours,
        with SLURM_CONF set, the venv first on PATH, and no Slurm/launcher variables of the caller."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_",
                                                                        "SALLOC_")) and k not in _LEAKY}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env["PYTHONUNBUFFERED"] = "1"
        env["SLURM_CONF"] = str(self.conf)
        env[TAG] = self.id
        env.update({k: str(v) for k, v in (extra or {}).items()})
        return env

    def _start(self) -> None:
        reason = ensure_slurm_packages()
        if reason:
            raise RuntimeError(f"LoopbackSlurm: {reason}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        self._purge_stale()
        for d in ("state", "spool"):
            shutil.rmtree(self.workdir / d, ignore_errors=True)
            (self.workdir / d).mkdir()
        self._start_munged()
        ctld_port = free_port()
        slurmd_port = free_port()
        while slurmd_port == ctld_port:
            slurmd_port = free_port()
        w = self.workdir
        self.conf.write_text(
            f"# A pd-dist LoopbackSlurm ({self.id}); started and stopped by tests/slurm.py\n"
            "ClusterName=pdloop\n"
            "SlurmctldHost=localhost\n"
            f"SlurmctldPort={ctld_port}\n"
            f"SlurmdPort={slurmd_port}\n"
            "SlurmUser=root\n"
            "SlurmdUser=root\n"
            "AuthType=auth/munge\n"
            "CredType=cred/munge\n"
            f"AuthInfo=socket={self.munge_socket}"
            + (f",cred_expire={self.cred_expire}" if self.cred_expire else "") + "\n"
            "CommunicationParameters=NoInAddrAny\n"
            f"StateSaveLocation={w / 'state'}\n"
            f"SlurmdSpoolDir={w / 'spool'}\n"
            f"SlurmctldPidFile={w / 'slurmctld.pid'}\n"
            f"SlurmdPidFile={w / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={w / 'slurmctld.log'}\n"
            f"SlurmdLogFile={w / 'slurmd.log'}\n"
            "SlurmctldDebug=info\n"
            "SlurmdDebug=info\n"
            f"PlugStackConfig={w / 'plugstack.conf'}\n"
            "ProctrackType=proctrack/linuxproc\n"
            "TaskPlugin=task/none\n"
            "SwitchType=switch/none\n"
            "MpiDefault=none\n"
            "SelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_Core\n"
            "SchedulerType=sched/builtin\n"
            "ReturnToService=2\n"
            "AccountingStorageType=accounting_storage/none\n"
            "JobAcctGatherType=jobacct_gather/none\n"
            "JobCompType=jobcomp/none\n"
            "InactiveLimit=0\n"
            "KillWait=5\n"
            "MinJobAge=300\n"
            "SlurmdTimeout=300\n"
            # Trust the node line below over what slurmd detects: lets a test declare more CPUs than
            # the machine has (e.g. 3 single-CPU tasks on 2 cores) without the node being drained.
            "SlurmdParameters=config_overrides\n"
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.real_memory_mb} "
            "State=UNKNOWN\n"
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP\n")
        (w / "plugstack.conf").write_text("")  # no SPANK plugins (not even the system's)
        self.slurmctld = self._spawn("slurmctld", [SLURMCTLD, "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._client(["scontrol", "ping"]).returncode == 0, "slurmctld answers ping")
        self.slurmd = self._spawn("slurmd", [SLURMD, "-D", "-f", str(self.conf)])
        self._wait(self._node_idle, f"node {self.node} idle in sinfo")

    def _acquire_lock(self) -> None:
        self._lock_fd = acquire_file_lock(LOCK_FILE, self.lock_timeout, "LoopbackSlurm")

    def _purge_stale(self) -> None:
        """End what a crashed earlier LoopbackSlurm (its owner process gone) left running."""
        stale = [p for p, tag in _tagged_processes().items() if tag != self.id and not _owner_alive(tag)]
        if stale:
            _terminate(stale)
        for d in Path(tempfile.gettempdir()).glob("pd-slurm-munge-*"):
            m = re.match(r"pd-slurm-munge-(\d+)-", d.name)
            if m and not _owner_alive(f"{m.group(1)}-"):
                shutil.rmtree(d, ignore_errors=True)

    # -- daemons ---------------------------------------------------------------------------------
    @property
    def munge_socket(self) -> Path:
        assert self.munge_dir is not None
        return self.munge_dir / "munge.socket"

    def _start_munged(self) -> None:
        # Its own socket, pid, log and seed files, in a directory of the munge user that munge can reach
        # (a pytest tmp_path is under a root-only 0700 directory), so a system munged is left alone.
        self.munge_dir = Path(tempfile.mkdtemp(prefix=f"pd-slurm-munge-{self.id}-"))
        shutil.chown(self.munge_dir, "munge", "munge")
        os.chmod(self.munge_dir, 0o755)
        d = self.munge_dir
        self.munged = self._spawn("munged", [
            MUNGED, "--foreground", f"--socket={d / 'munge.socket'}", f"--pid-file={d / 'munged.pid'}",
            f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}", f"--key-file={MUNGE_KEY}"],
            user="munge")
        self._wait(lambda: self.munge_socket.is_socket(), "munged socket",
                   log=lambda: _tail(d / "munged.log"))

    def _spawn(self, name: str, cmd: list[str], user: Optional[str] = None) -> subprocess.Popen:
        out = open(self.workdir / f"{name}.out", "ab")
        self._logs.append(out)
        kw = dict(user=user, group=user, extra_groups=[]) if user else {}
        return subprocess.Popen(cmd, env=self.env(), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                cwd=self.workdir if user is None else "/", start_new_session=True, **kw)

    def _client(self, cmd: list[str], timeout: float = 30.0, env: Optional[dict] = None,
                **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=env or self.env(), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, **kw)

    def _node_idle(self) -> bool:
        p = self._client(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"])
        return p.returncode == 0 and p.stdout.strip().rstrip("*") == "idle"

    def diagnostics(self) -> str:
        parts = []
        for name in ("slurmctld", "slurmd"):
            parts.append(f"{name}.log: {_tail(self.workdir / f'{name}.log')}")
            parts.append(f"{name}.out: {_tail(self.workdir / f'{name}.out', 5)}")
        if self.munge_dir is not None:
            parts.append(f"munged.log: {_tail(self.munge_dir / 'munged.log', 5)}")
        return "\n".join(parts)

    def _wait(self, ready, what: str, timeout: Optional[float] = None, log=None) -> None:
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        while True:
            for name, p in self.daemons.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}) while waiting for {what}:\n"
                                       f"{log() if log else self.diagnostics()}")
            try:
                if ready():
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} after {timeout or self.ready_timeout:.0f} s:\n"
                                   f"{log() if log else self.diagnostics()}")
            time.sleep(0.2)

    # -- jobs ------------------------------------------------------------------------------------
    # Final job states (scontrol's JobState); COMPLETING is not one: the step may still be flushing.
    FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                    "DEADLINE", "OUT_OF_MEMORY", "REVOKED", "SPECIAL_EXIT")

    def submit(self, script: Path, args=(), env: Optional[dict] = None, cwd: Optional[Path] = None,
               timeout: float = 300.0, sbatch_args=(), poll: float = 0.5) -> tuple[int, str, int]:
        """``sbatch [sbatch_args] script args`` from ``cwd``, then wait for the job to end; returns
        (job id, output, exit code).

        The job's stdout+stderr go to ``<workdir>/job-<id>.out`` (overriding the script's --output).
        ``env`` is added to `env()`, and the job sees it all (--export=ALL). No accounting is needed:
        the end is seen with ``scontrol show job`` every ``poll`` s (``sbatch --wait`` would do, but it
        polls at 2, 10, 42, 74... s after submission, which cost up to 30 s a job); the exit code is the
        batch script's (ExitCode=code:signal; 128+signal if signalled; never 0 unless the job
        COMPLETED). The final state is in `last_state`. On timeout (or any error, KeyboardInterrupt
        included) every job is cancelled and its processes ended, and TimeoutExpired is raised with
        the output so far."""
        if self.slurmd is None:
            raise RuntimeError("LoopbackSlurm is not running (use it as a context manager)")
        cmd = ["sbatch", "--parsable", *map(str, sbatch_args), f"--output={self.workdir / 'job-%j.out'}",
               "--export=ALL", str(script), *map(str, args)]
        deadline = time.monotonic() + timeout
        job_id = None
        self.last_state = None
        try:
            proc = self._client(cmd, timeout=60, cwd=cwd, env=self.env(env))
            m = re.match(r"(\d+)", proc.stdout.strip())
            if proc.returncode != 0 or not m:
                raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stdout.strip()} "
                                   f"{proc.stderr.strip()}\n{self.diagnostics()}")
            job_id = int(m.group(1))
            unknown = 0
            while True:
                info = self.job_info(job_id)
                state = info.get("JobState", "")
                if state in self.FINAL_STATES:
                    break
                unknown = 0 if info else unknown + 1
                if unknown > 20:
                    raise RuntimeError(f"scontrol no longer knows job {job_id}:\n{self.diagnostics()}")
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(cmd, timeout, output=self._job_output(job_id))
                if self.slurmctld.poll() is not None:
                    raise RuntimeError(f"slurmctld exited ({self.slurmctld.returncode}) during job {job_id}:"
                                       f"\n{self.diagnostics()}")
                time.sleep(poll)
        except BaseException:
            self.cancel_all()
            raise
        self.last_state = state
        code, _, sig = info.get("ExitCode", "1:0").partition(":")
        exit_code = int(code) if int(sig or 0) == 0 else 128 + int(sig)
        if state != "COMPLETED" and exit_code == 0:
            exit_code = 1
        return job_id, self._job_output(job_id), exit_code

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o ID`` as a dict (JobState, ExitCode, Reason, ...); {} if unknown."""
        p = self._client(["scontrol", "show", "job", "-o", str(job_id)], timeout=30)
        if p.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", p.stdout))

    def _job_output(self, job_id: int) -> str:
        try:
            return (self.workdir / f"job-{job_id}.out").read_text(errors="replace")
        except OSError:
            return ""

    def cancel_all(self, grace: float = 10.0) -> None:
        """scancel every job, wait for them to go, then end any process left from them by PID."""
        if self.slurmctld is not None and self.slurmctld.poll() is None:
            try:
                self._client(["scancel", "--full", "--quiet", "--partition", self.partition], timeout=15)
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline:
                    q = self._client(["squeue", "-h", "-o", "%i"], timeout=15)
                    if q.returncode != 0 or not q.stdout.strip():
                        break
                    time.sleep(0.3)
            except (subprocess.TimeoutExpired, OSError):
                pass
        self._kill_tagged(exclude_daemons=True)

    def _kill_tagged(self, exclude_daemons: bool) -> None:
        # With the daemons still running, spare them and their own children (slurmctld's slurmscriptd);
        # slurmd detaches slurmstepd (re-parented to init), so job processes are never among those.
        keep = set()
        if exclude_daemons:
            for p in self.daemons.values():
                keep |= {p.pid, *_descendants(p.pid)}
        pids = [p for p, tag in _tagged_processes().items() if tag == self.id and p not in keep]
        if pids:
            _terminate(pids)

    def close(self) -> None:
        """Cancel jobs, stop slurmd, slurmctld and munged and every process they left, by PID; remove
        munge's directory; release the lock. Idempotent."""
        try:
            if self.slurmd is not None or self.slurmctld is not None:
                self.cancel_all()
            for attr in ("slurmd", "slurmctld"):
                p = getattr(self, attr)
                if p is not None:
                    _terminate([p.pid])
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        pass
                    setattr(self, attr, None)
            self._kill_tagged(exclude_daemons=False)  # slurmstepd, job steps, anything else of ours
            if self.munged is not None:
                _terminate([self.munged.pid])
                try:
                    self.munged.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                self.munged = None
            self._kill_tagged(exclude_daemons=False)
        finally:
            for f in self._logs:
                f.close()
            self._logs = []
            if self.munge_dir is not None:
                shutil.rmtree(self.munge_dir, ignore_errors=True)
                self.munge_dir = None
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
