"""The watcher: run the update for every new data version of the registry, once each."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

from flows import STARTUP_TIMEOUT_S, STARTUP_TIMEOUT_SET_BY_USER
from flows.events import server_url
from flows.review import champion_version
from flows.update import UpdateResult, bootstrap, incremental_update
from incseg import datastore, ledger, processes
from incseg.data.layout import BatchInfo, DataError
from incseg.registry import ModelRegistry
from incseg.workspace import Workspace
from tasks.update import registry_task


def lock_name(ws: Workspace) -> str:
    """One lock per registered model: its name in its tracking store (two workspaces with their own
    stores share a Prefect server without waiting on each other)."""
    import hashlib

    store = hashlib.sha256(ws.tracking_uri.encode()).hexdigest()[:8]
    return f"incseg-update-{ws.params.model.name}-{store}"


@contextmanager
def update_lock(ws: Workspace):
    """Never two updates of one registered model at once.

    With a Prefect server (PREFECT_API_URL set): a strict global concurrency limit of 1, shared by
    every process and machine on that server; the server revokes the lease of a crashed holder.
    With the ephemeral API there is no server to do that, so the lock is an OS file lock in the
    workspace, which the kernel releases when its holder dies.
    """
    from prefect.settings import PREFECT_API_URL

    name = lock_name(ws)
    if not PREFECT_API_URL.value():
        from filelock import FileLock

        ws.runs_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(ws.runs_dir / f"{name}.lock"):
            yield
        return
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    with concurrency(name, occupy=1, strict=True):
        yield


@task(cache_policy=NO_CACHE)
def pull_registry(ws: Workspace) -> str | None:
    """Data pushed from another machine: `git pull --ff-only` + `dvc pull` (no retries: a conflict
    stays a conflict, and the next tick or event tries again)."""
    return datastore.pull_registry(ws)


@registry_task
def find_pending(ws: Workspace) -> list[ledger.PendingBatch]:
    return ledger.pending(ws)


@registry_task
def still_pending(ws: Workspace, item: ledger.PendingBatch) -> bool:
    return ledger.is_pending(ws, item)


@registry_task
def has_champion(ws: Workspace) -> bool:
    return ModelRegistry(ws).champion() is not None


@flow(name="watch-registry")
def watch_registry(workspace: str = ".", batch_id: str | None = None, event_time: str | None = None
                   ) -> list[UpdateResult]:
    """Read the registry's data version from DVC, then update on each unprocessed batch, oldest first.
    Run by an `incseg.batch.registered` event: `batch_id` (only that batch) and the event's time,
    recorded on the update's run as latency."""
    started = time.time()
    log = get_run_logger()
    ws = Workspace(workspace)
    if ws.params.data.pull:
        pulled = pull_registry(ws)
        if pulled:
            log.info("registry pulled from %s", pulled)
    for name in ledger.untracked(ws):
        log.warning("batch %s is not tracked by DVC, so not registered (bring batches in with `incseg data add`); "
                    "ignored", name)
    todo = [item for item in find_pending(ws) if batch_id is None or item.batch_id == batch_id]
    if not todo:
        log.info("no new data version in %s%s: nothing to do", ws.registry_dir,
                 f" for batch {batch_id}" if batch_id else "")
        return []
    results = []
    for item in todo:
        gap = waiting_for_holdout(ws, item.batch_id)
        if gap:  # pending still: taken up by the first watch after the holdout is replaced; later batches go on
            log.warning("batch %s waits (later batches go on): %s", item.batch_id, gap)
            champion = champion_version(ws)
            results.append(UpdateResult(item.batch_id, WAITING, gap, None, champion, champion))
            continue
        with update_lock(ws):
            if not still_pending(ws, item):
                log.info("batch %s was processed by another run meanwhile", item.batch_id)
                continue
            run = incremental_update if has_champion(ws) else bootstrap
            results.append(run(item.batch_id, str(ws.root)))
        if event_time and results[-1].run_id:
            record_latency(ws, results[-1].run_id, event_time, started)
    return results


WAITING = "waiting"  # a batch the holdout cannot judge yet (it labels none of a class the batch brings)


@task(cache_policy=NO_CACHE)
def waiting_for_holdout(ws: Workspace, batch_id: str) -> str | None:
    """Why the gate cannot judge the batch yet (`datastore.holdout_gap`); None when it can, or when the
    batch's own description is unreadable (its update says so)."""
    try:
        classes = BatchInfo.read(ws.registry_dir / batch_id).classes
    except DataError:
        return None
    return datastore.holdout_gap(ws, batch_id, classes)


@registry_task
def record_latency(ws: Workspace, run_id: str, event_time: str, started: float) -> dict[str, float]:
    return ModelRegistry(ws).record_latency(run_id, event_time, started)


