"""The on-disk layout every producer writes and every consumer reads.

`classes.yaml` maps label id to name (255 is always "ignore" and never listed); a batch is
a folder with `images/<stem>.<png|jpg|jpeg|bmp|tif|tiff|webp>`, `masks/<stem>.png` (single-channel or
palette label ids; a user's folder may bring them as BMP or TIFF, `data add` writes PNG) and an optional
`batch.yaml`.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import yaml
from PIL import Image, ImageOps

IGNORE = 255
IMAGES_DIR, MASKS_DIR = "images", "masks"  # a batch folder's two subfolders, paired by file stem
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")  # what PIL reads, in any case
MASK_SUFFIX = ".png"  # the registry's masks
MASK_SUFFIXES = (MASK_SUFFIX, ".bmp", ".tif", ".tiff")  # lossless formats a mask is read from (a JPEG's
                                                       # compression would blur label ids at every edge); all
                                                       # among IMAGE_SUFFIXES, which list any image file

# masks of one class saved black and white, which read as background and ignore: the way in (import and validation)
BLACK_AND_WHITE = ("every mask holds only 0 and 255, which incseg reads as background and ignore (Pascal VOC's "
                   "void), so no pixel is labelled. Masks of one class saved black and white: bring them in with "
                   "`incseg data add SRC --colours FILE`, FILE holding `0: '#000000'` and `1: '#ffffff'` (white "
                   "becomes id 1), or save each pixel's label id")


def nothing_labelled(ids: set[int]) -> bool:
    """A batch whose masks hold only background and ignore (ids: every label id in its masks)."""
    return IGNORE in ids and ids <= {0, IGNORE}


class DataError(ValueError):
    """Unreadable or malformed data; the message names the file."""


def read_classes(path: Path) -> dict[int, str]:
    """Label id -> class name; ids must be 0..K-1 with 0 the background."""
    if not path.exists():
        raise DataError(f"{path}: missing: `incseg data add SRC --classes FILE` installs one (a VOC or Cityscapes "
                        "folder brings its own; `incseg data synth` writes the generator's), or write it: "
                        "`0: background`, `1: NAME`, ... one line per label id")
    raw = load_yaml(path)
    if not all(isinstance(k, int) and not isinstance(k, bool) and isinstance(v, (str, int, float)) for k, v in raw.items()):
        raise DataError(f"{path}: expected a mapping of label id (an integer) to class name")
    classes = {int(k): str(v) for k, v in raw.items()}
    if not classes or len(classes) > IGNORE:
        raise DataError(f"{path}: expected 1..{IGNORE} classes (255 is the ignore label), got {len(classes)}")
    if sorted(classes) != list(range(len(classes))):
        missing = sorted(set(range(max(classes) + 1)) - set(classes))
        if min(classes) < 0 or not missing:
            raise DataError(f"{path}: label ids must be 0..{len(classes) - 1} without gaps, got {sorted(classes)}")
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        example = "0: background" if missing[0] == 0 else f"{missing[0]}: unused"
        raise DataError(f"{path}: label ids must be 0..{max(classes)} without gaps; missing {shown}: name them too "
                        f"(e.g. `{example}`): ids no mask uses are fine, the model only learns those it sees")
    seen: dict[str, int] = {}
    for c, name in classes.items():  # names tell classes apart in metrics, the gate's checks and reports
        if not name.strip():
            raise DataError(f"{path}: id {c} has an empty name")
        if name.strip() in seen:
            raise DataError(f"{path}: ids {seen[name.strip()]} and {c} are both named {name.strip()!r}: give each "
                            "id its own name")
        seen[name.strip()] = c
    return classes


def unlabelled_in(holdout_dir: Path, classes: list[int]) -> list[int]:
    """The foreground classes among `classes` that the holdout labels nowhere (its batch.yaml): the
    gate could judge no batch that labels them."""
    held = set(BatchInfo.read(holdout_dir).classes)
    return [c for c in classes if c != 0 and c not in held]


def write_classes(path: Path, classes: dict[int, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({int(k): v for k, v in sorted(classes.items())}, sort_keys=False))


@dataclass
class BatchInfo:
    """What `batch.yaml` says of a batch: the label ids annotated in it, and its origin."""

    batch_id: str
    classes: list[int] = field(default_factory=list)
    new_classes: list[int] = field(default_factory=list)
    kind: str = "user"
    made_by: str = ""
    seed: int | None = None

    def write(self, batch_dir: Path) -> None:
        batch_dir.mkdir(parents=True, exist_ok=True)
        (batch_dir / "batch.yaml").write_text(yaml.safe_dump(asdict(self), sort_keys=False))

    @classmethod
    def read(cls, batch_dir: Path) -> BatchInfo:
        """The batch's `batch.yaml`; without one, the classes are those found in its masks."""
        f = batch_dir / "batch.yaml"
        if f.exists():
            raw = load_yaml(f)
            classes = raw.get("classes", [])
            if not isinstance(classes, list) or not all(isinstance(c, int) and 0 <= c < IGNORE for c in classes):
                raise DataError(f"{f}: classes: expected a list of label ids (0..254), got {classes!r:.80}")
            new = raw.get("new_classes", []) or []
            if not isinstance(new, list) or not all(isinstance(c, int) and 0 <= c < IGNORE for c in new):
                raise DataError(f"{f}: new_classes: expected a list of label ids (0..254), got {new!r:.80}")
            seed = raw.get("seed")
            return cls(batch_dir.name, sorted(set(classes)), new, str(raw.get("kind", "user")),
                       str(raw.get("made_by", "")), seed if isinstance(seed, int) else None)
        ids: set[int] = set()
        for pair in find_pairs(batch_dir):
            ids |= set(np.unique(read_mask(pair.mask)).tolist())
        return cls(batch_id=batch_dir.name, classes=sorted(ids - {IGNORE}))


