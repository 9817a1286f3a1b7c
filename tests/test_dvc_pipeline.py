"""`dvc repro` on a workspace `incseg init` made: the stages call the CLI, status follows data and params."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from incseg.config import Workspace
from incseg.datastore import add_data, init_workspace
from incseg.registry import ModelRegistry

from helpers import tiny_params

pytestmark = pytest.mark.slow


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
