"""Every reader of untrusted bytes fails closed: a value, or an error naming the file, never a crash.

Property-based (Hypothesis): random bytes, truncated and mutated valid files, oversized headers,
and random YAML/JSON structures go into each reader of images, masks, `classes.yaml`,
`batch.yaml`, `.dvc` files, `params.yaml`, the exemplar index and cached profiles. Then the same
damage through the CLI, which must answer with one line and exit code 1.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from incseg.config import ConfigError, load_params
from incseg.continual.memory import ExemplarMemory
from incseg.data.layout import BatchInfo, DataError, read_classes, read_image, read_mask
from incseg.datastore import dvc_hash
from incseg.validation.history import read_cached_profile
from incseg.validation.table import image_row, mask_row

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def png_bytes(mode: str = "RGB", size: tuple[int, int] = (12, 10)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 4, shape, dtype=np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming a huge image, with a tiny (wrong) body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\0" * 64)
    body = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + chunk + body + b"\0\0\0\0IEND\xaeB`\x82"


VALID = {"rgb": png_bytes("RGB"), "mask": png_bytes("L")}

damaged_image = st.one_of(
    st.binary(max_size=400),
    st.integers(0, len(VALID["rgb"]) - 1).map(lambda n: VALID["rgb"][:n]),  # truncated
    st.tuples(st.integers(0, len(VALID["rgb"]) - 1), st.integers(0, 255)).map(  # one byte flipped
        lambda t: VALID["rgb"][: t[0]] + bytes([t[1]]) + VALID["rgb"][t[0] + 1:]),
    st.tuples(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)).map(lambda wh: huge_png_header(*wh)),
)

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(-3, 300), inner,
                                                                max_size=4),
    max_leaves=12,
)
yaml_text = st.one_of(st.binary(max_size=200), yaml_values.map(lambda v: yaml.safe_dump(v).encode()),
                      st.text(max_size=120).map(str.encode))


FUZZ_ROOT: list[Path] = []  # the module's folder under pytest's basetemp (pytest removes old ones)


@pytest.fixture(scope="module", autouse=True)
def fuzz_root(tmp_path_factory):
    """Hypothesis runs hundreds of examples per test and refuses function-scoped fixtures: one folder
    per module, inside pytest's basetemp, instead of a /tmp folder per example left behind."""
    FUZZ_ROOT[:] = [tmp_path_factory.mktemp("fuzz")]
    yield


def written(data: bytes, name: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="example-", dir=FUZZ_ROOT[0]))
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@FUZZ
@given(damaged_image)
def test_image_and_mask_readers_return_arrays_or_name_the_file(data):
    path = written(data, "images/x.png")
    for reader in (read_image, read_mask):
        try:
            arr = reader(path)
        except DataError as err:
            assert str(path) in str(err)
        else:
            assert arr.dtype == np.uint8 and arr.ndim in (2, 3)
    row = image_row(path)
    assert row["image_ok"] or row["image_error"]  # the validation table records why, never raises
    mrow = mask_row(path, 5)
    assert mrow["mask_ok"] or mrow["mask_error"]


def test_an_oversized_image_is_refused_before_it_is_decoded():
    path = written(huge_png_header(100_000, 100_000), "images/bomb.png")
    with pytest.raises(DataError, match="pixel limit"):
        read_image(path)
    assert "pixel limit" in image_row(path)["image_error"]


def test_16_bit_and_float_images_are_refused_not_clipped(tmp_path):
    """A 16-bit photo was read through PIL's convert("RGB"), which clips every sample to 255: the model
    trained on a white picture (a float one: black) and nothing said so. Reading, validation and the
    served model now refuse it, naming the image and its mode; 8-bit gray is still read."""
    import base64

    from incseg.serving import decode_images

    ramp = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16
    for name, array, mode in (("deep.png", ramp, "I;16"), ("float.tif", ramp.astype(np.float32) / 65535, "F")):
        path = tmp_path / name
        Image.fromarray(array).save(path)
        with pytest.raises(DataError, match=rf"{name}: a {mode} image .*8 bits per channel"):
            read_image(path)
        row = image_row(path)
        assert not row["image_ok"] and row["image_error"].startswith(f"a {mode} image")
        with pytest.raises(DataError, match=rf"image 0: a {mode} image"):
            decode_images({"image": base64.b64encode(path.read_bytes()).decode()})
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "gray.png")
    assert read_image(tmp_path / "gray.png").shape == (64, 64, 3) and image_row(tmp_path / "gray.png")["image_ok"]


