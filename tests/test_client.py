"""The training client against a real HTTP server on a real Unix socket (tests/fake_daemon.py)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler.client import Job, JobStopped, _parse_directive, default_socket_path, track
from scheduler.jobs import DIRECTIVE_FIELDS, Action, Directive
from tests.fake_daemon import FakeDaemon

FAST = 0.02  # report interval for tests, seconds


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("POWERTRAIN_JOB_ID", "POWERTRAIN_SOCKET", "POWERTRAIN_HOME",
                 "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def sock_path() -> Iterator[Path]:
    # pytest's tmp_path can pass the 107-byte limit of a Unix socket path
    folder = tempfile.mkdtemp(prefix="pt-", dir="/tmp")
    yield Path(folder) / "d.sock"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def daemon(sock_path: Path) -> Iterator[FakeDaemon]:
    with FakeDaemon(sock_path) as fake:
        yield fake


def warnings_from_client(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "scheduler.client" and r.levelno >= logging.WARNING]


def run_steps(job: Job, n: int, *, tokens: int = 128, samples: int = 2,
              body_s: float = 0.0) -> None:
    for _ in range(n):
        with job.step(tokens=tokens, samples=samples):
            if body_s:
                time.sleep(body_s)


def test_reports_are_batched_and_cumulative(
    daemon: FakeDaemon, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with track(name="gpt", total_tokens=10**6, watts=300.0, on_exceed="pause",
               socket_path=sock_path, report_interval_s=FAST) as job:
        run_steps(job, 300, body_s=0.0005)
        assert job.tokens == 300 * 128
        assert job.tokens_per_s > 0
    (attached,) = daemon.jobs.values()
    assert attached.attach is not None
    assert attached.attach["pid"] == os.getpid() == attached.attach["peer_pid"]
    assert attached.attach["gpu_ids"] == [2, 3]
    assert (attached.attach["name"], attached.attach["total_tokens"]) == ("gpt", 10**6)
    assert (attached.attach["watts"], attached.attach["on_exceed"]) == (300.0, "pause")
    reports = daemon.reports(attached.id)
    assert 3 <= len(reports) < 300 // 5, "progress goes in batches, not one request per step"
    assert [r["final"] for r in reports] == [False] * (len(reports) - 1) + [True]
    steps = [r["steps"] for r in reports]
    assert steps == sorted(steps)
    assert reports[-1] | {"step_time_s": None} == {
        "steps": 300, "samples": 600, "tokens": 300 * 128, "step_time_s": None,
        "total_steps": None, "total_tokens": 10**6, "final": True,
        "member": 1000 * attached.id + 1, "outcome": "ok",
    }
    timed = [r["step_time_s"] for r in reports if r["step_time_s"] is not None]
    assert timed and all(0.0004 < t < 0.5 for t in timed)


@pytest.mark.parametrize(("visible", "expected"),
                         [(None, None), ("0", [0]), ("GPU-5a1e2c3d,GPU-77", None), ("", None)])
def test_gpu_ids_from_cuda_visible_devices(
    daemon: FakeDaemon, sock_path: Path, monkeypatch: pytest.MonkeyPatch,
    visible: str | None, expected: list[int] | None,
) -> None:
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with track(name="g", socket_path=sock_path):
        pass
    (attached,) = daemon.jobs.values()
    assert attached.attach is not None and attached.attach["gpu_ids"] == expected


def test_launched_job_joins_its_own_job(
    daemon: FakeDaemon, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = daemon.launch("queued-gpt")
    monkeypatch.setenv("POWERTRAIN_JOB_ID", str(job_id))
    monkeypatch.setenv("POWERTRAIN_SOCKET", str(sock_path))  # the default path honours it
    assert default_socket_path() == sock_path
    with track(name="gpt", report_interval_s=FAST) as job:
        assert job.id == job_id
        run_steps(job, 20)
    # its process joins the job it was launched as (a member), and no other job is made
    joins = [body for path, body, _ in daemon.requests if path.endswith("/attach")]
    assert [body["job_id"] for body in joins] == [job_id]
    assert list(daemon.jobs) == [job_id]
    assert daemon.reports(job_id)[-1]["tokens"] == 20 * 128
    assert daemon.reports(job_id)[-1]["member"] == 1000 * job_id + 1


def launched(daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch, **directive: object) -> int:
    job_id = daemon.launch()
    daemon.set_directive(job_id, **directive)
    monkeypatch.setenv("POWERTRAIN_JOB_ID", str(job_id))
    return job_id


def test_pace_sleeps_after_each_step(
    daemon: FakeDaemon, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = launched(daemon, monkeypatch, pace_s=0.05)
    with track(socket_path=sock_path, report_interval_s=FAST) as job:
        assert job.pace_s == 0.05  # known before the first step
        t0 = time.perf_counter()
        run_steps(job, 4)
        assert time.perf_counter() - t0 >= 4 * 0.05
    # pacing is not part of the step: the reported step time stays tiny
    timed = [r["step_time_s"] for r in daemon.reports(job_id) if r["step_time_s"] is not None]
    assert timed and max(timed) < 0.04


def test_slowdown_stretches_each_step(
    daemon: FakeDaemon, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = launched(daemon, monkeypatch, slowdown=3.0)
    with track(socket_path=sock_path, report_interval_s=FAST) as job:
        assert job.slowdown == 3.0
        t0 = time.perf_counter()
        run_steps(job, 4, body_s=0.02)
        assert time.perf_counter() - t0 >= 4 * 0.02 * 3
    # the stretch stands for the simulated GPU's slower step, so it is in the step time
    timed = [r["step_time_s"] for r in daemon.reports(job_id) if r["step_time_s"] is not None]
    assert timed and min(timed) >= 0.06


def test_micro_batch_directive_is_visible_and_follows_changes(
    daemon: FakeDaemon, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = launched(daemon, monkeypatch, micro_batch=4)
    with track(socket_path=sock_path, report_interval_s=FAST) as job:
        assert job.micro_batch == 4
        daemon.set_directive(job_id, micro_batch=None)
        assert daemon.wait_for(lambda: job.micro_batch is None)
        daemon.set_directive(job_id, micro_batch=8)
        assert daemon.wait_for(lambda: job.micro_batch == 8)


def test_declared_micro_batches_are_reported_and_bound_the_directive(
    daemon: FakeDaemon, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = launched(daemon, monkeypatch)
    with track(socket_path=sock_path, report_interval_s=FAST, micro_batches=(8, 2, 4),
               micro_batch=4) as job:
        assert job.micro_batches == (2, 4, 8)
        assert job.micro_batch == 4  # no directive: the loop's own
        run_steps(job, 1)
        assert daemon.wait_for(lambda: any("micro_batches" in r for r in daemon.reports(job_id)))
        report = next(r for r in daemon.reports(job_id) if "micro_batches" in r)
        assert (report["micro_batches"], report["micro_batch_default"]) == ([2, 4, 8], 4)
        daemon.set_directive(job_id, micro_batch=8)
        assert daemon.wait_for(lambda: job.micro_batch == 8)
        # out of memory at 8: 8 is withdrawn, the loop goes on at 4 and says so to the daemon
        assert job.out_of_memory() == 4
        assert (job.micro_batch, job.micro_batches) == (4, (2, 4))
        run_steps(job, 1)
        assert daemon.wait_for(lambda: daemon.reports(job_id)[-1].get("micro_batches") == [2, 4])
        assert job.out_of_memory() == 2
        with pytest.raises(ValueError, match="no smaller one"):
            job.out_of_memory()


def test_bad_micro_batch_declarations_raise() -> None:
    with pytest.raises(ValueError, match="positive integers"):
        track(micro_batches=(0, 4))
    with pytest.raises(ValueError, match="not one of"):
        track(micro_batches=(2, 4), micro_batch=3)
    with pytest.raises(ValueError, match="declare those"):
        track(micro_batch=4)
    assert track(micro_batches=(2, 4)).micro_batch == 4  # the largest, by default
    with pytest.raises(ValueError, match="no smaller one"):
        track(enabled=False).out_of_memory()  # nothing declared


def test_pause_checkpoints_blocks_and_resumes(
    daemon: FakeDaemon, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = launched(daemon, monkeypatch, state="paused", action="pause")
    checkpoints: list[int] = []
    job = track(socket_path=sock_path, report_interval_s=FAST,
                checkpoint=lambda: checkpoints.append(job.steps))

    def resume_after_polls() -> None:
        daemon.wait_for(lambda: len(daemon.reports(job_id)) >= 6)
        daemon.set_directive(job_id, state="running", action=None)

    resumer = threading.Thread(target=resume_after_polls)
    with job:
        resumer.start()
        run_steps(job, 5)
    resumer.join()
    assert checkpoints == [1], "checkpointed once, after the step that saw the pause"
    reports = daemon.reports(job_id)
    # while paused, the client kept polling with the same totals
    assert sum(1 for r in reports if r["steps"] == 1) >= 3
    assert reports[-1]["steps"] == 5 and reports[-1]["final"]


def test_stop_checkpoints_and_raises(
    daemon: FakeDaemon, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = launched(daemon, monkeypatch)
    checkpoints: list[int] = []
    job = track(socket_path=sock_path, report_interval_s=FAST,
                checkpoint=lambda: checkpoints.append(job.steps))
    with pytest.raises(JobStopped) as stopped, job:
        run_steps(job, 3)
        daemon.set_directive(job_id, state="stopped", action="stop")
        assert daemon.wait_for(lambda: job.directive.action == "stop")
        run_steps(job, 100)
    assert isinstance(stopped.value, SystemExit) and stopped.value.job_id == job_id
    assert f"job {job_id} stopped" in str(stopped.value.code)
    assert checkpoints == [4]
    last = daemon.reports(job_id)[-1]
    assert (last["steps"], last["final"]) == (4, True)


def test_absent_daemon_warns_once_and_training_goes_on(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with track(socket_path=sock_path, report_interval_s=FAST) as job:
        run_steps(job, 60, body_s=0.002)  # about 0.15 s: several retries
        assert job.id is None and not job.connected
    assert job.steps == 60
    (warning,) = warnings_from_client(caplog)
    assert str(sock_path) in warning.getMessage()


def test_daemon_appearing_later_gets_cumulative_totals(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeDaemon(sock_path)
    try:
        with track(name="late", socket_path=sock_path, report_interval_s=FAST) as job:
            run_steps(job, 30)
            fake.start()
            assert fake.wait_for(lambda: job.connected)
            run_steps(job, 10)
        (attached,) = fake.jobs.values()
        assert fake.reports(attached.id)[-1]["tokens"] == 40 * 128
        assert fake.reports(attached.id)[0]["steps"] >= 30
    finally:
        fake.stop()
    assert len(warnings_from_client(caplog)) == 1


def test_daemon_restart_is_lossless(
    daemon: FakeDaemon, sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with track(socket_path=sock_path, report_interval_s=FAST) as job:
        run_steps(job, 10)
        first_id = job.id
        assert first_id is not None
        daemon.stop()
        run_steps(job, 10, body_s=0.005)  # reports fail meanwhile
        assert not job.connected
        daemon.start()
        assert daemon.wait_for(lambda: job.connected)
        run_steps(job, 5)
    assert job.id == first_id and len(daemon.jobs) == 1
    assert daemon.reports(first_id)[-1]["steps"] == 25
    assert len(warnings_from_client(caplog)) == 1


def test_forgotten_job_is_attached_again(daemon: FakeDaemon, sock_path: Path) -> None:
    with track(socket_path=sock_path, report_interval_s=FAST) as job:
        run_steps(job, 10)
        first_id = job.id
        with daemon._lock:
            daemon.jobs.clear()  # as if the daemon's store had been reset
        assert daemon.wait_for(lambda: job.id not in (None, first_id))
        run_steps(job, 3)
    assert job.id is not None and daemon.reports(job.id)[-1]["steps"] == 13


def test_final_report_on_exit_without_periodic_reports(
    daemon: FakeDaemon, sock_path: Path
) -> None:
    with track(socket_path=sock_path, report_interval_s=60) as job:
        run_steps(job, 50)
    paths = [path for path, _, _ in daemon.requests]
    assert paths == ["/v1/jobs/attach", "/v1/jobs/1/progress", "/v1/jobs/1/progress"]
    first, final = daemon.reports(1)
    assert (first["steps"], first["final"]) == (0, False)
    assert (final["steps"], final["tokens"], final["final"]) == (50, 50 * 128, True)


def test_on_step_callback_form(daemon: FakeDaemon, sock_path: Path) -> None:
    job = track(socket_path=sock_path, report_interval_s=60).start()
    for _ in range(8):
        job.on_step(tokens=64, samples=1, step_time_s=0.01)
    job.close()
    job.close()  # idempotent
    final = daemon.reports(1)[-1]
    assert (final["steps"], final["tokens"], final["samples"]) == (8, 512, 8)
    assert final["step_time_s"] == pytest.approx(0.01)


def test_disabled_client_counts_without_a_daemon(sock_path: Path) -> None:
    with track(socket_path=sock_path, enabled=False) as job:
        run_steps(job, 5)
    assert (job.steps, job.tokens, job.id) == (5, 640, None)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="mode"):
        track(mode="turbo")
    with pytest.raises(ValueError, match="on_exceed"):
        track(on_exceed="explode")


def test_malformed_directive_fields_fall_back_to_neutral() -> None:
    bad = {"pace_s": float("nan"), "duty": "half", "micro_batch": True, "slowdown": -3,
           "state": {"x": 1}, "action": ["stop"]}
    assert _parse_directive(bad) == Directive(slowdown=1.0)
    assert _parse_directive(None) == Directive()
    good = {name: None for name in DIRECTIVE_FIELDS} | {"action": "pause", "state": "paused"}
    assert _parse_directive(good) == Directive(state="paused", action=Action.PAUSE)


def test_client_does_not_import_torch() -> None:
    # Of powertrain, only the pure vocabulary in scheduler.jobs: no pydantic, no store.
    code = (
        "import sys, scheduler.client\n"
        "ours = {m for m in sys.modules if m.split('.')[0] in "
        "('scheduler', 'energy', 'telemetry', 'reports')}\n"
        "assert ours == {'scheduler', 'scheduler.client', 'scheduler.jobs', 'scheduler.runs'}, "
        "ours\n"
        "assert not {'torch', 'pydantic', 'sqlalchemy'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
