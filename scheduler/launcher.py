"""The launcher: starts a job's process as its user, follows it, and stops it.

A launched job runs under ``scheduler.runner`` in a session of its own (``start_new_session``), so
it outlives the daemon; the runner records the command's exit status in ``<log_dir>/exit_code``.
The runner's source reaches the interpreter through a pipe (``RUNNER_BOOTSTRAP``): the job's user
need not be able to read the folder powertrain is installed in, only to execute the interpreter
(see ``choose_runner_python``, which the daemon calls at start).
A pid is trusted only together with its psutil ``create_time``: after a daemon restart a new
``Launcher`` re-adopts running jobs from their stored pid and create time, and learns how a job
that ended meanwhile exited from its exit file. Attached jobs (started elsewhere) are followed by
pid and create time only.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import psutil

from scheduler import runner
from scheduler.store import JobRecord
from telemetry.clock import Clock, WallClock

log = logging.getLogger(__name__)

EXIT_FILE = "exit_code"
STDOUT_LOG = "stdout.log"
STDERR_LOG = "stderr.log"
CREATE_TIME_TOLERANCE_S = 0.01
"""psutil create times of one process agree exactly; a reused pid differs by far more."""
RUNNER_KILL_DELAY_S = 2.0
"""After SIGKILLing a job's command, how long its runner gets to record the exit, s."""
RUNNER_READY_TIMEOUT_S = 2.0
"""How long ``terminate`` waits for a just-started runner to catch SIGTERM, s."""
RUNNER_MIN_PYTHON = (3, 11)
"""The oldest Python the runner runs on (it starts the command with ``process_group``)."""
RUNNER_BOOTSTRAP = (
    "import sys; exec(compile(open(int(sys.argv.pop(1)), 'rb').read(), 'powertrain-runner', "
    "'exec'))"
)
"""``python -I -c`` code that runs the runner's source read from the pipe named by its first
argument (a short line in ``ps``, where the whole source would be a hundred)."""
NOBODY_UID = 65534
"""A uid that owns nothing: checking an interpreter as it, in a group, checks what that group's
members may run, not what one user owns."""


def choose_runner_python(configured: str | None, group: str | None) -> tuple[str, str | None]:
    """The interpreter that runs jobs' runners, and a warning line when jobs cannot use it.

    Jobs run as their users, so the interpreter must be one that the users allowed on the API
    socket can execute: a virtual environment under root's private home is not. As root, each
    candidate is tried for real, as a uid owning nothing in the socket's group, with
    ``python -I -c`` checking its version: ``configured`` alone when given, else this process's
    interpreter, the one it links to, and ``python3`` in the system folders, in that order. Not
    as root, the daemon launches only its own user's jobs, and its own interpreter serves.

    Args:
        configured: ``--runner-python`` (``POWERTRAIN_RUNNER_PYTHON``), or ``None``.
        group: The socket's group (``--socket-group``); ``None``: the daemon's own group.

    Returns:
        The interpreter, and ``None`` or one line that says why jobs of other users will not
        start with it and what to change.

    Raises:
        ValueError: ``group`` does not exist.
    """
    try:
        gid = grp.getgrnam(group).gr_gid if group else os.getegid()
    except KeyError:
        raise ValueError(f"--socket-group {group}: no such group") from None
    if os.geteuid() != 0:
        return configured or sys.executable, None
    who = f"group {group}" if group else f"the socket's group (gid {gid})"
    if configured:
        candidates = [configured]
    else:
        system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
        candidates = list(dict.fromkeys(
            c for c in (sys.executable, os.path.realpath(sys.executable), system) if c
        ))
    problems = []
    for python in candidates:
        problem = _runner_python_problem(python, gid)
        if problem is None:
            return python, None
        problems.append(f"{python}: {problem}")
    need = ".".join(map(str, RUNNER_MIN_PYTHON))
    fix = (f"set --runner-python (POWERTRAIN_RUNNER_PYTHON) to a Python {need}+ they can "
           "execute, or open its folders to them")
    return candidates[0], (
        f"jobs of users other than root will not start: {who} cannot run the job runner's "
        f"interpreter ({'; '.join(problems)}): {fix}"
    )


def _runner_python_problem(python: str, gid: int) -> str | None:
    """Why members of group ``gid`` cannot run the runner with ``python``, or ``None``."""
    need = ".".join(map(str, RUNNER_MIN_PYTHON))
    try:
        done = subprocess.run(
            [python, "-I", "-c",
             f"import sys; sys.exit(0 if sys.version_info >= {RUNNER_MIN_PYTHON!r} else 3)"],
            user=NOBODY_UID, group=gid, extra_groups=[], cwd="/", env={},
            stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
        )  # fmt: skip
    except PermissionError:
        return "permission denied (a folder on its path or the file is closed to them)"
    except FileNotFoundError:
        return "not found"
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if done.returncode == 3:
        return f"older than Python {need}"
    if done.returncode != 0:
        last = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        return f"exits {done.returncode} ({last})"
    return None


