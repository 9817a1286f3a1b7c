from pathlib import Path

import pytest
import yaml

from incseg.config import ConfigError, Params, load_params
from incseg.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_is_valid_and_matches_the_defaults():
    assert load_params(ROOT / "params.yaml") == Params()


def test_init_writes_every_knob_with_its_comment(tmp_path):
    """`incseg init` writes the project's params.yaml (one file: the repo's is a link to the template):
    every field of `Params` by name, at its default, the lines commented as in the repo."""
    from incseg.datastore import PARAMS_YAML, write_default_params

    assert (ROOT / "params.yaml").resolve() == PARAMS_YAML.resolve()
    write_default_params(tmp_path / "params.yaml")
    text = (tmp_path / "params.yaml").read_text()
    assert load_params(tmp_path / "params.yaml") == Params() and text.count("#") > 50

    def names(model, prefix=""):
        for name, value in model:
            yield from names(value, f"{prefix}{name}.") if hasattr(value, "model_fields") else [prefix + name]

    raw = yaml.safe_load(text)
    for dotted in names(Params()):
        section, *rest = dotted.split(".")
        node = raw[section]
        for key in rest[:-1]:
            node = node[key]
        assert rest[-1] in node, f"params.yaml lacks {dotted}"


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


def test_auto_image_size_follows_the_holdout_images(tmp_path):
    """`data.image_size: auto` (the default) is the holdout images' shorter side in steps of 16 within
    64-96; 64 while there is no holdout, not kept; a number is kept as it is."""
    from PIL import Image

    ws = Workspace(tmp_path)
    assert ws.params.data.image_size == 64 and ws.holdout_shape() is None
    images = ws.holdout_dir / "images"
    images.mkdir(parents=True)
    for i, (w, h) in enumerate([(128, 96), (130, 100), (120, 90)]):
        Image.new("RGB", (w, h)).save(images / f"{i}.png")
    (images / "notes.txt").write_text("not an image")
    assert ws.holdout_shape() == (96, 128) and ws.params.data.image_size == 96
    assert ws.declared.data.image_size == "auto"  # as written (`incseg bench` resolves it from its own stream)
    for (w, h), size in [((500, 375), 96), ((80, 80), 80), ((48, 48), 64)]:
        other = Workspace(tmp_path / f"{w}")
        (other.holdout_dir / "images").mkdir(parents=True)
        Image.new("RGB", (w, h)).save(other.holdout_dir / "images" / "a.png")
        assert other.params.data.image_size == size, (w, h)
    fixed = Workspace(tmp_path, Params.model_validate({"data": {"image_size": 48}}))
    assert fixed.params.data.image_size == 48
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"image_size": 8}}))
    with pytest.raises(ConfigError, match=r"data\.image_size"):
        load_params(tmp_path / "params.yaml")
