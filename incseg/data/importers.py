"""Bring outside data into the registry layout: plain folders, Pascal VOC, Cityscapes.

VOC and Cityscapes are parsed with torchvision's own dataset classes (`download=False`);
their label conventions are mapped to the registry's: VOC palette indices are label ids,
Cityscapes `labelIds` are mapped to its 19 train ids, everything else to 255 (ignore).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor

from incseg.data.layout import (BLACK_AND_WHITE, IGNORE, IMAGE_SUFFIXES, IMAGES_DIR, MASK_SUFFIX, MASK_SUFFIXES,
                                 MASKS_DIR, BatchInfo, DataError, Pair, copy_pair, find_pairs, list_files, load_yaml,
                                 nothing_labelled, open_image, read_mask, unpaired, write_classes)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
LAYOUTS = ("folder", "voc", "cityscapes")


def detect_layout(src: Path) -> str:
    if (src / "JPEGImages").is_dir() and (src / "SegmentationClass").is_dir():
        return "voc"
    if (src / "VOCdevkit").is_dir():
        return "voc"
    if (src / "leftImg8bit").is_dir() and (src / "gtFine").is_dir():
        return "cityscapes"
    if (src / IMAGES_DIR).is_dir() and (src / MASKS_DIR).is_dir():
        return "folder"
    raise DataError(f"{src}: not a known layout ({IMAGES_DIR}/+{MASKS_DIR}/, VOC JPEGImages/+SegmentationClass/, "
                    "or Cityscapes leftImg8bit/+gtFine/)")


def voc_pairs(src: Path, split: str) -> list[Pair]:
    """Pairs of a VOC2012 folder (or a folder holding VOCdevkit/VOC2012) via VOCSegmentation."""
    from torchvision.datasets import VOCSegmentation

    with tempfile.TemporaryDirectory() as tmp:
        wrapped = not (src / "VOCdevkit").is_dir()
        root = Path(tmp) if wrapped else src
        voc_root = root / "VOCdevkit" / "VOC2012"
        if wrapped:  # SRC is VOC2012 itself: give torchvision the root it expects
            voc_root.parent.mkdir()
            voc_root.symlink_to(src.resolve(), target_is_directory=True)
        try:
            ds = VOCSegmentation(str(root), year="2012", image_set=split, download=False)
        except (RuntimeError, FileNotFoundError) as err:
            raise DataError(f"{src}: not a readable VOC layout for split '{split}': {err}") from err
        real = src if wrapped else voc_root
        return [Pair(Path(i).stem, real / Path(i).relative_to(voc_root), real / Path(m).relative_to(voc_root))
                for i, m in zip(ds.images, ds.masks)]


def cityscapes_pairs(src: Path, split: str) -> tuple[list[Pair], np.ndarray, dict[int, str]]:
    """Pairs (image, labelIds mask), the labelId -> trainId table, and the train-id class names."""
    from torchvision.datasets import Cityscapes

    try:
        ds = Cityscapes(str(src), split=split, mode="fine", target_type="semantic")
    except (RuntimeError, FileNotFoundError) as err:
        raise DataError(f"{src}: not a readable Cityscapes layout for split '{split}': {err}") from err
    lut = np.full(256, IGNORE, dtype=np.uint8)
    names: dict[int, str] = {}
    for c in ds.classes:
        if 0 <= c.train_id < 255 and c.id >= 0:
            lut[c.id] = c.train_id
            names[c.train_id] = c.name
    pairs = [Pair(Path(i).stem.replace("_leftImg8bit", ""), Path(i), Path(t[0])) for i, t in zip(ds.images, ds.targets)]
    return pairs, lut, dict(sorted(names.items()))


def import_batch(src: Path, dst: Path, layout: str = "auto", split: str = "train",
                 classes_out: Path | None = None, colours: Path | None = None,
                 progress: Callable[[list[Pair]], Iterable[Pair]] | None = None) -> BatchInfo:
    """Copy SRC into the batch folder `dst` in the registry layout; returns its batch.yaml.

    `classes_out` receives the layout's class list (VOC / Cityscapes) when it is not there yet; a plain
    folder, which names no classes, is refused when it is given and missing. `colours`: a colour table
    (`read_colours`) through which colour-coded masks are read. `progress` wraps the pairs as they are
    copied (the CLI's progress bar).
    """
    table = read_colours(colours) if colours is not None else None  # a bad table is refused before anything
    layout = detect_layout(src) if layout == "auto" else layout
    if dst.exists():
        raise DataError(f"{dst} already exists; choose another --batch-id")
    if layout == "folder":
        pairs, lut, names = find_pairs(src), None, None
        _refuse_unpaired(src)
    elif layout == "voc":
        pairs, lut, names = voc_pairs(src, split), None, dict(enumerate(VOC_CLASSES))
    elif layout == "cityscapes":
        pairs, lut, names = cityscapes_pairs(src, split)
    else:
        raise DataError(f"unknown layout {layout!r}; choose one of auto, {', '.join(LAYOUTS)}")
    if not pairs:
        raise DataError(f"{src}: no image/mask pairs found ({layout} layout)")
    if names is None and classes_out is not None and not classes_out.exists():  # before any file is copied
        raise DataError(f"{classes_out}: missing, and a plain folder names no classes: pass `--classes FILE` "
                        "(`0: background`, `1: NAME`, ... one line per label id) or write that file")
    tmp = dst.with_name(f".{dst.name}.importing")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / IMAGES_DIR).mkdir(parents=True)
    (tmp / MASKS_DIR).mkdir()
    try:
        ids = _copy_pairs(progress(pairs) if progress else pairs, tmp, lut, table)
        if layout == "folder" and nothing_labelled(ids):
            raise DataError(f"{src}: {BLACK_AND_WHITE}" if table is None else
                            f"{src}: through the colour table {colours}, every mask still holds only background (0) "
                            "and ignore (255), so no pixel is labelled: check the table's ids (255 is ignore); "
                            "palette (P) masks are read by their indices, not through the table")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a refused import leaves nothing behind
        raise
    src_info = BatchInfo.read(src) if layout == "folder" and (src / "batch.yaml").exists() else None
    info = BatchInfo(batch_id=dst.name, classes=src_info.classes if src_info else sorted(ids - {IGNORE}),
                     new_classes=src_info.new_classes if src_info else [], kind=src_info.kind if src_info else layout,
                     made_by=f"incseg data add ({layout}) from {src}", seed=src_info.seed if src_info else None)
    info.write(tmp)
    if classes_out is not None and names and not classes_out.exists():
        write_classes(classes_out, names)
    tmp.rename(dst)
    return info


def read_colours(path: Path) -> dict[int, int]:
    """A colour table (`--colours FILE`): YAML `label id: [R, G, B]` (or `"#RRGGBB"`), one line per id
    (255: ignore), as packed colour -> id. Errors name the file and the id."""
    raw = load_yaml(path)
    table: dict[int, int] = {}
    for key, value in raw.items():
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= IGNORE:
            raise DataError(f"{path}: key {key!r} is not a label id (0..254, 255: ignore)")
        if isinstance(value, str):  # "#RRGGBB" (or any colour PIL names), read by PIL
            with contextlib.suppress(ValueError):
                value = list(ImageColor.getrgb(value))
        if not (isinstance(value, list) and len(value) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)):
            raise DataError(f"{path}: id {key}: {value!r} is not a colour ([R, G, B] of 0..255, or \"#RRGGBB\")")
        packed = int(_packed(value))
        if packed in table:
            raise DataError(f"{path}: ids {table[packed]} and {key} have the same colour {value}")
        table[packed] = key
    if not table:
        raise DataError(f"{path}: no colours (`0: [0, 0, 0]`, `1: [128, 0, 0]`, ... one line per label id)")
    return table


def _packed(rgb) -> np.ndarray:
    """R, G, B (the last axis) as one 24-bit int: how the colour table and `_decoded` key colours."""
    rgb = np.asarray(rgb, np.uint32)
    return rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]


def greys(colours: dict[int, int]) -> bool:
    """Whether a colour table (`read_colours`) holds only greys: then it reads gray (L) masks too, each grey
    level as the colour it is (black-and-white masks of one class: `0: "#000000"`, `1: "#ffffff"`)."""
    return all(c >> 16 == c >> 8 & 255 == c & 255 for c in colours)


def colour_coded(src: Path, colours: dict[int, int] | None = None) -> bool:
    """Whether a plain folder's masks include a colour-coded one (RGB or RGBA; gray ones too when `colours`
    is a table of greys: read from the headers)."""
    modes = ("RGB", "RGBA", "L") if colours is not None and greys(colours) else ("RGB", "RGBA")
    for mask in list_files(src / MASKS_DIR, MASK_SUFFIXES):
        try:
            with Image.open(mask) as im:
                if im.mode in modes:
                    return True
        except (OSError, Image.DecompressionBombError):
            continue  # unreadable: validation names it
    return False


def _decoded(path: Path, rgb: np.ndarray, colours: dict[int, int]) -> np.ndarray:
    """A colour-coded mask's label ids through the table; a colour the table lacks is refused, naming it."""
    packed = _packed(rgb)
    found, inverse = np.unique(packed, return_inverse=True)
    unknown = [int(c) for c in found if int(c) not in colours]
    if unknown:
        shown = ", ".join(f"[{c >> 16}, {c >> 8 & 255}, {c & 255}]" for c in unknown[:5])
        raise DataError(f"{path}: {len(unknown)} colour(s) not in the colour table: {shown}"
                        + (", ..." if len(unknown) > 5 else ""))
    return np.array([colours[int(c)] for c in found], np.uint8)[inverse.reshape(packed.shape)]


