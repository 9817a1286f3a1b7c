"""`incseg serve`: a local Prefect server and the watcher on its schedule, as a user starts it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from incseg import processes
from incseg.config import Workspace
from incseg.datastore import add_data, init_workspace
from incseg.registry import ModelRegistry

from helpers import free_port, tiny_params

pytestmark = [pytest.mark.slow, pytest.mark.server]


def test_serve_runs_the_watcher_on_its_schedule(tmp_path, stream_dir):
    """`incseg serve` starts a local Prefect server and the schedule picks up a new batch."""
    import signal
    import time

    root = tmp_path / "ws"
    init_workspace(root)
    params = tiny_params(train={"bootstrap_max_steps": 12, "bootstrap_min_steps": 12},
                         schedule={"interval_seconds": 3})
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump()))
    ws = Workspace(root)
    add_data(ws, stream_dir / "holdout", holdout=True, classes=stream_dir / "classes.yaml")
    add_data(ws, stream_dir / "registry" / "batch-00")
    # the server's scheduler looks for new schedules every 60 s by default, the runner polls every 10 s
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "incseg", "-C", str(root), "serve", "--port", str(free_port())]
    with (tmp_path / "serve.log").open("w") as log, \
            processes.running(command, grace=20, sig=signal.SIGINT, env=env, stdout=log, stderr=subprocess.STDOUT) as proc:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not ModelRegistry(ws).ledger():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(1)
        assert list(ModelRegistry(ws).ledger().values()) == ["promoted"]
