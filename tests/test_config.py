from pathlib import Path

import pytest
import yaml

from incseg.config import ConfigError, Params, Workspace, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_is_valid_and_matches_the_defaults():
    assert load_params(ROOT / "params.yaml") == Params()


def test_bad_value_names_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"batch_size": 0}}))
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_params(tmp_path / "params.yaml")


def test_unknown_key_is_refused(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"gate": {"min_mIoU": 1}}))
    with pytest.raises(ConfigError, match=r"gate\.min_mIoU"):
        load_params(tmp_path / "params.yaml")


def test_relative_paths_resolve_in_the_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = Workspace(tmp_path)
    assert ws.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert ws.registry_dir == tmp_path.resolve() / "data" / "registry"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert ws.tracking_uri == "http://127.0.0.1:5000" and ws.artifact_location is None
