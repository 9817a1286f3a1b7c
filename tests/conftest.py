"""Shared fixtures: tiny params, a tiny synthetic stream, isolated Prefect/MLflow state."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Before any Prefect / GX import: never touch the user's ~/.prefect, no analytics.
_STATE = Path(tempfile.mkdtemp(prefix="incseg-tests-"))
# Every temporary file of this process and the processes it starts goes below the state folder,
# removed at the end (at exit, below): what a library leaves in the temp folder (a stopped Prefect
# runner's `runner_storage/`, Dask's scratch, torch's caches) does not pile up in /tmp run after run.
# pytest's own tmp_path folders stay where pytest keeps them (its last three runs, for a look after a failure).
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
os.environ["TMPDIR"] = str(_STATE / "tmp")
(_STATE / "tmp").mkdir()
tempfile.tempdir = None  # gettempdir() reads TMPDIR again
# removed at exit, after every exit handler registered later (they run first): prefect_test_harness
# removes its own temporary folder in one
atexit.register(shutil.rmtree, _STATE, ignore_errors=True)
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
os.environ["GX_ANALYTICS_ENABLED"] = "false"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"  # no test reads run logs back from an API: not shipped
os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # `mlflow server` would start ~8 idle job consumers
os.environ.pop("MLFLOW_TRACKING_URI", None)
# never a developer's own Prefect server: only the run's shared test server (see pytest_configure)
if os.environ.get("PREFECT_API_URL") != os.environ.get("INCSEG_TEST_PREFECT_API"):
    os.environ.pop("PREFECT_API_URL", None)
# every process the tests start inherits this: found at the end even if its parent died (orphans)
os.environ["INCSEG_TEST_SESSION"] = _STATE.name
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs several workers on few cores: one torch thread each
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402

from helpers import make_workspace, tiny_params  # noqa: E402
from incseg.data.synthetic import synthesize  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def prefect_logs_to_the_session_stderr():
    """Prefect binds its console log handler to whatever `sys.stderr` is when it first configures
    logging (on importing `prefect.main`). First configured inside a `CliRunner.invoke`, the handler
    would keep that invocation's stream, closed after it, and every later flow run of the worker would
    print a "Logging error" traceback into the next invocation's output (test_cli, then a one-line
    error check of test_untrusted_inputs, in one process). Configured here, before any invocation."""
    import prefect.main  # noqa: F401


@pytest.fixture(scope="session")
def stream_dir(tmp_path_factory) -> Path:
    """The tiny synthetic stream, written once per session (read-only for tests)."""
    out = tmp_path_factory.mktemp("stream")
    synthesize(out, tiny_params().synth)
    return out


@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    """A tiny U-Net trained on the base batch, with its workspace (shared, do not mutate)."""
    from incseg.pipeline import Batch, train_base

    ws = make_workspace(tmp_path_factory.mktemp("base-ws"))
    batch = Batch.load(ws.registry_dir / "batch-00")
    model, result = train_base(ws, batch, progress=False)
    return ws, model, result


def pytest_collection_modifyitems(config, items):
    """Longest first: modules by their measured `cost` marker, then the other slow ones, then the
    rest (a stable sort: each module's order is kept). Under pytest-xdist (`make test`: `--dist
    loadscope`, modules handed out in this order) the long ones overlap instead of ending the run."""
    def order(item) -> tuple[float, bool]:
        cost = item.get_closest_marker("cost")
        return -(cost.args[0] if cost else 0), item.get_closest_marker("slow") is None

    items.sort(key=order)


def pytest_sessionfinish(session, exitstatus):
    """No process outlives the suite: a process the session started (a descendant, or an orphan
    carrying the session's INCSEG_TEST_SESSION marker) still alive at the end fails the run, named,
    and is killed. (multiprocessing's resource tracker ends with its parent.)"""
    import time

    import psutil

    if session.config.pluginmanager.hasplugin("dsession"):
        return  # the xdist controller starts only its workers; each worker checks what it started
    me = psutil.Process()

    def ours(proc: psutil.Process) -> bool:  # a descendant, or an orphan that inherited the marker
        try:
            return proc.environ().get("INCSEG_TEST_SESSION") == os.environ["INCSEG_TEST_SESSION"]
        except psutil.Error:
            return False

    def leftovers() -> list[psutil.Process]:
        alive = []
        candidates = {p.pid: p for p in me.children(recursive=True)}
        candidates.update({p.pid: p for p in psutil.process_iter() if p.pid != me.pid and ours(p)})
        for child in candidates.values():
            try:
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE and \
                        "resource_tracker" not in " ".join(child.cmdline()):
                    alive.append(child)
            except psutil.Error:
                pass
        return alive

    deadline = time.monotonic() + 10  # a process stopped by a finaliser may take a moment to go
    while (left := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not left:
        return
    names = []
    for child in left:
        try:
            names.append(f"pid {child.pid}: {' '.join(child.cmdline())[:200]}")
            child.kill()
        except psutil.Error:
            pass
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = "processes left running by the tests (now killed):\n  " + "\n  ".join(names)
    if reporter is not None:
        reporter.write_line(message, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


_SERVER = pytest.StashKey()


def pytest_configure(config):
    """Under pytest-xdist one Prefect API serves the whole run: the controller starts it (Prefect's
    own test-harness server process) and the workers, and every process they start, inherit
    PREFECT_API_URL. One cold start instead of one per worker and one per CLI subprocess.
    The server starts while the workers import and collect (both take ~20 s of one core); each
    worker waits for it after collection (`pytest_collection_finish`). PREFECT_API_URL is set only
    once the server process exists, so the server itself never inherits it.
    The unit layer (`-m "not slow"`) needs none: every test that talks to Prefect is marked slow
    (one that is not would still get the `prefect_api` fixture's harness)."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    if (config.option.markexpr or "").replace(" ", "") == "notslow":
        return
    import threading
    import time

    from prefect.server.api.server import SubprocessASGIServer

    from helpers import free_port

    server = SubprocessASGIServer(port=free_port())
    errors: list[BaseException] = []

    def start() -> None:
        try:
            server.start(timeout=180)
        except BaseException as err:  # noqa: BLE001 - reported by the workers' wait and at the end
            errors.append(err)

    starter = threading.Thread(target=start, name="prefect-test-server", daemon=True)
    starter.start()
    while server.server_process is None and starter.is_alive():
        time.sleep(0.01)
    config.stash[_SERVER] = (server, starter, errors)
    os.environ["PREFECT_API_URL"] = os.environ["INCSEG_TEST_PREFECT_API"] = server.api_url
    # its database, migrated and still empty, for a test that gives a process a Prefect home of its
    # own (helpers.prefect_home): a copy instead of running every migration again (~9 s); made by
    # the first worker that finds the server up
    os.environ["INCSEG_TEST_PREFECT_DB"] = str(_STATE / "prefect-template.db")


def pytest_collection_finish(session):
    """A worker waits here for the run's shared Prefect server (started by the controller while the
    workers collected) and the first one to see it up copies its empty database as the template."""
    url = os.environ.get("INCSEG_TEST_PREFECT_API")
    if not url or not hasattr(session.config, "workerinput"):
        return
    import sqlite3

    from filelock import FileLock

    from helpers import wait_http

    wait_http(f"{url}/health", timeout=180)
    template = Path(os.environ["INCSEG_TEST_PREFECT_DB"])  # beside the server's home (the controller's state)
    with FileLock(f"{template}.lock"):
        if not template.exists():
            with sqlite3.connect(template.parent / "prefect" / "prefect.db") as src, sqlite3.connect(template) as dst:
                src.backup(dst)


def pytest_unconfigure(config):
    """Stop the run's Prefect server. This process's state folder (Prefect home, the template database,
    the temporary files: ~20 MB per process per run) goes at exit (above)."""
    started = config.stash.get(_SERVER, None)
    if started is not None:
        server, starter, errors = started
        starter.join(timeout=180)
        server.stop()  # SIGTERM, SIGKILL after 5 s
        if errors:
            raise errors[0]


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's real API: the run's shared server (xdist), or the ephemeral test harness started
    once for this session (a cold start is slow)."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
