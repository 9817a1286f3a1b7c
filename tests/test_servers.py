"""Shared servers for real: an `mlflow server` over HTTP, a Prefect server with a process work pool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import fault_params, free_port, make_workspace, set_params, wait_http
from incseg.config import Params
from incseg.registry import ModelRegistry

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` with a SQLite backend and a served artifact root, on a loopback port."""
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    log = (tmp_path / "mlflow-server.log").open("w")  # a pipe nobody reads would fill and block the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc)
        yield url, store
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


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
    ws = set_params(Workspace(root), fault_params(bootstrap_epochs=2))
    add_data(ws, stream_dir / "holdout", holdout=True, classes=stream_dir / "classes.yaml")
    add_data(ws, stream_dir / "registry" / "batch-00")

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": url,
           "INCSEG_CODE_DIR": str(PROJECT), "INCSEG_WORKSPACE": str(root),
           "PREFECT_WORKER_QUERY_SECONDS": "2"}  # the worker polls every 15 s by default
    prefect = [sys.executable, "-m", "prefect"]
    logs = (tmp_path / "server.log").open("w"), (tmp_path / "worker.log").open("w")
    server = subprocess.Popen(prefect + ["server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        wait_http(f"{url}/health", server, timeout=180)

        def cli(*args: str) -> str:
            proc = subprocess.run(prefect + list(args), env=env, cwd=PROJECT, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            return proc.stdout

        cli("work-pool", "create", "incseg", "--type", "process")
        cli("--no-prompt", "deploy", "--all")
        worker = subprocess.Popen(prefect + ["worker", "start", "--pool", "incseg"], env=env, cwd=tmp_path,
                                  stdout=logs[1], stderr=subprocess.STDOUT, start_new_session=True)
        out = cli("deployment", "run", "watch-registry/watch", "--watch", "--watch-timeout", "300")
        assert "Completed" in out, out
        assert list(ModelRegistry(ws).ledger().values()) == ["promoted"]
    finally:
        for proc in (worker, server):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
        for log in logs:
            log.close()
