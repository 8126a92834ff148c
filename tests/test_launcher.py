"""The launcher and runner with real processes: environment, logs, exit codes, stopping, adoption
after a daemon restart, reused pids, attached jobs, and running as another user."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from scheduler import runner
from scheduler.jobs import JobState, Mode, OnExceed
from scheduler.launcher import (
    EXIT_FILE,
    Launched,
    Launcher,
    ProcessState,
    ProcessStatus,
    choose_runner_python,
    read_exit_file,
)
from scheduler.store import JobRecord
from telemetry.clock import VirtualClock
from tests.users import machine_users

TEST_USER = "powertrain-test"
SOCKET = Path("/run/powertrain/api.sock")
ENV = {"PATH": "/usr/bin:/bin"}
# sh loops that stop promptly when signalled (sleep is a child in the job's process group)
LOOP = "while :; do sleep 0.05; done"


def make_job(
    argv: list[str], cwd: Path | str, *, job_id: int = 7, env: dict[str, str] | None = None
) -> JobRecord:
    return JobRecord(
        id=job_id,
        name="test",
        user=pwd.getpwuid(os.getuid()).pw_name,
        uid=os.getuid(),
        gid=os.getgid(),
        argv=tuple(argv),
        cwd=str(cwd),
        env=ENV if env is None else env,
        gpu_count=None,
        gpu_ids_requested=None,
        watts_per_gpu=None,
        energy_budget_wh=None,
        mode=Mode.AUTO,
        mode_effective=None,
        mode_reason=None,
        on_exceed=OnExceed.WARN,
        priority=0,
        objective=None,
        total_steps=None,
        total_tokens=None,
        state=JobState.QUEUED,
        attached=False,
        host="node-a",
        pid=None,
        pid_create_time=None,
        submitted_at=datetime(2026, 1, 1, tzinfo=UTC),
        started_at=None,
        ended_at=None,
        exit_code=None,
        end_reason=None,
    )


def sh(script: str, cwd: Path, **kwargs: object) -> JobRecord:
    return make_job(["/bin/sh", "-c", script], cwd, **kwargs)  # type: ignore[arg-type]


def started(job: JobRecord, launched: Launched) -> JobRecord:
    """The job as the store would hold it once running."""
    return replace(
        job, state=JobState.RUNNING, pid=launched.pid, pid_create_time=launched.create_time
    )


def wait_until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


def wait_end(launcher: Launcher, job: JobRecord, timeout_s: float = 10.0) -> ProcessStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        status = launcher.poll(job)
        if not status.running:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job.id} still running after {timeout_s} s")
        time.sleep(0.01)


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(log_dir_of=lambda job: tmp_path / "logs" / str(job.id))
    yield launcher
    _kill_leftovers(launcher)


def _kill_leftovers(launcher: Launcher) -> None:
    for proc, _ in list(launcher._children.values()):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the runner's session group
            for pid in _session(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.wait(5)


def _session(sid: int) -> list[int]:
    out = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                out.append(pid)
        except OSError:
            pass
    return out


def launch(
    launcher: Launcher, job: JobRecord, tmp_path: Path, gpus: tuple[int, ...] = (0,)
) -> tuple[JobRecord, Launched]:
    launched = launcher.launch(
        job, gpus, socket_path=SOCKET, log_dir=tmp_path / "logs" / str(job.id)
    )
    return started(job, launched), launched


# -- environment, folder, logs -------------------------------------------------------------------


def test_job_runs_in_its_folder_with_its_environment_gpus_and_logs(
    launcher: Launcher, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    script = (
        'pwd; echo "$CUDA_VISIBLE_DEVICES|$POWERTRAIN_JOB_ID|$POWERTRAIN_SOCKET|$FOO"; '
        "echo oops >&2; test -t 0 || read -r line || echo stdin-empty"
    )
    job = sh(script, work, env={**ENV, "FOO": "bar baz"})
    job, launched = launch(launcher, job, tmp_path, gpus=(2, 5))
    status = wait_end(launcher, job)
    assert status == ProcessStatus(ProcessState.EXITED, 0, "exited with status 0")
    log_dir = tmp_path / "logs" / "7"
    assert launched.stdout_path == log_dir / "stdout.log"
    assert launched.stderr_path == log_dir / "stderr.log"
    assert launched.stdout_path.read_text().splitlines() == [
        str(work),
        f"2,5|7|{SOCKET}|bar baz",
        "stdin-empty",
    ]
    assert launched.stderr_path.read_text() == "oops\n"
    assert read_exit_file(log_dir) == 0
    assert (log_dir / EXIT_FILE).read_text() == "0\n"


def test_job_runs_in_a_new_session_that_outlives_the_daemon(
    launcher: Launcher, tmp_path: Path
) -> None:
    job, launched = launch(launcher, sh(LOOP, tmp_path), tmp_path)
    assert os.getsid(launched.pid) == launched.pid != os.getsid(0)
    assert launcher.poll(job).running
    assert launcher.terminate(job, grace_s=5)
    assert wait_end(launcher, job).exit_code == 128 + signal.SIGTERM


def test_logs_are_appended_and_a_stale_exit_file_is_removed(
    launcher: Launcher, tmp_path: Path
) -> None:
    log_dir = tmp_path / "logs" / "7"
    log_dir.mkdir(parents=True)
    (log_dir / "stdout.log").write_text("earlier\n")
    (log_dir / EXIT_FILE).write_text("9\n")
    job, launched = launch(launcher, sh(f"echo now; {LOOP}", tmp_path), tmp_path)
    assert not (log_dir / EXIT_FILE).exists()
    wait_until(lambda: launched.stdout_path.read_text() == "earlier\nnow\n")
    launcher.terminate(job, grace_s=5)
    wait_end(launcher, job)


# -- exit statuses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "code", "reason"),
    [
        ("exit 0", 0, "exited with status 0"),
        ("exit 3", 3, "exited with status 3"),
        ("kill -KILL $$", 137, "killed by SIGKILL (exit status 137)"),
        ("kill -SEGV $$", 139, "killed by SIGSEGV (exit status 139)"),
    ],
)
def test_exit_codes(
    launcher: Launcher, tmp_path: Path, script: str, code: int, reason: str
) -> None:
    job, _ = launch(launcher, sh(script, tmp_path), tmp_path)
    assert wait_end(launcher, job) == ProcessStatus(ProcessState.EXITED, code, reason)
    assert read_exit_file(tmp_path / "logs" / "7") == code
    # the runner exits with the same status
    proc, _ = launcher._children[job.pid]  # type: ignore[index]
    assert runner.exit_status(proc.returncode) == code


def test_a_command_that_cannot_start_exits_127(launcher: Launcher, tmp_path: Path) -> None:
    job, launched = launch(launcher, make_job(["/no/such/program"], tmp_path), tmp_path)
    assert wait_end(launcher, job).exit_code == 127
    assert "cannot start '/no/such/program'" in launched.stderr_path.read_text()


def test_a_job_without_a_command_or_folder_is_refused(launcher: Launcher, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no command"):
        launch(launcher, make_job([], tmp_path), tmp_path)
    with pytest.raises(OSError):
        launch(launcher, sh("exit 0", tmp_path / "missing"), tmp_path)


def test_only_root_launches_jobs_of_other_users(
    launcher: Launcher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = replace(sh("exit 0", tmp_path), uid=os.getuid() + 4242)
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    with pytest.raises(PermissionError, match="may only launch jobs of its own user"):
        launch(launcher, job, tmp_path)


# -- stopping ------------------------------------------------------------------------------------


def test_terminate_forwards_sigterm_to_the_command(launcher: Launcher, tmp_path: Path) -> None:
    script = f'trap "echo got TERM; exit 5" TERM; echo ready; {LOOP}'
    job, launched = launch(launcher, sh(script, tmp_path), tmp_path)
    wait_until(lambda: "ready" in launched.stdout_path.read_text())
    assert launcher.terminate(job, grace_s=30)
    status = wait_end(launcher, job)
    assert status.exit_code == 5
    assert launched.stdout_path.read_text() == "ready\ngot TERM\n"
    assert launcher.kill_overdue() == []  # it ended: nothing left to kill
    assert not launcher.terminate(job)  # gone: nothing to signal


def test_terminate_kills_after_the_grace_period(tmp_path: Path) -> None:
    clock = VirtualClock()
    launcher = Launcher(clock=clock)
    try:
        script = f'trap "echo ignored" TERM; echo ready; {LOOP}'
        job, launched = launch(launcher, sh(script, tmp_path), tmp_path)
        wait_until(lambda: "ready" in launched.stdout_path.read_text())
        assert launcher.terminate(job, grace_s=10)
        wait_until(lambda: "ignored" in launched.stdout_path.read_text())
        clock.advance(5)
        assert launcher.terminate(job, grace_s=10)  # asking again keeps the first deadline
        clock.advance(4.9)
        assert launcher.kill_overdue() == []
        assert launcher.poll(job).running
        clock.advance(0.2)
        assert launcher.kill_overdue() == [job.id]
        status = wait_end(launcher, job)
        assert status == ProcessStatus(
            ProcessState.EXITED, 137, "killed by SIGKILL (exit status 137)"
        )
        assert read_exit_file(tmp_path / "logs" / "7") == 137  # the runner recorded the kill
        assert launcher.kill_overdue(clock.now() + 100) == []
    finally:
        _kill_leftovers(launcher)


# -- a daemon restart ------------------------------------------------------------------------------


def test_a_new_launcher_adopts_a_running_job_and_stops_it(
    launcher: Launcher, tmp_path: Path
) -> None:
    job, _ = launch(launcher, sh(LOOP, tmp_path), tmp_path)
    adopter = Launcher(log_dir_of=lambda j: tmp_path / "logs" / str(j.id))
    assert adopter.poll(job).running
    assert adopter.terminate(job, grace_s=5)
    status = wait_end(adopter, job)  # not its child: the status comes from the exit file
    assert status == ProcessStatus(ProcessState.EXITED, 143, "killed by SIGTERM (exit status 143)")


def test_a_new_launcher_learns_how_a_job_ended_while_no_daemon_ran(
    launcher: Launcher, tmp_path: Path
) -> None:
    job, _ = launch(launcher, sh("exit 4", tmp_path), tmp_path)
    log_dir = tmp_path / "logs" / "7"
    wait_until(lambda: read_exit_file(log_dir) is not None)
    assert wait_end(launcher, job).exit_code == 4  # the old daemon reaped it (or init would)

    adopter = Launcher(log_dir_of=lambda j: log_dir)
    assert adopter.poll(job) == ProcessStatus(ProcessState.EXITED, 4, "exited with status 4")

    blind = Launcher()  # does not know where the logs are
    assert blind.poll(job).state is ProcessState.VANISHED

    (log_dir / EXIT_FILE).unlink()
    lost = adopter.poll(job)
    assert lost.state is ProcessState.VANISHED and lost.exit_code is None
    assert lost.reason is not None and lost.reason.startswith("lost")


def test_a_reused_pid_is_not_mistaken_for_the_job(launcher: Launcher, tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "30"])
    try:
        real_ct = psutil.Process(other.pid).create_time()
        job = replace(
            sh("exit 0", tmp_path),
            state=JobState.RUNNING,
            pid=other.pid,
            pid_create_time=real_ct - 3600.0,  # the job's process started an hour earlier
        )
        status = launcher.poll(job)
        assert status.state is ProcessState.VANISHED
        assert not launcher.terminate(job)
        assert other.poll() is None  # not signalled
        assert launcher.poll(replace(job, pid_create_time=real_ct)).running
    finally:
        other.kill()
        other.wait()


def test_a_job_without_a_pid_is_lost(launcher: Launcher, tmp_path: Path) -> None:
    status = launcher.poll(sh("exit 0", tmp_path))
    assert status.state is ProcessState.VANISHED and not status.running


# -- attached jobs ---------------------------------------------------------------------------------


def test_an_attached_job_is_followed_by_pid_and_create_time(
    launcher: Launcher, tmp_path: Path
) -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        job = replace(
            make_job([], tmp_path),
            attached=True,
            state=JobState.RUNNING,
            pid=proc.pid,
            pid_create_time=psutil.Process(proc.pid).create_time(),
        )
        assert launcher.poll(job).running
        assert launcher.terminate(job, grace_s=5)
        proc.wait(5)
        status = launcher.poll(job)
        assert status.state is ProcessState.VANISHED and status.exit_code is None
        assert status.reason is not None and "attached" in status.reason
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_attached_job_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    clock = VirtualClock()
    launcher = Launcher(clock=clock)
    proc = subprocess.Popen(
        ["/bin/sh", "-c", f'trap "" TERM; echo ready; {LOOP}'], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        job = replace(
            make_job([], tmp_path),
            attached=True,
            pid=proc.pid,
            pid_create_time=psutil.Process(proc.pid).create_time(),
        )
        assert launcher.terminate(job, grace_s=1)
        clock.advance(2)
        assert launcher.kill_overdue() == [job.id]
        assert proc.wait(5) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


# -- another user --------------------------------------------------------------------------------


@pytest.fixture
def test_user() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0:
        pytest.skip("running a job as another user needs root (the daemon's usual identity)")
    with machine_users(TEST_USER) as (user,):
        yield user


@pytest.fixture
def closed_python() -> Iterator[str]:
    """This interpreter reached through a mode-0700 folder, as a virtual environment in root's
    private home is: only root can run it by that path."""
    top = Path(tempfile.mkdtemp(prefix="pt-closed-"))  # mkdtemp: mode 0700
    try:
        (top / "python").symlink_to(sys.executable)
        yield str(top / "python")
    finally:
        shutil.rmtree(top)


def test_the_runner_python_is_one_the_socket_group_can_run(
    test_user: pwd.struct_passwd, closed_python: str
) -> None:
    python, problem = choose_runner_python(None, None)
    assert problem is None, problem
    # what was checked as a uid owning nothing holds for a real user of the group
    done = subprocess.run(["runuser", "-u", test_user.pw_name, "--", python, "-I", "-c", "0"],
                          cwd="/", capture_output=True, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # one that cannot be run is said in one line that says what to change
    kept, problem = choose_runner_python(closed_python, None)
    assert kept == closed_python
    assert problem is not None and "\n" not in problem
    assert closed_python in problem and "permission denied" in problem
    assert "--runner-python" in problem
    with pytest.raises(ValueError, match="no such group"):
        choose_runner_python(None, "pt-no-such-group")


def test_a_job_runs_as_its_user(test_user: pwd.struct_passwd, tmp_path: Path) -> None:
    # root's interpreter may sit under /root (closed to other users): the daemon's choice
    python, _ = choose_runner_python(None, None)
    launcher = Launcher(python=python)
    work = Path(tempfile.mkdtemp(prefix="powertrain-test-"))
    try:
        os.chown(work, test_user.pw_uid, test_user.pw_gid)
        job = replace(
            sh(f"id -u; id -g; id -G; touch made-here; echo ready; {LOOP}", work),
            user=TEST_USER,
            uid=test_user.pw_uid,
            gid=test_user.pw_gid,
        )
        # tmp_path's parents are root's only: the runner still writes its exit file
        job, launched = launch(launcher, job, tmp_path)
        wait_until(lambda: "ready" in launched.stdout_path.read_text())
        assert psutil.Process(launched.pid).uids().real == test_user.pw_uid
        uid, gid, groups = launched.stdout_path.read_text().splitlines()[:3]
        assert int(uid) == test_user.pw_uid and int(gid) == test_user.pw_gid
        assert 0 not in {int(g) for g in groups.split()}  # none of root's groups
        assert (work / "made-here").stat().st_uid == test_user.pw_uid
        log_dir = tmp_path / "logs" / "7"
        for path in (log_dir, launched.stdout_path, launched.stderr_path):
            assert path.stat().st_uid == test_user.pw_uid
            assert grp.getgrgid(path.stat().st_gid).gr_gid == test_user.pw_gid
        assert launcher.terminate(job, grace_s=5)
        status = wait_end(launcher, job)
        assert status.exit_code == 143
        assert (log_dir / EXIT_FILE).stat().st_uid == test_user.pw_uid  # written by the runner
    finally:
        _kill_leftovers(launcher)
        shutil.rmtree(work, ignore_errors=True)


# -- the runner on its own -------------------------------------------------------------------------


def test_runner_exit_status_mapping() -> None:
    assert runner.exit_status(0) == 0
    assert runner.exit_status(3) == 3
    assert runner.exit_status(-signal.SIGKILL) == 137
    assert runner.exit_status(-signal.SIGTERM) == 143


def test_runner_needs_a_command(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        runner.main(["--exit-file", str(tmp_path / "x"), "--"])
    assert caught.value.code == 2


def test_runner_as_a_module_writes_the_exit_file(tmp_path: Path) -> None:
    exit_file = tmp_path / "exit_code"
    done = subprocess.run(
        [sys.executable, "-m", "scheduler.runner", "--exit-file", str(exit_file), "--",
         "/bin/sh", "-c", "exit 6"],
        timeout=30,
    )  # fmt: skip
    assert done.returncode == 6
    assert exit_file.read_text() == "6\n"
    assert [p.name for p in tmp_path.iterdir()] == ["exit_code"]  # no temporary left
