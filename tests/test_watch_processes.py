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


# Ctrl-C in a terminal: SIGINT to the whole foreground process group. The command resets SIGINT to
# Python's handler: a process started in the background of a non-interactive shell inherits it ignored.
CTRL_C_CMD = ["-c", "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "from incseg.cli import run; run()"]


@pytest.mark.cost(40)
@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c"])
def test_a_watch_stopped_mid_bootstrap_stops_the_ephemeral_prefect_server_it_started(tmp_path, stream_dir, stop):
    """`kill PID` (SIGTERM to the leader only, what a service manager sends) or Ctrl-C in a terminal
    (SIGINT to the whole group) on an `incseg watch` mid-bootstrap: it exits within a minute without a
    word about an unreachable API, and the Prefect server its ephemeral API started goes down with it.
    Before: on SIGTERM Python's default skipped the exit handler that stops the server, left running;
    on Ctrl-C the server, in the same group, died first, and the flow spent ~3 minutes failing to report
    its crash to it (`flows.watch.ephemeral_api_server` starts it in a session of its own)."""
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
           "PREFECT_HOME": str(prefect_home(tmp_path / "prefect")),
           "PREFECT_LOGGING_TO_API_ENABLED": "true"}  # as a user has it (the suite turns it off)
    program = ["-m", "incseg"] if stop == "sigterm" else CTRL_C_CMD
    with (tmp_path / "watch.log").open("w") as log, processes.running(
            [sys.executable, *program, "-C", str(root), "watch"], env=env, stdout=log,
            stderr=subprocess.STDOUT) as proc:
        def servers() -> list[psutil.Process]:
            try:
                return [c for c in psutil.Process(proc.pid).children(recursive=True) if "uvicorn" in c.cmdline()]
            except psutil.Error:
                return []

        def training() -> bool:  # the bootstrap's MLflow run is open
            client = ModelRegistry(ws).client
            exp = client.get_experiment_by_name(ws.params.mlflow.experiment)
            return exp is not None and bool(client.search_runs([exp.experiment_id]))

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (servers() and training()):
            assert proc.poll() is None, (tmp_path / "watch.log").read_text()
            time.sleep(1)
        [server] = servers()
        time.sleep(3)  # into the training
        if stop == "sigterm":
            proc.send_signal(signal.SIGTERM)  # the leader only, as `kill PID` does
        else:
            os.killpg(proc.pid, signal.SIGINT)  # its group, as the terminal does
        code = proc.wait(timeout=60)
        gone, _ = psutil.wait_procs([server], timeout=15)
        output = (tmp_path / "watch.log").read_text()
        assert gone == [server], f"the Prefect server outlived its watch (exit {code})\n" + output[-3000:]
        assert code != -signal.SIGKILL
        assert "Unable to connect" not in output and "Error logging to API" not in output, output[-3000:]
    assert not ModelRegistry(ws).versions()  # nothing half-trained was registered
