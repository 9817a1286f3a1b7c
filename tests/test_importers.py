"""VOC and Cityscapes layouts, made here in miniature, imported with torchvision's parsers."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from PIL import Image

from incseg.data.layout import DataError, read_classes, read_mask
from incseg.datastore import add_data, init_workspace, tracked_batches
from incseg.workspace import Workspace


@pytest.fixture
def ws(tmp_path):
    return Workspace(init_workspace(tmp_path / "ws"))


def make_voc(root):
    voc = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    ids = {"2007_000001": 15, "2007_000002": 12}
    for stem, cls in ids.items():
        Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(voc / "JPEGImages" / f"{stem}.jpg")
        mask = np.zeros((40, 48), np.uint8)
        mask[10:30, 10:30] = cls
        mask[9, 9:31] = 255  # VOC's ignore border
        im = Image.fromarray(mask, "P")
        im.putpalette([v for i in range(256) for v in (i * 3 % 256, i * 7 % 256, i * 11 % 256)])
        im.save(voc / "SegmentationClass" / f"{stem}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    return voc, ids


def test_voc_layout_imports_with_label_ids(ws, tmp_path):
    voc, ids = make_voc(tmp_path)
    shown = []  # the CLI's progress bar sees every pair as it is copied

    def progress(pairs):
        for p in pairs:
            shown.append(p.stem)
            yield p
    dst, info, h = add_data(ws, voc, "voc-01", progress=progress)
    assert shown == sorted(ids)
    assert read_classes(ws.classes_file)[15] == "person"
    assert info.classes == [0, 12, 15] and h.startswith("md5:")
    for stem, cls in ids.items():
        assert (dst / "images" / f"{stem}.jpg").exists()
        assert set(np.unique(read_mask(dst / "masks" / f"{stem}.png")).tolist()) == {0, cls, 255}
    assert tracked_batches(ws.registry_dir) == {"voc-01": h}


def test_validate_reads_a_voc_layout_as_data_add_would(ws, tmp_path):
    """`incseg validate VOC2012` found no images/ + masks/ and called the folder an empty batch; it now
    validates the pairs as `data add` would register them (the layout's class names when the workspace
    has none), registering nothing."""
    from typer.testing import CliRunner

    from incseg.cli import app

    voc, ids = make_voc(tmp_path)
    for i, stem in enumerate(ids):  # two different photos (the fixture's are one gray)
        Image.fromarray(np.full((40, 48, 3), 60 + 40 * i, np.uint8)).save(voc / "JPEGImages" / f"{stem}.jpg")
    result = CliRunner().invoke(app, ["-C", str(ws.root), "validate", str(voc)])
    said = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "voc layout, split train" in said and "2 files, 2 valid: accepted" in said
    assert not ws.classes_file.exists() and list(ws.registry_dir.glob("*")) == []  # nothing installed or registered
    missing = CliRunner().invoke(app, ["-C", str(ws.root), "validate", str(voc), "--split", "val"])
    assert missing.exit_code == 1 and "val" in missing.output and "Traceback" not in missing.output, missing.output
    folder = tmp_path / "folder"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    plain = CliRunner().invoke(app, ["-C", str(ws.root), "validate", str(folder)], terminal_width=400)
    said = " ".join(plain.output.split())
    assert plain.exit_code == 1 and f"{ws.classes_file}: missing: `incseg data add SRC --classes FILE`" in said, said


def test_cityscapes_layout_maps_label_ids_to_train_ids(ws, tmp_path):
    cs = tmp_path / "cityscapes"
    (cs / "leftImg8bit/train/aachen").mkdir(parents=True)
    (cs / "gtFine/train/aachen").mkdir(parents=True)
    stem = "aachen_000000_000019"
    Image.fromarray(np.full((32, 64, 3), 120, np.uint8)).save(cs / f"leftImg8bit/train/aachen/{stem}_leftImg8bit.png")
    label_ids = np.zeros((32, 64), np.uint8)  # 0 = unlabeled -> ignore
    label_ids[:16] = 7  # road -> train id 0
    label_ids[16:, :32] = 26  # car -> train id 13
    Image.fromarray(label_ids, "L").save(cs / f"gtFine/train/aachen/{stem}_gtFine_labelIds.png")
    dst, info, _ = add_data(ws, cs, "cs-01")
    mask = read_mask(dst / "masks" / f"{stem}.png")
    assert mask[0, 0] == 0 and mask[20, 0] == 13 and mask[20, 40] == 255
    assert info.classes == [0, 13]
    classes = read_classes(ws.classes_file)
    assert len(classes) == 19 and classes[0] == "road" and classes[13] == "car"


def test_plain_folder_and_hostile_ids(ws, stream_dir):
    add_data(ws, stream_dir / "holdout", holdout=True, classes=stream_dir / "classes.yaml")
    dst, info, _ = add_data(ws, stream_dir / "registry" / "batch-01")
    assert info.classes == [3] and dst == ws.registry_dir / "batch-01"
    for bad in ("../escape", "/abs", ".hidden", "a/b"):
        with pytest.raises(DataError, match="invalid batch id"):
            add_data(ws, stream_dir / "registry" / "batch-02", bad)


def test_holdout_is_fixed_unless_forced(ws, stream_dir, tmp_path):
    import shutil

    add_data(ws, stream_dir / "holdout", holdout=True, classes=stream_dir / "classes.yaml")
    with pytest.raises(DataError, match="incomparable"):
        add_data(ws, stream_dir / "registry" / "batch-00", holdout=True)
    # a forced replacement the import refuses leaves the holdout as it was (it was deleted first, so lost)
    before = {p.relative_to(ws.holdout_dir): p.read_bytes() for p in ws.holdout_dir.rglob("*") if p.is_file()}
    bad = tmp_path / "bad"
    shutil.copytree(stream_dir / "registry" / "batch-00", bad)
    next((bad / "masks").iterdir()).unlink()  # an image without its mask
    with pytest.raises(DataError, match="pair with nothing"):
        add_data(ws, bad, holdout=True, force=True)
    assert {p.relative_to(ws.holdout_dir): p.read_bytes() for p in ws.holdout_dir.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in ws.data_dir.iterdir() if p.name.startswith(".")) == [".gitignore"]

    # a class named later comes with the data that brings it: `--classes` was ignored once the workspace had
    # names (the new ids then refused as unknown); now it may add ids after the last, never rename one
    names = (stream_dir / "classes.yaml").read_text()
    more, renamed = tmp_path / "more.yaml", tmp_path / "renamed.yaml"
    more.write_text(names + "5: truck\n")
    renamed.write_text(names.replace("square", "box") + "5: truck\n")
    with pytest.raises(DataError, match=rf"{renamed}: id 1 is 'box' there but 'square' in {ws.classes_file}"):
        add_data(ws, stream_dir / "registry" / "batch-00", holdout=True, force=True, classes=renamed)
    with pytest.raises(DataError, match="pair with nothing"):  # refused: the names stay as they were too
        add_data(ws, bad, holdout=True, force=True, classes=more)
    assert ws.classes_file.read_text() == names
    assert {p.relative_to(ws.holdout_dir): p.read_bytes() for p in ws.holdout_dir.rglob("*") if p.is_file()} == before
    add_data(ws, stream_dir / "registry" / "batch-00", holdout=True, force=True, classes=more)
    assert read_classes(ws.classes_file)[5] == "truck"
    tracked = subprocess.run(["git", "show", "HEAD:data/classes.yaml"], cwd=ws.root, capture_output=True, text=True)
    assert "5: truck" in tracked.stdout  # committed with the data
    add_data(ws, stream_dir / "registry" / "batch-00", holdout=True, force=True)
    assert len(list((ws.holdout_dir / "masks").iterdir())) == len(list((stream_dir / "registry/batch-00/masks").iterdir()))


def test_symlinked_files_are_refused(ws, stream_dir, tmp_path):
    import shutil

    src = tmp_path / "linky"
    shutil.copytree(stream_dir / "registry" / "batch-01", src)
    victim = sorted((src / "images").iterdir())[0]
    victim.unlink()
    victim.symlink_to("/etc/hostname")
    with pytest.raises(DataError, match="symbolic links are refused"):
        add_data(ws, src, "linky", classes=stream_dir / "classes.yaml")
    assert not (ws.registry_dir / "linky").exists()
    assert [p.name for p in ws.registry_dir.iterdir()] == []


def test_a_plain_folder_needs_every_file_paired_and_the_class_names(ws, stream_dir, tmp_path):
    import shutil

    src = tmp_path / "loose"
    shutil.copytree(stream_dir / "registry" / "batch-01", src)
    mask = sorted((src / "masks").iterdir())[0]
    mask.rename(mask.with_suffix(".jpg"))  # a mask saved as JPEG: its image pairs with nothing either
    (src / "images" / ".DS_Store").write_bytes(b"\0")  # not an image file: not counted
    image = next((src / "images").glob(f"{mask.stem}.*"))
    twin = sorted((src / "images").iterdir())[-1]
    (src / "images" / "more" / "deeper").mkdir(parents=True)  # pairs a level down were left out without a word
    shutil.copyfile(twin, src / "images" / "more" / "deeper" / twin.name)
    (src / "masks" / ".cache").mkdir()  # hidden: a tool's, not data
    with pytest.raises(DataError, match=r"images/more/ holds image files, and only the files directly in images/ and "
                                        r"masks/ are read"):
        add_data(ws, src, "loose")
    shutil.rmtree(src / "images" / "more")
    shutil.copyfile(twin, twin.with_suffix(".jpg"))  # one stem, two images: which one the mask labels is unknown
    with pytest.raises(DataError, match=rf"1 stem\(s\) name two files: images/{twin.stem}\.jpg and "
                                        rf"images/{twin.name}\. A mask"):
        add_data(ws, src, "loose")
    twin.with_suffix(".jpg").unlink()
    with pytest.raises(DataError, match=rf"1 mask\(s\) in a lossy format: masks/{mask.stem}\.jpg\. JPEG and WebP "
                                        r"compression blurs the label ids .* \(a JPEG re-saved as PNG keeps the blur\)"):
        add_data(ws, src, "loose")
    mask.with_suffix(".jpg").unlink()
    with pytest.raises(DataError, match=rf"1 file\(s\) pair with nothing: images/{image.name}\. Each"):
        add_data(ws, src, "loose")
    assert [p.name for p in ws.registry_dir.iterdir()] == []
    image.unlink()
    with pytest.raises(DataError, match=r"classes\.yaml: missing, and a plain folder names no classes"):
        add_data(ws, src, "loose")
    broken = tmp_path / "classes.yaml"
    broken.write_text("1: square\n")  # no background
    with pytest.raises(DataError, match=rf"{broken}: .*missing 0: .*`0: background`"):
        add_data(ws, src, "loose", classes=broken)
    broken.write_text("0: background\n3: square\n7: circle\n")  # a dataset's sparse ids: say which to add
    with pytest.raises(DataError, match=rf"{broken}: label ids must be 0\.\.7 without gaps; missing 1, 2, 4, 5, 6: "
                                        r"name them too \(e\.g\. `1: unused`\)"):
        add_data(ws, src, "loose", classes=broken)
    broken.write_text("0: background\n1: square\n2: ' square'\n")  # one name twice: one row in every report
    with pytest.raises(DataError, match=rf"{broken}: ids 1 and 2 are both named 'square': give each id its own"):
        add_data(ws, src, "loose", classes=broken)
    broken.write_text("0: background\n1: ''\n")
    with pytest.raises(DataError, match=rf"{broken}: id 1 has an empty name"):
        add_data(ws, src, "loose", classes=broken)
    assert not ws.classes_file.exists() and [p.name for p in ws.registry_dir.iterdir()] == []
    dst, _, _ = add_data(ws, src, "loose", classes=stream_dir / "classes.yaml")
    before = len(list((stream_dir / "registry" / "batch-01" / "masks").iterdir()))
    assert len(list((dst / "masks").iterdir())) == before - 1


def test_masks_named_after_their_images_with_a_suffix_are_said_to_be(ws, stream_dir, tmp_path):
    """ISIC's masks are ISIC_0000000_segmentation.png for ISIC_0000000.jpg, a tool's x_mask.png: every file
    "paired with nothing", and the error listed them without saying why. It now names the suffix the masks
    add and how to rename them; a name the masks add in front is named too."""
    import shutil

    src = tmp_path / "isic"
    shutil.copytree(stream_dir / "registry" / "batch-01", src)
    masks = sorted((src / "masks").iterdir())
    for m in masks:
        m.rename(m.with_name(f"{m.stem}_segmentation.png"))
    said = rf"isic: the masks are named after their images with '_segmentation' added \(masks/{masks[0].stem}" \
        rf"_segmentation\.png for images/{masks[0].stem}\."
    with pytest.raises(DataError, match=said) as refused:
        add_data(ws, src, "isic")
    assert 'mv "$f" "${f%_segmentation.png}.png"' in str(refused.value)  # the way out, as a shell line
    for m in masks:
        m.with_name(f"{m.stem}_segmentation.png").rename(m.with_name(f"mask-{m.name}"))
    with pytest.raises(DataError, match=r"isic: the masks are named after their images with 'mask-' in front"):
        add_data(ws, src, "isic")
    for m in masks[1:]:  # GIF masks (Carvana's) were not even listed: the images alone "paired with nothing"
        Image.open(m.with_name(f"mask-{m.name}")).save(m.with_name(f"mask-{m.stem}.gif"))
        m.with_name(f"mask-{m.name}").unlink()
    with pytest.raises(DataError, match=rf"isic: {len(masks) - 1} GIF mask\(s\): masks/mask-{masks[1].stem}\.gif"):
        add_data(ws, src, "isic")
    for m in masks[1:]:
        Image.open(m.with_name(f"mask-{m.stem}.gif")).save(m.with_name(f"mask-{m.name}"))
        m.with_name(f"mask-{m.stem}.gif").unlink()
    masks[0].with_name(f"mask-{masks[0].name}").rename(masks[0].with_name("other.png"))  # no one rule: as before
    with pytest.raises(DataError, match=r"isic: \d+ file\(s\) pair with nothing"):
        add_data(ws, src, "isic")
    assert [p.name for p in ws.registry_dir.iterdir()] == []


def test_bmp_tiff_and_webp_files_import_masks_as_png(ws, stream_dir, tmp_path):
    """Images in BMP, TIFF or WebP and masks in BMP or TIFF (lossless both) were called files that pair with
    nothing. They import: images byte for byte, masks written as PNG label maps with the same ids; two masks
    of one stem are refused like two images of one."""
    import shutil

    from incseg.data.layout import find_pairs

    src = tmp_path / "formats"
    shutil.copytree(stream_dir / "registry" / "batch-01", src)
    pairs = find_pairs(src)[:5]
    ids = {p.stem: read_mask(p.mask) for p in pairs}
    for p, image_suffix, mask_suffix in zip(pairs, (".bmp", ".TIFF", ".webp", ".tif", ".png"),
                                            (".bmp", ".tif", ".tiff", ".png", ".TIF")):
        with Image.open(p.image) as im:
            im.convert("RGB").save(p.image.with_suffix(image_suffix), lossless=True)
        if image_suffix != p.image.suffix:
            p.image.unlink()
        mask = p.mask.with_suffix(mask_suffix)
        Image.fromarray(ids[p.stem].astype(np.uint16) if mask_suffix == ".TIF" else ids[p.stem]).save(mask)
        if mask_suffix != ".png":
            p.mask.unlink()
    extra = src / "masks" / f"{pairs[0].stem}.png"
    Image.fromarray(ids[pairs[0].stem]).save(extra)
    with pytest.raises(DataError, match=rf"1 stem\(s\) name two files: masks/{pairs[0].stem}\.bmp and "
                                        rf"masks/{pairs[0].stem}\.png\. A mask"):
        add_data(ws, src, "formats", classes=stream_dir / "classes.yaml")
    extra.unlink()
    dst, _, _ = add_data(ws, src, "formats", classes=stream_dir / "classes.yaml")
    assert len(find_pairs(dst)) == len(find_pairs(stream_dir / "registry" / "batch-01"))
    registered = {p.stem: p for p in find_pairs(dst)}
    assert sorted(registered[p.stem].image.suffix for p in pairs) == [".bmp", ".png", ".tif", ".tiff", ".webp"]
    for p in pairs:
        mask = registered[p.stem].mask
        assert mask.suffix == ".png" and np.array_equal(read_mask(mask), ids[p.stem])
        original = next((src / "images").glob(f"{p.stem}.*"))
        assert registered[p.stem].image.read_bytes() == original.read_bytes()


def test_label_maps_in_other_encodings_are_converted_colour_coded_masks_refused(ws, stream_dir, tmp_path):
    """A 1-bit mask, a 16-bit label map, a gray map saved as RGB and an opaque gray + alpha map (what tools
    write) are imported as 8-bit label maps with the same ids (they were refused as 'not a single-channel
    label map'); a colour-coded mask, ids past 255 or transparent pixels are refused, naming the file, and
    nothing is registered."""
    import shutil

    src = tmp_path / "tools"
    shutil.copytree(stream_dir / "registry" / "batch-01", src)
    masks = sorted((src / "masks").iterdir())
    ids = {m.stem: read_mask(m) for m in masks[:2]}
    ids[masks[3].stem] = (read_mask(masks[3]) > 0).astype(np.uint8)
    Image.fromarray(ids[masks[3].stem] > 0).save(masks[3])  # bilevel: 1-bit PNG
    assert Image.open(masks[3]).mode == "1"
    Image.fromarray(ids[masks[0].stem].astype(np.uint16)).save(masks[0])  # 16-bit PNG
    assert Image.open(masks[0]).mode.startswith("I")
    Image.fromarray(np.repeat(ids[masks[1].stem][..., None], 3, axis=2)).save(masks[1])  # gray as RGB
    ids[masks[4].stem] = read_mask(masks[4])
    opaque = np.stack([ids[masks[4].stem], np.full_like(ids[masks[4].stem], 255)], axis=-1)
    Image.fromarray(opaque, "LA").save(masks[4])  # gray + alpha, all opaque (an image editor's)
    colour = np.zeros((*ids[masks[0].stem].shape, 3), np.uint8)
    colour[..., 0] = ids[masks[0].stem] * 40
    wide = ids[masks[0].stem].astype(np.uint16) * 300

    Image.fromarray(colour).save(masks[2])
    with pytest.raises(DataError, match=rf"{masks[2].name}: a colour-coded RGB mask"):
        add_data(ws, src, "tools", classes=stream_dir / "classes.yaml")
    Image.fromarray(wide).save(masks[2])
    with pytest.raises(DataError, match=rf"{masks[2].name}: mask mode I\S* holds values 0\.\.\d+: label ids are 0"):
        add_data(ws, src, "tools", classes=stream_dir / "classes.yaml")
    see_through = opaque.copy()
    see_through[0, 0, 1] = 0
    Image.fromarray(see_through, "LA").save(masks[2])
    with pytest.raises(DataError, match=rf"{masks[2].name}: mask mode LA has transparent pixels"):
        add_data(ws, src, "tools", classes=stream_dir / "classes.yaml")
    assert [p.name for p in ws.registry_dir.iterdir()] == []

    masks[2].unlink()
    next((src / "images").glob(f"{masks[2].stem}.*")).unlink()
    dst, _, _ = add_data(ws, src, "tools", classes=stream_dir / "classes.yaml")
    for stem, expected in ids.items():
        im = Image.open(dst / "masks" / f"{stem}.png")
        assert im.mode == "L" and np.array_equal(np.array(im), expected)


def test_colour_coded_masks_import_through_a_colour_table(ws, stream_dir, tmp_path):
    """Colour-coded RGB masks (CamVid, labelling tools) were refused; with `--colours FILE` they are read
    through the table into the same label ids. A colour the table lacks, or a bad table, is refused naming
    the file (and the colour or id), and nothing is registered."""
    import shutil

    from typer.testing import CliRunner

    from incseg.cli import app

    src = tmp_path / "camvid"
    shutil.copytree(stream_dir / "registry" / "batch-01", src)
    palette = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 64), 3: (64, 64, 192), 255: (255, 255, 255)}
    masks = sorted((src / "masks").iterdir())
    ids = {m.stem: read_mask(m) for m in masks}
    assert set(np.unique(np.concatenate([v.ravel() for v in ids.values()]))) <= set(palette)
    for m in masks:
        rgb = np.zeros((*ids[m.stem].shape, 3), np.uint8)
        for i, colour in palette.items():
            rgb[ids[m.stem] == i] = colour
        Image.fromarray(rgb).save(m)
    table = tmp_path / "colours.yaml"
    table.write_text("".join(f"{i}: [{r}, {g}, {b}]\n" for i, (r, g, b) in palette.items() if i != 3)
                     + '3: "#4040c0"\n')

    user = masks[0]  # the first mask read; the table lacks the colour of one of its classes
    left_out = max(np.unique(ids[user.stem]))
    lacking = tmp_path / "lacking.yaml"
    lacking.write_text("".join(f"{i}: [{r}, {g}, {b}]\n" for i, (r, g, b) in palette.items() if i != left_out))
    shown = ", ".join(map(str, palette[left_out]))
    with pytest.raises(DataError, match=rf"{user.name}: 1 colour\(s\) not in the colour table: \[{shown}\]"):
        add_data(ws, src, "camvid", classes=stream_dir / "classes.yaml", colours=lacking)
    bad = tmp_path / "bad.yaml"
    bad.write_text("0: [0, 0, 0]\n1: [300, 0, 0]\n")
    with pytest.raises(DataError, match=r"bad\.yaml: id 1: \[300, 0, 0\] is not a colour"):
        add_data(ws, src, "camvid", classes=stream_dir / "classes.yaml", colours=bad)
    assert [p.name for p in ws.registry_dir.iterdir()] == []
    assert not ws.colours_file.exists()  # a refused table is not installed

    result = CliRunner().invoke(app, ["-C", str(ws.root), "data", "add", str(src), "--batch-id", "camvid",
                                      "--classes", str(stream_dir / "classes.yaml"), "--colours", str(table)])
    assert result.exit_code == 0, result.output
    dst = ws.registry_dir / "camvid"
    for stem, expected in ids.items():
        im = Image.open(dst / "masks" / f"{stem}.png")
        assert im.mode == "L" and np.array_equal(np.array(im), expected)
    assert "camvid" in tracked_batches(ws.registry_dir)
    # the table is the workspace's now, versioned with the data: the next batch needs no --colours
    assert ws.colours_file.read_text() == table.read_text()
    committed = subprocess.run(["git", "ls-files", str(ws.colours_file)], cwd=ws.root, capture_output=True, text=True)
    assert committed.stdout.strip() == "data/colours.yaml"
    checked = CliRunner().invoke(app, ["-C", str(ws.root), "validate", str(src), "--no-fail"])
    said = " ".join(checked.output.split())
    assert checked.exit_code == 0 and "colour-coded masks, colours from" in said, checked.output
    assert "mask_single_channel" not in said and f"camvid: {len(masks)} files" in said  # read through the table
    later = CliRunner().invoke(app, ["-C", str(ws.root), "data", "add", str(src), "--batch-id", "camvid-2"])
    assert later.exit_code == 0, later.output
    assert all(np.array_equal(read_mask(ws.registry_dir / "camvid-2" / "masks" / f"{stem}.png"), expected)
               for stem, expected in ids.items())


def test_black_and_white_masks_are_named_and_read_through_a_grey_colour_table(ws, tmp_path):
    """Masks of one class saved black and white (0 and 255: defects, lesions, cracks) were registered with
    "classes [0]", 255 read as ignore, and every file then failed validation as "all background/ignore".
    Now the import is refused with the way in (a grey colour table), validation says the same of such a
    batch, and with `--colours` holding greys the gray masks are read through it: white is id 1."""
    import shutil

    from typer.testing import CliRunner

    from incseg.cli import app

    src = tmp_path / "cracks"
    for sub in ("images", "masks"):
        (src / sub).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((32, 40, 3), 40 * i, np.uint8)).save(src / "images" / f"{i}.png")
        mask = np.zeros((32, 40), np.uint8)
        mask[5:20, 8:8 + 5 * (i + 1)] = 255
        Image.fromarray(mask).save(src / "masks" / f"{i}.png")
    classes = tmp_path / "classes.yaml"
    classes.write_text("0: background\n1: crack\n")
    with pytest.raises(DataError, match=r"cracks: every mask holds only 0 and 255.*--colours FILE.*'#ffffff'"):
        add_data(ws, src, classes=classes)
    assert list(ws.registry_dir.iterdir()) == [] and not ws.classes_file.exists()

    ws.classes_file.write_text(classes.read_text())  # validate reads the workspace's class names
    checked = CliRunner().invoke(app, ["-C", str(ws.root), "validate", str(src), "--no-fail"])
    said = " ".join(checked.output.split())
    assert "every mask holds only 0 and 255" in said and "REJECTED" in said, checked.output

    table = tmp_path / "greys.yaml"
    table.write_text("0: '#000000'\n1: '#ffffff'\n")
    checked = CliRunner().invoke(app, ["-C", str(ws.root), "validate", str(src), "--colours", str(table)])
    said = " ".join(checked.output.split())
    assert "colours from" in said and "cracks: 3 files, 3 valid: accepted" in said, checked.output
    palette = tmp_path / "palette"  # the same masks as palette files: their indices are the ids, table or not
    shutil.copytree(src, palette)
    for f in (palette / "masks").iterdir():
        Image.open(f).convert("P").save(f)
    assert Image.open(f).mode == "P" and set(np.unique(np.array(Image.open(f)))) == {0, 255}
    with pytest.raises(DataError, match=r"palette: through the colour table .*greys\.yaml, every mask still holds "
                                        r"only background \(0\) and ignore \(255\)"):
        add_data(ws, palette, classes=classes, colours=table)
    assert list(ws.registry_dir.iterdir()) == [] and not ws.colours_file.exists()
    result = CliRunner().invoke(app, ["-C", str(ws.root), "data", "add", str(src), "--classes", str(classes),
                                      "--colours", str(table)])
    assert result.exit_code == 0, result.output
    assert "cracks: 3 pairs, classes [0, 1]" in " ".join(result.output.split())
    for i in range(3):
        expected = (np.array(Image.open(src / "masks" / f"{i}.png")) == 255).astype(np.uint8)
        assert np.array_equal(read_mask(ws.registry_dir / "cracks" / "masks" / f"{i}.png"), expected)


def test_data_add_warns_at_once_when_the_holdout_labels_none_of_a_new_class(ws, stream_dir):
    """A batch bringing a class the holdout never labels was registered without a word; the watcher then
    refused its update and waited on it. `data add` now says so while the user is there (the batch is
    registered all the same: replacing the holdout makes it judgeable)."""
    from typer.testing import CliRunner

    from incseg.cli import app

    add_data(ws, stream_dir / "registry" / "batch-00", holdout=True, classes=stream_dir / "classes.yaml")
    said = CliRunner().invoke(app, ["-C", str(ws.root), "data", "add", str(stream_dir / "registry" / "batch-01"),
                                    "--batch-id", "b1"], terminal_width=400)
    assert said.exit_code == 0, said.output
    assert " ".join(said.output.split()).startswith(f"{stream_dir / 'registry' / 'batch-01'}: reading and copying "
                                                   "the pairs, then dvc add")
    assert "warning:" in said.output and "no pixel labelled 'triangle' (3), which batch 'b1' labels" in said.output
    assert "b1" in tracked_batches(ws.registry_dir)
    quiet = CliRunner().invoke(app, ["-C", str(ws.root), "data", "add", str(stream_dir / "registry" / "batch-00"),
                                     "--batch-id", "b0"], terminal_width=400)
    assert quiet.exit_code == 0 and "warning" not in quiet.output, quiet.output


def test_a_holdout_holding_registered_images_is_warned_of(ws, stream_dir):
    """A holdout made of images already registered for training was taken without a word: the models
    trained on them would be judged on their own training images. `data add --holdout` names the batches."""
    from typer.testing import CliRunner

    from incseg.cli import app

    base = stream_dir / "registry" / "batch-00"
    add_data(ws, base, "b0", classes=stream_dir / "classes.yaml")
    said = CliRunner().invoke(app, ["-C", str(ws.root), "data", "add", str(base), "--holdout"], terminal_width=400)
    assert said.exit_code == 0, said.output
    n = len(list((base / "masks").iterdir()))
    assert f"warning: {n} of the holdout's images are in registered batches: b0 ({n})" in said.output
    other = CliRunner().invoke(app, ["-C", str(ws.root), "data", "add", str(stream_dir / "holdout"), "--holdout",
                                     "--force"], terminal_width=400)
    assert other.exit_code == 0 and "warning" not in other.output, other.output
