"""A fixed-size, class-balanced exemplar memory, stored as a folder next to the model."""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from incseg.data.dataset import kept_side, scaled_down
from incseg.data.layout import (IGNORE, IMAGES_DIR, MASK_SUFFIX, MASKS_DIR, DataError, Pair, copy_pair, load_yaml,
                                 read_image, read_mask)

INDEX = "memory.yaml"


@dataclass(frozen=True)
class Exemplar:
    stem: str
    batch_id: str
    annotated: tuple[int, ...]  # classes labelled in the exemplar's own batch
    primary: int  # the class it was kept for


@dataclass
class ExemplarMemory:
    """At most `size` exemplars, about equally many kept for each foreground class.

    Files live in `root/{images,masks}/`; `root/memory.yaml` indexes them.
    """

    root: Path | None
    items: list[Exemplar]

    @classmethod
    def empty(cls) -> ExemplarMemory:
        return cls(None, [])

    @classmethod
    def load(cls, root: Path) -> ExemplarMemory:
        index = root / INDEX
        if not index.exists():
            return cls(root, [])
        raw = load_yaml(index, list)
        try:
            items = [Exemplar(str(r["stem"]), str(r["batch_id"]), tuple(int(c) for c in r["annotated"]), int(r["primary"]))
                     for r in raw]
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{index}: not an exemplar index ({type(err).__name__}: {err})") from err
        if any(Path(it.stem).name != it.stem or it.stem.startswith(".") for it in items):
            raise DataError(f"{index}: an exemplar stem is a path; refused")
        return cls(root, items)

    def pair(self, item: Exemplar) -> Pair:
        assert self.root is not None
        image = next((self.root / IMAGES_DIR).glob(f"{item.stem}.*"))
        return Pair(item.stem, image, self.root / MASKS_DIR / f"{item.stem}{MASK_SUFFIX}")

    def per_class(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for it in self.items:
            counts[it.primary] = counts.get(it.primary, 0) + 1
        return dict(sorted(counts.items()))

    def by_label_set(self) -> dict[tuple[int, ...], list[Exemplar]]:
        """Exemplars grouped by the class set their batch annotated."""
        groups: dict[tuple[int, ...], list[Exemplar]] = {}
        for it in self.items:
            groups.setdefault(it.annotated, []).append(it)
        return groups

    def held_back(self, fraction: float, seed: int = 0) -> tuple[ExemplarMemory, ExemplarMemory]:
        """(replayed, held): a seeded `fraction` of each class's exemplars set aside (rounded down,
        so a class with few keeps them all for replay), e.g. to score old classes during an update."""
        rng = random.Random(seed)
        held: set[str] = set()
        for c in sorted(self.per_class()):
            stems = sorted(it.stem for it in self.items if it.primary == c)
            held.update(rng.sample(stems, int(fraction * len(stems))))
        return (ExemplarMemory(self.root, [it for it in self.items if it.stem not in held]),
                ExemplarMemory(self.root, [it for it in self.items if it.stem in held]))

    def refreshed(
        self, pairs: list[Pair], batch_id: str, annotated: list[int], size: int, out: Path, seed: int = 0,
        image_size: int | None = None,
    ) -> ExemplarMemory:
        """A new memory at `out` from this one plus a batch; old exemplars are kept first.

        Round-robin over classes keeps the memory class-balanced as classes are added. With the
        training size `image_size`, a new exemplar larger than `kept_side(image_size)` on its shorter
        side is stored scaled down to it (aspect kept; the mask by nearest neighbour): the memory is
        stored with every version, and a camera's 2048 x 1024 frames would cost hundreds of MB each.
        """
        rng = random.Random(seed)
        candidates: list[tuple[Exemplar, Pair]] = [(it, self.pair(it)) for it in self.items]
        fresh = []
        for p in pairs:
            ids = set(np.unique(read_mask(p.mask)).tolist()) & set(annotated) - {0, IGNORE}
            fresh.append((Exemplar(f"{batch_id}__{p.stem}", batch_id, tuple(sorted(annotated)), -1), p, ids))
        rng.shuffle(fresh)
        queues: dict[int, list[tuple[Exemplar, Pair]]] = {}
        for it, p in candidates:
            queues.setdefault(it.primary, []).append((it, p))
        for it, p, ids in fresh:
            for c in ids:
                queues.setdefault(c, []).append((it, p))
        chosen: dict[str, tuple[Exemplar, Pair]] = {}
        while len(chosen) < size and any(queues.values()):
            for c in sorted(queues):
                while queues[c] and queues[c][0][0].stem in chosen:
                    queues[c].pop(0)
                if queues[c] and len(chosen) < size:
                    it, p = queues[c].pop(0)
                    chosen[it.stem] = (Exemplar(it.stem, it.batch_id, it.annotated, c), p)
        return _write(out, list(chosen.values()), None if image_size is None else kept_side(image_size))


def _write(out: Path, chosen: list[tuple[Exemplar, Pair]], side: int | None) -> ExemplarMemory:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in (IMAGES_DIR, MASKS_DIR):
        (tmp / sub).mkdir(parents=True)
    for it, p in chosen:
        _keep(p, tmp, it.stem, side)
    items = [it for it, _ in chosen]
    (tmp / INDEX).write_text(yaml.safe_dump([{**asdict(it), "annotated": list(it.annotated)} for it in items]))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return ExemplarMemory(out, items)


def _keep(pair: Pair, out: Path, stem: str, side: int | None) -> None:
    """Copy the pair into the memory folder `out`; scaled down to `side` on its shorter side
    (`scaled_down`, the image as PNG) when it is larger."""
    if side is not None:
        with Image.open(pair.image) as image:  # the header's size only: the pair was validated, and is
            large = min(image.size) > side    # decoded below only when it is to be scaled
        if large:
            image, mask = scaled_down(read_image(pair.image), read_mask(pair.mask), side)
            Image.fromarray(image).save(out / IMAGES_DIR / f"{stem}.png")
            Image.fromarray(mask).save(out / MASKS_DIR / f"{stem}{MASK_SUFFIX}")
            return
    copy_pair(pair, out, stem)