def source_mask(path: Path, colours: dict[int, int] | None = None) -> tuple[np.ndarray, bool]:
    """A source mask's label ids, and whether its file must be rewritten for the registry (which holds
    8-bit L or P PNGs only): a 1-bit mask, a 16- or 32-bit label map whose values fit 0-255, an opaque gray
    + alpha (LA) map, and an RGB file whose three channels are equal (a gray map saved in colour), are
    converted; a colour-coded RGB(A) mask through `colours` (`read_colours`), refused without it: which
    colour is which id only its author knows. A gray mask is read through `colours` when it is a table of
    greys (`greys`), as its ids otherwise."""
    with open_image(path) as im:
        mode, values = im.mode, np.array(im)
    if colours is not None and mode in ("RGB", "RGBA"):  # palette files hold ids: read as they are
        return _decoded(path, values[..., :3], colours), True
    if colours is not None and mode == "L" and greys(colours):  # black and white (or grey levels) per class
        return _decoded(path, np.repeat(values[..., None], 3, axis=-1), colours), True
    if mode in ("L", "P"):  # palette indices are the ids, as Pascal VOC intends
        return values.astype(np.uint8), False
    if mode == "1":  # a bilevel (1-bit) mask: ids 0 and 1
        return values.astype(np.uint8), True
    if mode.startswith("I") and values.ndim == 2:
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > IGNORE:
            raise DataError(f"{path}: mask mode {mode} holds values {lo}..{hi}: label ids are 0..254 (255: ignore)")
        return values.astype(np.uint8), True
    if mode == "LA":  # gray + alpha (image editors): the ids when every pixel is opaque
        if (values[..., 1] == 255).all():
            return values[..., 0].copy(), True
        raise DataError(f"{path}: mask mode LA has transparent pixels, whose label is unknown: save the label ids "
                        "as an 8-bit gray PNG without transparency (255 marks pixels to ignore)")
    if mode == "RGB":
        if (values[..., 1:] == values[..., :1]).all():
            return values[..., 0].copy(), True
        raise DataError(f"{path}: a colour-coded RGB mask: pass `--colours FILE` (`0: [0, 0, 0]`, `1: [128, 0, 0]`, "
                        "... one colour per label id) or save each pixel's label id as an 8-bit gray PNG")
    return read_mask(path), False  # refused there, naming the mode


