"""Who calls the job service and how it refuses them: ``Caller`` and the service's error types.

They live apart from the HTTP layer so the service speaks no HTTP: ``scheduler/api.py`` builds a
``Caller`` from a connection's peer credentials and maps each error to its status code (named in
the class docstrings); in-process callers (``bench/simjob.py``, tests) use them directly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking, as the kernel says (``SO_PEERCRED`` on the API's socket), or as a token
    says (the API over TCP).

    Attributes:
        pid / uid / gid: From ``SO_PEERCRED`` when the connection was made; for a token, its
            user's ids on this node and no pid (a token speaks for a user, not a process).
        user: Login name of ``uid`` (the uid as text if it has none).
        admin: root, or a member of the configured admin group, or an ``admin`` token.
    """

    pid: int | None
    uid: int
    gid: int
    user: str
    admin: bool


class NotFoundError(LookupError):
    """No such job (HTTP 404)."""


class ForbiddenError(PermissionError):
    """The caller may not do this (HTTP 403)."""


class ConflictError(RuntimeError):
    """The job is not in a state that allows this (HTTP 409)."""
