"""A real two-node SLURM cluster on this host, for tests.

Debian's SLURM 22.05 (`slurmctld`, `slurmd`, `slurm-client`) runs without systemd from a
configuration in a temporary directory: one `slurmctld` and two `slurmd` (`-N n1`, `-N n2`),
each on its own port, all at 127.0.0.1. `auth/none` with `cred/none` avoids a munge key.
The packages are installed with apt-get when missing (CI is a fresh Debian machine, root),
which takes a few seconds.

Why the care in `stop()`: daemons are stopped by their process ids, and only once the queue
is empty, or an orphaned `slurmstepd` stays behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol"]
NODES = ["n1", "n2"]


class SlurmUnavailable(Exception):
    """SLURM is not installed and cannot be installed here (not root, no apt-get)."""


def ensure_slurm_installed() -> None:
    """Install Debian's SLURM packages when a binary is missing (root and apt-get only)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("SLURM is not installed and apt-get as root is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
               "-o", "DPkg::Lock::Timeout=120", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
        # A fresh machine may have empty package lists: update once, then try again.
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=True,
                       timeout=300)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: "
                                   f"{result.stderr.strip()[-500:]}")


def _free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class SlurmCluster:
    """A running cluster; `env` is what clients (sbatch, squeue, tml launch) need."""

    root: Path
    conf: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True,
                              timeout=30)

    def idle_nodes(self) -> set[str]:
        out = self._run("sinfo", "-h", "-N", "-o", "%N %t").stdout
        return {line.split()[0] for line in out.splitlines()
                if len(line.split()) == 2 and line.split()[1] == "idle"}

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}: "
                                       f"{self.log_tail(name)}")
            if self.idle_nodes() == set(NODES):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the SLURM nodes did not become idle in {timeout:.0f} s: "
                           f"{self.log_tail('slurmctld')}")

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.root / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def wait_for_empty_queue(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self._run("squeue", "-h", "-o", "%i")
            if result.returncode == 0 and not result.stdout.strip():
                return
            time.sleep(0.2)
        self._run("scancel", "--full", "-u", "root")

    def stop(self) -> None:
        """Wait for the queue to drain, then stop the daemons by process id, slurmd first."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            self.wait_for_empty_queue()
        for name in [*NODES, "slurmctld"]:
            proc = self.processes.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _config(root: Path, ctld_port: int, node_ports: list[int]) -> str:
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    lines = [
        "ClusterName=tmltest",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "AuthType=auth/none",
        "CredType=cred/none",
        # A requeued job waits cred_expire seconds (default 120) before it starts again.
        "AuthInfo=cred_expire=5",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool-%n",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/%n.log",
        # Tracks the process tree: torch elastic starts its workers in new sessions, which
        # a process-group tracker (proctrack/pgid) would lose on a kill or requeue.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/builtin",
        # Schedule every second (default 60 s), so a requeued job starts again promptly.
        "SchedulerParameters=sched_interval=1",
        "SelectType=select/linear",
        "MpiDefault=none",
        "ReturnToService=2",
        "MinJobAge=300",
        "KillWait=5",
        "InactiveLimit=0",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
    ]
    for name, port in zip(NODES, node_ports):
        lines.append(f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} "
                     f"CPUs={cpus} State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES "
                 "MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def start_cluster(root: Path) -> SlurmCluster:
    """Write the configuration under `root`, start the daemons, wait until both nodes idle."""
    ensure_slurm_installed()
    root.mkdir(parents=True, exist_ok=True)
    (root / "state").mkdir(exist_ok=True)
    ports = _free_ports(3)
    conf = root / "slurm.conf"
    conf.write_text(_config(root, ports[0], ports[1:]))
    cluster = SlurmCluster(root=root, conf=conf)
    env = cluster.env
    try:
        # -D: stay in the foreground, so that the Popen id is the daemon's; -i: ignore
        # state left by an earlier cluster; -c: clear the job state.
        cluster.processes["slurmctld"] = subprocess.Popen(
            ["slurmctld", "-D", "-i", "-c", "-f", str(conf)], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name in NODES:
            cluster.processes[name] = subprocess.Popen(
                ["slurmd", "-D", "-N", name, "-f", str(conf)], env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cluster.wait_until_ready()
    except BaseException:
        cluster.stop()
        raise
    return cluster