def _copy_pairs(pairs: Iterable[Pair], out: Path, lut: np.ndarray | None, colours: dict[int, int] | None) -> set[int]:
    """Copy images as they are and masks as label maps (through `lut` if given, converted by `source_mask`);
    returns the ids seen."""
    ids: set[int] = set()
    for p in pairs:
        _refuse_link(p.image)
        _refuse_link(p.mask)
        mask, convert = source_mask(p.mask, colours)  # read even when copied as it is: a bad mask fails the import
        convert = convert or p.mask.suffix.lower() != MASK_SUFFIX  # a BMP or TIFF mask is written as a PNG
        relabelled = lut[mask] if lut is not None else mask if convert else None
        copy_pair(p, out, mask=relabelled)
        ids |= set(np.unique(mask if relabelled is None else relabelled).tolist())
    return ids


def _refuse_unpaired(src: Path) -> None:
    """A folder's file that pairs with nothing would be left out unseen: the import is refused, naming it
    (two images of one stem first: one mask pairs with one image), and so would image files in folders
    below `images/` or `masks/`."""
    below = [f"{sub}/{d.name}/" for sub in (IMAGES_DIR, MASKS_DIR) if (src / sub).is_dir()
             for d in sorted((src / sub).iterdir()) if d.is_dir() and not d.name.startswith(".")
             and any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.rglob("*"))]
    if below:
        raise DataError(f"{src}: {', '.join(below[:5])}{' ...' if len(below) > 5 else ''} "
                        f"{'hold' if len(below) > 1 else 'holds'} image files, and "
                        f"only the files directly in {IMAGES_DIR}/ and {MASKS_DIR}/ are read: move them up, or add each "
                        f"folder as a batch of its own (a folder with {IMAGES_DIR}/ and {MASKS_DIR}/)")
    stems: dict[tuple[str, str], list[str]] = {}
    for sub, suffixes in ((IMAGES_DIR, IMAGE_SUFFIXES), (MASKS_DIR, MASK_SUFFIXES)):
        for f in list_files(src / sub, suffixes):
            stems.setdefault((sub, f.stem), []).append(f"{sub}/{f.name}")
    twins = [" and ".join(names) for names in stems.values() if len(names) > 1]
    if twins:
        raise DataError(f"{src}: {len(twins)} stem(s) name two files: {'; '.join(twins[:5])}. A mask "
                        f"{MASKS_DIR}/STEM{MASK_SUFFIX} pairs with one image: rename or move the others")
    lossy = [f"{MASKS_DIR}/{f.name}" for f in list_files(src / MASKS_DIR) if f.suffix.lower() not in MASK_SUFFIXES]
    if lossy:
        raise DataError(f"{src}: {len(lossy)} mask(s) in a lossy format: {_some(lossy)}. JPEG and WebP "
                        "compression blurs the label ids at every edge, so a mask must be PNG, BMP or TIFF: export "
                        "the masks losslessly from the labelling tool (a JPEG re-saved as PNG keeps the blur)")
    gifs = [f"{MASKS_DIR}/{f.name}" for f in list_files(src / MASKS_DIR, (".gif",))]  # not even image files to us
    if gifs:
        raise DataError(f"{src}: {len(gifs)} GIF mask(s): {_some(gifs)}. GIF masks are not read (a GIF "
                        "writer may renumber the palette, so its indices need not be the label ids): save each as a "
                        "PNG of label ids (0 background, 1, 2, ... the classes, 255 ignore)")
    loose = unpaired(src)
    renamed = _renamed_masks(src, loose)
    if renamed:
        raise DataError(f"{src}: {renamed}")
    left = [str(f.relative_to(src)) for f in loose]
    if left:
        raise DataError(f"{src}: {len(left)} file(s) pair with nothing: {_some(left)}. Each "
                        f"{IMAGES_DIR}/STEM.(png|jpg|bmp|tif|webp) needs {MASKS_DIR}/STEM.(png|bmp|tif) (label ids, "
                        "lossless) and each mask an image; move the others out of the folder")


