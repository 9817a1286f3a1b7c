"""Shared fixtures: tiny params, a tiny synthetic stream, isolated Prefect/MLflow state."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before any Prefect / GX import: never touch the user's ~/.prefect, no analytics.
_STATE = Path(tempfile.mkdtemp(prefix="incseg-tests-"))
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
os.environ["GX_ANALYTICS_ENABLED"] = "false"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("MLFLOW_TRACKING_URI", None)

import pytest  # noqa: E402

from helpers import make_workspace, tiny_params  # noqa: E402
from incseg.data.synthetic import synthesize  # noqa: E402


@pytest.fixture(scope="session")
def stream_dir(tmp_path_factory) -> Path:
    """The tiny synthetic stream, written once per session (read-only for tests)."""
    out = tmp_path_factory.mktemp("stream")
    synthesize(out, tiny_params().synth)
    return out


@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    """A tiny U-Net trained on the base batch, with its workspace (shared, do not mutate)."""
    from incseg.pipeline import Batch, train_base

    ws = make_workspace(tmp_path_factory.mktemp("base-ws"))
    batch = Batch.load(ws.registry_dir / "batch-00")
    model, result = train_base(ws, batch, progress=False)
    return ws, model, result


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's real ephemeral API, started once per session (a cold start is slow)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
