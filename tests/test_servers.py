"""Shared servers for real: an `mlflow server` over HTTP, a Prefect server with a process work pool."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import fault_params, free_port, make_workspace, set_params, wait_http
from incseg import processes
from incseg.config import Params
from incseg.registry import ModelRegistry

PROJECT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.server]


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
    ws = set_params(make_workspace(tmp_path / "ws"), Params.model_validate(params))
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


def test_prefect_yaml_deploys_the_watcher_to_a_process_work_pool(tmp_path, stream_dir):
    """prefect.yaml → `prefect deploy` on a local `prefect server`; a process worker runs the watcher."""
    from incseg.config import Workspace
    from incseg.datastore import add_data, init_workspace

    root = tmp_path / "ws"
    init_workspace(root)
    ws = set_params(Workspace(root), fault_params(bootstrap_max_steps=12, bootstrap_min_steps=12))
    add_data(ws, stream_dir / "holdout", holdout=True, classes=stream_dir / "classes.yaml")
    add_data(ws, stream_dir / "registry" / "batch-00")

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": url,
           "INCSEG_CODE_DIR": str(PROJECT), "INCSEG_WORKSPACE": str(root),
           "PREFECT_WORKER_QUERY_SECONDS": "2"}  # the worker polls every 15 s by default
    prefect = [sys.executable, "-m", "prefect"]
    with ExitStack() as stack:  # unwinds in reverse: the worker stops before the server
        server_log = stack.enter_context((tmp_path / "server.log").open("w"))
        worker_log = stack.enter_context((tmp_path / "worker.log").open("w"))
        server = stack.enter_context(processes.running(
            prefect + ["server", "start", "--host", "127.0.0.1", "--port", str(port)],
            grace=15, env=env, stdout=server_log, stderr=subprocess.STDOUT))
        wait_http(f"{url}/health", server, timeout=180)

        def cli(*args: str) -> str:
            proc = subprocess.run(prefect + list(args), env=env, cwd=PROJECT, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            return proc.stdout

        cli("work-pool", "create", "incseg", "--type", "process")
        cli("--no-prompt", "deploy", "--all")
        stack.enter_context(processes.running(prefect + ["worker", "start", "--pool", "incseg"], grace=15,
                                              env=env, cwd=tmp_path, stdout=worker_log, stderr=subprocess.STDOUT))
        out = cli("deployment", "run", "watch-registry/watch", "--watch", "--watch-timeout", "300")
        assert "Completed" in out, out
        assert list(ModelRegistry(ws).ledger().values()) == ["promoted"]