class ProcessState(StrEnum):
    """What ``Launcher.poll`` found."""

    RUNNING = "running"
    EXITED = "exited"
    VANISHED = "vanished"


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    """A job's process as last seen.

    Attributes:
        state: ``running``; ``exited`` with a known status; ``vanished`` (gone, status unknown).
        exit_code: The command's exit status (``128 + n`` if killed by signal ``n``) when exited.
        reason: Why, in words (e.g. ``lost: the process is gone and left no exit status``).
    """

    state: ProcessState
    exit_code: int | None = None
    reason: str | None = None

    @property
    def running(self) -> bool:
        """Whether the process is still running."""
        return self.state is ProcessState.RUNNING


@dataclass(frozen=True, slots=True)
class Launched:
    """A started job: its runner's pid and psutil create time (s since the epoch), its logs."""

    pid: int
    create_time: float
    stdout_path: Path
    stderr_path: Path


@dataclass(slots=True)
class _Termination:
    job: JobRecord
    kill_at: float
    runner_kill_at: float | None = None


def _describe(status: int) -> str:
    if status > 128 and status - 128 < signal.NSIG:
        try:
            name = signal.Signals(status - 128).name
        except ValueError:
            name = f"signal {status - 128}"
        return f"killed by {name} (exit status {status})"
    return f"exited with status {status}"


def matching_process(pid: int | None, create_time: float | None) -> psutil.Process | None:
    """The live process ``pid`` if its create time is ``create_time`` (zombies count as gone)."""
    if pid is None or create_time is None:
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > CREATE_TIME_TOLERANCE_S:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return proc


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (``SigCgt`` in /proc; Linux)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True  # cannot tell: assume it does


def _wait_until_catching(pid: int, signum: int, timeout_s: float) -> None:
    """Wait (at most ``timeout_s``, s) until ``pid`` handles ``signum`` or is gone."""
    deadline = time.monotonic() + timeout_s
    while not _catches(pid, signum) and time.monotonic() < deadline:
        time.sleep(0.005)


def _session_members(sid: int) -> list[int]:
    """Pids of every process in session ``sid`` (a launched job's runner leads its session)."""
    members = []
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            if os.getsid(pid) == sid:
                members.append(pid)
    return members


