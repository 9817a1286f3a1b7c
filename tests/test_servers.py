"""A shared tracking server for real: the update flows against an `mlflow server` over HTTP."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow import MlflowClient

from helpers import fault_params, free_port, make_workspace, wait_http
from incseg import processes
from incseg.config import Params
from incseg.registry import ModelRegistry

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.cost(40)]


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` with a SQLite backend and a served artifact root, on a loopback port."""
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination",
               str(store / "artifacts")]
    with (tmp_path / "mlflow-server.log").open("w") as log, \
            processes.running(command, stdout=log, stderr=subprocess.STDOUT) as proc:  # a log file: an unread pipe blocks
        wait_http(f"{url}/health", proc)
        yield url, store


def test_update_runs_against_an_mlflow_tracking_server(tmp_path, mlflow_server, prefect_api):
    from flows.update import bootstrap, incremental_update

    url, store = mlflow_server
    params = fault_params().model_dump()
    params["mlflow"]["tracking_uri"] = url  # configuration alone moves the store
    ws = make_workspace(tmp_path / "ws", Params.model_validate(params))
    boot = bootstrap("batch-00", str(ws.root))
    upd = incremental_update("batch-01", str(ws.root))  # loads the champion back over HTTP

    assert boot.status == "promoted" and upd.candidate_version == "2"
    client = MlflowClient(url)
    name = params["model"]["name"]
    assert sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'")) == ["1", "2"]
    champion = client.get_model_version_by_alias(name, "champion").version
    assert str(champion) == upd.champion_after
    assert client.get_run(upd.run_id).data.tags["outcome"] == upd.status
    assert not (ws.root / "mlflow.db").exists() and not (ws.root / "mlartifacts").exists()
    served = {p.name for p in (store / "artifacts").rglob("*") if p.is_file()}
    assert {"model.pt", "decision.json", "report.json"} <= served
    assert ModelRegistry(ws).uri == url
