"""A seeded class-incremental stream of synthetic images, in the registry layout.

One producer of the standard layout (`classes.yaml`, `holdout/`, `registry/<batch>/`):
nothing downstream knows the data is synthetic. Two looks (`synth.style`), so that no
recipe choice is tuned to one generator:

- `shapes`: geometric shapes with class-oriented stripes on a blocky colour field;
- `blobs`: lobed, star-like blobs of several sizes (up to two of a class per image) with
  dotted / checkered / ringed fills on smooth noise with speckle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from incseg.config import SynthParams
from incseg.data.layout import BatchInfo, find_pairs, read_image, read_mask, write_classes, write_pair

SHAPES = ("square", "circle", "triangle", "ring", "cross", "diamond", "ellipse", "bar")
BLOBS = ("clover", "quatrefoil", "star", "gear", "flower", "sun", "bean", "crescent")


def look_classes(style: str) -> tuple[str, ...]:
    return SHAPES if style == "shapes" else BLOBS


@dataclass(frozen=True)
class Lighting:
    """How an image is lit and recorded: the domain-shift batch changes all of these."""

    brightness: float = 1.0
    noise: float = 0.04
    texture_scale: int = 8
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)


NORMAL = Lighting()
SHIFTED = Lighting(brightness=0.7, noise=0.08, texture_scale=4, tint=(1.1, 0.85, 0.7))


def shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of one randomly placed, sized and rotated shape."""
    r = rng.uniform(0.12, 0.24) * size
    cx, cy = rng.uniform(r, size - r, 2)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    d2 = dx**2 + dy**2
    if kind == "square":
        return (abs(u) <= r * 0.8) & (abs(v) <= r * 0.8)
    if kind == "circle":
        return d2 <= r**2
    if kind == "triangle":
        edges = [np.cos(angle + k * 2 * np.pi / 3) * dx + np.sin(angle + k * 2 * np.pi / 3) * dy for k in range(3)]
        return np.all([e <= r * 0.5 for e in edges], axis=0)
    if kind == "ring":
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if kind == "cross":
        return ((abs(u) <= r) & (abs(v) <= r / 3)) | ((abs(v) <= r) & (abs(u) <= r / 3))
    if kind == "diamond":
        return abs(u) + abs(v) <= r
    if kind == "ellipse":
        return (u / r) ** 2 + (v / (0.45 * r)) ** 2 <= 1
    if kind == "bar":
        return (abs(u) <= r) & (abs(v) <= r / 5)
    raise ValueError(f"unknown shape {kind!r}")


