"""A bootstrapped DVC workspace per test module: the champion that faults must not replace."""

from __future__ import annotations

import pytest
import yaml

from conftest import tiny_params
from incseg.config import Workspace
from incseg.datastore import add_data, init_workspace


def fault_params(**train):
    return tiny_params(train={"bootstrap_epochs": 12, "update_epochs": 4, **train})


@pytest.fixture(scope="module")
def champion_ws(tmp_path_factory, stream_dir, prefect_api):
    from flows.watch import watch_registry

    root = tmp_path_factory.mktemp("fault") / "ws"
    init_workspace(root)
    (root / "params.yaml").write_text(yaml.safe_dump(fault_params().model_dump()))
    ws = Workspace(root)
    add_data(ws, stream_dir / "holdout", holdout=True, classes=stream_dir / "classes.yaml")
    add_data(ws, stream_dir / "registry" / "batch-00")
    assert [r.status for r in watch_registry(str(root))] == ["promoted"]
    return ws


def set_params(ws: Workspace, params) -> Workspace:
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params.model_dump()))
    return Workspace(ws.root)
