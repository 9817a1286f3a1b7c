"""A bootstrapped DVC workspace per test module: the champion that faults must not replace."""

from __future__ import annotations

import pytest
import yaml

from helpers import fault_params, seed_store
from incseg.datastore import add_data, init_workspace
from incseg.workspace import Workspace


@pytest.fixture(scope="module")
def champion_ws(tmp_path_factory, stream_dir, prefect_api):
    from flows.watch import watch_registry

    root = tmp_path_factory.mktemp("fault") / "ws"
    seed_store(init_workspace(root))
    (root / "params.yaml").write_text(yaml.safe_dump(fault_params().model_dump()))
    ws = Workspace(root)
    add_data(ws, stream_dir / "holdout", holdout=True, classes=stream_dir / "classes.yaml")
    add_data(ws, stream_dir / "registry" / "batch-00")
    assert [r.status for r in watch_registry(str(root))] == ["promoted"]
    return ws

