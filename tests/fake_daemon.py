"""A small real HTTP server on a Unix socket that answers the daemon's job API the way the contract
says (``POST /v1/jobs/attach``, ``POST /v1/jobs/{id}/progress``) and records every request.

Tests drive the training client against it; directives are set per job with
:meth:`FakeDaemon.set_directive`. It can be stopped and started again on the same socket (keeping
its jobs, as a restarted daemon keeps them in its store) to test reconnection.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import TracebackType
from typing import Any

from scheduler.jobs import DIRECTIVE_FIELDS, Directive, Mode, OnExceed

_PROGRESS = re.compile(r"^/v1/jobs/(-?\d+)/progress$")
_MODES = {m.value for m in Mode}
_ON_EXCEED = {p.value for p in OnExceed}


@dataclass
class FakeJob:
    """A job the fake daemon knows: its attach body (if attached) and its directive."""

    id: int
    name: str
    attach: dict[str, Any] | None = None
    directive: dict[str, Any] = field(
        default_factory=lambda: asdict(Directive(state="running"))
    )
    reports: list[dict[str, Any]] = field(default_factory=list)
    joins: list[dict[str, Any]] = field(default_factory=list)


def _check_directive(fields: dict[str, Any]) -> None:
    unknown = set(fields) - set(DIRECTIVE_FIELDS)
    if unknown:
        raise TypeError(f"unknown directive fields: {sorted(unknown)}")


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, path: str, owner: FakeDaemon) -> None:
        self.owner = owner
        self.connections: set[socket.socket] = set()
        super().__init__(path, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn serves it
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.owner._lock:
            self.server.connections.add(self.request)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.server.owner._lock:
            self.server.connections.discard(self.request)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a Unix socket has no client address to log, and tests want quiet

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except ValueError:
            self._send(400, {"detail": "body is not JSON"})
            return
        pid, _uid, _gid = struct.unpack(
            "3i", self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                          struct.calcsize("3i")))
        status, answer = self.server.owner._handle(self.path, body, pid)
        self._send(status, answer)

    def _send(self, status: int, answer: dict[str, Any]) -> None:
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeDaemon:
    """The daemon's job API on a real Unix socket, in a background thread.

    Args:
        socket_path: Where to listen.
        first_job_id: The id the first job gets.
        directive: Directive fields every new job starts with (e.g. ``micro_batch=4``).

    Attributes:
        socket_path: Where it listens.
        jobs: Jobs by id (attached or launched).
        requests: Every request as ``(path, body, peer pid)``, in arrival order.
    """

    def __init__(self, socket_path: str | os.PathLike[str], first_job_id: int = 1,
                 **directive: Any) -> None:
        _check_directive(directive)
        self.socket_path = Path(socket_path)
        self.new_job_directive = directive
        self.jobs: dict[int, FakeJob] = {}
        self.requests: list[tuple[str, Any, int]] = []
        self._next_id = first_job_id
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeDaemon:
        """Listen on the socket (again, after :meth:`stop`)."""
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = _Server(str(self.socket_path), self)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening, drop open connections and remove the socket, as a dying daemon does."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            open_connections = list(server.connections)
        for conn in open_connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def __enter__(self) -> FakeDaemon:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- test controls -----------------------------------------------------------------------

    def launch(self, name: str = "launched") -> int:
        """Register a job as if the daemon had launched its process; returns its id."""
        with self._lock:
            job = FakeJob(id=self._next_id, name=name)
            job.directive.update(self.new_job_directive)
            self._next_id += 1
            self.jobs[job.id] = job
            return job.id

    def set_directive(self, job_id: int, **fields: Any) -> None:
        """Change what the job's progress reports are answered with (pace_s, micro_batch,
        slowdown, state, action)."""
        _check_directive(fields)
        with self._lock:
            self.jobs[job_id].directive.update(fields)

    def reports(self, job_id: int) -> list[dict[str, Any]]:
        """The progress bodies received for a job, in order."""
        with self._lock:
            return list(self.jobs[job_id].reports) if job_id in self.jobs else []

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait until ``predicate()`` holds after some request (checked under no lock)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._changed:
                self._changed.wait(min(left, 0.05))
        return True

    # -- the API -----------------------------------------------------------------------------

    def _handle(self, path: str, body: Any, pid: int) -> tuple[int, dict[str, Any]]:
        with self._changed:
            self.requests.append((path, body, pid))
            try:
                return self._route(path, body, pid)
            finally:
                self._changed.notify_all()

    def _route(self, path: str, body: Any, pid: int) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict):
            return 422, {"detail": "body must be a JSON object"}
        if path == "/v1/jobs/attach":
            if not isinstance(body.get("name"), str) or not isinstance(body.get("pid"), int):
                return 422, {"detail": "name (str) and pid (int) are required"}
            if body.get("mode", "auto") not in _MODES:
                return 422, {"detail": f"mode must be one of {sorted(_MODES)}"}
            if body.get("on_exceed", "warn") not in _ON_EXCEED:
                return 422, {"detail": f"on_exceed must be one of {sorted(_ON_EXCEED)}"}
            joined = {**body, "peer_pid": pid}
            existing = [j for j in self.jobs.values()
                        if j.id == body.get("job_id") or (
                            body.get("run_key") and j.attach is not None
                            and j.attach.get("run_key") == body["run_key"])]
            if existing:  # a launched job's process, or another rank of a run
                job = existing[0]
            else:
                job_id = body.get("job_id") or self._next_id
                job = FakeJob(id=job_id, name=body["name"], attach=joined)
                job.directive.update(self.new_job_directive)
                self._next_id = max(self._next_id, job_id) + 1
                self.jobs[job.id] = job
            job.joins.append(joined)
            return 201, {"id": job.id, "name": job.name, "state": job.directive["state"],
                         "member_id": 1000 * job.id + len(job.joins)}
        match = _PROGRESS.match(path)
        if match is None:
            return 404, {"detail": f"no route {path}"}
        found = self.jobs.get(int(match.group(1)))
        if found is None:
            return 404, {"detail": f"no job {match.group(1)}"}
        for key in ("steps", "samples", "tokens"):
            if not isinstance(body.get(key), int):
                return 422, {"detail": f"{key} (int) is required"}
        found.reports.append(body)
        if body.get("final"):
            found.directive["state"] = "done"
        return 200, dict(found.directive)
