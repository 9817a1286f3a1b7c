"""One row per file pair of a batch: everything the expectation suite looks at."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from incseg.data.layout import (IGNORE, IMAGES_DIR, MASK_SUFFIXES, MASKS_DIR, DataError, list_files, open_image,
                                 rgb_array)

LABEL_MODES = ("L", "P")


def _open(path: Path) -> tuple[Image.Image | None, str]:
    """The fully decoded image, or None and why not."""
    try:
        if path.is_symlink():
            return None, "symbolic link (refused)"
        if path.stat().st_size == 0:
            return None, "empty file (0 bytes)"
        return open_image(path), ""
    except OSError as err:
        return None, f"not a readable file ({type(err).__name__}: {err})"
    except DataError as err:
        return None, str(err).removeprefix(f"{path}: ")


def image_row(path: Path) -> dict:
    row: dict = {"image_path": str(path), "image_ok": False, "image_error": ""}
    im, err = _open(path)
    if im is None:
        row["image_error"] = err
        return row
    try:
        rgb = rgb_array(im, str(path))
    except DataError as err:  # a mode PIL cannot convert, or samples it would clip: an unusable image
        row["image_error"] = str(err).removeprefix(f"{path}: ")
        return row
    row.update(
        image_ok=True, width=rgb.shape[1], height=rgb.shape[0], image_mode=im.mode, channels=len(im.getbands()),
        brightness=float(rgb.mean()), image_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )
    return row


def mask_row(path: Path, n_classes: int) -> dict:
    row: dict = {"mask_path": str(path), "mask_ok": False, "mask_error": ""}
    if path.suffix.lower() not in MASK_SUFFIXES:
        row["mask_error"] = (f"a {path.suffix} mask: lossy compression blurs the label ids at every edge; export "
                             "masks as PNG, BMP or TIFF (re-saving this one keeps the blur)")
        return row
    im, err = _open(path)
    if im is None:
        row["mask_error"] = err
        return row
    row.update(mask_ok=True, mask_width=im.width, mask_height=im.height, mask_mode=im.mode)
    arr = np.asarray(im)
    row["mask_dtype"] = str(arr.dtype)
    if im.mode not in LABEL_MODES:  # the suite's mask_single_channel check reports it
        return row
    ids, counts = np.unique(arr, return_counts=True)
    total = arr.size
    frac = dict(zip(ids.tolist(), (counts / total).tolist()))
    unknown = [i for i in ids.tolist() if i >= n_classes and i != IGNORE]
    row.update(
        label_ids=",".join(map(str, ids.tolist())),
        unknown_label_ids=",".join(map(str, unknown)),
        ignore_fraction=frac.get(IGNORE, 0.0),
        foreground_fraction=sum(v for k, v in frac.items() if k not in (0, IGNORE)),
        **{f"class_fraction_{c}": frac.get(c, 0.0) for c in range(n_classes)},
    )
    return row


Entry = tuple[str, str | None, str | None]  # (stem, image path, mask path)


def file_entries(batch_dir: Path) -> list[Entry]:
    """Every stem seen in `images/` or `masks/`, with its files (None where one is missing)."""
    images = {p.stem: p for p in list_files(batch_dir / IMAGES_DIR)}
    # a JPEG mask is listed, to be failed for being one; a lossless mask of the same stem wins
    masks = {p.stem: p for p in list_files(batch_dir / MASKS_DIR)}
    masks |= {p.stem: p for p in list_files(batch_dir / MASKS_DIR, MASK_SUFFIXES)}
    return [(stem, _str(images.get(stem)), _str(masks.get(stem))) for stem in sorted(images.keys() | masks.keys())]


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def file_rows(entries: list[Entry], n_classes: int) -> list[dict]:
    """The table rows of some entries: the expensive part (decoding every file), run per shard."""
    rows = []
    for stem, image, mask in entries:
        row = {"stem": stem, "has_image": image is not None, "has_mask": mask is not None, "image_ok": False,
               "mask_ok": False}
        if image is not None:
            row.update(image_row(Path(image)))
        else:
            row["image_error"] = f"no {IMAGES_DIR}/{stem}.(png|jpg|bmp|tif|webp)"
        if mask is not None:
            row.update(mask_row(Path(mask), n_classes))
        else:
            row["mask_error"] = f"no {MASKS_DIR}/{stem}.(png|bmp|tif)"
        rows.append(row)
    return rows


def assemble(rows: list[dict], n_classes: int) -> pd.DataFrame:
    """The table from its rows (in any shard order), with every column even when no file was readable."""
    columns = COLUMNS + [f"class_fraction_{c}" for c in range(n_classes)]
    table = pd.DataFrame(sorted(rows, key=lambda r: r["stem"])).reindex(columns=columns)
    for col in ("image_error", "mask_error", "unknown_label_ids", "image_path", "mask_path"):
        table[col] = table[col].fillna("").astype(object)
    for col in ("has_image", "has_mask", "image_ok", "mask_ok"):
        table[col] = table[col].fillna(False).astype(bool)
    # a missing file is failed for that alone (not as unreadable too), and sizes are compared only where
    # both files were read: an unreadable one is failed for that alone
    table["image_read"] = ~table["has_image"] | table["image_ok"]
    table["mask_read"] = ~table["has_mask"] | table["mask_ok"]
    both_read = table["image_ok"] & table["mask_ok"]
    same = (table["width"] == table["mask_width"]) & (table["height"] == table["mask_height"])
    table["size_match"] = ~both_read | same
    return table


def shards(entries: list[Entry], size: int) -> list[list[Entry]]:
    return [entries[i:i + size] for i in range(0, len(entries), size)]


def file_table(batch_dir: Path, n_classes: int) -> pd.DataFrame:
    """Rows for every stem seen in `images/` or `masks/`, with why a file is unusable."""
    return assemble(file_rows(file_entries(batch_dir), n_classes), n_classes)


COLUMNS = [
    "stem", "has_image", "has_mask", "image_path", "image_ok", "image_error", "width", "height", "image_mode",
    "channels", "brightness", "image_sha256", "mask_path", "mask_ok", "mask_error", "mask_width", "mask_height",
    "mask_mode", "mask_dtype", "label_ids", "unknown_label_ids", "ignore_fraction", "foreground_fraction",
]
