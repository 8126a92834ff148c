"""The daemon's API over TCP with tokens: a real daemon with ``--listen``, tokens made with the
real ``powertrain token`` commands, requests over real sockets (plain HTTP and HTTPS).

Every refused request must change nothing: the module's checks compare the daemon's jobs before
and after. The ownership rules over TCP (a user's token cannot touch another user's job) run as
real users in tests/test_jobs_e2e.py, beside the same rules on the socket.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cli_helpers import one_error_line
from tests.daemon_proc import DaemonProcess, free_port, make_token, powertrain, start_daemon

pytestmark = pytest.mark.slow


@dataclass
class Remote:
    daemon: DaemonProcess
    home: Path
    socket: Path
    url: str

    def call(self, method: str, path: str, token: str | None = None,
             **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        with httpx.Client(base_url=self.url, timeout=10) as http:
            return http.request(method, path, headers=headers, **kwargs)

    def jobs_on_socket(self) -> list[dict[str, Any]]:
        """Every job, as root sees it through the socket (not through what is tested)."""
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                          base_url="http://powertrain") as http:
            rows: list[dict[str, Any]] = http.get("/v1/jobs", params={"all": "true"}).json()
        return rows

    def cli(self, *args: str, token: str | None) -> subprocess.CompletedProcess[str]:
        env = {"POWERTRAIN_TOKEN": token} if token is not None else {}
        return powertrain(args[0], "--url", self.url, *args[1:], env=env)


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    home = tmp_path_factory.mktemp("tcp")
    socket = home / "api.sock"
    port = free_port()
    daemon = start_daemon(home, socket, "--listen", f"127.0.0.1:{port}", gpus=2)
    try:
        yield Remote(daemon, home, socket, f"http://127.0.0.1:{port}")
    finally:
        assert daemon.terminate() == 0, daemon.log()


SLEEP = {"argv": ["sleep", "30"], "cwd": "/tmp", "watts": 300}


def test_refused_tokens_get_401_or_403_and_change_nothing(remote: Remote) -> None:
    read = make_token(remote.home, "root", "read")["token"]
    revoked = make_token(remote.home, "root", "submit")
    done = powertrain("token", "revoke", "--home", str(remote.home), str(revoked["id"]))
    assert done.returncode == 0, done.stderr
    before = remote.jobs_on_socket()

    cases = [
        (None, 401, "a token is needed"),
        ("ptk_not-a-token-at-all", 401, "not valid"),
        ("Basic dXNlcjpwYXNz", 401, "not valid"),  # sent as a bearer token: unknown
        (revoked["token"], 401, "not valid"),
        (read, 403, "needs scope submit"),
    ]
    for token, status, words in cases:
        answer = remote.call("POST", "/v1/jobs", token, json=SLEEP)
        assert answer.status_code == status, (token, answer.text)
        assert words in answer.json()["detail"]
        if status == 401:
            assert answer.headers["www-authenticate"] == "Bearer"
    # a read token changes nothing either: not a budget, not a cancel, not the node's cap
    for method, path, body in (("PATCH", "/v1/jobs/1", {"watts": 200}),
                               ("POST", "/v1/jobs/1/cancel", None),
                               ("PUT", "/v1/node", {"node_cap_w": 500})):
        answer = remote.call(method, path, read, json=body)
        assert answer.status_code == 403, answer.text
    assert remote.jobs_on_socket() == before

    # and what a read token may do, it does
    health = remote.call("GET", "/v1/health", read)
    assert health.status_code == 200 and health.json()["you"] == "root"
    assert health.json()["admin"] is False  # root's token is not root: its scope says
    assert len(remote.call("GET", "/v1/gpus", read).json()) == 2


def test_a_submit_token_runs_the_cli_as_its_user_and_only_admin_sets_the_node(
    remote: Remote,
) -> None:
    token = make_token(remote.home, "root", "submit")["token"]
    made = remote.cli("submit", "--watts", "300", "--name", "over-tcp", "--", "sleep", "30",
                      token=token)
    assert made.returncode == 0, made.stderr
    job_id = int(made.stdout)
    listed = remote.cli("jobs", "--json", token=token)
    assert listed.returncode == 0, listed.stderr
    view = next(j for j in json.loads(listed.stdout) if j["id"] == job_id)
    assert view["name"] == "over-tcp" and view["user"] == "root"

    changed = remote.cli("budget", str(job_id), "--watts", "250", token=token)
    assert changed.returncode == 0, changed.stderr
    assert next(j for j in remote.jobs_on_socket() if j["id"] == job_id)["watts"] == 250

    node = remote.call("PUT", "/v1/node", token, json={"node_cap_w": 500})
    assert node.status_code == 403, node.text
    admin = make_token(remote.home, "root", "admin")["token"]
    node = remote.call("PUT", "/v1/node", admin, json={"node_cap_w": 5000})
    assert node.status_code == 200, node.text

    cancelled = remote.cli("cancel", str(job_id), token=token)
    assert cancelled.returncode == 0, cancelled.stderr
    remote.daemon.wait_for(lambda: next(
        j for j in remote.jobs_on_socket() if j["id"] == job_id)["state"] == "cancelled")


def test_a_process_attaches_and_reports_over_tcp_naming_its_pid_and_member(
    remote: Remote,
) -> None:
    token = make_token(remote.home, "root", "submit")["token"]
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        no_pid = remote.call("POST", "/v1/jobs/attach", token, json={"name": "x", "gpu_ids": []})
        assert no_pid.status_code == 422 and "pid" in no_pid.json()["detail"]
        joined = remote.call("POST", "/v1/jobs/attach", token,
                             json={"name": "remote", "pid": sleeper.pid, "gpu_ids": [1]})
        assert joined.status_code == 201, joined.text
        job_id, member = joined.json()["id"], joined.json()["member_id"]
        nameless = remote.call("POST", f"/v1/jobs/{job_id}/progress", token,
                               json={"steps": 1, "samples": 2, "tokens": 3})
        assert nameless.status_code == 409 and "member" in nameless.json()["detail"]
        report = remote.call("POST", f"/v1/jobs/{job_id}/progress", token,
                             json={"member": member, "steps": 5, "samples": 10, "tokens": 640})
        assert report.status_code == 200, report.text
        view = next(j for j in remote.jobs_on_socket() if j["id"] == job_id)
        assert (view["steps"], view["samples"], view["tokens"]) == (5, 10, 640)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_cli_says_in_one_line_what_is_wrong(remote: Remote) -> None:
    no_token = remote.cli("jobs", token=None)
    assert no_token.returncode == 2
    assert "POWERTRAIN_TOKEN" in one_error_line(no_token.stderr)
    bad = remote.cli("jobs", token="ptk_nope")
    assert bad.returncode == 1
    assert "not valid" in one_error_line(bad.stderr)
    nobody = powertrain("jobs", "--url", f"http://127.0.0.1:{free_port()}",
                        env={"POWERTRAIN_TOKEN": "ptk_x"})
    assert nobody.returncode == 1 and "cannot reach" in one_error_line(nobody.stderr)
    scheme = powertrain("jobs", "--url", "ftp://host:1", env={"POWERTRAIN_TOKEN": "ptk_x"})
    assert scheme.returncode == 2 and "--url" in one_error_line(scheme.stderr)

    for args, words in ((["--user", "no-such-user-here", "--scope", "read"], "no account"),
                        (["--user", "root", "--scope", "root"], "--scope")):
        done = powertrain("token", "create", "--home", str(remote.home), *args)
        assert done.returncode == 2 and words in one_error_line(done.stderr), done.stderr
    unknown = powertrain("token", "revoke", "--home", str(remote.home), "999")
    assert unknown.returncode == 1 and "no token 999" in one_error_line(unknown.stderr)


def test_token_list_shows_tokens_but_never_the_tokens_themselves(remote: Remote) -> None:
    made = make_token(remote.home, "root", "read")
    listed = powertrain("token", "list", "--home", str(remote.home), "--json")
    assert listed.returncode == 0, listed.stderr
    assert made["token"] not in listed.stdout
    row = next(r for r in json.loads(listed.stdout) if r["id"] == made["id"])
    assert row["scope"] == "read" and made["token"].startswith(row["prefix"])
    db = (remote.home / "powertrain.db").read_bytes()
    assert made["token"].encode() not in db


@pytest.mark.parametrize("args, words", [
    (["--listen", "localhost"], "--listen"),
    (["--listen", "127.0.0.1:0"], "--listen"),
    (["--listen", "127.0.0.1:9", "--tls-cert", "/nonexistent"], "give both"),
    (["--tls-cert", "/a", "--tls-key", "/b"], "give listen too"),
])
def test_bad_daemon_options_are_one_line(tmp_path: Path, args: list[str], words: str) -> None:
    done = powertrain("daemon", "--backend", "simulated", "--home", str(tmp_path), *args)
    assert done.returncode == 2
    assert words in one_error_line(done.stderr)


def test_a_taken_port_or_unusable_certificate_is_one_line_and_no_daemon(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = powertrain("daemon", "--backend", "simulated", "--home", str(tmp_path),
                          "--socket", str(tmp_path / "a.sock"), "--listen", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in _daemon_error(done.stderr)
    assert not (tmp_path / "a.sock").exists()  # the socket it had bound is gone again

    (tmp_path / "cert.pem").write_text("not a certificate\n")
    done = powertrain("daemon", "--backend", "simulated", "--home", str(tmp_path), "--listen",
                      f"127.0.0.1:{free_port()}", "--tls-cert", str(tmp_path / "cert.pem"),
                      "--tls-key", str(tmp_path / "cert.pem"))
    assert done.returncode == 1
    _daemon_error(done.stderr)


def _daemon_error(stderr: str) -> str:
    """The one ``error:`` line a daemon that will not start ends its log with."""
    lines = stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], stderr
    return lines[-1]


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
         "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def test_https_with_a_certificate_the_client_trusts(tmp_path: Path, sock_dir: Path) -> None:
    cert, key = _self_signed(tmp_path)
    port = free_port()
    daemon = start_daemon(tmp_path, sock_dir / "api.sock", "--listen", f"127.0.0.1:{port}",
                          "--tls-cert", str(cert), "--tls-key", str(key), gpus=1)
    try:
        token = make_token(tmp_path, "root", "read")["token"]
        url = f"https://127.0.0.1:{port}"
        trusted = powertrain("jobs", "--url", url, "--json",
                             env={"POWERTRAIN_TOKEN": token, "POWERTRAIN_CA_CERT": str(cert)})
        assert trusted.returncode == 0, trusted.stderr
        assert json.loads(trusted.stdout) == []
        untrusted = powertrain("jobs", "--url", url, env={"POWERTRAIN_TOKEN": token})
        assert untrusted.returncode == 1
        assert "certificate" in one_error_line(untrusted.stderr).lower()
        with pytest.raises(httpx.HTTPError):  # plain HTTP gets no answer from an HTTPS port
            httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5)
    finally:
        assert daemon.terminate() == 0, daemon.log()