@FUZZ
@given(yaml_text)
def test_classes_yaml_reader(data):
    path = written(data, "classes.yaml")
    try:
        classes = read_classes(path)
    except DataError as err:
        assert str(path) in str(err)
    else:
        assert sorted(classes) == list(range(len(classes))) and all(isinstance(v, str) for v in classes.values())


@FUZZ
@given(yaml_text)
def test_batch_yaml_reader(data):
    path = written(data, "batch/batch.yaml")
    try:
        info = BatchInfo.read(path.parent)
    except DataError as err:
        assert str(path) in str(err)
    else:
        assert all(isinstance(c, int) and 0 <= c < 255 for c in info.classes)


@FUZZ
@given(st.one_of(yaml_text, st.text(alphabet="0123456789abcdef", max_size=40).map(
    lambda h: yaml.safe_dump({"outs": [{"md5": h, "path": "b"}]}).encode())))
def test_dvc_file_reader(data):
    path = written(data, "registry/b.dvc")
    try:
        h = dvc_hash(path)
    except DataError as err:
        assert str(path) in str(err)
    else:
        assert h.startswith("md5:") and len(h) >= 36


@FUZZ
@given(yaml_text)
def test_params_reader(data):
    path = written(data, "params.yaml")
    try:
        load_params(path)
    except ConfigError as err:
        assert str(path) in str(err)


@FUZZ
@given(yaml_text)
def test_exemplar_index_reader(data):
    path = written(data, "memory/memory.yaml")
    try:
        memory = ExemplarMemory.load(path.parent)
    except DataError as err:
        assert str(path) in str(err)
    else:
        assert all("/" not in it.stem for it in memory.items)


@FUZZ
@given(st.one_of(st.binary(max_size=200), yaml_values.map(lambda v: json.dumps(v).encode())))
def test_cached_profile_reader_recomputes_what_it_cannot_read(data):
    profile = read_cached_profile(written(data, "profiles/b.json"))  # damaged: None (recomputed), never raises
    assert profile is None or (isinstance(profile.class_share, list) and isinstance(profile.images, int))


def test_a_valid_cached_profile_is_read_back():
    from dataclasses import asdict

    from incseg.validation.history import BatchProfile

    good = BatchProfile("b", "fp", 3, ["ab"], [0.9, 0.1], 120.0, 4.0)
    assert read_cached_profile(written(json.dumps(asdict(good)).encode(), "profiles/b.json")) == good


# ---- the same damage through the CLI: one line naming the file, exit 1 -------------------------
runner = CliRunner()


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1, result.output
    for needle in needles:
        assert needle in result.output.replace("\n", ""), result.output


@pytest.fixture
def synth_ws(tmp_path):
    (tmp_path / "params.yaml").write_text("synth: {size: 24, base_images: 12, step_images: 12, holdout_per_class: 1}\n")
    assert runner.invoke(app_(), ["-C", str(tmp_path), "data", "synth"]).exit_code == 0
    return tmp_path


def app_():
    from incseg.cli import app

    return app


def test_cli_names_a_damaged_classes_yaml(synth_ws):
    (synth_ws / "data" / "classes.yaml").write_bytes(b"\xff\xfe: [unclosed")
    one_line_error(runner.invoke(app_(), ["-C", str(synth_ws), "validate", str(synth_ws / "data" / "registry")],
                                 terminal_width=400), "classes.yaml", "not readable YAML")


