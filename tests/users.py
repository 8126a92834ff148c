"""Real users and groups on the machine for tests that run jobs as other users (root only).

What a test creates it removes afterwards; what already existed is left as it was.
"""

from __future__ import annotations

import grp
import pwd
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager


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
                subprocess.run(["groupadd", "--system", group], check=True, timeout=30)
                made_group = True
        for name in names:
            try:
                pwd.getpwnam(name)
            except KeyError:
                extra = ["-G", group] if group else []
                subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh",
                                *extra, name], check=True, timeout=30)  # fmt: skip
                made_users.append(name)
            else:
                if group is not None:
                    subprocess.run(["usermod", "-a", "-G", group, name], check=True, timeout=30)
        yield [pwd.getpwnam(name) for name in names]
    finally:
        for name in made_users:
            subprocess.run(["userdel", name], check=False, timeout=30)
        if made_group:
            subprocess.run(["groupdel", group or ""], check=False, timeout=30)
