"""Running under systemd: readiness and stopping through ``sd_notify``, and log lines the journal
reads as they are meant.

``Type=notify`` units learn that the daemon is ready from a datagram ``READY=1`` sent to the socket
systemd names in ``NOTIFY_SOCKET`` (``sd_notify(3)``; a name starting with ``@`` is in the abstract
namespace). The protocol is one ``sendto``; no library is needed for it. Outside systemd (no
``NOTIFY_SOCKET``) nothing is sent.

When stderr goes to the journal (systemd sets ``JOURNAL_STREAM``), each line starts with its
syslog priority (``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>`` debug; ``sd-daemon(3)``) so
that ``journalctl -p warning`` finds the warnings, and carries no time of its own: the journal
stamps every line.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

_PRIORITY = {  # Python level -> syslog priority
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``) to systemd.

    Returns:
        Whether it was sent: ``False`` outside a ``Type=notify`` unit, or when the socket does
        not take it (logged; the daemon runs on either way).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("could not tell systemd %r through %s: %s", state, address, exc)
        return False
    return True


def to_journal() -> bool:
    """Whether stderr is the journal (``JOURNAL_STREAM`` names stderr's device and inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return bool(inode) and f"{st.st_dev}:{st.st_ino}" == f"{device}:{inode}"


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message``: the journal adds the time, host and unit."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 4)
        # A multi-line message (a traceback) stays one entry's worth of lines, each prefixed.
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())
