"""The daemon's HTTP API, on a Unix socket and optionally over TCP.

On the socket, callers are known by the kernel, not by what they say: each connection's peer
credentials (``SO_PEERCRED``: pid, uid, gid) are read once when it is accepted and handed to the
handlers through the ASGI scope, so no request field can claim to be someone else. A connection
without them (TCP) must show a token (``Authorization: Bearer``; ``scheduler.store.tokens``),
which acts as its user within its scope: reads need ``read``, every change ``submit``, and an
``admin`` token may do what root or the admin group may. The service's refusals
(``scheduler.errors``) become HTTP status codes here.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import socket
import stat
import struct
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeVar

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from uvicorn.protocols.http.h11_impl import H11Protocol

from scheduler.errors import Caller, ConflictError, ForbiddenError, NotFoundError
from scheduler.jobs import Directive
from scheduler.schemas import (
    AllocationEndRequest,
    AllocationRequest,
    AttachRequest,
    JobEnergy,
    JobView,
    LogChunk,
    NodeUpdate,
    ProgressReport,
    SettingView,
    SubmitRequest,
    UpdateRequest,
)
from scheduler.store.tokens import Scope, TokenRecord

log = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SCOPE_KEY = "powertrain.peer"
_T = TypeVar("_T")
_READS = frozenset({"GET", "HEAD"})

TokenCheck = Callable[[str], TokenRecord | None]
"""The valid token a presented one is, or ``None`` (``TokenStore.verify``)."""


class JobsApi(Protocol):
    """What the API needs from the scheduler (``scheduler.service.JobService``)."""

    def submit(self, caller: Caller, req: SubmitRequest) -> JobView: ...
    def attach(self, caller: Caller, req: AttachRequest) -> JobView: ...
    def list_jobs(self, *, include_ended: bool) -> list[JobView]: ...
    def get(self, job_id: int) -> JobView: ...
    def cancel(self, caller: Caller, job_id: int) -> JobView: ...
    def update(self, caller: Caller, job_id: int, req: UpdateRequest) -> JobView: ...
    def resume(self, caller: Caller, job_id: int) -> JobView: ...
    def checkpoint(self, caller: Caller, job_id: int) -> JobView: ...
    def progress(self, caller: Caller, job_id: int, req: ProgressReport) -> Directive: ...
    def log_chunk(
        self,
        caller: Caller,
        job_id: int,
        stream: Literal["stdout", "stderr"],
        offset: int,
        limit: int,
    ) -> LogChunk: ...
    def gpus(self) -> list[dict[str, Any]]: ...
    def set_node(self, caller: Caller, req: NodeUpdate) -> dict[str, Any]: ...
    def register_allocation(self, caller: Caller, req: AllocationRequest) -> JobView: ...
    def end_allocation(self, caller: Caller, req: AllocationEndRequest) -> JobView: ...
    def job_settings(self, job_id: int) -> list[SettingView]: ...
    def job_energy(self, job_id: int) -> JobEnergy: ...
    def node(self) -> dict[str, Any]: ...


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


class _PeerCredProtocol(H11Protocol):
    """uvicorn's h11 protocol, adding the connection's peer credentials to every request scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        creds = peer_credentials(sock) if sock is not None else None
        inner = self.app

        async def with_peer(
            scope: MutableMapping[str, Any],
            receive: Callable[[], Awaitable[Any]],
            send: Callable[[Any], Awaitable[None]],
        ) -> None:
            scope[_SCOPE_KEY] = creds
            await inner(scope, receive, send)

        self.app = with_peer


def _is_admin(uid: int, gid: int, admin_group: str | None) -> bool:
    if uid == 0:
        return True
    if admin_group is None:
        return False
    try:
        group = grp.getgrnam(admin_group)
    except KeyError:
        return False
    if gid == group.gr_gid:
        return True
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return name in group.gr_mem or group.gr_gid in os.getgrouplist(name, gid)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _caller(request: Request) -> Caller:
    """The connection's peer, from the credentials the protocol put in the scope; without
    them (TCP), the user of the request's token."""
    creds = request.scope.get(_SCOPE_KEY)
    if creds is None:
        return _token_caller(request)
    pid, uid, gid = creds
    admin = _is_admin(uid, gid, request.app.state.admin_group)
    return Caller(pid, uid, gid, _user_name(uid), admin)


