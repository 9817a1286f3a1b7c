"""The on-disk layout every producer writes and every consumer reads.

`classes.yaml` maps label id to name (255 is always "ignore" and never listed); a batch is
a folder with `images/<stem>.(png|jpg)`, `masks/<stem>.png` (single-channel or palette
label ids) and an optional `batch.yaml`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

IGNORE = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_SUFFIX = ".png"


class DataError(ValueError):
    """Unreadable or malformed data; the message names the file."""


def read_classes(path: Path) -> dict[int, str]:
    """Label id -> class name; ids must be 0..K-1 with 0 the background."""
    if not path.exists():
        raise DataError(f"{path}: missing (run `incseg data synth` or write one: `0: background`, `1: ...`)")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        classes = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError, AttributeError) as err:
        raise DataError(f"{path}: expected a mapping of label id to class name") from err
    if sorted(classes) != list(range(len(classes))):
        raise DataError(f"{path}: label ids must be 0..{len(classes) - 1} without gaps, got {sorted(classes)}")
    return classes


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
            raw = yaml.safe_load(f.read_text()) or {}
            known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
            return cls(**{"batch_id": batch_dir.name, **known})
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
    """Image/mask pairs matched by stem, sorted; unmatched files are left out (validation reports them)."""
    images = {p.stem: p for p in _files(batch_dir / "images", IMAGE_SUFFIXES)}
    masks = {p.stem: p for p in _files(batch_dir / "masks", (MASK_SUFFIX,))}
    return [Pair(s, images[s], masks[s]) for s in sorted(images.keys() & masks.keys())]


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file())


def read_image(path: Path) -> np.ndarray:
    """An RGB uint8 array (H, W, 3)."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: unreadable image ({err})") from err


def read_mask(path: Path) -> np.ndarray:
    """A uint8 label-id array (H, W). Palette PNGs give their indices, as Pascal VOC intends."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise DataError(f"{path}: mask mode {im.mode} is not a single-channel label map (L or P)")
            return np.array(im, dtype=np.uint8)
    except (OSError, SyntaxError) as err:
        raise DataError(f"{path}: unreadable mask ({err})") from err


def write_pair(batch_dir: Path, stem: str, image: np.ndarray, mask: np.ndarray) -> None:
    (batch_dir / "images").mkdir(parents=True, exist_ok=True)
    (batch_dir / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, "RGB").save(batch_dir / "images" / f"{stem}.png")
    Image.fromarray(mask.astype(np.uint8), "L").save(batch_dir / "masks" / f"{stem}.png")


def list_batches(registry: Path) -> list[str]:
    """Batch ids in the registry, in name order (name batches so that this is arrival order)."""
    if not registry.is_dir():
        return []
    return sorted(p.name for p in registry.iterdir() if p.is_dir() and not p.name.startswith("."))
