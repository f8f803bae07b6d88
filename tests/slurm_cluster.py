"""A real, private, single-node SLURM cluster on localhost, for integration tests.

``LocalCluster`` writes a ``slurm.conf`` into a temporary folder and starts its own
``munged`` (own key and socket), ``slurmctld`` and ``slurmd`` there, without systemd,
on free TCP ports, so it neither needs nor disturbs a system-wide SLURM or munge.
Clients reach it through ``cluster.env`` (``SLURM_CONF`` set). ``stop`` kills the
daemons by their pid files. ``ensure_slurm`` installs Debian's packages with
apt-get when the binaries are missing and says why when it cannot.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol")
APT_TIMEOUT_S = 600


def missing_binaries() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]


def _which(name: str) -> str | None:
    # Daemons live in /usr/sbin, which a non-login PATH may lack.
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return shutil.which(name, path=path)


def ensure_slurm() -> str | None:
    """Install SLURM + munge with apt-get if missing; None when ready, else the reason it is not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a private cluster needs root (slurmd launches jobs; apt-get installs SLURM)"
    if not missing_binaries():
        return None
    if shutil.which("apt-get") is None:
        return f"SLURM is not installed ({', '.join(missing_binaries())} missing) and there is no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [
        ["apt-get", "update", "-q"],
        [
            "apt-get",
            "install",
            "-y",
            "-q",
            "-o",
            "DPkg::Lock::Timeout=120",
            "--no-install-recommends",
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
            *PACKAGES,
        ],
    ]
    deadline = time.monotonic() + APT_TIMEOUT_S
    for step in steps:
        try:
            done = subprocess.run(
                step,
                env=env,
                capture_output=True,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
            )
        except subprocess.TimeoutExpired:
            return f"`{' '.join(step[:2])}` took longer than {APT_TIMEOUT_S}s (no network?)"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            return f"`{' '.join(step[:2])}` failed ({done.returncode}): {tail[0][:200]}"
    if missing_binaries():
        return f"apt-get installed {' '.join(PACKAGES)} but {', '.join(missing_binaries())} still missing"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 1024


class LocalCluster:
    """One node (``localhost``, every CPU), one partition (``debug``), everything under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.cpus = os.cpu_count() or 1
        self.env = {
            **os.environ,
            "SLURM_CONF": str(self.conf),
            "PATH": os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin",
        }
        # Tests run inside a SLURM job must not hand that job's variables to this cluster's jobs.
        for name in [n for n in self.env if n.startswith("SLURM_") and n != "SLURM_CONF"]:
            del self.env[name]
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.pid_files = {name: self.root / "pid" / f"{name}.pid" for name in DAEMONS}

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 60.0) -> None:
        """Start munged, slurmctld and slurmd; return once the node is idle (or raise with the logs)."""
        for sub in ("pid", "log", "state", "spool", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self._start_munge()
        self._write_conf()
        self._daemon(["slurmctld", "-f", str(self.conf)], "slurmctld")
        self._daemon(["slurmd", "-f", str(self.conf), "-N", "localhost"], "slurmd")
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            done = self.client(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state = done.stdout.strip()
            if done.returncode == 0 and state.rstrip("*") in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"SLURM node not idle after {timeout_s:.0f}s (sinfo: {state!r})\n{self.logs()}"
        )

    def stop(self) -> None:
        """Cancel this cluster's jobs, then end its daemons by their pid files (SIGKILL stragglers)."""
        controller = self._pid("slurmctld")
        if controller is not None and _alive(controller):
            try:
                self.client(["scancel", "--user", str(os.getuid())], check=False)
                self.wait([], timeout_s=15)
            except (OSError, subprocess.SubprocessError, TimeoutError, RuntimeError):
                pass  # the daemons go down below either way
        pids = []
        for name in DAEMONS:
            pid = self._pid(name)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGTERM)
                    pids.append(pid)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if _alive(pid)]
            time.sleep(0.2)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ clients

    def client(
        self, args: list[str], check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            args, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
            )
        return done

    def wait(self, job_ids: list[str], timeout_s: float) -> None:
        """Block until none of ``job_ids`` (plain or array jobs; [] = all) is pending or running."""
        deadline = time.monotonic() + timeout_s
        select = ["-j", ",".join(job_ids)] if job_ids else []  # no ids: every job
        while True:
            done = self.client(["squeue", "-h", *select, "-o", "%i %T %r"], check=False)
            if done.returncode == 0 and not done.stdout.strip():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"jobs {job_ids} still queued after {timeout_s:.0f}s:\n{done.stdout}{done.stderr}\n"
                    + self.logs()
                )
            time.sleep(0.5)

    def job_records(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` of a finished job: one record per array task (or one)."""
        done = self.client(["scontrol", "-o", "show", "job", job_id])
        records = []
        for line in done.stdout.splitlines():
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            if fields:
                records.append(fields)
        return records

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------------ internals

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        self._daemon(
            [
                "munged",
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.pid_files['munged']}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            ],
            "munged",
        )

    def _write_conf(self) -> None:
        root = self.root
        lines = [
            "ClusterName=grasptest",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
            "ReturnToService=2",
            "MinJobAge=3600",
            "MailProg=/bin/true",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
            f"NodeName=localhost CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _daemon(self, argv: list[str], name: str) -> None:
        """Run a self-daemonizing program; it must leave its pid file behind."""
        path = _which(argv[0])
        if path is None:
            raise RuntimeError(f"{argv[0]} not found")
        done = subprocess.run(
            [path, *argv[1:]], env=self.env, capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} -> {done.returncode}\n{done.stdout}{done.stderr}\n{self.logs()}"
            )
        deadline = time.monotonic() + 20
        while self._pid(name) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} wrote no pid file\n{self.logs()}")
            time.sleep(0.1)

    def _pid(self, name: str) -> int | None:
        try:
            return int(self.pid_files[name].read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (a daemon reaped by nobody) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True
