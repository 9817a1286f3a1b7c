"""Using the champion: batch prediction, the pyfunc behind `mlflow models serve`, ONNX export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers import fault_params, free_port, make_workspace, tiny_params, wait_http
from incseg import processes
from incseg.cli import app
from incseg.data.dataset import eval_transforms
from incseg.data.layout import find_pairs, read_image, read_mask
from incseg.inference import segment
from incseg.registry import ModelRegistry

pytestmark = [pytest.mark.slow, pytest.mark.cost(80)]

@pytest.fixture(scope="module")
def champion(tmp_path_factory, prefect_api):
    """A workspace whose champion is a tiny U-Net bootstrapped on batch-00 (classes 0-2)."""
    from flows.update import bootstrap

    ws = make_workspace(tmp_path_factory.mktemp("infer") / "ws", fault_params())
    assert bootstrap("batch-00", str(ws.root)).status == "promoted"
    reg = ModelRegistry(ws)
    return ws, reg.load(reg.require_champion(), ws.runs_dir / "test-models")


def holdout_with_objects(ws, n):
    """Holdout pairs whose masks show one of the champion's classes (1 or 2)."""
    pairs = [p for p in find_pairs(ws.holdout_dir) if set(np.unique(read_mask(p.mask))) & {1, 2}]
    return pairs[:n]


