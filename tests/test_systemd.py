"""The daemon under systemd: the unit file in examples/systemd/ passes ``systemd-analyze verify``
without a warning, the daemon tells a ``Type=notify`` unit when it is ready and when it stops, and
its log lines to the journal carry their priority."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler import systemd
from tests.daemon_proc import REPO, DaemonProcess

UNIT = REPO / "examples" / "systemd" / "powertrain.service"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pt-sd-"))  # short: it holds sockets
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but systemd-analyze is not installed (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # The unit names /opt/powertrain; verify checks that ExecStart exists, so point it here.
    text = UNIT.read_text().replace("/opt/powertrain/.venv/bin/powertrain",
                                    str(Path(sys.executable).parent / "powertrain"))
    unit = tmp_path / "powertrain.service"
    unit.write_text(text)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    # verify exits 0 even for unknown keys or bad values; it says so on stderr
    said = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    assert done.returncode == 0 and not said, done.stdout + done.stderr
    assert re.search(r"^KillMode=process$", text, re.M), "jobs must outlive a daemon restart"
    assert re.search(r"^Type=notify$", text, re.M)


def test_notify_sends_to_a_path_or_an_abstract_socket(short_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False  # not under systemd: nothing to tell
    for address, bind in ((str(short_dir / "n.sock"), str(short_dir / "n.sock")),
                          (f"@pt-test-{os.getpid()}", f"\0pt-test-{os.getpid()}")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(bind)
            monkeypatch.setenv("NOTIFY_SOCKET", address)
            assert systemd.notify("READY=1") is True
            assert sock.recv(4096) == b"READY=1"
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "nobody-listens"))
    assert systemd.notify("READY=1") is False  # said in a warning; the daemon goes on


def test_the_daemon_says_when_it_is_ready_and_when_it_stops(
    short_dir: Path, tmp_path: Path
) -> None:
    path = short_dir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(60)
        daemon = DaemonProcess(tmp_path, "--socket", str(short_dir / "api.sock"), gpus=2,
                               env={"NOTIFY_SOCKET": str(path)})
        try:
            ready = sock.recv(4096).decode()
            assert ready.startswith("READY=1\n"), ready
            assert "STATUS=sampling 2 GPUs" in ready
            assert (short_dir / "api.sock").exists(), "ready means the API is up"
            daemon.proc.send_signal(signal.SIGTERM)
            assert sock.recv(4096) == b"STOPPING=1"
            assert daemon.proc.wait(30) == 0, daemon.log()
        finally:
            if daemon.proc.poll() is None:
                daemon.kill()


def test_log_lines_to_the_journal_carry_their_priority_and_no_time(
    short_dir: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "journal.log"
    with log_path.open("w") as log_file:
        st = os.fstat(log_file.fileno())
        env = {k: v for k, v in os.environ.items() if not k.startswith("POWERTRAIN_")}
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler", "daemon", "--backend", "simulated",
             "--sim-gpus", "1", "--home", str(tmp_path / "home"), "--socket",
             str(short_dir / "api.sock")],
            stdout=log_file, stderr=log_file, env=env, cwd=REPO,
        )
        daemon = DaemonProcess.__new__(DaemonProcess)  # only its wait_for, on this process
        daemon.proc, daemon.log_path, daemon._log = proc, log_path, log_file
        daemon.wait_for(lambda: "sampling 1 GPUs" in log_path.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    lines = log_path.read_text().splitlines()
    assert lines and all(re.match(r"^<[2-7]>[\w.]+: ", line) for line in lines), lines
    assert any(line.startswith("<6>scheduler.daemon: sampling 1 GPUs") for line in lines)
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines), "no timestamps"
