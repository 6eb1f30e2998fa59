"""A real single-node Slurm cluster on localhost, for tests of the sbatch scripts in slurm/.

Debian's `slurmctld`, `slurmd`, `slurm-client` and `munge` run as the current (root) user with every
file they write (key, config, state, spool, logs, pid files) under one temporary directory, so the
host's /etc/slurm and /etc/munge are never read or changed and several clusters can run side by side
(each picks free ports and its own first job id). The daemons run in the foreground as our children
and are stopped by PID; nothing is found or killed by name.

What a working configuration needs on a container/VM without systemd or cgroups was measured on this
kind of machine (issue 6); the comments below say which line fixes what.
"""
from __future__ import annotations

import os
import random
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.debian_packages import PackagesUnavailable, ensure_binaries

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "munged", "mungekey")
# Terminal states: the job has left the queue (or will not run again without help).
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
               "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here (the reason is the message)."""


def ensure_installed(log=print) -> None:
    """Install the Debian packages when a binary is missing; raise SlurmUnavailable if impossible."""
    try:
        ensure_binaries(BINARIES, PACKAGES, log=log)
    except PackagesUnavailable as e:
        raise SlurmUnavailable(str(e)) from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_layout() -> dict:
    """CPU layout and memory as `slurmd -C` reports them (the node line must not claim more)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0].split()
    fields = dict(kv.split("=", 1) for kv in first if "=" in kv)
    return fields


class LocalSlurm:
    """Start with `start()`, stop with `stop()` (also a context manager).

    Args:
        gpus: fake GPUs on the node, so scripts that ask `--gpus-per-node=N` (N <= gpus) schedule.
            Their device files are symlinks to /dev/null: slurmd rejects plain files or a missing
            File=, and jobs then see CUDA_VISIBLE_DEVICES but no real device.
        root: directory for everything the cluster writes (default: a new temporary directory).
    """

    def __init__(self, gpus: int = 8, root: str | os.PathLike | None = None):
        self.gpus = gpus
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="slurm-"))
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self.host = socket.gethostname().split(".")[0]
        self.partition = "debug"
        self.procs: dict[str, subprocess.Popen] = {}
        self.bringup_s: float | None = None

    # ------------------------------------------------------------------ environment for clients
    @property
    def env(self) -> dict:
        """os.environ for client commands (sbatch, squeue, ...): SLURM_CONF set, stray SLURM_* dropped.

        SOFTCLIP_* (the slurm/ scripts' knobs) are dropped too: sbatch exports this environment to
        the job, and a test must not depend on what the shell that runs it has set."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SOFTCLIP_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def cmd(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        r = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"`{' '.join(args)}` failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return r

    # ------------------------------------------------------------------ configuration
    def _write_config(self) -> None:
        for d in ("etc", "munge", "state", "spool", "log", "dev"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket whose directories others cannot enter (mkdtemp makes 0700)
        for d in (self.root, self.root / "munge"):
            os.chmod(d, 0o755)
        key = self.root / "etc" / "munge.key"
        subprocess.run(["mungekey", "--create", "--force", f"--keyfile={key}"], check=True, capture_output=True)
        os.chmod(key, 0o600)  # munged refuses a key readable by others
        node = _node_layout()
        mem = int(int(node.get("RealMemory", "2048")) * 0.9)  # a bit under what slurmd measures
        gres_node, gres_lines = "", []
        if self.gpus:
            for i in range(self.gpus):
                dev = self.root / "dev" / f"fakegpu{i}"
                if not dev.exists():
                    dev.symlink_to("/dev/null")
            gres_node = f" Gres=gpu:{self.gpus}"
            gres_lines.append(f"Name=gpu File={self.root}/dev/fakegpu[0-{self.gpus - 1}]")
        (self.conf.parent / "gres.conf").write_text("\n".join(gres_lines) + "\n")
        r = self.root
        lines = [
            f"ClusterName=t{random.randrange(10**6)}",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # a short credential lifetime: a requeued job otherwise waits for the old one to expire
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            # no cgroups, no systemd, no accounting daemon in a container
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "JobRequeue=1",
            "MailProg=/bin/true",
            "EnforcePartLimits=ALL",  # else a job asking for more than the node has pends forever
            "SchedulerParameters=sched_interval=2",  # start a requeued job within seconds, not ~140 s
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "KillWait=10",
            # job ids (and the MASTER_PORT the scripts derive from them) differ between clusters
            # that run side by side on one host
            f"FirstJobId={random.randrange(1000, 900000)}",
            "GresTypes=gpu",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={node['CPUs']} Boards={node.get('Boards', 1)} "
            f"SocketsPerBoard={node['SocketsPerBoard']} CoresPerSocket={node['CoresPerSocket']} "
            f"ThreadsPerCore={node['ThreadsPerCore']} RealMemory={mem}{gres_node} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.close()

    def _wait_for(self, what: str, ok, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}; "
                                       f"see {self.root}/log/{name}.log and {name}.stdout:\n{self.tail(name)}")
            if ok():
                return
            time.sleep(0.1)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}; logs in {self.root}/log:\n"
                           + "\n".join(self.tail(n) for n in self.procs))

    def tail(self, name: str, n: int = 15) -> str:
        out = []
        for f in (self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.stdout"):
            if f.is_file():
                out += [f"--- {f.name}"] + f.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(out)

    def start(self, timeout: float = 60) -> "LocalSlurm":
        t0 = time.perf_counter()
        self._write_config()
        m = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", f"--socket={self.munge_socket}",
                               f"--key-file={self.root}/etc/munge.key", f"--pid-file={m}/munged.pid",
                               f"--log-file={self.root}/log/munged.log", f"--seed-file={m}/munged.seed"])
        self._wait_for("the munge socket", self.munge_socket.exists, timeout)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait_for("slurmctld", lambda: self.cmd("scontrol", "ping", check=False).returncode == 0, timeout)
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.host])
        self._wait_for(f"node {self.host} to be idle", lambda: self.node_state().startswith("IDLE"), timeout)
        self.bringup_s = time.perf_counter() - t0
        return self

    def node_state(self) -> str:
        r = self.cmd("sinfo", "-h", "-N", "-n", self.host, "-o", "%T", check=False)
        return r.stdout.strip().upper() if r.returncode == 0 else ""

    def stop(self, timeout: float = 30) -> None:
        """Cancel what is still queued, then stop slurmd, slurmctld and munged by PID."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.cmd("scancel", "--full", f"--partition={self.partition}", check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.queue():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ jobs
    def queue(self) -> list[str]:
        r = self.cmd("squeue", "-h", "-o", "%i", check=False)
        return r.stdout.split() if r.returncode == 0 else []

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | os.PathLike | None = None) -> int:
        """Submit; returns the job id. `env` adds to the client environment (exported to the job)."""
        r = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, ...); {} once it is gone."""
        r = self.cmd("scontrol", "show", "job", "-o", str(job_id), check=False)
        if r.returncode != 0:
            return {}
        return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)

    def wait(self, job_id: int, timeout: float, until=None) -> dict:
        """Poll until the job reaches a terminal state (or `until(job_dict)` is true); return the dict."""
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job(job_id) or info
            state = info.get("JobState", "")
            if (until(info) if until else state in DONE_STATES):
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {info.get('JobState', '?')} after {timeout} s: {info}")