def _token_caller(request: Request) -> Caller:
    check: TokenCheck | None = request.app.state.tokens
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if check is None or scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(
            401, "a token is needed: send 'Authorization: Bearer TOKEN' (the CLI takes it from "
            "POWERTRAIN_TOKEN; `powertrain token create` makes one)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        record = check(token.strip())
    except SQLAlchemyError as exc:
        log.error("checking a token failed: %s", exc)
        raise HTTPException(503, "cannot check the token now: the store is unavailable") from None
    if record is None:
        raise HTTPException(401, "the token is not valid: unknown or revoked",
                            headers={"WWW-Authenticate": "Bearer"})
    needed = Scope.READ if request.method in _READS else Scope.SUBMIT
    if not record.scope.allows(needed):
        raise HTTPException(
            403, f"token {record.prefix}… has scope {record.scope.value}: {request.method} "
            f"{request.url.path} needs scope {needed.value}",
        )
    try:
        account = pwd.getpwnam(record.user)
    except KeyError:
        raise HTTPException(
            403, f"the token's user {record.user} has no account on this node"
        ) from None
    return Caller(None, account.pw_uid, account.pw_gid, record.user,
                  record.scope is Scope.ADMIN)


Who = Annotated[Caller, Depends(_caller)]


def create_app(
    service: JobsApi, *, admin_group: str | None = None, tokens: TokenCheck | None = None
) -> FastAPI:
    """The API as an ASGI app; ``service`` does the work, the app checks input and identity.

    Args:
        service: The job service.
        admin_group: Whose members the socket treats as admins.
        tokens: Checks the tokens of connections without peer credentials (TCP); without it,
            every such request is refused.
    """
    app = FastAPI(title="powertrain daemon API", version="1", docs_url=None, redoc_url=None)

    app.state.admin_group = admin_group
    app.state.tokens = tokens

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse({"detail": f"malformed JSON: {first.get('msg')}"}, status_code=422)
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        detail = f"{where}: {message}" if where else message
        return JSONResponse({"detail": detail}, status_code=422)

    def _errors(exc: Exception) -> HTTPException:
        if isinstance(exc, NotFoundError):
            return HTTPException(404, str(exc))
        if isinstance(exc, ForbiddenError):
            return HTTPException(403, str(exc))
        if isinstance(exc, ConflictError):
            return HTTPException(409, str(exc))
        return HTTPException(422, str(exc))

    def call(fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except (LookupError, PermissionError, ConflictError, ValueError) as exc:
            raise _errors(exc) from exc

    @app.get("/v1/health")
    def health(who: Who) -> dict[str, Any]:
        return {"status": "ok", "you": who.user, "admin": who.admin}

    @app.get("/v1/gpus")
    def gpus(who: Who) -> list[dict[str, Any]]:
        return service.gpus()

    @app.post("/v1/jobs", status_code=201)
    def submit(req: SubmitRequest, who: Who) -> JobView:
        return call(lambda: service.submit(who, req))

    @app.post("/v1/jobs/attach", status_code=201)
    def attach(req: AttachRequest, who: Who) -> JobView:
        return call(lambda: service.attach(who, req))

    @app.get("/v1/jobs")
    def jobs(who: Who, all: bool = False) -> list[JobView]:
        return service.list_jobs(include_ended=all)

    @app.get("/v1/jobs/{job_id}")
    def job(job_id: int, who: Who) -> JobView:
        return call(lambda: service.get(job_id))

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: int, who: Who) -> JobView:
        return call(lambda: service.cancel(who, job_id))

    @app.post("/v1/jobs/{job_id}/resume")
    def resume(job_id: int, who: Who) -> JobView:
        return call(lambda: service.resume(who, job_id))

    @app.post("/v1/jobs/{job_id}/checkpoint")
    def checkpoint(job_id: int, who: Who) -> JobView:
        return call(lambda: service.checkpoint(who, job_id))

    @app.patch("/v1/jobs/{job_id}")
    def update(job_id: int, req: UpdateRequest, who: Who) -> JobView:
        return call(lambda: service.update(who, job_id, req))

    @app.post("/v1/jobs/{job_id}/progress")
    def progress(job_id: int, req: ProgressReport, who: Who) -> Directive:
        return call(lambda: service.progress(who, job_id, req))

    @app.get("/v1/jobs/{job_id}/log")
    def job_log(
        job_id: int,
        who: Who,
        stream: Literal["stdout", "stderr"] = "stdout",
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=4 * 2**20)] = 2**20,
    ) -> LogChunk:
        return call(lambda: service.log_chunk(who, job_id, stream, offset, limit))

    @app.get("/v1/node")
    def node_power(who: Who) -> dict[str, Any]:
        return service.node()

    @app.put("/v1/node")
    def node(req: NodeUpdate, who: Who) -> dict[str, Any]:
        return call(lambda: service.set_node(who, req))

    @app.get("/v1/jobs/{job_id}/settings")
    def job_settings(job_id: int, who: Who) -> list[SettingView]:
        return call(lambda: service.job_settings(job_id))

    @app.get("/v1/jobs/{job_id}/energy")
    def job_energy(job_id: int, who: Who) -> JobEnergy:
        return call(lambda: service.job_energy(job_id))

    @app.post("/v1/allocations", status_code=201)
    def register_allocation(req: AllocationRequest, who: Who) -> JobView:
        return call(lambda: service.register_allocation(who, req))

    @app.post("/v1/allocations/end")
    def end_allocation(req: AllocationEndRequest, who: Who) -> JobView:
        return call(lambda: service.end_allocation(who, req))

    return app


