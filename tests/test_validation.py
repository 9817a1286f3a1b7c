"""Real Great Expectations validation on real files, one test per kind of bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from incseg.config import ValidationParams
from incseg.data.layout import list_batches
from incseg.validation import quarantine, valid_pairs, validate_batch
from incseg.validation.history import earlier_profiles

N_CLASSES = 5


@pytest.fixture
def batch(stream_dir, tmp_path):
    """A private copy of the clean base batch (24 pairs)."""
    dst = tmp_path / "registry" / "batch-00"
    shutil.copytree(stream_dir / "registry" / "batch-00", dst)
    for extra in sorted((dst / "images").glob("*.png"))[24:]:
        extra.unlink()
        (dst / "masks" / extra.name).unlink()
    return dst


def stem0(batch):
    return sorted((batch / "images").glob("*.png"))[0].stem


def checks_of(report, stem):
    return {f.check for f in report.failures if f.stem == stem}


def files_of(batch):
    return sorted(p.relative_to(batch).as_posix() + ":" + str(p.stat().st_size) for p in batch.rglob("*") if p.is_file())


def run(batch, **params):
    return validate_batch(batch, N_CLASSES, ValidationParams(**params))


def test_clean_batch_passes(batch):
    report, _, raw = run(batch)
    assert report.failures == [] and report.batch_errors == [] and not report.rejected
    assert len(report.valid_stems) == 24
    assert raw["success"] is True


@pytest.mark.parametrize(
    "damage, check",
    [
        ("truncate", "image_readable"),
        ("not_an_image", "image_readable"),
        ("zero_bytes", "image_readable"),
        ("sixteen_bit_image", "image_readable"),
        ("size_mismatch", "same_size"),
        ("rgb_mask", "mask_single_channel"),
        ("unknown_label", "known_label_ids"),
        ("all_ignore", "ignore_fraction_bounded"),
        ("sixteen_bit_mask", "mask_single_channel"),
        ("oversized", "width_within_bounds"),
    ],
)
def test_each_bad_file_is_named_and_nothing_is_lost(batch, tmp_path, damage, check):
    stem = stem0(batch)
    img, msk = batch / "images" / f"{stem}.png", batch / "masks" / f"{stem}.png"
    mask = np.array(Image.open(msk))
    if damage == "truncate":
        img.write_bytes(img.read_bytes()[:200])
    elif damage == "not_an_image":
        img.write_text("this is not a PNG")
    elif damage == "zero_bytes":
        img.write_bytes(b"")
    elif damage == "sixteen_bit_image":
        Image.fromarray(np.array(Image.open(img).convert("L")).astype(np.uint16) * 256).save(img)  # 16-bit PNG
    elif damage == "size_mismatch":
        Image.fromarray(mask[:20, :20]).save(msk)
    elif damage == "rgb_mask":
        Image.fromarray(np.stack([mask] * 3, -1)).save(msk)
    elif damage == "unknown_label":
        mask[:4, :4] = 17
        Image.fromarray(mask).save(msk)
    elif damage == "all_ignore":
        Image.fromarray(np.full_like(mask, 255)).save(msk)
    elif damage == "sixteen_bit_mask":
        Image.fromarray(mask.astype(np.uint16) * 300).save(msk)  # 16-bit PNG
    elif damage == "oversized":
        Image.fromarray(np.zeros((8, 9000, 3), np.uint8)).save(img)
        Image.fromarray(np.zeros((8, 9000), np.uint8)).save(msk)
    before = files_of(batch)
    report, table, _ = run(batch)
    assert check in checks_of(report, stem), report.failures
    if check.endswith("_readable"):  # the cause alone: an unreadable file's size is unknown, not "differs"
        assert checks_of(report, stem) == {check}, report.failures
    assert not report.rejected  # one bad file in 24: the rest proceeds
    assert stem not in report.valid_stems and len(report.valid_stems) == 23
    assert stem not in {p.stem for p in valid_pairs(table, report)}
    out = quarantine(report, table, tmp_path / "quarantine" / batch.name)
    reasons = json.loads((out / "reason.json").read_text())["files"]
    assert check in {r["check"] for r in reasons[stem]}
    assert files_of(batch) == before  # the registry is never modified


def test_all_background_mask_is_refused(batch):
    stem = stem0(batch)
    msk = batch / "masks" / f"{stem}.png"
    Image.fromarray(np.zeros_like(np.array(Image.open(msk)))).save(msk)
    report, _, _ = run(batch)
    assert "mask_not_empty" in checks_of(report, stem)
    # a defect-inspection set holds images without objects: the refusal names the knob that takes them
    failure = next(f for f in report.failures if f.check == "mask_not_empty")
    assert "validation.min_foreground_fraction; 0 takes images without objects" in failure.message
    report, _, _ = validate_batch(batch, N_CLASSES, ValidationParams(min_foreground_fraction=0))
    assert stem in report.valid_stems and not report.rejected


def test_a_mask_with_one_small_object_is_not_empty(batch):
    """The check is for masks with nothing labelled: a lesion, a defect or a far-off sign of 0.05 % of
    the image was refused as "all background" by a 0.1 % floor."""
    stem = stem0(batch)
    msk = batch / "masks" / f"{stem}.png"
    mask = np.zeros_like(np.array(Image.open(msk)))
    mask[:2, :2] = 1  # 4 pixels of 64 x 64: 0.1 %, then 1 of them
    Image.fromarray(mask).save(msk)
    report, _, _ = run(batch)
    assert stem in report.valid_stems, report.failures
    mask[:2, :2] = 0
    mask[0, 0] = 1
    Image.fromarray(mask).save(msk)
    report, _, _ = run(batch)
    assert stem in report.valid_stems, report.failures


def test_rgb_mask_message_says_so(batch):
    stem = stem0(batch)
    msk = batch / "masks" / f"{stem}.png"
    Image.fromarray(np.stack([np.array(Image.open(msk))] * 3, -1)).save(msk)
    report, _, _ = run(batch)
    failure = next(f for f in report.failures if f.check == "mask_single_channel")
    assert failure.observed == "RGB" and "RGB" in failure.message


def test_orphans_on_both_sides(batch):
    stems = sorted(p.stem for p in (batch / "images").glob("*.png"))
    (batch / "masks" / f"{stems[0]}.png").unlink()
    (batch / "images" / f"{stems[1]}.png").unlink()
    mask = batch / "masks" / f"{stems[2]}.png"  # a mask saved as JPEG: there, but not a label map to trust
    Image.open(mask).save(mask.with_suffix(".jpg"), quality=95)
    mask.unlink()
    report, _, _ = run(batch)
    # each file is failed for its cause alone, the cause shown (a missing file is not also "unreadable")
    assert checks_of(report, stems[0]) == {"mask_present"} and checks_of(report, stems[1]) == {"image_present"}
    assert checks_of(report, stems[2]) == {"mask_readable"}
    observed = {(f.stem, f.check): f.observed for f in report.failures}
    assert observed[stems[0], "mask_present"] == f"no masks/{stems[0]}.(png|bmp|tif)"
    assert observed[stems[1], "image_present"] == f"no images/{stems[1]}.(png|jpg|bmp|tif|webp)"
    assert observed[stems[2], "mask_readable"].startswith("a .jpg mask: lossy compression blurs the label ids")
    rows = [line for line in report.markdown().splitlines() if line.startswith(f"| {stems[0]} ")]
    assert [row.replace("\\|", "").count("|") for row in rows] == [5], rows  # "(png|bmp|tif)" stays in its cell


def test_duplicate_images_within_the_batch(batch):
    stems = sorted(p.stem for p in (batch / "images").glob("*.png"))
    shutil.copyfile(batch / "images" / f"{stems[0]}.png", batch / "images" / f"{stems[1]}.png")
    report, _, _ = run(batch)
    assert checks_of(report, stems[1]) == {"unique_in_batch"}
    assert stems[0] in report.valid_stems  # the first copy is kept


def test_resent_batch_is_rejected(batch, tmp_path):
    registry = batch.parent
    shutil.copytree(batch, registry / "batch-07")
    assert list_batches(registry) == ["batch-00", "batch-07"]
    earlier = earlier_profiles(registry, "batch-07", N_CLASSES, tmp_path / "profiles")
    report, _, _ = validate_batch(registry / "batch-07", N_CLASSES, ValidationParams(), earlier)
    assert report.rejected and any("re-send" in e and "batch-00" in e for e in report.batch_errors)
    assert {f.check for f in report.failures} == {"not_in_registry"}


def test_empty_batch_is_rejected(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    report, _, _ = validate_batch(tmp_path / "empty", N_CLASSES, ValidationParams())
    assert report.rejected and any("empty" in e for e in report.batch_errors)


def test_mostly_bad_batch_is_rejected(batch):
    for img in sorted((batch / "images").glob("*.png"))[:12]:
        img.write_bytes(b"")
    report, _, _ = run(batch)
    assert report.rejected and any("too few valid files: 12/24 (50% < 80%, validation.min_valid_fraction)" in e
                                   for e in report.batch_errors)
    # why, in the same line: the commonest failure, counted, with one file's reason
    first = sorted((batch / "images").glob("*.png"))[0].stem
    why = f"most often image_readable (12 files; e.g. {first}: empty file (0 bytes))"
    assert any(why in e for e in report.batch_errors), report.batch_errors


def test_drift_warns_by_default_and_blocks_when_asked(stream_dir, tmp_path):
    registry = tmp_path / "registry"
    for b in ("batch-00", "batch-03"):  # base, then the domain-shift batch (darker)
        shutil.copytree(stream_dir / "registry" / b, registry / b)
    earlier = earlier_profiles(registry, "batch-03", N_CLASSES, tmp_path / "profiles")
    warn, _, _ = validate_batch(registry / "batch-03", N_CLASSES, ValidationParams(), earlier)
    assert not warn.rejected and any(w.startswith("brightness_drift") for w in warn.warnings)
    drift = next(w for w in warn.warnings if w.startswith("brightness_drift"))
    assert "(validation.drift_max_brightness_shift), observed " in drift
    assert len(drift.rsplit("observed ", 1)[1]) <= 6  # a mean to four digits, not its full repr
    block, _, _ = validate_batch(registry / "batch-03", N_CLASSES, ValidationParams(drift_blocks=True), earlier)
    assert block.rejected and any(e.startswith("brightness_drift") for e in block.batch_errors)
    same, _, _ = validate_batch(registry / "batch-00", N_CLASSES, ValidationParams(), [])
    assert same.warnings == []


def test_holdout_images_in_a_training_batch_are_failed_by_name(tmp_path):
    """A batch holding images of the holdout was accepted: the model trained on the gate's test set and
    every later verdict was inflated. Each such file now fails `not_in_holdout`, named and quarantined;
    the rest of the batch trains. `incseg validate` says so too, and passes the holdout itself."""
    from typer.testing import CliRunner

    from helpers import make_workspace
    from incseg.cli import app
    from incseg.data.layout import find_pairs
    from incseg.pipeline import check_batch

    ws = make_workspace(tmp_path / "ws")
    batch = ws.registry_dir / "batch-00"
    for i, p in enumerate(find_pairs(ws.holdout_dir)[:2]):
        shutil.copyfile(p.image, batch / "images" / f"leak{i}{p.image.suffix}")
        shutil.copyfile(p.mask, batch / "masks" / f"leak{i}.png")
    checked = check_batch(ws, "batch-00")
    assert checked.batch is not None and not checked.report.rejected
    assert sorted((f.stem, f.check) for f in checked.report.failures) == [("leak0", "not_in_holdout"),
                                                                         ("leak1", "not_in_holdout")]
    assert sorted(p.stem for p in (ws.quarantine_dir / "batch-00" / "images").iterdir()) == ["leak0", "leak1"]
    assert not {"leak0", "leak1"} & {p.stem for p in checked.batch.pairs}
    assert len(checked.batch.pairs) == len(find_pairs(batch)) - 2

    told = CliRunner().invoke(app, ["-C", str(ws.root), "validate", str(batch), "--no-fail"])
    assert told.exit_code == 0 and "leak0" in told.output and "not_in_holdout" in told.output, told.output
    itself = CliRunner().invoke(app, ["-C", str(ws.root), "validate", str(ws.holdout_dir)])
    assert itself.exit_code == 0 and "not_in_holdout" not in itself.output, itself.output


def test_the_cli_shows_twenty_failures_counts_the_rest_and_reports_every_one(batch, stream_dir, tmp_path):
    """A folder failing as a whole (here every mask saved in colour) printed one row per file: ten thousand
    for a large folder. The table stops at twenty; the rest are counted by check; `--report` lists all."""
    from typer.testing import CliRunner

    from incseg.cli import app

    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "data").mkdir()
    shutil.copyfile(stream_dir / "classes.yaml", tmp_path / "data" / "classes.yaml")
    for mask in sorted((batch / "masks").glob("*.png")):
        Image.fromarray(np.stack([np.array(Image.open(mask))] * 3, -1) * 40).save(mask)
    result = CliRunner().invoke(app, ["-C", str(tmp_path), "validate", str(batch), "--report", "r.json"],
                                terminal_width=200)
    assert result.exit_code == 1
    rows = [line for line in result.output.splitlines() if "mask_single_channel" in line and "RGB" in line]
    assert len(rows) == 20
    assert "... and 4 more failures (mask_single_channel 4): `--report FILE` lists every one" in result.output
    listed = json.loads((tmp_path / "r.json").read_text())["batches"]["batch-00"]["failures"]
    assert len(listed) == 24 and {f["check"] for f in listed} == {"mask_single_channel"}
    assert {f["stem"] for f in listed} == {p.stem for p in (batch / "masks").glob("*.png")}


def test_the_cli_shows_why_a_file_is_unreadable_in_full(batch, stream_dir, tmp_path):
    """The reason a file cannot be read carries what to do about it (a 16-bit photo: save it with 8 bits
    per channel); the table cut it at 30 characters, advice and all."""
    from typer.testing import CliRunner

    from incseg.cli import app

    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "data").mkdir()
    shutil.copyfile(stream_dir / "classes.yaml", tmp_path / "data" / "classes.yaml")
    img = batch / "images" / f"{stem0(batch)}.png"
    Image.fromarray(np.array(Image.open(img).convert("L")).astype(np.uint16) * 256).save(img)
    result = CliRunner().invoke(app, ["-C", str(tmp_path), "validate", str(batch)], terminal_width=100)
    assert result.exit_code == 0, result.output  # one bad file in 24: accepted, the file named
    assert "save it with 8 bits per channel (your range scaled to 0-255) first" in " ".join(result.output.split())
    assert "same_size" not in result.output
