"""Real users and groups on the machine for tests that run jobs as other users (root only).

What a test creates it removes afterwards; what already existed is left as it was. Changes are
made one at a time across pytest-xdist workers: useradd and userdel refuse to run while another
holds /etc/passwd's lock.
"""

from __future__ import annotations

import fcntl
import grp
import pwd
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

_LOCK = "/tmp/powertrain-test-users.lock"


def _run(*argv: str, check: bool = True) -> None:
    with open(_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(argv, check=check, timeout=30, capture_output=not check)


@contextmanager
def machine_users(*names: str, group: str | None = None) -> Iterator[list[pwd.struct_passwd]]:
    """System users ``names`` (members of ``group`` when given), for the ``with`` block.

    Yields:
        Each user's passwd entry, in order.
    """
    made_users: list[str] = []
    made_group = False
    try:
        if group is not None:
            try:
                grp.getgrnam(group)
            except KeyError:
                _run("groupadd", "--system", group)
                made_group = True
        for name in names:
            try:
                pwd.getpwnam(name)
            except KeyError:
                extra = ["-G", group] if group else []
                _run("useradd", "--system", "--no-create-home", "--shell", "/bin/sh", *extra, name)
                made_users.append(name)
            else:
                if group is not None:
                    _run("usermod", "-a", "-G", group, name)
        yield [pwd.getpwnam(name) for name in names]
    finally:
        for name in made_users:
            _run("userdel", name, check=False)
        if made_group:
            _run("groupdel", group or "", check=False)
