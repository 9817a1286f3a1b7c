import numpy as np

from incseg.config import SynthParams
from incseg.data.layout import BatchInfo, find_pairs, list_batches, read_classes, read_image, read_mask
from incseg.data.synthetic import poison_batch, synthesize


def test_stream_layout_and_protocol(stream_dir):
    classes = read_classes(stream_dir / "classes.yaml")
    assert classes == {0: "background", 1: "square", 2: "circle", 3: "triangle", 4: "ring"}
    assert list_batches(stream_dir / "registry") == ["batch-00", "batch-01", "batch-02", "batch-03"]
    infos = [BatchInfo.read(stream_dir / "registry" / b) for b in list_batches(stream_dir / "registry")]
    assert [i.kind for i in infos] == ["base", "new-class", "new-class", "domain-shift"]
    assert infos[1].new_classes == [3] and infos[1].classes == [3]  # old classes labelled background
    # every class of classes.yaml occurs in the holdout
    holdout_ids = set()
    for p in find_pairs(stream_dir / "holdout"):
        holdout_ids |= set(np.unique(read_mask(p.mask)).tolist())
    assert holdout_ids == set(classes)
    # a new-class batch has its class in every mask, and nothing else labelled
    for p in find_pairs(stream_dir / "registry" / "batch-01"):
        assert set(np.unique(read_mask(p.mask)).tolist()) == {0, 3}
    img = read_image(find_pairs(stream_dir / "registry" / "batch-00")[0].image)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8


def test_stream_is_deterministic(tmp_path):
    p = SynthParams(size=24, base_images=3, step_images=2, holdout_per_class=1, new_classes=1)
    synthesize(tmp_path / "a", p)
    synthesize(tmp_path / "b", p)
    for rel in ("registry/batch-01/images/batch-01_0001.png", "holdout/masks/holdout_2_000.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    other = SynthParams(**{**p.model_dump(), "seed": 1})
    synthesize(tmp_path / "c", other)
    rel = "registry/batch-00/images/batch-00_0000.png"
    assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()


def test_domain_shift_batch_is_darker(stream_dir):
    def brightness(batch):
        return np.mean([read_image(p.image).mean() for p in find_pairs(stream_dir / "registry" / batch)])

    assert brightness("batch-03") < 0.85 * brightness("batch-00")


def test_poisoned_batch_permutes_labels(stream_dir, tmp_path):
    src = stream_dir / "registry" / "batch-00"
    poison_batch(src, tmp_path / "poison")
    a, b = find_pairs(src)[0], find_pairs(tmp_path / "poison")[0]
    m, pm = read_mask(a.mask), read_mask(b.mask)
    lut = {0: 1, 1: 2, 2: 0}
    assert np.array_equal(np.vectorize(lut.get)(m), pm)
    assert np.abs(read_image(a.image).astype(int) - read_image(b.image)).max() <= 1
    assert a.image.read_bytes() != b.image.read_bytes()


def test_the_blobs_look_differs_from_shapes_and_keeps_the_layout(tmp_path):
    """A second family of textures and shapes, same layout and protocol: nothing downstream changes."""
    from typer.testing import CliRunner

    from incseg.cli import app

    (tmp_path / "params.yaml").write_text("synth: {size: 24, base_images: 4, step_images: 3, holdout_per_class: 1}\n")
    runner = CliRunner()
    assert runner.invoke(app, ["-C", str(tmp_path), "data", "synth", "--style", "blobs", "--out", str(tmp_path / "b")]).exit_code == 0
    assert runner.invoke(app, ["-C", str(tmp_path), "data", "synth", "--out", str(tmp_path / "s")]).exit_code == 0
    blobs, shapes = read_classes(tmp_path / "b" / "classes.yaml"), read_classes(tmp_path / "s" / "classes.yaml")
    assert len(blobs) == len(shapes) and set(blobs.values()).isdisjoint(set(shapes.values()) - {"background"})
    assert list_batches(tmp_path / "b" / "registry") == list_batches(tmp_path / "s" / "registry")
    pair = find_pairs(tmp_path / "b" / "registry" / "batch-01")[0]
    assert set(np.unique(read_mask(pair.mask)).tolist()) == {0, 3}  # the disjoint protocol holds
    a = read_image(find_pairs(tmp_path / "b" / "registry" / "batch-00")[0].image)
    b = read_image(find_pairs(tmp_path / "s" / "registry" / "batch-00")[0].image)
    assert a.shape == b.shape and not np.array_equal(a, b)
    bad = runner.invoke(app, ["-C", str(tmp_path), "data", "synth", "--style", "plaid"])
    said = " ".join(bad.output.replace("│", " ").split())  # click's usage error, in a box that wraps lines
    assert bad.exit_code == 2 and "'plaid' is not one of 'shapes', 'blobs'" in said, said


def test_recipe_ablation_runs_on_both_looks(tmp_path):
    from incseg.bench import recipe
    from incseg.config import Params

    base = recipe.with_changes(Params(), {"train.bootstrap_max_steps": 4, "train.bootstrap_min_steps": 0,
                                          "train.eval_every": 2, "model.width": 4})
    result = recipe.run(base, ["default", "lr 3e-3"], images=12, size=16)
    assert [(r["style"], r["variant"]) for r in result["rows"]] == [
        ("shapes", "default"), ("shapes", "lr 3e-3"), ("blobs", "default"), ("blobs", "lr 3e-3")]
    assert all(r["steps"] == 4 and len(r["curve"]) == 2 and 0 <= r["holdout_miou"] <= 1 for r in result["rows"])
    assert "| blobs | lr 3e-3 |" in recipe.markdown(result, "test")
