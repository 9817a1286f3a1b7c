"""Child processes that always end: each starts in its own process group and is stopped with
SIGTERM to the whole group, then SIGKILL after a bound (servers, workers, torchrun). On Linux a
child also gets SIGTERM from the kernel when its parent dies without stopping it (SIGKILL, the
OOM killer), so no server or training process outlives the program that started it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# Run in the child before it becomes `cmd`: ask the kernel for SIGTERM when the parent dies
# (prctl PR_SET_PDEATHSIG, kept across exec), and go at once if the parent is already gone.
# A separate small interpreter rather than Popen's preexec_fn, which is unsafe with threads.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(143)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def start(cmd: list[str], own_group: bool = True, **popen) -> subprocess.Popen:
    """`subprocess.Popen` in a new session, so the process and everything it spawns form one group.
    `own_group=False` keeps it in the caller's group instead: a helper that must go down with its
    caller (Ctrl-C in the terminal, or a kill of the caller's group, reaches it too). Either way,
    on Linux, the process is sent SIGTERM if this process dies first (see the module docstring)."""
    if sys.platform == "linux":
        path = (popen.get("env") or os.environ).get("PATH")
        if shutil.which(cmd[0], path=path) is None:  # as Popen would: the caller sees a missing program
            raise FileNotFoundError(2, "No such file or directory", cmd[0])
        cmd = [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]
    proc = subprocess.Popen(cmd, start_new_session=own_group, **popen)
    proc.own_group = own_group  # how `stop` must signal it
    return proc


def stop(proc: subprocess.Popen | None, grace: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
    """`sig` (SIGTERM) to the process group, SIGKILL to it if the leader has not exited within
    `grace` seconds (only to the process itself when it shares the caller's group). Returns the
    exit code (None if it could not be reaped)."""
    if proc is None:
        return None
    own = getattr(proc, "own_group", True)  # its group id is its pid; the group outlives the leader

    def send(s: int) -> None:
        try:
            os.killpg(proc.pid, s) if own else proc.send_signal(s)
        except (ProcessLookupError, PermissionError):
            pass

    if proc.poll() is None:
        send(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    if own or proc.poll() is None:
        send(signal.SIGKILL)  # stragglers of its group (a worker's own children) go too
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        return None


@contextmanager
def running(cmd: list[str], grace: float = 10.0, sig: int = signal.SIGTERM, own_group: bool = True,
            **popen) -> Iterator[subprocess.Popen]:
    """The process for the duration of the block, stopped (see `stop`) however the block ends."""
    proc = start(cmd, own_group, **popen)
    try:
        yield proc
    finally:
        stop(proc, grace, sig)


def exit_on_sigterm() -> None:
    """From now on SIGTERM (a service manager's or `kill`'s stop) ends this program as Ctrl-C does,
    through every `finally`, context manager and exit handler: Python's default ends it at once,
    orphaning the servers it started and leaving its temporary folders behind."""

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)


def owner_tags() -> dict[str, str]:
    """Which process owns a piece of work: host, pid and the pid's start time (pids are reused)."""
    import socket

    import psutil

    me = psutil.Process()
    return {"owner_host": socket.gethostname(), "owner_pid": str(me.pid), "owner_started": f"{me.create_time():.3f}"}


def owner_alive(tags: dict[str, str]) -> bool:
    """False only when the owner named by `owner_tags` is provably gone: on this host and no longer
    running. Work owned by another host (or without owner tags) is assumed alive."""
    import socket

    import psutil

    if tags.get("owner_host") != socket.gethostname() or not tags.get("owner_pid"):
        return True
    try:
        proc = psutil.Process(int(tags["owner_pid"]))
        return f"{proc.create_time():.3f}" == tags.get("owner_started") and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return False


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something already listens on `host:port` (a server started here would fail to bind it,
    or a health check would find the other one)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a closed one's TIME_WAIT is free
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False