def test_cli_validate_reports_garbage_images_by_name(synth_ws):
    batch = synth_ws / "data" / "registry" / "batch-00"
    images = sorted((batch / "images").iterdir())
    images[0].write_bytes(huge_png_header(90_000, 90_000))
    images[1].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    result = runner.invoke(app_(), ["-C", str(synth_ws), "validate", str(batch), "--no-fail"], terminal_width=400)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert images[0].stem in result.output and images[1].stem in result.output


def test_cli_validate_without_a_path_validates_the_registry(synth_ws):
    """`incseg validate` alone checks every registered batch (it asked for a path), and fails on a bad one."""
    images = sorted((synth_ws / "data" / "registry" / "batch-01" / "images").iterdir())
    for image in images:
        image.write_bytes(b"not an image")
    result = runner.invoke(app_(), ["-C", str(synth_ws), "validate"], terminal_width=400)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    batches = sorted(p.name for p in (synth_ws / "data" / "registry").iterdir() if p.is_dir())
    assert len(batches) >= 3 and all(f"{b}: " in result.output for b in batches), result.output
    assert "batch-00: 12 files, 12 valid: accepted" in result.output and images[0].stem in result.output


def test_validate_writes_gx_data_docs_naming_every_check_and_the_failing_file(synth_ws):
    from incseg.config import ValidationParams
    from incseg.validation.suite import build_suite

    batch = synth_ws / "data" / "registry" / "batch-00"
    bad = sorted((batch / "images").iterdir())[0]
    bad.write_bytes(b"not an image")
    result = runner.invoke(app_(), ["-C", str(synth_ws), "validate", str(batch), "--no-fail", "--docs", "docs"],
                           terminal_width=400)
    site = synth_ws / "docs" / "batch-00"
    assert result.exit_code == 0 and str(site / "index.html") in result.output.replace("\n", ""), result.output
    index = (site / "index.html").read_text()
    assert "incseg-batch" in index  # the suite and its validation are listed
    suite_page = (site / "expectations" / "incseg-batch.html").read_text()
    checks = [e.meta["check"] for e in build_suite(ValidationParams(), None).expectations]
    assert len(checks) >= 14 and [c for c in checks if c not in suite_page] == []
    [validation_page] = [p for p in (site / "validations").rglob("*.html")]
    assert bad.stem in validation_page.read_text()


@pytest.mark.slow
def test_cli_names_a_damaged_batch_yaml(synth_ws, prefect_api):
    (synth_ws / "data" / "registry" / "batch-00" / "batch.yaml").write_text("classes: {1: square}\n")
    one_line_error(runner.invoke(app_(), ["-C", str(synth_ws), "bootstrap"], terminal_width=400),
                   "batch.yaml", "classes")


def test_cli_names_a_damaged_params_yaml(synth_ws):
    (synth_ws / "params.yaml").write_bytes(b"train: [1, 2\n\x00")
    one_line_error(runner.invoke(app_(), ["-C", str(synth_ws), "models"], terminal_width=400), "params.yaml")


@pytest.mark.slow
def test_a_bootstrap_without_a_holdout_fails_before_its_training(synth_ws, prefect_api):
    """Every run is judged on the holdout: without one, the run fails at once, naming it (it failed after
    the training, hours into a bootstrap at default budgets), and no MLflow run is left."""
    import shutil

    from helpers import tiny_params
    from incseg.registry import ModelRegistry
    from incseg.workspace import Workspace

    (synth_ws / "params.yaml").write_text(yaml.safe_dump(tiny_params().model_dump()))  # bounded, were it to train
    shutil.rmtree(synth_ws / "data" / "holdout")
    result = runner.invoke(app_(), ["-C", str(synth_ws), "bootstrap"], terminal_width=400)
    one_line_error(result, "holdout", "is empty")
    assert "bootstrap batch-00 at" not in result.output  # no training started
    assert flow_runs_of(synth_ws) == []  # refused before a flow run (whose failure Prefect logs as an ERROR too)
    client = ModelRegistry(Workspace(synth_ws)).client
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def flow_runs_of(ws_root: Path) -> list[str]:
    """The names of the flows run on this workspace, oldest first (the API is shared by the session's tests)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=200)
        flows = {r.flow_id for r in runs if r.parameters.get("workspace") == str(ws_root)}
        names = {f: client.read_flow(f).name for f in flows}
    return [names[r.flow_id] for r in reversed(runs) if r.parameters.get("workspace") == str(ws_root)]


def _unlabel_in_holdout(ws_root: Path, class_id: int) -> None:
    """The holdout's masks with every pixel of `class_id` made background (a holdout made before the class)."""
    from incseg.data.layout import read_mask

    for mask in (ws_root / "data" / "holdout" / "masks").glob("*.png"):
        m = read_mask(mask)
        Image.fromarray(np.where(m == class_id, 0, m).astype(np.uint8)).save(mask)


