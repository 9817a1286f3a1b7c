"""The watcher flow on a real git + DVC workspace, real MLflow store, real Prefect: each data version
once, also with two watchers at once."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import yaml
from PIL import Image

from incseg.datastore import add_data, init_workspace, track
from incseg.registry import ModelRegistry
from incseg.workspace import Workspace

from helpers import fault_params, seed_store


@pytest.fixture(scope="module")
def dvc_ws(tmp_path_factory, stream_dir):
    root = tmp_path_factory.mktemp("dvc-ws") / "ws"
    seed_store(init_workspace(root))
    (root / "params.yaml").write_text(yaml.safe_dump(fault_params().model_dump()))  # states, not quality
    ws = Workspace(root)
    add_data(ws, stream_dir / "holdout", holdout=True, classes=stream_dir / "classes.yaml")
    return ws


pytestmark = [pytest.mark.slow, pytest.mark.cost(130)]


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
