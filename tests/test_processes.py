"""`incseg.processes`: children end with their parent, however the parent ends."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from incseg import processes

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")

PARENT = textwrap.dedent("""
    import sys, time
    from incseg import processes
    child = processes.start([sys.executable, "-c", "import time; time.sleep(120)"], own_group={own_group})
    print(child.pid, flush=True)
    time.sleep(120)
""")


def wait_for_cmdline(proc: psutil.Process, last: str, timeout: float = 30.0) -> bool:
    """Whether `proc`'s command line ends with `last` within `timeout`: `start` returns once the wrapper
    runs, and the wrapper exec's the command a moment later (mid-exec the command line reads empty)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.cmdline()[-1:] == [last]:
            return True
        time.sleep(0.05)
    return False


@linux_only
@pytest.mark.parametrize("own_group", [True, False])
def test_a_child_is_terminated_when_its_parent_is_killed(own_group):
    """SIGKILL to the parent alone (no finally, no exit handler runs): the kernel sends the child
    SIGTERM. In its own group, nothing else would ever reach it; it used to run on as an orphan."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(own_group=own_group)], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    child = None
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        assert child.ppid() == parent.pid
        assert wait_for_cmdline(child, "import time; time.sleep(120)")  # the wrapper has become the command
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        child.wait(timeout=10)  # psutil.TimeoutExpired if it survived
        assert not child.is_running()
    finally:
        if child is not None and child.is_running():
            child.kill()
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()


def test_a_missing_program_fails_in_the_caller_naming_it():
    with pytest.raises(FileNotFoundError, match="no-such-program-incseg"):
        processes.start(["no-such-program-incseg", "--help"])


def test_running_returns_the_commands_exit_code_and_stops_it_on_leaving():
    with processes.running([sys.executable, "-c", "import sys; sys.exit(3)"]) as proc:
        assert proc.wait(timeout=30) == 3
    with processes.running([sys.executable, "-c", "import time; time.sleep(120)"], grace=5) as proc:
        pid = proc.pid
    assert proc.returncode == -signal.SIGTERM and not psutil.pid_exists(pid)


def test_after_exit_on_sigterm_a_kill_runs_the_cleanup_of_a_program(tmp_path):
    """Python's default SIGTERM ends a program at once: a temporary folder it holds stays on disk
    (the benchmarks' streams did). After `exit_on_sigterm` the folder is removed and the exit code
    says SIGTERM, as a shell reports it."""
    code = textwrap.dedent(f"""
        import sys, tempfile, time
        from incseg.processes import exit_on_sigterm
        if sys.argv[1] == "handled":
            exit_on_sigterm()
        with tempfile.TemporaryDirectory(dir={str(tmp_path)!r}) as tmp:
            print(tmp, flush=True)
            time.sleep(120)
    """)
    for mode, code_expected, kept in (("default", -signal.SIGTERM, True), ("handled", 128 + signal.SIGTERM, False)):
        proc = subprocess.Popen([sys.executable, "-c", code, mode], stdout=subprocess.PIPE, text=True)
        try:
            folder = proc.stdout.readline().strip()
            assert folder.startswith(str(tmp_path))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == code_expected
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        assert Path(folder).is_dir() == kept, mode
