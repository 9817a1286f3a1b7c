"""The watcher on a real git + DVC workspace, real MLflow store, real Prefect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from incseg import processes
from incseg.config import Workspace
from incseg.datastore import add_data, init_workspace, track
from incseg.registry import ModelRegistry

from helpers import fault_params, free_port, tiny_params


@pytest.fixture(scope="module")
def dvc_ws(tmp_path_factory, stream_dir):
    root = tmp_path_factory.mktemp("dvc-ws") / "ws"
    init_workspace(root)
    (root / "params.yaml").write_text(yaml.safe_dump(fault_params().model_dump()))  # states, not quality
    ws = Workspace(root)
    add_data(ws, stream_dir / "holdout", holdout=True, classes=stream_dir / "classes.yaml")
    return ws


pytestmark = pytest.mark.slow


def versions(ws):
    return [str(v.version) for v in ModelRegistry(ws).versions()]


def test_each_data_version_is_processed_exactly_once(dvc_ws, stream_dir, prefect_api):
    from flows.watch import watch_registry

    ws = dvc_ws
    add_data(ws, stream_dir / "registry" / "batch-00")
    first = watch_registry(str(ws.root))
    assert [(r.batch_id, r.status) for r in first] == [("batch-00", "promoted")]
    assert watch_registry(str(ws.root)) == []  # no data change: nothing to do
    assert versions(ws) == ["1"]

    add_data(ws, stream_dir / "registry" / "batch-01")
    second = watch_registry(str(ws.root))
    assert [r.batch_id for r in second] == ["batch-01"]
    assert versions(ws) == ["1", "2"]

    # same id, new content: a new data version, processed again
    mask_file = sorted((ws.registry_dir / "batch-01" / "masks").iterdir())[0]
    mask = np.array(Image.open(mask_file))
    mask[:2, :2] = 3
    Image.fromarray(mask).save(mask_file)
    track(ws.root, ws.registry_dir / "batch-01", "data: fix a mask of batch-01")
    third = watch_registry(str(ws.root))
    assert [r.batch_id for r in third] == ["batch-01"]
    assert versions(ws) == ["1", "2", "3"]
    ledger = ModelRegistry(ws).ledger()
    assert sum(1 for (b, _) in ledger if b == "batch-01") == 2


def test_two_watchers_at_once_update_each_batch_once(dvc_ws, stream_dir, prefect_api):
    from flows.watch import watch_registry

    ws = dvc_ws
    before = len(versions(ws))
    add_data(ws, stream_dir / "registry" / "batch-02")
    results, errors = [], []

    def run():
        try:
            results.append(watch_registry(str(ws.root)))
        except BaseException as err:  # noqa: BLE001 - surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(len(r) for r in results) == [0, 1]
    assert len(versions(ws)) == before + 1


def dvc_status(root: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out or "{}")


def test_dvc_pipeline_reruns_exactly_what_changed(tmp_path, stream_dir, prefect_api):
    """`dvc repro` runs bootstrap/validate/update through the CLI; status tracks data and params."""
    root = tmp_path / "ws"
    init_workspace(root)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(train={"bootstrap_max_steps": 24, "update_max_steps": 12,
                                                                       "eval_every": 12})
                                                     .model_dump()))
    ws = Workspace(root)
    add_data(ws, stream_dir / "holdout", holdout=True, classes=stream_dir / "classes.yaml")
    add_data(ws, stream_dir / "registry" / "batch-00")
    from prefect.settings import PREFECT_API_URL

    # the stages' CLI calls use the session's Prefect API instead of each starting its own
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_API_URL": PREFECT_API_URL.value()}

    def repro():
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=root, env=env, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    repro()
    assert dvc_status(root) == {}
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["champion_version"] == "1" and "iou.square" in metrics

    add_data(ws, stream_dir / "registry" / "batch-01")
    assert {"validate", "update"} <= set(dvc_status(root)) and "bootstrap" not in dvc_status(root)
    repro()
    assert dvc_status(root) == {}
    assert len(ModelRegistry(ws).versions()) == 2

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["gate"]["max_class_drop"] = 0.5
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert set(dvc_status(root)) == {"update"}


@pytest.mark.server
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


def test_two_watch_processes_on_the_file_lock_process_each_batch_once(tmp_path, stream_dir):
    """Two `incseg watch` CLI processes started together, each on its own ephemeral Prefect API, so
    the update lock is the OS file lock: every pending batch gets exactly one run and one version."""
    root = tmp_path / "ws"
    init_workspace(root)
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
            env = {**base_env, "PREFECT_HOME": str(tmp_path / f"prefect-{i}")}  # its own ephemeral API
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
