"""`dvc repro` on a workspace `incseg init` made: the stages call the CLI, status follows data and params."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from incseg.cli import app
from incseg.data.layout import list_batches
from incseg.datastore import init_workspace, track
from incseg.ledger import registered, untracked
from incseg.registry import ModelRegistry
from incseg.workspace import Workspace

from helpers import seed_store, tiny_params

pytestmark = [pytest.mark.slow, pytest.mark.cost(165)]


def dvc_status(root: Path) -> dict:
    """`dvc status` through DVC's Python API (what the command prints as JSON)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:  # stage names as `dvc status` prints them in the workspace
        return {name.rsplit(":", 1)[-1]: change for name, change in repo.status().items()}


def test_init_synth_repro_learns_the_whole_stream_and_reruns_what_changed(tmp_path, prefect_api):
    """`incseg init` → `incseg data synth` → `dvc repro`, as a new user runs it: the synthetic batches
    are registered like `data add` registers them, so the pipeline learns every one of them; then
    `dvc status` follows params and data."""
    from prefect.settings import PREFECT_API_URL

    root = tmp_path / "ws"
    seed_store(init_workspace(root))
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(  # a short stream: base, then one new class
        synth={"new_classes": 1, "domain_shift": False},
        train={"bootstrap_max_steps": 24, "bootstrap_min_steps": 24, "update_max_steps": 12, "update_min_steps": 12,
               "eval_every": 12}).model_dump()))
    synth = CliRunner().invoke(app, ["-C", str(root), "data", "synth"])
    assert synth.exit_code == 0 and "registered with DVC" in synth.output, synth.output
    ws = Workspace(root)
    batches = list(registered(ws))
    assert batches == list_batches(ws.registry_dir) == ["batch-00", "batch-01"] and untracked(ws) == []

    # the stages' CLI calls use the session's Prefect API instead of each starting its own
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert dvc_status(root) == {}
    reg = ModelRegistry(ws)
    assert sorted(b for b, _ in reg.ledger()) == batches  # every batch learned once: bootstrap, then updates
    assert len(reg.versions()) == len(batches)
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["champion_version"] in {str(v.version) for v in reg.versions()} and "iou.square" in metrics
    for noise in ("Traceback", "ephemeral docs site", "not tracked by DVC"):  # only what a user can act on
        assert noise not in output, output[-3000:]

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["gate"]["max_class_drop"] = 0.5
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert set(dvc_status(root)) == {"update"}

    mask_file = sorted((ws.registry_dir / batches[-1] / "masks").iterdir())[0]
    mask = np.array(Image.open(mask_file))
    mask[:2, :2] = 2 if mask[0, 0] != 2 else 1  # a real change of content
    Image.fromarray(mask).save(mask_file)
    track(root, ws.registry_dir / batches[-1], "data: fix a mask")
    assert {"validate", "update"} <= set(dvc_status(root)) and "bootstrap" not in dvc_status(root)
