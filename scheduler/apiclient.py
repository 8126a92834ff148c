"""A small client of the daemon's API for the CLI: one method per call, errors as one line."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import httpx


class DaemonError(Exception):
    """The daemon refused the request or could not be reached; the message is for people."""


class DaemonClient:
    """Talks to ``powertrain daemon`` over its Unix socket, or over TCP with a token.

    Args:
        socket_path: The daemon's socket (when ``url`` is not given).
        url: ``http(s)://HOST:PORT`` of a daemon started with ``--listen``.
        token: The API token sent with every request over ``url``.
        ca_cert: A CA (PEM) to trust, beside the system's, for an HTTPS ``url``.
        timeout_s: Per-request timeout, s.
    """

    def __init__(
        self,
        socket_path: Path | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        ca_cert: Path | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        if url is None:
            if socket_path is None:
                raise ValueError("a socket path or a URL is needed")
            self.where = f"the daemon at {socket_path}"
            self._hint = "is `powertrain daemon` running? (--socket or POWERTRAIN_SOCKET)"
            self._http = httpx.Client(
                transport=httpx.HTTPTransport(uds=str(socket_path)),
                base_url="http://powertrain",
                timeout=timeout_s,
            )
            return
        if not token:
            raise ValueError(f"talking to {url} needs a token: set POWERTRAIN_TOKEN "
                             "(`powertrain token create` makes one)")
        self.where = f"the daemon at {url}"
        self._hint = "is it running with --listen there? (--url or POWERTRAIN_URL)"
        verify: bool | ssl.SSLContext = True
        if ca_cert is not None:
            verify = ssl.create_default_context(cafile=str(ca_cert))
        self._http = httpx.Client(
            base_url=url, timeout=timeout_s, verify=verify,
            headers={"Authorization": f"Bearer {token}"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; return the decoded JSON body.

        Raises:
            DaemonError: Not reachable, or an error status (its ``detail`` as the message).
        """
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonError(f"cannot reach {self.where} ({_reason(exc)}); {self._hint}") from exc
        except httpx.HTTPError as exc:
            raise DaemonError(f"talking to the daemon failed: {exc}") from exc
        if response.is_error:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise DaemonError(str(detail))
        return response.json()

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/v1/jobs", json=body)
        return result

    def jobs(self, *, include_ended: bool) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request(
            "GET", "/v1/jobs", params={"all": str(include_ended).lower()}
        )
        return result

    def job(self, job_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/jobs/{job_id}")
        return result

    def cancel(self, job_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    def resume(self, job_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/v1/jobs/{job_id}/resume")
        return result

    def checkpoint(self, job_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/v1/jobs/{job_id}/checkpoint")
        return result

    def update(self, job_id: int, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request("PATCH", f"/v1/jobs/{job_id}", json=body)
        return result

    def node(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/v1/node")
        return result

    def gpus(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/v1/gpus")
        return result

    def log(self, job_id: int, *, stream: str, offset: int) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "GET", f"/v1/jobs/{job_id}/log", params={"stream": stream, "offset": offset}
        )
        return result


def _reason(exc: Exception) -> str:
    cause = exc.__cause__ or exc.__context__ or exc
    return getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