def read_exit_file(log_dir: Path) -> int | None:
    """The exit status a runner recorded in ``log_dir``, or ``None`` (absent or unreadable)."""
    try:
        fd = os.open(log_dir / EXIT_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    try:
        return int(text)
    except ValueError:
        return None


class Launcher:
    """Starts, polls and stops job processes on this host.

    One per daemon. Processes it started are kept (``Popen``) so that their exit is reaped; a new
    instance (after a daemon restart) follows the same jobs by pid and create time.
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        log_dir_of: Callable[[JobRecord], Path] | None = None,
        python: str | None = None,
    ) -> None:
        """Make a launcher.

        Args:
            clock: The clock of ``terminate``'s grace period and ``kill_overdue`` (the control
                loop's); the wall clock by default.
            log_dir_of: Where a job's logs and exit file are (the ``log_dir`` given to
                ``launch``); needed to learn how an adopted job exited while no daemon ran.
            python: The interpreter that runs ``scheduler.runner`` (the job's user must be able
                to execute it); this process's interpreter by default.
        """
        self._clock = clock or WallClock()
        self._log_dir_of = log_dir_of
        self._python = python or sys.executable
        # Read once, as the daemon: the job's user may not be able to read this checkout.
        self._runner_source = Path(runner.__file__).read_bytes()
        self._children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self._log_dirs: dict[int, Path] = {}
        self._terminating: dict[int, _Termination] = {}

    # -- starting --------------------------------------------------------------------------------

    def launch(
        self,
        job: JobRecord,
        gpu_indices: Sequence[int],
        *,
        socket_path: Path,
        log_dir: Path,
        extra_env: Mapping[str, str] | None = None,
    ) -> Launched:
        """Start ``job``'s command as its user, in its folder, on ``gpu_indices``.

        The command runs under ``scheduler.runner`` in a new session, with the job's environment
        plus ``CUDA_VISIBLE_DEVICES`` (the indices, comma-joined), ``POWERTRAIN_JOB_ID`` and
        ``POWERTRAIN_SOCKET``; stdin is ``/dev/null``, stdout and stderr are appended to
        ``<log_dir>/stdout.log`` and ``stderr.log``. ``log_dir`` is created and, like the logs,
        owned by the job's user. As root the process takes the job's uid, gid and the user's
        supplementary groups (none of the daemon's); otherwise the daemon may only launch its
        own user's jobs.

        Args:
            job: The job (``argv``, ``cwd``, ``env``, ``uid``, ``gid``, ``user``).
            gpu_indices: Its GPUs.
            socket_path: The daemon's API socket, for the job's client.
            log_dir: The job's folder for logs and the exit file.
            extra_env: More variables for the job (after the job's own, before ours).

        Returns:
            The runner's pid and create time, and the log paths.

        Raises:
            PermissionError: Not root and the job belongs to another user.
            ValueError: The job has no command.
            OSError: The logs or the process could not be made (e.g. ``cwd`` is missing).
        """
        if not job.argv:
            raise ValueError(f"job {job.id} has no command to run")
        as_root = os.geteuid() == 0
        if not as_root and job.uid != os.geteuid():
            raise PermissionError(
                f"job {job.id} belongs to uid {job.uid}: a daemon not running as root may only "
                f"launch jobs of its own user (uid {os.geteuid()})"
            )
        env = dict(job.env)
        env.update(extra_env or {})
        env.update(
            CUDA_VISIBLE_DEVICES=",".join(str(i) for i in gpu_indices),
            POWERTRAIN_JOB_ID=str(job.id),
            POWERTRAIN_SOCKET=str(socket_path),
        )
        log_dir.mkdir(parents=True, exist_ok=True)
        if as_root:
            os.chown(log_dir, job.uid, job.gid)
        log_dir.chmod(0o750)
        exit_path = log_dir / EXIT_FILE
        with contextlib.suppress(FileNotFoundError):
            exit_path.unlink()  # from an earlier run under the same id: not this run's status
        stdout_path, stderr_path = log_dir / STDOUT_LOG, log_dir / STDERR_LOG
        fds: list[int] = []
        try:
            dir_fd = os.open(log_dir, os.O_RDONLY | os.O_DIRECTORY)
            fds.append(dir_fd)
            source_fd, source_w = os.pipe()
            fds.append(source_fd)
            try:  # a few kB: the pipe holds it all before the runner reads
                os.write(source_w, self._runner_source)
            finally:
                os.close(source_w)
            for path in (stdout_path, stderr_path):
                # O_NOFOLLOW: the folder is the user's; never follow their link as root
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640)
                fds.append(fd)
                if as_root:
                    os.fchown(fd, job.uid, job.gid)
            command = [
                self._python,
                "-I",
                "-c",
                RUNNER_BOOTSTRAP,
                str(source_fd),
                "--exit-file",
                str(exit_path),
                "--dir-fd",
                str(dir_fd),
                "--",
                *job.argv,
            ]
            proc = subprocess.Popen(
                command,
                cwd=job.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fds[-2],
                stderr=fds[-1],
                pass_fds=(dir_fd, source_fd),
                start_new_session=True,
                user=job.uid if as_root else None,
                group=job.gid if as_root else None,
                extra_groups=self._groups(job) if as_root else None,
            )
        finally:
            for fd in fds:
                os.close(fd)
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error as exc:  # pragma: no cover - a zombie still has its /proc entry
            raise OSError(f"job {job.id}: cannot read its process {proc.pid}: {exc}") from exc
        self._children[proc.pid] = (proc, create_time)
        self._log_dirs[job.id] = log_dir
        log.info("job %d: started pid %d as uid %d in %s", job.id, proc.pid, job.uid, job.cwd)
        return Launched(proc.pid, create_time, stdout_path, stderr_path)

    @staticmethod
    def _groups(job: JobRecord) -> list[int]:
        """The job user's supplementary groups (none if the login name is not ``job.uid``'s)."""
        try:
            if pwd.getpwnam(job.user).pw_uid != job.uid:
                return []
            return sorted(set(os.getgrouplist(job.user, job.gid)) - {job.gid})
        except (KeyError, OSError):
            return []

    # -- following -------------------------------------------------------------------------------

    def _log_dir(self, job: JobRecord) -> Path | None:
        known = self._log_dirs.get(job.id)
        if known is not None:
            return known
        return None if self._log_dir_of is None else self._log_dir_of(job)

    def _own_child(self, job: JobRecord) -> subprocess.Popen[bytes] | None:
        """The ``Popen`` of ``job``'s process if this launcher started it."""
        if job.pid is None or job.attached:
            return None
        entry = self._children.get(job.pid)
        if entry is None or job.pid_create_time is None:
            return None
        proc, create_time = entry
        if abs(create_time - job.pid_create_time) > CREATE_TIME_TOLERANCE_S:
            return None
        return proc

    def poll(self, job: JobRecord) -> ProcessStatus:
        """Whether ``job``'s process runs, and how it ended if not.

        A process this launcher started is reaped and its status read. Any other (adopted after
        a restart, or attached) counts as running only while a process with the stored pid AND
        create time lives; once gone, a launched job's status comes from its exit file, and
        without one the job is ``vanished`` ("lost"). An attached job's status is never known.
        """
        if job.pid is None:
            return ProcessStatus(ProcessState.VANISHED, reason="lost: the job has no process id")
        child = self._own_child(job)
        if child is not None:
            returncode = child.poll()
            if returncode is None:
                return ProcessStatus(ProcessState.RUNNING)
            log_dir = self._log_dir(job)
            recorded = None if log_dir is None else read_exit_file(log_dir)
            status = recorded if recorded is not None else runner.exit_status(returncode)
            self._terminating.pop(job.id, None)
            return ProcessStatus(ProcessState.EXITED, status, _describe(status))
        if matching_process(job.pid, job.pid_create_time) is not None:
            return ProcessStatus(ProcessState.RUNNING)
        self._terminating.pop(job.id, None)
        if job.attached:
            return ProcessStatus(
                ProcessState.VANISHED,
                reason="the attached process ended (its exit status is not known here)",
            )
        log_dir = self._log_dir(job)
        recorded = None if log_dir is None else read_exit_file(log_dir)
        if recorded is not None:
            return ProcessStatus(ProcessState.EXITED, recorded, _describe(recorded))
        return ProcessStatus(
            ProcessState.VANISHED, reason="lost: the process is gone and left no exit status"
        )

    # -- stopping --------------------------------------------------------------------------------

    def terminate(self, job: JobRecord, grace_s: float = 10.0) -> bool:
        """Ask ``job``'s process to stop: SIGTERM now, SIGKILL once ``grace_s`` has passed.

        Does not wait for the exit: ``kill_overdue`` sends the SIGKILL and ``poll`` sees the exit.
        A launched job's SIGTERM goes to its runner, which passes it to the command's process
        group (a runner still starting up, tens of ms, is waited for first, at most
        ``RUNNER_READY_TIMEOUT_S``); an attached job's goes to its pid. Asking again does not
        move the deadline.

        Returns:
            Whether a signal was sent (``False``: the process is already gone).
        """
        proc = matching_process(job.pid, job.pid_create_time)
        if proc is None or job.pid is None:
            return False
        if not job.attached:
            # a runner killed before it installs its handlers would leave no exit status
            _wait_until_catching(job.pid, signal.SIGTERM, RUNNER_READY_TIMEOUT_S)
        try:
            os.kill(job.pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        if job.id not in self._terminating:
            self._terminating[job.id] = _Termination(job, self._clock.now() + grace_s)
        log.info("job %d: SIGTERM to pid %d (SIGKILL in %.0f s)", job.id, job.pid, grace_s)
        return True

    def kill_overdue(self, now: float | None = None) -> list[int]:
        """SIGKILL the jobs whose grace period has passed; call it from the control loop.

        A launched job's command and everything else in its session are killed first, so that
        the runner records the kill (status 137); the runner itself is killed if it is still
        there ``RUNNER_KILL_DELAY_S`` later.

        Args:
            now: Seconds since the epoch on the launcher's clock; its ``now()`` by default.

        Returns:
            The ids of the jobs that were sent SIGKILL.
        """
        now = self._clock.now() if now is None else now
        killed: list[int] = []
        for job_id, term in list(self._terminating.items()):
            job = term.job
            proc = matching_process(job.pid, job.pid_create_time)
            if proc is None or job.pid is None:
                del self._terminating[job_id]
                continue
            if term.runner_kill_at is not None:
                if now >= term.runner_kill_at:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(job.pid, signal.SIGKILL)
                    del self._terminating[job_id]
                continue
            if now < term.kill_at:
                continue
            if job.attached:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(job.pid, signal.SIGKILL)
                del self._terminating[job_id]
            else:
                for pid in _session_members(job.pid):
                    if pid != job.pid:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                term.runner_kill_at = now + RUNNER_KILL_DELAY_S
            log.warning("job %d: grace period over, SIGKILL", job_id)
            killed.append(job_id)
        return killed

    def forget(self, job: JobRecord) -> None:
        """Drop what this launcher keeps about ``job`` (after its end has been recorded)."""
        child = self._own_child(job)
        if child is not None and child.poll() is not None and job.pid is not None:
            del self._children[job.pid]
        self._log_dirs.pop(job.id, None)
        self._terminating.pop(job.id, None)