@dataclass(frozen=True)
class Pair:
    stem: str
    image: Path
    mask: Path


def find_pairs(batch_dir: Path) -> list[Pair]:
    """Image/mask pairs matched by stem, sorted; unmatched files are left out (`unpaired` names them)."""
    images = {p.stem: p for p in list_files(batch_dir / IMAGES_DIR)}
    masks = {p.stem: p for p in list_files(batch_dir / MASKS_DIR, MASK_SUFFIXES)}
    return [Pair(s, images[s], masks[s]) for s in sorted(images.keys() & masks.keys())]


def unpaired(batch_dir: Path) -> list[Path]:
    """The image files (by suffix) in a batch folder's two subfolders that `find_pairs` leaves out: an
    image without a mask of its stem, a mask without an image, a mask in a lossy format (not `MASK_SUFFIXES`)."""
    paired = {f for pair in find_pairs(batch_dir) for f in (pair.image, pair.mask)}
    return [f for sub in (IMAGES_DIR, MASKS_DIR) for f in list_files(batch_dir / sub) if f not in paired]


def list_files(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The files of `folder` (not below it) whose suffix, in any case, is one of `suffixes`, sorted;
    none when the folder does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file())


def copy_pair(pair: Pair, batch_dir: Path, stem: str | None = None, mask: np.ndarray | None = None) -> None:
    """Copy a pair's files as they are into `batch_dir`'s layout, under `stem` (default the pair's):
    the image keeps its suffix, lower-cased; the mask gets `MASK_SUFFIX`, or is `mask` (label ids)
    written in its place when given. The subfolders must exist."""
    stem = stem or pair.stem
    shutil.copyfile(pair.image, batch_dir / IMAGES_DIR / f"{stem}{pair.image.suffix.lower()}")
    if mask is None:
        shutil.copyfile(pair.mask, batch_dir / MASKS_DIR / f"{stem}{MASK_SUFFIX}")
    else:
        Image.fromarray(mask.astype(np.uint8), "L").save(batch_dir / MASKS_DIR / f"{stem}{MASK_SUFFIX}")


MAX_PIXELS = 64_000_000  # a decoded image above this (8k x 8k) is refused before it fills memory