def bind_socket(path: Path, *, group: str | None = None) -> socket.socket:
    """Bind the API's Unix socket with mode 0660 (and ``group``), replacing a stale one.

    Raises:
        OSError: Another process is listening there, or the folder is not writable.
        KeyError: Unknown group.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: left by a daemon that died
        else:
            raise OSError(f"another daemon is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # the socket is never world-accessible, not even for a moment
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    if group is not None:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    os.chmod(path, 0o660)
    sock.listen(128)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port`` (IPv4 or IPv6) for the API over TCP.

    Raises:
        OSError: The address is in use or not this machine's.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, waking once a second rather than ten times to see whether to stop.

    uvicorn polls ``should_exit`` every 100 ms, which an idle daemon paid for in CPU. Each wake
    here runs uvicorn's once-a-second chores (the Date header); ``wake`` stops it at once.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._wake, self._loop = asyncio.Event(), asyncio.get_running_loop()
        counter = 0
        while not await self.on_tick(counter):
            counter += 10  # on_tick does its once-a-second work when counter % 10 == 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)

    def wake(self) -> None:
        """From any thread: have the main loop look at ``should_exit`` now."""
        loop, event = self._loop, self._wake
        if loop is not None and event is not None and not loop.is_closed():
            loop.call_soon_threadsafe(event.set)


class ApiServer:
    """Serves the app from a background thread on a bound socket: a Unix socket, whose
    connections carry their peer's credentials, or a TCP one (HTTPS with ``tls``: certificate
    and key files), whose requests need a token."""

    def __init__(
        self, app: FastAPI, sock: socket.socket, *, tls: tuple[Path, Path] | None = None
    ) -> None:
        unix = sock.family == socket.AF_UNIX
        config = uvicorn.Config(
            app,
            http=_PeerCredProtocol if unix else H11Protocol,
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
            ssl_certfile=tls[0] if tls else None,
            ssl_keyfile=tls[1] if tls else None,
        )
        if tls:
            try:  # a certificate or key that cannot be used fails here, not in the thread
                config.load()
            except OSError as exc:  # ssl.SSLError is one
                why = getattr(exc, "reason", None) or exc.strerror or str(exc)
                raise OSError(f"cannot use the TLS certificate {tls[0]} with the key {tls[1]}: "
                              f"{why}") from None
        self._server = _Server(config)
        self._sock = sock
        self._path = Path(sock.getsockname()) if unix else None
        self._thread = threading.Thread(target=self._run, name="api", daemon=True)

    def _run(self) -> None:
        self._server.run(sockets=[self._sock])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.should_exit = True
        self._server.wake()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._sock.close()
        if self._path is not None:
            self._path.unlink(missing_ok=True)
