"""The job runner: runs a job's command as a child and records how it ended in an exit file.

``python -m scheduler.runner --exit-file PATH [--dir-fd N] -- ARGV...`` (the launcher hands this
file's source to ``python -I`` through a pipe, as the job's user may not be able to read it: it
imports nothing but the standard library). It starts
ARGV in a process group of its own, forwards SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 to that
group, and when the child exits writes its status (``128 + n`` when killed by signal ``n``) to the
exit file atomically (a temporary file renamed over it), then exits with the same status. With
``--dir-fd``, the exit file is named relative to that open directory (the launcher passes the
job's log folder, which the job's user may write even when its parent folders are closed to it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from types import FrameType

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
"""Signals the runner passes on to the command's process group."""

EXIT_NOT_STARTED = 127
"""Status when the command could not be started (not found, not executable)."""


def exit_status(returncode: int) -> int:
    """A ``Popen.returncode`` as a shell-style exit status: ``128 + n`` for signal ``n``."""
    return 128 - returncode if returncode < 0 else returncode


def write_exit_file(path: str, status: int, *, dir_fd: int | None = None) -> None:
    """Write ``status`` to ``path`` atomically: readers see the old file or the whole new one.

    Args:
        path: The exit file (relative to ``dir_fd`` when given: only its base name is used).
        status: Exit status, 0..255.
        dir_fd: An open directory the file is in.
    """
    name = os.path.basename(path) if dir_fd is not None else path
    tmp = f"{name}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, f"{status}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scheduler.runner",
        description="Run a job's command and record its exit status.",
    )
    parser.add_argument("--exit-file", required=True, help="where the exit status is written")
    parser.add_argument("--dir-fd", type=int, default=None, help="open folder of the exit file")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("no command given (put it after --)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the command; return (and record) its exit status."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if child is None:
            pending.append(signum)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    try:
        child = subprocess.Popen(args.command, process_group=0)
    except OSError as exc:
        print(f"powertrain runner: cannot start {args.command[0]!r}: {exc}", file=sys.stderr)
        status = EXIT_NOT_STARTED
    else:
        for signum in pending:
            forward(signum, None)
        while True:
            try:
                returncode = child.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for safety
                continue
        status = exit_status(returncode)
    write_exit_file(args.exit_file, status, dir_fd=args.dir_fd)
    return status


if __name__ == "__main__":
    sys.exit(main())
