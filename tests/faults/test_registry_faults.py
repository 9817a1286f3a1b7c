"""The tracking store fails: retries wait out a locked store; an unreachable one fails naming the URI."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import fault_params, set_params
from incseg.datastore import add_data
from incseg.registry import ModelRegistry

pytestmark = [pytest.mark.slow, pytest.mark.cost(200)]

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns


def test_unreachable_server_fails_cleanly_naming_the_uri(champion_ws, tmp_path):
    from prefect.settings import PREFECT_API_URL  # the session's API: no ephemeral start in the CLI

    uri = f"http://127.0.0.1:{closed_port()}"
    proc = subprocess.run([sys.executable, "-m", "incseg", "-C", str(champion_ws.root), "update", "batch-00"],
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PREFECT_API_URL": PREFECT_API_URL.value()},
                          capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert uri in proc.stderr and "Traceback" not in proc.stderr
    assert ModelRegistry(champion_ws).aliases() == {"champion": "1"}


def test_locked_sqlite_store_is_waited_out_by_the_retry(champion_ws, stream_dir):
    """Another writer holds the SQLite file past MLflow's 20 s busy timeout: the first attempt of the
    first registry task fails, its retry gets through once the lock is gone, the update completes."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.update import incremental_update

    ws = set_params(champion_ws, fault_params())
    add_data(ws, stream_dir / "registry" / "batch-03")
    reg = ModelRegistry(ws)
    n = len(reg.versions())
    lock = sqlite3.connect(ws.root / "mlflow.db", timeout=1, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(25, lock.rollback)
    release.start()
    try:
        state = incremental_update("batch-03", str(ws.root), return_state=True)
    finally:
        release.join()
        lock.close()
    result = state.result()
    assert result.status in ("promoted", "rejected") and len(reg.versions()) == n + 1
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    first = min(runs, key=lambda r: r.start_time or r.expected_start_time)  # the flow's first registry task
    assert first.name.startswith("close_orphaned_runs"), [r.name for r in runs]
    assert first.run_count >= 2  # failed on the lock, then retried


def test_racing_promotions_leave_a_consistent_alias(champion_ws):
    """Two `incseg promote` processes race for two new versions: both succeed, `champion` ends on
    one of them, and that version's tags tell the same story as the alias."""
    from mlflow import MlflowClient

    reg = ModelRegistry(champion_ws)
    start = reg.require_champion()
    targets = []
    for _ in range(2):  # two more servable versions of the same model, made independently of other tests
        mv = reg.client.create_model_version(reg.name, start.source, start.run_id,
                                             tags={**start.tags, "status": "promoted", "reason": "race test"})
        targets.append(str(mv.version))
    procs = [subprocess.Popen([sys.executable, "-m", "incseg", "-C", str(champion_ws.root), "promote", v,
                               "--reason", f"race to {v}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "INCSEG_USER": f"racer-{v}"})
             for v in targets]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    fresh = MlflowClient(reg.uri, reg.uri)  # read back through a new client, not the one that wrote
    winner = fresh.get_model_version_by_alias(reg.name, "champion")
    loser = targets[1 - targets.index(str(winner.version))]
    assert str(winner.version) in targets
    assert winner.tags["status"] == "promoted"
    assert winner.tags["champion_set_by"] == f"racer-{winner.version}"
    assert winner.tags["champion_set_reason"] == f"race to {winner.version}"
    # the winner replaced either the old champion (ran first) or the loser (ran second)
    assert winner.tags["previous_champion"] in (str(start.version), loser)
    assert fresh.get_registered_model(reg.name).aliases == {"champion": winner.version}


def test_unwritable_model_store_registers_nothing(champion_ws, stream_dir):
    """The model cannot be logged: the run fails, no version appears, no alias moves."""
    from flows.update import incremental_update

    ws = set_params(champion_ws, fault_params())
    add_data(ws, stream_dir / "registry" / "batch-02", "batch-05")
    reg = ModelRegistry(ws)
    before, n = reg.aliases(), len(reg.versions())
    exp = reg.client.get_experiment_by_name(ws.params.mlflow.experiment)
    from urllib.parse import urlparse

    models_dir = Path(urlparse(exp.artifact_location).path) / "models"  # where MLflow 3 logs models
    assert models_dir.is_dir()
    parked = models_dir.with_name("models.parked")
    models_dir.rename(parked)
    models_dir.write_text("not a folder: logged models cannot be written here")
    try:
        with pytest.raises(Exception):
            incremental_update("batch-05", str(ws.root))
    finally:
        models_dir.unlink()
        parked.rename(models_dir)
    assert reg.aliases() == before and len(reg.versions()) == n
    failed = [r for r in reg.client.search_runs([exp.experiment_id]) if r.data.tags.get("batch_id") == "batch-05"]
    assert failed and all(r.info.status == "FAILED" for r in failed)