def api_database() -> Path | None:
    """The SQLite file a Prefect server started here (the ephemeral API's, `prefect server start`'s)
    keeps its state in; None when PREFECT_API_URL (the environment's or the Prefect profile's) names a
    server, or the database is not SQLite."""
    from prefect.settings import get_current_settings

    if server_url():
        return None
    url = get_current_settings().server.database.connection_url.get_secret_value()
    prefix = url.split(":///", 1)
    return Path(prefix[1]) if url.startswith("sqlite") and len(prefix) == 2 and prefix[1] != ":memory:" else None


@contextmanager
def api_database_lock(timeout: float = 600):
    """Yields True when the API database does not exist yet, holding a file lock beside it until the
    block ends; False when it exists (or is not a local SQLite file), at once. A Prefect server
    migrates its database as it starts, with no lock between processes: two commands started together
    on a machine without one raced on creating it (`index ... already exists`) and one failed. Whoever
    starts a server under this lock lets the others find the database made."""
    from filelock import FileLock

    db = api_database()
    if db is None:
        yield False
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.incseg-lock", timeout=timeout):
        yield not db.exists()


def start_ephemeral_api() -> None:
    """Where this process will use Prefect's ephemeral API: its server is `ephemeral_api_server`'s, and
    where its database is new it is started now under `api_database_lock` (kept for the process's flows,
    as Prefect would have started it); otherwise Prefect starts it on first use."""
    if server_url():  # a server of its own
        return
    server = ephemeral_api_server()
    with api_database_lock() as creating:
        if creating:
            server.start(timeout=startup_timeout())


def ephemeral_api_server():
    """Prefect's ephemeral API server of this process (Prefect's one instance for it, made here before
    Prefect makes its own), whose uvicorn process runs in a session of its own (`processes.start`).
    Started by Prefect, it shared the incseg process's group, so a Ctrl-C in the terminal stopped it at
    once, and the interrupted flow then spent minutes failing to report its crash to it (an error line
    every 7 s; 3 minutes seen). Apart, it outlives the flow's last reports; Prefect's exit handler stops
    it, and the kernel stops it if incseg is killed."""
    from types import SimpleNamespace

    import prefect.server.api.server as api

    class OwnSession(api.SubprocessASGIServer):
        def _run_uvicorn_command(self):
            real = api.subprocess  # Prefect's command, started through `processes.start` instead of Popen
            api.subprocess = SimpleNamespace(Popen=lambda args, **popen: processes.start(list(args), **popen))
            try:
                return super()._run_uvicorn_command()
            finally:
                api.subprocess = real

    return OwnSession()


def startup_timeout() -> float:
    """Seconds to wait for the ephemeral API this process starts: the user's
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS where they set it, else at least `STARTUP_TIMEOUT_S`
    (Prefect's own 20 s stands where it was imported before `flows` set the variable)."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    setting = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    return setting if STARTUP_TIMEOUT_SET_BY_USER else max(STARTUP_TIMEOUT_S, setting)


@contextmanager
def prefect_api(port: int = 4200):
    """The configured Prefect API (PREFECT_API_URL, from the environment or the active Prefect profile),
    or a local `prefect server` started for the duration: the ephemeral API has no scheduler, so
    schedules need a real server process."""
    configured = server_url()
    if configured:
        yield configured
        return
    url = f"http://127.0.0.1:{port}/api"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    # in our process group: whatever ends `incseg serve` (Ctrl-C, a group kill) ends its server too
    with ExitStack() as stack:
        with api_database_lock():  # held until the server is up: it migrates its database as it starts
            server = stack.enter_context(processes.running(command, grace=20, own_group=False,
                                                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
            _wait_healthy(url, server)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float = STARTUP_TIMEOUT_S) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"`prefect server start` exited with code {server.returncode} (port in use?)")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"Prefect server at {url} did not become healthy within {timeout:.0f} s")


def serve_watcher(ws: Workspace) -> None:
    """Serve the watcher twice: on the schedule from params (interval or cron; an overlapping tick is
    cancelled), and on every `incseg.batch.registered` event of this model (that batch, at once).
    Both go through the update lock and the ledger: one version per (batch, data hash)."""
    from prefect import serve
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from flows.events import EVENT, resource_prefix

    s, name = ws.params.schedule, ws.params.model.name
    scheduled = watch_registry.to_deployment(
        name=f"watch-{name}", interval=None if s.cron else s.interval_seconds, cron=s.cron,
        parameters={"workspace": str(ws.root)},
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
    )
    on_event = watch_registry.to_deployment(
        name=f"on-data-{name}", parameters={"workspace": str(ws.root)},
        triggers=[DeploymentEventTrigger(
            name=f"incseg-{name}-new-data", expect={EVENT}, match={"prefect.resource.id": f"{resource_prefix(ws)}.*"},
            parameters={"workspace": str(ws.root), "batch_id": "{{ event.payload.batch_id }}",
                        "event_time": "{{ event.payload.registered_at }}"},
        )],
    )
    # the runner looks for runs to start every 10 s by default: most of an event's latency
    poll = None if os.environ.get("PREFECT_RUNNER_POLL_FREQUENCY") else 2
    serve(scheduled, on_event, query_seconds=poll)