def _some(names: list[str]) -> str:
    """The first five names, and how many more."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _renamed_masks(src: Path, left: list[Path]) -> str:
    """Why the files left unpaired are, when every unpaired mask is an unpaired image's stem with one and
    the same text added after it (ISIC's `_segmentation`, a tool's `_mask`) or in front of it: that, and
    how to rename them; "" otherwise."""
    images = {f.stem: f for f in left if f.parent.name == IMAGES_DIR}
    masks = [f for f in left if f.parent.name == MASKS_DIR]
    for where in ("added", "in front") if images and masks else ():
        extras, example = set(), None
        for m in masks:
            # the longest image stem the mask's name holds, at its start ("added") or its end ("in front")
            splits = [(m.stem[:k], m.stem[k:]) for k in range(len(m.stem) - 1, 0, -1)] if where == "added" else \
                [(m.stem[k:], m.stem[:k]) for k in range(1, len(m.stem))]
            stem, extra = next(((a, b) for a, b in splits if a in images), (None, None))
            if stem is None:
                break  # a mask no image's name explains: no one rule
            extras.add(extra)
            example = example or (m, images[stem])
        else:
            if len(extras) == 1:
                (extra,), (mask, image) = extras, example
                ext = mask.suffix
                shell = f'for f in *{extra}{ext}; do mv "$f" "${{f%{extra}{ext}}}{ext}"; done' if where == "added" \
                    else f'for f in {extra}*{ext}; do mv "$f" "${{f#{extra}}}"; done'
                return (f"the masks are named after their images with '{extra}' {where} ({MASKS_DIR}/{mask.name} "
                        f"for {IMAGES_DIR}/{image.name}); a mask must have its image's name ({MASKS_DIR}/STEM.png "
                        f"for {IMAGES_DIR}/STEM.jpg): rename them, e.g. in {src / MASKS_DIR}: {shell}")
    return ""


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise DataError(f"{path}: symbolic links are refused, copy the file instead")