@pytest.mark.slow
def test_a_class_the_holdout_lacks_is_refused_before_training(synth_ws, prefect_api):
    """A batch labelling a class with no pixel in the holdout cannot be judged (the gate read its IoU as 0
    from false positives, after the training): bootstrap and update refuse it at once, naming the class."""
    from helpers import tiny_params
    from incseg.registry import ModelRegistry
    from incseg.workspace import Workspace

    (synth_ws / "params.yaml").write_text(yaml.safe_dump(tiny_params().model_dump()))
    masks = {p: p.read_bytes() for p in (synth_ws / "data" / "holdout" / "masks").glob("*.png")}
    _unlabel_in_holdout(synth_ws, 1)  # the base batch labels 1 and 2
    result = runner.invoke(app_(), ["-C", str(synth_ws), "bootstrap"], terminal_width=400)
    one_line_error(result, "holdout", "no pixel labelled 'square' (1)", "batch 'batch-00'", "--holdout --force")
    assert "bootstrap batch-00 at" not in result.output  # no training started
    assert flow_runs_of(synth_ws) == []  # refused before a flow run (whose failure Prefect logs as an ERROR too)
    client = ModelRegistry(Workspace(synth_ws)).client
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []

    for path, data in masks.items():
        path.write_bytes(data)
    assert runner.invoke(app_(), ["-C", str(synth_ws), "bootstrap"]).exit_code == 0
    _unlabel_in_holdout(synth_ws, 3)  # batch-01 brings class 3
    result = runner.invoke(app_(), ["-C", str(synth_ws), "update", "batch-01"], terminal_width=400)
    one_line_error(result, "no pixel labelled 'triangle' (3)", "batch 'batch-01'")
    assert "update batch-01" not in result.output
    assert flow_runs_of(synth_ws) == ["bootstrap"]  # refused before a flow run (whose failure Prefect logs too)
    reg = ModelRegistry(Workspace(synth_ws))
    assert [str(v.version) for v in reg.client.search_model_versions()] == ["1"]  # nothing registered, champion kept
    assert len(reg.client.search_runs([e.experiment_id for e in reg.client.search_experiments()])) == 1

    # the watcher: that batch waits, the later ones are updated on (it stopped at it, every tick)
    result = runner.invoke(app_(), ["-C", str(synth_ws), "watch"], terminal_width=400)
    assert result.exit_code == 0, result.output
    said = {line.split(":")[0]: line for line in result.output.splitlines() if line.startswith("batch-")}
    squeezed = "".join(result.output.split())  # a long path is wrapped inside it, at any width
    expected = f"batch-01: waiting - {synth_ws / 'data' / 'holdout'}: no pixel labelled 'triangle' (3)"
    assert "".join(expected.split()) in squeezed
    assert said.keys() == {"batch-01", "batch-02", "batch-03"} and "waiting" not in said["batch-02"]
    assert said["batch-03"].startswith("batch-03: waiting - ")  # the domain-shift batch labels triangles too
    for path, data in masks.items():  # the holdout replaced by one that labels triangles: the next watch takes it
        path.write_bytes(data)
    result = runner.invoke(app_(), ["-C", str(synth_ws), "watch"], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert [line.split(":")[0] for line in result.output.splitlines() if line.startswith("batch-")] == [
        "batch-01", "batch-03"]
    assert "waiting" not in result.output