def open_image(source: Path | BinaryIO, name: str | None = None) -> Image.Image:
    """The fully decoded image (a truncated file fails here, not at training time). Any failure,
    a decompression bomb included, is a `DataError` naming the file: these are untrusted bytes."""
    name = name or str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(source)
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise DataError(f"{name}: {width} x {height} pixels is over the {MAX_PIXELS:,} pixel limit")
            im.load()
            return im
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{name}: over the pixel limit ({err})") from err
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds (OSError, SyntaxError, bombs, struct.error...)
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise DataError(f"{name}: not a readable image ({type(err).__name__}{': ' + detail if detail else ''})") from err


def read_image(path: Path) -> np.ndarray:
    """An RGB uint8 array (H, W, 3)."""
    with open_image(path) as im:
        return rgb_array(im, str(path))


EXIF_ORIENTATION = 0x0112  # the EXIF tag a camera records its rotation in (1: upright)


def orientation(im: Image.Image) -> int:
    """The image's EXIF orientation, 1 (upright) where it has none or an unreadable one."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not cost a readable picture
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as `rgb_array` gives the picture: swapped where its EXIF orientation turns it."""
    return im.size[::-1] if orientation(im) in (5, 6, 7, 8) else im.size


def rgb_array(im: Image.Image, name: str) -> np.ndarray:
    """An opened image's pixels as an RGB uint8 array (H, W, 3), upright: a phone photo's EXIF
    orientation is applied, as viewers and labelling tools show it and its mask is drawn (detectron2's
    reader does the same); read raw, a portrait photo lay on its side against its mask. A 16- or 32-bit
    or a float image is refused, naming it: PIL would clip its samples to 0-255 (a 16-bit photo turns
    white, a float one black) and nothing would say so; which range maps to 0-255 only its author knows."""
    if im.mode.startswith(("I", "F")):
        depth = "floating-point" if im.mode.startswith("F") else "16- or 32-bit integer"
        raise DataError(f"{name}: a {im.mode} image ({depth} samples): save it with 8 bits per channel "
                        "(your range scaled to 0-255) first")
    try:
        if orientation(im) != 1:
            im = ImageOps.exif_transpose(im)
        return np.array(im.convert("RGB"))
    except Exception as err:  # noqa: BLE001 - e.g. an exotic mode PIL cannot convert
        raise DataError(f"{name}: cannot be converted to RGB ({type(err).__name__})") from err


def read_mask(path: Path) -> np.ndarray:
    """A uint8 label-id array (H, W). Palette PNGs give their indices, as Pascal VOC intends."""
    im = open_image(path)
    try:
        if im.mode not in ("L", "P"):
            raise DataError(f"{path}: mask mode {im.mode} is not a single-channel label map (L or P)")
        return np.array(im, dtype=np.uint8)
    finally:
        im.close()


def load_yaml(path: Path, expect: type | tuple[type, ...] = dict):
    """A YAML file's content, checked to be of type `expect` (an empty file gives `expect()`).
    Unreadable, undecodable, malformed or mistyped content is a `DataError` naming the file."""
    kinds = expect if isinstance(expect, tuple) else (expect,)
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: not readable YAML ({first})") from err
    if raw is None:
        return kinds[0]()
    if not isinstance(raw, kinds):
        raise DataError(f"{path}: expected a YAML {' or '.join(k.__name__ for k in kinds)}, got {type(raw).__name__}")
    return raw


def write_pair(batch_dir: Path, stem: str, image: np.ndarray, mask: np.ndarray) -> None:
    (batch_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (batch_dir / MASKS_DIR).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, "RGB").save(batch_dir / IMAGES_DIR / f"{stem}.png")
    Image.fromarray(mask.astype(np.uint8), "L").save(batch_dir / MASKS_DIR / f"{stem}{MASK_SUFFIX}")


def list_batches(registry: Path) -> list[str]:
    """Batch ids in the registry, in name order (name batches so that this is arrival order)."""
    if not registry.is_dir():
        return []
    return sorted(p.name for p in registry.iterdir() if p.is_dir() and not p.name.startswith("."))
