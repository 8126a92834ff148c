"""A real single-node Slurm for the tests marked ``slurm``, in a temporary folder.

Debian's daemons (``.ci/slurm.sh`` installs them), each started in the foreground as a child of
the test run and stopped at its end: ``munged`` (a key of its own), a throwaway MariaDB and
``slurmdbd`` (the job accounting ``sacct`` reads, where the epilog writes a job's energy),
``slurmctld`` and ``slurmd``. The node has 4 GPUs (gres.conf: ``File=`` links to /dev/null,
which Slurm takes for GPU devices) and the cgroup-free plugins (``proctrack/linuxproc``,
``task/none``). Its ``Prolog``/``Epilog`` run ``powertrain slurm prolog|epilog`` of this
checkout for the daemon on ``socket``, their output appended to ``prolog.log``/``epilog.log``.
Every port is a free one on the loopback; nothing of the machine's own Slurm or MariaDB is used.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.daemon_proc import REPO, free_port

DAEMONS = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "scancel", "scontrol", "sinfo", "squeue", "sacct", "sacctmgr", "srun")
GPUS = 4


def missing() -> list[str]:
    """The programs this cluster needs that this machine lacks."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [name for name in DAEMONS + COMMANDS if shutil.which(name, path=path) is None]


def _which(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert found is not None, f"{name} is not installed"
    return found


class SlurmCluster:
    """One node's Slurm, started on construction; ``stop`` ends every daemon it started.

    Args:
        socket: The powertrain daemon's API socket that the prolog and epilog talk to.
        home: That daemon's home (the epilog stands in for a daemon that is not running).
    """

    def __init__(self, socket_path: Path, home: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pt-slurm-"))
        self.dir.chmod(0o755)
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        try:
            self._write(socket_path, home)
            self._start()
        except BaseException:
            self.stop()
            raise

    # -- setup -------------------------------------------------------------------------------------

    def _write(self, socket_path: Path, home: Path) -> None:
        d = self.dir
        for sub in ("munge", "spool", "state", "log", "dev", "db"):
            (d / sub).mkdir()
        (d / "munge").chmod(0o755)  # the socket's folder: every user's jobs reach munged
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for i in range(GPUS):
            (d / "dev" / f"gpu{i}").symlink_to("/dev/null")  # a character device, as Slurm wants
        self.ports = {name: free_port() for name in ("ctld", "slurmd", "dbd", "db")}
        munge = d / "munge" / "munge.sock"
        self.munge_socket = munge
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in {
            "POWERTRAIN_SOCKET": str(socket_path), "POWERTRAIN_HOME": str(home),
            "POWERTRAIN_BACKEND": "simulated",
        }.items())
        for step in ("prolog", "epilog"):
            script = d / f"{step}.sh"
            script.write_text(
                "#!/bin/sh\n"
                f"cd {shlex.quote(str(REPO))} && {env} exec {shlex.quote(sys.executable)} "
                f"-m scheduler slurm {step} >>{shlex.quote(str(d / f'{step}.log'))} 2>&1\n"
            )
            script.chmod(0o755)
        self.conf.write_text(f"""\
ClusterName=pt
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge}
CredType=cred/munge
SlurmctldPort={self.ports["ctld"]}
SlurmdPort={self.ports["slurmd"]}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
GresTypes=gpu
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={self.ports["dbd"]}
AccountingStoragePass={munge}
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MinJobAge=600
KillWait=2
PrologEpilogTimeout=120
Prolog={d}/prolog.sh
Epilog={d}/epilog.sh
PrologFlags=Alloc
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=4 Gres=gpu:{GPUS} State=UNKNOWN
PartitionName=main Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        (d / "gres.conf").write_text(f"AutoDetect=off\nName=gpu File={d}/dev/gpu[0-{GPUS - 1}]\n")
        dbd = d / "slurmdbd.conf"
        dbd.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={munge}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={self.ports["dbd"]}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.ports["db"]}
StorageUser=root
StorageLoc=slurm_acct_db
LogFile={d}/log/slurmdbd.log
PidFile={d}/slurmdbd.pid
""")
        dbd.chmod(0o600)

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        out = (self.dir / "log" / f"{name}.out").open("ab")
        proc = subprocess.Popen([_which(args[0]), *args[1:]], stdout=out,
                                stderr=subprocess.STDOUT, env=self.env, cwd=self.dir,
                                start_new_session=True)
        self._procs.append((name, proc))
        return proc

    def _wait(self, what: str, ready: Callable[[], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self._procs:
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited {proc.returncode} while waiting for "
                                         f"{what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.logs()}")

    @staticmethod
    def _listens(port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _start(self) -> None:
        d = self.dir
        self._spawn("munged", "munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                    f"--key-file={d}/munge/munge.key", f"--log-file={d}/log/munged.log",
                    f"--pid-file={d}/munge/munged.pid", f"--seed-file={d}/munge/munged.seed")
        done = subprocess.run(
            [_which("mariadb-install-db"), "--no-defaults", f"--datadir={d}/db/data",
             "--user=root", "--auth-root-authentication-method=normal", "--skip-test-db"],
            capture_output=True, text=True, timeout=120, cwd=d)
        assert done.returncode == 0, f"mariadb-install-db failed:\n{done.stdout}{done.stderr}"
        self._spawn("mariadbd", "mariadbd", "--no-defaults", f"--datadir={d}/db/data",
                    "--user=root", f"--socket={d}/db/mysqld.sock", f"--port={self.ports['db']}",
                    "--bind-address=127.0.0.1", f"--pid-file={d}/db/mysqld.pid",
                    "--innodb-use-native-aio=0", "--innodb-buffer-pool-size=32M",
                    "--skip-log-bin", "--skip-name-resolve")
        self._wait("munged", self.munge_socket.exists)
        self._wait("MariaDB", lambda: self._listens(self.ports["db"]))
        self._spawn("slurmdbd", "slurmdbd", "-D")
        self._wait("slurmdbd", lambda: self._listens(self.ports["dbd"]))
        self._spawn("slurmctld", "slurmctld", "-D", "-i", "-f", str(self.conf))
        self._wait("slurmctld", lambda: self._listens(self.ports["ctld"]))
        self._spawn("slurmd", "slurmd", "-D", "-N", self.node, "-f", str(self.conf))
        self._wait("the node to be idle", lambda: self.run("sinfo", "-h", "-N", "-o", "%t",
                                                           check=False).stdout.strip() == "idle")

    # -- use ---------------------------------------------------------------------------------------

    def run(self, *args: str, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """One of Slurm's commands against this cluster."""
        done = subprocess.run([_which(args[0]), *args[1:]], capture_output=True, text=True,
                              timeout=60, env=self.env | (env or {}), cwd=REPO)
        if check:
            assert done.returncode == 0, f"{' '.join(args)}: {done.stdout}{done.stderr}"
        return done

    def log(self, name: str) -> str:
        path = self.dir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        """The prolog's and epilog's logs and the end of each daemon's, for a failure message."""
        parts = [f"--- {n}:\n{self.log(n)[-3000:]}" for n in ("prolog.log", "epilog.log")]
        for path in sorted((self.dir / "log").glob("*")):
            parts.append(f"--- {path.name}:\n{path.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel the jobs left (a failed test's), end every daemon this cluster started (last
        started first) and delete its folder."""
        if any(name == "slurmd" and proc.poll() is None for name, proc in self._procs):
            left = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if left:
                self.run("scancel", *left, check=False)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.run(
                        "squeue", "-h", "-o", "%i", check=False).stdout.strip():
                    time.sleep(0.5)
        for _, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        self._procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
