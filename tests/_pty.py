"""A command run the way a user meets it: stdout and stderr on a pseudo-terminal (progress bars on).

The one reading loop of the tests (``on_terminal``, ``isle_on_terminal``): it reads everything the
command prints until it exits, also when it leaves children holding the terminal, and kills the
command's whole process group when it runs past its time.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]


class TerminalRun(NamedTuple):
    """What :func:`on_terminal` saw."""

    rc: int | None
    """The exit status; None when the command was still running after ``timeout`` s (and was killed)."""
    text: str
    """Everything the command printed on the terminal (tqdm's ``\\r`` frames included)."""
    seconds: float
    """From the start to the exit."""


def on_terminal(argv: Sequence[object], *, timeout: float = 300, cwd: Path | str | None = None,
                env: Mapping[str, str | None] | None = None, size: tuple[int, int] | None = (40, 120),
                stdin: bool = True, stdout: bool = True, fail_on_timeout: bool = True,
                on_output: Callable[[subprocess.Popen, bytes], None] | None = None) -> TerminalRun:
    """Run ``argv`` with stderr (and stdout, stdin) on a new pseudo-terminal, its controlling terminal.

    Parameters
    ----------
    argv
        The command (``str()`` of each).
    timeout
        Seconds it may run; then its process group is killed and the test fails
        (``fail_on_timeout``) or the result has ``rc`` None.
    cwd
        Where it runs (the repository by default).
    env
        Changes to ``os.environ`` (a value None removes the name). ``ISLE_PROGRESS`` is ``1``
        and the repository is on ``PYTHONPATH`` unless changed here.
    size
        The terminal's (rows, columns); a fresh pseudo-terminal is 0 x 0, where tqdm draws
        nothing. None keeps it so.
    stdin, stdout
        False: that stream is ``/dev/null`` rather than the terminal.
    fail_on_timeout
        See ``timeout``.
    on_output
        Called with the process and all output so far after each read.
    """
    environ = dict(os.environ, ISLE_PROGRESS="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    environ.setdefault("TERM", "xterm")
    for k, v in (env or {}).items():
        if v is None:
            environ.pop(k, None)
        else:
            environ[k] = v
    master, slave = pty.openpty()
    if size is not None:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    t0 = time.monotonic()
    proc = subprocess.Popen([str(a) for a in argv], cwd=cwd or REPO, env=environ, close_fds=True,
                            stdin=slave if stdin else subprocess.DEVNULL,
                            stdout=slave if stdout else subprocess.DEVNULL, stderr=slave,
                            start_new_session=True,     # its own session and process group, as in a shell,
                            preexec_fn=lambda: fcntl.ioctl(2, termios.TIOCSCTTY, 0))  # with the terminal
    os.close(slave)
    out = b""
    rc: int | None = None
    try:
        while True:
            if time.monotonic() - t0 > timeout:
                break
            ready, _, _ = select.select([master], [], [], 0.1)
            data = b""
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:     # EIO: every process holding the terminal has closed it
                    data = b""
                out += data
                if data and on_output is not None:
                    on_output(proc, out)
            if not data and proc.poll() is not None:
                rc = proc.returncode
                break
            if ready and not data:  # closed, but the process has not exited yet
                time.sleep(0.05)
    finally:
        os.close(master)
        try:                        # the command, if still running, and what it left behind
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    seconds = time.monotonic() - t0
    text = out.decode("utf-8", errors="replace")
    if rc is None and fail_on_timeout:
        pytest.fail(f"{' '.join(map(str, argv[:4]))} did not exit within {timeout} s; its output:\n"
                    + text[-2000:])
    return TerminalRun(rc, text, seconds)


def isle_on_terminal(argv: Sequence[object], **kw) -> TerminalRun:
    """:func:`on_terminal` of ``python -m isle_fast ARGV``."""
    return on_terminal([sys.executable, "-m", "isle_fast", *argv], **kw)
