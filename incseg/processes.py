"""Child processes that always end: each starts in its own process group and is stopped with
SIGTERM to the whole group, then SIGKILL after a bound (servers, workers, torchrun)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager


def start(cmd: list[str], **popen) -> subprocess.Popen:
    """`subprocess.Popen` in a new session, so the process and everything it spawns form one group."""
    return subprocess.Popen(cmd, start_new_session=True, **popen)


def stop(proc: subprocess.Popen | None, grace: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
    """`sig` (SIGTERM) to the process group, SIGKILL to it if the leader has not exited within
    `grace` seconds. Returns the exit code (None if it could not be reaped)."""
    if proc is None:
        return None
    pgid = proc.pid  # started with start_new_session: the group outlives its leader while members remain
    if proc.poll() is None:
        _signal_group(pgid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(pgid, signal.SIGKILL)  # stragglers of the group (a worker's own children) go too
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        return None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def running(cmd: list[str], grace: float = 10.0, sig: int = signal.SIGTERM, **popen) -> Iterator[subprocess.Popen]:
    """The process for the duration of the block, stopped (see `stop`) however the block ends."""
    proc = start(cmd, **popen)
    try:
        yield proc
    finally:
        stop(proc, grace, sig)