def texture(size: int, style: Lighting, rng: np.random.Generator) -> np.ndarray:
    """Smooth random colour field plus stripes: (size, size, 3) floats in [0, 1]."""
    cells = max(2, size // style.texture_scale)
    coarse = rng.uniform(0, 1, (cells, cells, 3))
    idx = np.arange(size) * cells // size
    field = coarse[idx][:, idx]
    yy, xx = np.mgrid[0:size, 0:size]
    theta, freq = rng.uniform(0, np.pi), rng.uniform(0.2, 0.8)
    stripes = 0.5 + 0.5 * np.sin(freq * (xx * np.cos(theta) + yy * np.sin(theta)))
    base = rng.uniform(0.2, 0.8, 3)
    return np.clip(0.5 * base + 0.35 * field + 0.15 * stripes[..., None], 0, 1)


def class_pattern(c: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Stripes whose orientation and period belong to the class (jittered): a local cue
    beside the shape, as real classes have their own textures. Colour stays random."""
    yy, xx = np.mgrid[0:size, 0:size]
    theta = c * np.pi / 5 + rng.normal(0, 0.15)
    period = 2.5 + (c % 3) * 1.5 + rng.normal(0, 0.2)
    phase = rng.uniform(0, 2 * np.pi)
    return 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase))


def blob_mask(c: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A lobed blob of class `c` (the boundary's lobe count and depth belong to the class),
    at a random place, size and rotation. `bean` and `crescent` are the two non-radial ones."""
    r = rng.uniform(0.1, 0.3) * size
    cx, cy = rng.uniform(0.6 * r, size - 0.6 * r, 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    theta = np.arctan2(dy, dx) + rng.uniform(0, 2 * np.pi)
    dist = np.sqrt(dx**2 + dy**2)
    name = BLOBS[c - 1]
    if name == "bean":
        return ((dx / r) ** 2 + (dy / (0.55 * r)) ** 2 <= 1) & ~((dx / (0.5 * r)) ** 2 + ((dy - 0.6 * r) / (0.35 * r)) ** 2 <= 1)
    if name == "crescent":
        ox, oy = 0.45 * r * np.cos(theta[0, 0]), 0.45 * r * np.sin(theta[0, 0])
        return (dist <= r) & ((dx - ox) ** 2 + (dy - oy) ** 2 > (0.8 * r) ** 2)
    lobes, depth = {"clover": (3, 0.35), "quatrefoil": (4, 0.3), "star": (5, 0.45), "gear": (8, 0.15),
                    "flower": (6, 0.3), "sun": (12, 0.2)}[name]
    return dist <= r * (1 - depth + depth * np.cos(lobes * theta))


def smooth_noise(size: int, rng: np.random.Generator, cells: int) -> np.ndarray:
    """Bilinearly interpolated random colour grid: (size, size, 3) in [0, 1]."""
    grid = rng.uniform(0, 1, (cells + 1, cells + 1, 3))
    t = np.linspace(0, cells, size, endpoint=False)
    i, f = t.astype(int), (t - t.astype(int))[:, None]
    rows = grid[i] * (1 - f[..., None]) + grid[i + 1] * f[..., None]
    return rows[:, i] * (1 - f[None, :, :]) + rows[:, i + 1] * f[None, :, :]


def blob_fill(c: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The class's fill pattern (dots, checks or rings, with a class-specific period), in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + rng.uniform(0, 8, 2)[:, None, None]
    period = 3.0 + (c % 4) + rng.normal(0, 0.15)
    kind = c % 3
    if kind == 0:
        return ((np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)) > 0.3).astype(np.float32)
    if kind == 1:
        return ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
    return 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * np.sqrt((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / period))


def render_blobs(objects: list[tuple[int, np.ndarray]], size: int, style: Lighting,
                 rng: np.random.Generator) -> np.ndarray:
    """Blobs over smooth noise with speckle; later blobs occlude earlier ones."""
    img = 0.6 * smooth_noise(size, rng, max(2, size // 16)) + 0.25 * smooth_noise(size, rng, max(2, size // 4))
    img += 0.15 * (rng.random((size, size, 1)) < 0.05)
    for c, m in objects:
        colour = rng.uniform(0.05, 0.95, 3)
        img[m] = (0.55 * colour + 0.45 * blob_fill(c, size, rng)[..., None] * rng.uniform(0.5, 1.0))[m]
    img = img * style.brightness * np.asarray(style.tint) + rng.normal(0, style.noise, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def render(objects: list[tuple[int, np.ndarray]], size: int, style: Lighting, rng: np.random.Generator) -> np.ndarray:
    """Paint objects (class id, boolean mask) over a textured background; later ones occlude."""
    img = texture(size, style, rng)
    for c, m in objects:
        img[m] = (class_pattern(c, size, rng)[..., None] * 0.35 + rng.uniform(0.1, 0.9, 3) * 0.65)[m]
    img = img * style.brightness * np.asarray(style.tint) + rng.normal(0, style.noise, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def sample_image(
    rng: np.random.Generator,
    size: int,
    must: int | None,
    optional: list[int],
    style: Lighting,
    labelled: set[int],
    look: str = "shapes",
) -> tuple[np.ndarray, np.ndarray]:
    """One image with class `must` present, some of `optional`, and masks for `labelled` only."""
    others = [c for c in optional if c != must and rng.random() < 0.5]
    if must is None and not others:
        others = [int(rng.choice(optional))]
    if look == "blobs":  # blobs come one or two of a kind
        others += [c for c in others if rng.random() < 0.3]
    # the required class is painted last, so no other object hides it
    order = [int(c) for c in rng.permutation(others)] + ([must] if must is not None else [])
    if look == "blobs":
        objects = [(c, blob_mask(c, size, rng)) for c in order]
    else:
        objects = [(c, shape_mask(SHAPES[c - 1], size, rng)) for c in order]
    mask = np.zeros((size, size), np.uint8)
    for c, m in objects:
        mask[m] = c if c in labelled else 0
    image = render_blobs(objects, size, style, rng) if look == "blobs" else render(objects, size, style, rng)
    return image, mask


@dataclass(frozen=True)
class BatchPlan:
    batch_id: str
    kind: str
    new: list[int]
    present: list[int]
    labelled: set[int]
    lighting: Lighting
    count: int


def plan_stream(p: SynthParams) -> list[BatchPlan]:
    """Base batch, one batch per new class, then an optional domain-shift batch."""
    base = list(range(1, p.base_classes + 1))
    plans = [BatchPlan("batch-00", "base", base, base, set(base), NORMAL, p.base_images)]
    known = list(base)
    for step in range(p.new_classes):
        c = p.base_classes + step + 1
        olds = [] if p.old_classes == "absent" else list(known)
        labelled = {c} | (set(known) if p.old_classes == "keep" else set())
        plans.append(BatchPlan(f"batch-{step + 1:02d}", "new-class", [c], olds, labelled, NORMAL, p.step_images))
        known.append(c)
    if p.domain_shift:
        n = len(plans)
        plans.append(BatchPlan(f"batch-{n:02d}", "domain-shift", [], known, set(known), SHIFTED, p.step_images))
    return plans


def synthesize(out: Path, p: SynthParams) -> list[BatchInfo]:
    """Write classes.yaml, the holdout and every batch of the stream under `out`."""
    n_fg = p.base_classes + p.new_classes
    names = look_classes(p.style)
    if n_fg > len(names):
        raise ValueError(f"at most {len(names)} foreground classes, asked for {n_fg}")
    all_fg = list(range(1, n_fg + 1))
    write_classes(out / "classes.yaml", {0: "background", **{c: names[c - 1] for c in all_fg}})
    rng = np.random.default_rng([p.seed, 999])
    holdout = out / "holdout"
    for c in all_fg:
        for i in range(p.holdout_per_class):
            lighting = SHIFTED if p.domain_shift and i % 4 == 3 else NORMAL
            img, mask = sample_image(rng, p.size, c, all_fg, lighting, set(all_fg), p.style)
            write_pair(holdout, f"holdout_{c}_{i:03d}", img, mask)
    infos = []
    for index, plan in enumerate(plan_stream(p)):
        rng = np.random.default_rng([p.seed, index])
        bdir = out / "registry" / plan.batch_id
        for i in range(plan.count):
            must = plan.new[i % len(plan.new)] if plan.new else None
            img, mask = sample_image(rng, p.size, must, plan.present, plan.lighting, plan.labelled, p.style)
            write_pair(bdir, f"{plan.batch_id}_{i:04d}", img, mask)
        info = BatchInfo(
            batch_id=plan.batch_id,
            classes=sorted(plan.labelled),
            new_classes=plan.new if plan.kind != "domain-shift" else [],
            kind=plan.kind,
            made_by="incseg data synth",
            seed=p.seed,
        )
        info.write(bdir)
        infos.append(info)
    return infos


def poison_batch(src: Path, dst: Path) -> BatchInfo:
    """Copy a batch with its label ids shifted cyclically (background included):
    new files that pass every validation check but teach the wrong classes."""
    info = BatchInfo.read(src)
    ids = sorted(set(info.classes) | {0})
    lut = np.arange(256, dtype=np.uint8)
    lut[ids] = ids[1:] + ids[:1]
    rng = np.random.default_rng(info.seed or 0)
    for pair in find_pairs(src):
        # +-1 grey-level noise: new files (no duplicate hashes) that look the same
        image = read_image(pair.image)
        image = image.astype(np.int16) + rng.integers(-1, 2, image.shape)
        write_pair(dst, f"{dst.name}_{pair.stem}", np.clip(image, 0, 255).astype(np.uint8), lut[read_mask(pair.mask)])
    poisoned = BatchInfo(batch_id=dst.name, classes=info.classes, new_classes=[], kind="poisoned",
                         made_by=f"poison_batch({src.name})", seed=info.seed)
    poisoned.write(dst)
    return poisoned
