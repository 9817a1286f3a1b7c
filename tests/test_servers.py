"""Servers for real: the update flows against an `mlflow server` over HTTP; Prefect's own API
database created once when commands start together on a machine without one."""

from __future__ import annotations

import os
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


def test_commands_started_together_on_a_new_machine_share_one_prefect_database(tmp_path):
    """A Prefect server migrates its database as it starts, with no lock between processes: two
    commands started together on a machine without one raced on creating it and one failed. Both
    processes here start with the same empty PREFECT_HOME; `start_ephemeral_api` lets one create it
    under a file lock and the other find it made; both get a healthy API of their own."""
    home = tmp_path / "prefect"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "INCSEG_TEST_PREFECT_API")}
    env["PREFECT_HOME"] = str(home)
    code = ("from flows.watch import start_ephemeral_api; start_ephemeral_api()\n"
            "from prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as client:\n"
            "    assert client.api_healthcheck() is None, 'unhealthy'\n"
            "    print('flows', len(client.read_flows()))\n")
    logs = [tmp_path / f"{i}.log" for i in range(2)]
    with logs[0].open("w") as a, logs[1].open("w") as b, \
            processes.running([sys.executable, "-c", code], env=env, stdout=a, stderr=subprocess.STDOUT) as first, \
            processes.running([sys.executable, "-c", code], env=env, stdout=b, stderr=subprocess.STDOUT) as second:
        codes = [first.wait(timeout=300), second.wait(timeout=300)]
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs
    assert all("flows 0" in out for out in outputs) and (home / "prefect.db").stat().st_size > 0


def test_an_api_url_in_the_prefect_profile_is_the_server_used(tmp_path):
    """`prefect config set PREFECT_API_URL=...` writes the active profile, not the environment: it names
    the shared server as surely as the variable does. `serve` uses it (no local server started) and no
    ephemeral API database is locked or made (before, only the variable counted)."""
    home = tmp_path / "prefect"
    home.mkdir()
    (home / "profiles.toml").write_text('active = "shared"\n\n[profiles.shared]\n'
                                        'PREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "INCSEG_TEST_PREFECT_API")}
    env["PREFECT_HOME"] = str(home)
    code = ("from flows.watch import api_database, prefect_api, start_ephemeral_api\n"
            "assert api_database() is None, api_database()\n"
            "start_ephemeral_api()\n"
            "with prefect_api(port=1) as url:\n"  # a server started on port 1 would fail
            "    print('api', url)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "api http://127.0.0.1:9/api" in out.stdout
    assert sorted(p.name for p in home.iterdir()) == ["profiles.toml"]  # no database, no lock file