def test_predict_writes_palette_masks_at_each_images_size_and_skips_bad_files(champion, tmp_path):
    ws, loaded = champion
    size = ws.params.data.image_size
    pairs = holdout_with_objects(ws, 4)
    src, out = tmp_path / "images", tmp_path / "masks"
    src.mkdir()
    for p in pairs[:2]:
        Image.open(p.image).save(src / p.image.name)
    tiles = [read_image(p.image) for p in pairs]
    mosaic = np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)
    Image.fromarray(mosaic).save(src / "mosaic.png")  # 2x the training size: sliding window
    Image.fromarray(tiles[0][:, : size // 2]).save(src / "narrow.jpg")  # smaller than a tile
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")

    result = CliRunner().invoke(app, ["-C", str(ws.root), "predict", str(src), "--out", str(out), "--overlay"])
    assert result.exit_code == 0, result.output
    assert "4 written, 1 skipped" in result.output and "broken.png" in result.output
    # what it was taught by name (it said "16 classes" for a VOC model taught 4: its head's size)
    assert "taught 3 classes (background, square, circle)" in " ".join(result.output.split())
    report = json.loads((out / "report.json").read_text())
    assert list(report["skipped"]) == ["broken.png"] and report["n_written"] == 4

    for name, shape in [("mosaic", mosaic.shape[:2]), ("narrow", (size, size // 2)), (pairs[0].stem, (size, size))]:
        mask = Image.open(out / f"{name}.png")
        assert mask.mode == "P" and mask.size == shape[::-1]
        assert set(np.unique(np.asarray(mask))) <= set(loaded.classes)
        assert Image.open(out / f"{name}_overlay.png").size == shape[::-1]
    # the sliding window sees each quarter of the mosaic as the model saw the tile alone
    alone = np.concatenate([np.concatenate([segment(loaded.model, t, size) for t in tiles[:2]], axis=1),
                            np.concatenate([segment(loaded.model, t, size) for t in tiles[2:]], axis=1)], axis=0)
    assert (np.asarray(Image.open(out / "mosaic.png")) == alone).mean() > 0.9
    truth = read_mask(pairs[0].mask)
    assert (np.asarray(Image.open(out / f"{pairs[0].stem}.png")) == truth).mean() > 0.7


def test_predict_reads_bmp_tiff_and_webp_and_keeps_one_mask_per_stem(champion, tmp_path):
    """Images in BMP, TIFF or WebP were passed over without a word (only png/jpg were listed); two
    images of one stem wrote one mask file, the second over the first; image files are taken as well as
    folders."""
    ws, _ = champion
    pair = holdout_with_objects(ws, 1)[0]
    src, out = tmp_path / "images", tmp_path / "masks"
    src.mkdir()
    with Image.open(pair.image) as im:
        for name, extra in [("a.png", {}), ("b.bmp", {}), ("c.TIF", {}), ("d.webp", {"lossless": True}),
                            ("twin.png", {}), ("twin.jpg", {"quality": 95})]:
            im.convert("RGB").save(src / name, **extra)
    result = CliRunner().invoke(app, ["-C", str(ws.root), "predict", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["written"]) == ["a.png", "b.bmp", "c.TIF", "d.webp", "twin.jpg"]
    assert list(report["skipped"]) == ["twin.png"] and "twin.jpg has the same stem" in report["skipped"]["twin.png"]
    masks = {stem: np.asarray(Image.open(out / f"{stem}.png")) for stem in "abcd"}
    assert all(np.array_equal(masks["a"], masks[stem]) for stem in "bcd")  # the same pixels, the same answer
    # files as well as folders (it took one folder only)
    result = CliRunner().invoke(app, ["-C", str(ws.root), "predict", str(src / "b.bmp"), str(src / "d.webp"), "--out",
                                      str(tmp_path / "two")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "two").glob("*.png")) == ["b.png", "d.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "two" / "b.png")), masks["b"])
    result = CliRunner().invoke(app, ["-C", str(ws.root), "predict", str(src / "gone.png"), "--out", str(out)])
    assert result.exit_code == 1 and f"no such file or folder: {src / 'gone.png'}" in " ".join(result.output.split())


def test_predict_writes_the_datas_own_colours_when_it_has_a_colour_table(champion, tmp_path):
    """Masks imported through `data add --colours` come back from `predict` in the same colours: the
    palette PNG's ids are unchanged, its palette (and the overlay) are the table's (were VOC's)."""
    ws, loaded = champion
    pair = holdout_with_objects(ws, 1)[0]
    src, out = tmp_path / "images", tmp_path / "masks"
    src.mkdir()
    Image.open(pair.image).save(src / pair.image.name)
    ws.colours_file.write_text('0: [0, 0, 0]\n1: "#ff8000"\n2: [10, 20, 30]\n')
    try:
        result = CliRunner().invoke(app, ["-C", str(ws.root), "predict", str(src), "--out", str(out), "--overlay"])
    finally:
        ws.colours_file.unlink()
    assert result.exit_code == 0, result.output
    mask = Image.open(out / f"{pair.stem}.png")
    assert mask.getpalette()[:9] == [0, 0, 0, 255, 128, 0, 10, 20, 30]
    ids, rgb = np.asarray(mask), read_image(pair.image).astype(float)
    assert np.array_equal(ids, segment(loaded.model, read_image(pair.image), loaded.image_size))
    seen = np.asarray(Image.open(out / f"{pair.stem}_overlay.png")).astype(float)
    for c, colour in ((1, (255, 128, 0)), (2, (10, 20, 30))):
        if (ids == c).any():
            assert np.abs(seen[ids == c] - (rgb[ids == c] + colour) / 2).max() <= 1


def test_prediction_scales_an_image_as_training_scaled_the_data(champion):
    """The version records its training size and the holdout images' size; an image is scaled by
    their ratio first. Here the 32 px model is told its data were 48 px: an image of 48 px is then
    resized whole (as evaluation resizes the holdout) and a 96 px mosaic of four is tiled at that
    scale, each quarter segmented as its image alone."""
    ws, loaded = champion
    assert (loaded.image_size, loaded.native_size) == (ws.params.data.image_size, ws.holdout_shape()) == (32, (32, 32))
    size, native = loaded.image_size, (48, 48)
    pairs = holdout_with_objects(ws, 4)

    def up(a, resample=Image.BILINEAR):
        return np.array(Image.fromarray(a).resize(native[::-1], resample))  # writable, as read_image gives

    images = [up(read_image(p.image)) for p in pairs]
    judge = eval_transforms(size)
    for image in images:
        mask = segment(loaded.model, image, size, native=native)
        x, _ = judge(image, np.zeros(native, np.uint8))  # what the gate's evaluation feeds the model
        with torch.no_grad():
            logits = torch.nn.functional.interpolate(loaded.model.eval()(x[None]), native, mode="bilinear")
        assert mask.shape == native and (mask == logits[0].argmax(0).numpy()).mean() > 0.99
    mosaic = np.concatenate([np.concatenate(images[:2], axis=1), np.concatenate(images[2:], axis=1)], axis=0)
    alone = [segment(loaded.model, image, size, native=native) for image in images]
    alone = np.concatenate([np.concatenate(alone[:2], axis=1), np.concatenate(alone[2:], axis=1)], axis=0)
    assert (segment(loaded.model, mosaic, size, native=native) == alone).mean() > 0.9


def test_mlflow_models_serve_answers_an_image_with_its_mask(champion, tmp_path):
    import httpx

    from incseg.serving import encode_png

    ws, loaded = champion
    pair = holdout_with_objects(ws, 1)[0]
    port = free_port()
    bin_dir = os.path.dirname(sys.executable)  # the scoring server is `uvicorn` from the same venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": ws.tracking_uri, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{ws.params.model.name}@champion",
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    # its own group: the scoring server (uvicorn) is a child of `mlflow models serve` and goes with it
    with (tmp_path / "serve.log").open("w") as log, \
            processes.running(command, env=env, stdout=log, stderr=subprocess.STDOUT) as proc:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=180)
        url = f"http://127.0.0.1:{port}/invocations"
        png = httpx.post(url, json={"dataframe_records": [{"image": encode_png(pair.image)}]}, timeout=60)
        assert png.status_code == 200, png.text
        rgb = read_image(pair.image)
        array = httpx.post(url, json={"inputs": rgb.tolist()}, timeout=60)
        assert array.status_code == 200, array.text
    expected = segment(loaded.model, rgb, ws.params.data.image_size)
    for response in (png, array):
        (mask,) = [np.array(m) for m in response.json()["predictions"]]
        assert mask.shape == rgb.shape[:2]
        assert set(np.unique(mask)) <= set(loaded.classes)
        assert np.array_equal(mask, expected)


def test_onnx_export_agrees_with_pytorch_and_is_logged_to_the_version(champion, tmp_path):
    import onnx

    from incseg.export import session

    ws, loaded = champion
    result = CliRunner().invoke(app, ["-C", str(ws.root), "export", "--format", "onnx", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "max abs logit difference" in " ".join(result.output.split())
    path = tmp_path / f"{ws.params.model.name}-v{loaded.version}.onnx"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["classes.json", path.name]  # self-contained
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["classes"]) == {str(k): v for k, v in loaded.classes.items()}
    assert int(meta["image_size"]) == loaded.image_size  # what an ONNX user needs to scale images as predict does
    assert json.loads(meta["native_size"]) == list(loaded.native_size) and json.loads(meta["taught"]) == sorted(
        loaded.classes)

    reg = ModelRegistry(ws)
    tags = reg.version(loaded.version).tags
    assert float(tags["onnx_argmax_agreement"]) >= 0.999
    logged = {f.path for f in reg.client.list_artifacts(loaded.run_id, "onnx")}
    assert {f"onnx/{path.name}", "onnx/classes.json", "onnx/check.json"} <= logged
    # dynamic batch and spatial size
    out = session(path).run(["logits"], {"image": np.zeros((2, 3, 40, 56), np.float32)})[0]
    assert out.shape == (2, len(loaded.classes), 40, 56)


def test_the_latency_bench_measures_the_configured_model(tmp_path):
    """`incseg bench --inference` times the U-Net params.yaml describes, depth included, and says so."""
    from incseg.bench import inference as bench_inference
    from incseg.models import build_model

    params = tiny_params(model={"width": 4, "depth": 4})
    result = bench_inference.run(params, quick=True)
    assert (result["width"], result["depth"]) == (4, 4)
    # the model timed is the one described: its checkpoint weighs what a depth-4 U-Net's weights do
    # (0.49 MB at width 4; depth 3: 0.12 MB), not only the echoed params
    weights_mb = sum(t.numel() * t.element_size() for t in build_model("unet", 5, 4, 4).state_dict().values()) / 1e6
    assert weights_mb <= result["checkpoint_mb"] < 1.2 * weights_mb
    assert {r["size"] for r in result["rows"]} == {64, 128} and all(r["p50_ms"] > 0 for r in result["rows"])
    assert "unet (width 4, depth 4)" in bench_inference.markdown(result, "incseg bench --inference --quick")
