"""Helpers shared by the tests: tiny params and workspaces."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from incseg.config import UPDATE_RULE_SHARED, Params
from incseg.data.synthetic import synthesize
from incseg.workspace import Workspace


def tiny_params(**sections) -> Params:
    """32x32 images, a width-8 U-Net: seconds per training run on 2 CPU cores."""
    base = {
        "data": {"image_size": 32},
        "synth": {"size": 32, "base_images": 96, "step_images": 64, "holdout_per_class": 6, "new_classes": 2},
        "model": {"width": 8},
        "train": {"bootstrap_max_steps": 240, "bootstrap_min_steps": 150, "update_max_steps": 210,
                  "update_min_steps": 150, "eval_every": 30, "patience": 2, "batch_size": 16,
                  # at this size the crop on every sample gives the first new class its margin
                  # (test_update_flow: triangle 0.41 against 0.24 with the default crop on half, limit 0.2)
                  "crop_probability": 1.0, **UPDATE_RULE_SHARED},
        # tiny models learn less than the defaults: thresholds far below what they reach (see test_update_flow)
        "gate": {"min_new_class_iou": 0.1, "max_class_drop": 0.15},
        "continual": {"memory_size": 32},
        "eval": {"preview_images": 4},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return Params.model_validate(base)


_EMPTY_STORE: list[Path] = []


def seed_store(root: Path) -> Path:
    """An empty MLflow SQLite store, already migrated, copied into the workspace: making one from
    nothing runs MLflow's schema migrations (seconds), so each test process does that once."""
    if not _EMPTY_STORE:
        from mlflow import MlflowClient

        folder = tempfile.mkdtemp(prefix="incseg-empty-store-")
        atexit.register(shutil.rmtree, folder, True)
        db = Path(folder) / "mlflow.db"
        MlflowClient(f"sqlite:///{db}").search_registered_models()
        _EMPTY_STORE.append(db)
    if not (root / "mlflow.db").exists():
        shutil.copyfile(_EMPTY_STORE[0], root / "mlflow.db")
    return root


def make_workspace(root: Path, params: Params | None = None) -> Workspace:
    """A workspace folder with params.yaml and the tiny synthetic stream."""
    params = params or tiny_params()
    root.mkdir(parents=True, exist_ok=True)
    if params.mlflow.tracking_uri == "sqlite:///mlflow.db":
        seed_store(root)
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump()))
    ws = Workspace(root)
    synthesize(ws.data_dir, params.synth)
    return ws


def prefect_home(path: Path) -> Path:
    """A PREFECT_HOME for a process with an API of its own (ephemeral or `prefect server`): its
    database starts as a copy of the run's migrated, empty one when there is one (conftest)."""
    path.mkdir(parents=True, exist_ok=True)
    template = os.environ.get("INCSEG_TEST_PREFECT_DB")
    if template and not (path / "prefect.db").exists():
        shutil.copyfile(template, path / "prefect.db")
    return path


def fault_params(**train) -> Params:
    """Tiny params with short training: the fault tests care about states, not quality."""
    return tiny_params(train={"bootstrap_max_steps": 72, "bootstrap_min_steps": 72, "update_max_steps": 24,
                              "update_min_steps": 24, "eval_every": 12, **train})


def set_params(ws: Workspace, params: Params) -> Workspace:
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params.model_dump()))
    return Workspace(ws.root)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc=None, timeout: float = 120) -> None:
    """Until `url` answers 200; fails early with the output if `proc` (when given) exits."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")
