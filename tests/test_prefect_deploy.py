"""prefect.yaml for real: `prefect deploy` to a Prefect server, a process worker runs the watcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import fault_params, seed_store, set_params
from incseg import processes
from incseg.registry import ModelRegistry

PROJECT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.cost(120)]


def test_prefect_yaml_deploys_the_watcher_to_a_process_work_pool(tmp_path, stream_dir, prefect_api):
    """prefect.yaml → `prefect deploy` on the session's Prefect server (a real uvicorn server on a
    loopback port); a process worker picks up the run and runs the watcher."""
    from prefect.settings import PREFECT_API_URL

    from incseg.datastore import add_data, init_workspace
    from incseg.workspace import Workspace

    root = tmp_path / "ws"
    seed_store(init_workspace(root))
    ws = set_params(Workspace(root), fault_params(bootstrap_max_steps=12, bootstrap_min_steps=12))
    add_data(ws, stream_dir / "holdout", holdout=True, classes=stream_dir / "classes.yaml")
    add_data(ws, stream_dir / "registry" / "batch-00")

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": PREFECT_API_URL.value(),
           "INCSEG_CODE_DIR": str(PROJECT), "INCSEG_WORKSPACE": str(root),
           "PREFECT_WORKER_QUERY_SECONDS": "2"}  # the worker polls every 15 s by default
    prefect = [sys.executable, "-m", "prefect"]

    def cli(*args: str) -> str:
        proc = subprocess.run(prefect + list(args), env=env, cwd=PROJECT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    cli("work-pool", "create", "incseg", "--type", "process")
    cli("--no-prompt", "deploy", "--all")
    with (tmp_path / "worker.log").open("w") as worker_log, \
            processes.running(prefect + ["worker", "start", "--pool", "incseg"], grace=15, env=env, cwd=tmp_path,
                              stdout=worker_log, stderr=subprocess.STDOUT):
        out = cli("deployment", "run", "watch-registry/watch", "--watch", "--watch-timeout", "300")
    assert "Completed" in out, out + (tmp_path / "worker.log").read_text()[-3000:]
    assert list(ModelRegistry(ws).ledger().values()) == ["promoted"]
