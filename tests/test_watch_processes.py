"""Two `incseg watch` CLI processes at once on the default (file-lock) path."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack

import pytest
import yaml

from incseg import processes
from incseg.datastore import add_data, init_workspace
from incseg.registry import ModelRegistry
from incseg.workspace import Workspace

from helpers import fault_params, prefect_home, seed_store

pytestmark = [pytest.mark.slow, pytest.mark.cost(150)]


def test_two_watch_processes_on_the_file_lock_process_each_batch_once(tmp_path, stream_dir):
    """Two `incseg watch` CLI processes started together, each on its own ephemeral Prefect API, so
    the update lock is the OS file lock: every pending batch gets exactly one run and one version."""
    root = tmp_path / "ws"
    seed_store(init_workspace(root))
    (root / "params.yaml").write_text(yaml.safe_dump(fault_params().model_dump()))
    ws = Workspace(root)
    add_data(ws, stream_dir / "holdout", holdout=True, classes=stream_dir / "classes.yaml")
    for batch in ("batch-00", "batch-01"):
        add_data(ws, stream_dir / "registry" / batch)
    base_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    with ExitStack() as stack:
        procs = []
        for i in range(2):
            log = stack.enter_context((tmp_path / f"watch-{i}.log").open("w"))
            env = {**base_env, "PREFECT_HOME": str(prefect_home(tmp_path / f"prefect-{i}"))}  # its own ephemeral API
            procs.append(stack.enter_context(processes.running(
                [sys.executable, "-m", "incseg", "-C", str(root), "watch"], env=env, stdout=log,
                stderr=subprocess.STDOUT)))
        codes = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f"watch-{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    reg = ModelRegistry(ws)
    assert [str(v.version) for v in reg.versions()] == ["1", "2"]
    exp = reg.client.get_experiment_by_name(ws.params.mlflow.experiment)
    runs = reg.client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["batch_id"] for r in runs) == ["batch-00", "batch-01"]  # one run each
    assert {r.info.status for r in runs} == {"FINISHED"}
    reported = [line for text in logs for line in text.splitlines() if line.startswith("batch-0")]
    assert len(reported) == 2, logs  # the two processes together reported each batch once


@pytest.mark.cost(40)
def test_a_watch_stopped_by_sigterm_stops_the_ephemeral_prefect_server_it_started(tmp_path, stream_dir):
    """`kill PID` (SIGTERM, what a service manager sends) on an `incseg watch` mid-bootstrap: the
    Prefect server its ephemeral API started goes down with it (Python's default SIGTERM skips the
    exit handler that stops it, and it was left running)."""
    import signal
    import time

    import psutil

    root = tmp_path / "ws"
    seed_store(init_workspace(root))
    (root / "params.yaml").write_text(yaml.safe_dump(fault_params(
        bootstrap_max_steps=10**6, bootstrap_min_steps=10**6, eval_every=10**6).model_dump()))  # trains until stopped
    ws = Workspace(root)
    add_data(ws, stream_dir / "holdout", holdout=True, classes=stream_dir / "classes.yaml")
    add_data(ws, stream_dir / "registry" / "batch-00")
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
           "PREFECT_HOME": str(prefect_home(tmp_path / "prefect"))}
    with (tmp_path / "watch.log").open("w") as log, processes.running(
            [sys.executable, "-m", "incseg", "-C", str(root), "watch"], env=env, stdout=log,
            stderr=subprocess.STDOUT) as proc:
        def servers() -> list[psutil.Process]:
            try:
                return [c for c in psutil.Process(proc.pid).children(recursive=True) if "uvicorn" in c.cmdline()]
            except psutil.Error:
                return []

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (servers() and ModelRegistry(ws).client.search_experiments()):
            assert proc.poll() is None, (tmp_path / "watch.log").read_text()
            time.sleep(1)
        [server] = servers()
        time.sleep(3)  # into the flow run
        proc.send_signal(signal.SIGTERM)  # the leader only, as `kill PID` does
        code = proc.wait(timeout=60)
        gone, _ = psutil.wait_procs([server], timeout=15)
        assert gone == [server], f"the Prefect server outlived its watch (exit {code})\n" + \
            (tmp_path / "watch.log").read_text()[-3000:]
        assert code != -signal.SIGKILL
    assert not ModelRegistry(ws).versions()  # nothing half-trained was registered
