"""A look the product's generator never makes: the bootstrap at default params on it, as a user would.

Writes a seeded set of its own (numpy + PIL only, nothing from `incseg.data.synthetic`): RGB images
of SIZE px on a smooth colour field crossed by stripes and noise, holding 1-4 objects of CLASSES
shape classes (ellipse, bar, hexagon, crescent, chevron, in that order), each filled with one colour
under a checker and noise drawn independently of the class, so only the shape tells them apart;
objects overlap, the later on top. Then, in a fresh workspace under OUT, the commands a new user
runs at default params: `incseg init`, `incseg data add --holdout`, `incseg data add`,
`incseg bootstrap`, and writes OUT/result.json: the champion's metrics, its validation and holdout
curves, and the seconds it took.
With `--stream N` the last N classes are held back from the bootstrap's batch and come one per later
batch, in which only the new class is labelled (old classes' objects appear, as background); each
is brought in with `incseg data add` + `incseg update`, and its verdict, reason and per-class
holdout IoU (candidate and champion) go into result.json too.
With `--joint` the same stream (same seed, the same images) is written with every object labelled
and bootstrapped as one batch instead: the stream's joint upper bound, the figure its final mIoU is
set against.

    python benchmarks/foreign_look.py OUT [--images 720] [--holdout 150] [--size 96] [--classes 5] [--seed 0]
                                          [--stream N] [--step-images 120] [--joint] [--set SECTION.KEY=VALUE ...]

`--set` changes the workspace's params.yaml after `init` (YAML values: `--set train.update_max_steps=3200`),
for a probe of one knob on this look; the result records what was set.

    python benchmarks/foreign_look.py OUT --updates-from RUN [--set SECTION.KEY=VALUE ...]

re-runs the stream's updates of an earlier run (RUN, its OUT) from the same base model, so two update
recipes are compared on one bootstrap: RUN/ws is copied to OUT/ws, `champion` set back to the bootstrap's
version, `--set` applied to the copy's params.yaml, and each later batch updated again. The copy's new
runs log their artifacts into RUN/ws's artifact store (its experiment's location): keep RUN.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from incseg.processes import exit_on_sigterm, running

SHAPES = ["ellipse", "bar", "hexagon", "crescent", "chevron"]


def polygon(kind: str, cx: float, cy: float, r: float, angle: float, rng: np.random.Generator) -> list:
    if kind == "ellipse":
        a, b = r, r / rng.uniform(1.6, 2.5)
        pts = [(a * math.cos(t), b * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)]
    elif kind == "bar":
        a, b = r, r / rng.uniform(3, 5)
        pts = [(-a, -b), (a, -b), (a, b), (-a, b)]
    elif kind == "hexagon":
        pts = [(r * math.cos(t), r * math.sin(t)) for t in np.arange(6) * math.pi / 3]
    elif kind == "chevron":
        w = r * rng.uniform(0.3, 0.45)
        pts = [(-r, -r), (-r + w, -r), (0, r - w * 1.4), (r - w, -r), (r, -r), (0, r)]
    else:
        raise ValueError(kind)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    r = rng.uniform(0.12, 0.3) * size
    cx, cy = rng.uniform(r * 0.5, size - r * 0.5, 2)
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    if kind == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        angle, off = rng.uniform(0, 2 * math.pi), r * rng.uniform(0.45, 0.65)
        ox, oy = cx + off * math.cos(angle), cy + off * math.sin(angle)
        draw.ellipse([ox - r * 0.9, oy - r * 0.9, ox + r * 0.9, oy + r * 0.9], fill=0)
    else:
        draw.polygon(polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi), rng), fill=1)
    return np.asarray(img, dtype=bool)


def texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A colour field: a random 4x4 colour grid blown up smoothly, stripes at a random angle, noise."""
    grid = Image.fromarray((rng.uniform(0, 1, (4, 4, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    field = np.asarray(grid, dtype=np.float32) / 255
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = rng.uniform(0, math.pi)
    stripes = np.sin(2 * math.pi * rng.uniform(2, 10) * (xx * math.cos(t) + yy * math.sin(t)))
    field = field + rng.uniform(0, 0.25) * stripes[..., None] * rng.uniform(-1, 1, 3)
    return field + rng.normal(0, rng.uniform(0.02, 0.12), field.shape)


def fill(size: int, rng: np.random.Generator) -> np.ndarray:
    """An object's surface: one random colour, a checker of random period and contrast, noise."""
    yy, xx = np.mgrid[0:size, 0:size] // rng.integers(2, 9)
    checker = ((yy + xx) % 2)[..., None] * rng.uniform(-0.3, 0.3)
    return rng.uniform(0, 1, 3) * (1 + checker) + rng.normal(0, rng.uniform(0.02, 0.1), (size, size, 3))


def sample(size: int, shown: list[int], labelled: set[int], rng: np.random.Generator,
           must: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """1-4 objects of the `shown` classes (one of them `must`, when given); pixels of a class not
    in `labelled` stay background in the mask, as an annotator asked for one new class leaves them."""
    image, mask = texture(size, rng), np.zeros((size, size), np.uint8)
    count = int(rng.integers(1, 5))
    for i in range(count):
        k = must if must is not None and i == count - 1 else int(rng.choice(shown))
        m = shape_mask(SHAPES[k - 1], size, rng)
        image[m] = fill(size, rng)[m]
        mask[m] = k if k in labelled else 0
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask


def write_set(folder: Path, n: int, size: int, shown: list[int], rng: np.random.Generator,
              labelled: set[int] | None = None, must: int | None = None) -> None:
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(n):
        image, mask = sample(size, shown, set(shown) if labelled is None else labelled, rng, must)
        Image.fromarray(image).save(folder / "images" / f"{i:04d}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{i:04d}.png")


def newest_run(ws: Path) -> dict:
    """The newest MLflow run's outcome, reason, candidate / champion holdout IoU per class (an update's)
    and its curves: the validation split's and the holdout's mIoU per evaluation."""
    import mlflow

    from incseg.workspace import Workspace

    client = mlflow.MlflowClient(tracking_uri=Workspace(ws).tracking_uri)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"],
                             max_results=1)[0]
    curves = {name: [[m.step, round(m.value, 4)] for m in client.get_metric_history(run.info.run_id, name)]
              for name in ("val_miou", "holdout_miou")}
    return {"outcome": run.data.tags.get("outcome"), "reason": run.data.tags.get("reason"),
            "metrics": {k: round(v, 4) for k, v in sorted(run.data.metrics.items())
                        if k.startswith(("candidate.", "champion."))},
            "curves": {name: sorted(points) for name, points in curves.items() if points}}


def incseg(*args: str, cwd: Path, check: bool = True) -> int:
    """One `incseg` command; it goes down with this script (a `kill` of the script reaches it as SIGTERM,
    which incseg takes as Ctrl-C, and its Prefect server with it), not on as an orphan training for hours."""
    with running([sys.executable, "-m", "incseg", *args], grace=60, own_group=False, cwd=cwd) as proc:
        code = proc.wait()
    if check and code:
        raise SystemExit(f"incseg {' '.join(args)}: exit {code}")
    return code


def set_params(params_file: Path, changes: dict[str, object]) -> None:
    """Write `changes` ({"section.key": value}) into the workspace's params file (its comments go); a key
    the file lacks is added where today's params.yaml has it (a run made before the key existed)."""
    import yaml

    from incseg.datastore import PARAMS_YAML

    params, today = yaml.safe_load(params_file.read_text()), yaml.safe_load(PARAMS_YAML.read_text())
    for dotted, value in changes.items():
        *sections, key = dotted.split(".")
        node, known = params, today
        for section in sections:
            node, known = node[section], known.get(section, {})
        if key not in node and key not in known:
            raise SystemExit(f"--set {dotted}: {params_file} has no key {key!r} there")
        node[key] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def main(out: Path, images: int, holdout: int, size: int, classes: int, seed: int, stream: int = 0,
         step_images: int = 120, changes: dict[str, object] | None = None, joint: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    data, every = out / "source", list(range(1, classes + 1))
    base = every[:classes - stream]
    write_set(data / "holdout", holdout, size, every, rng)
    write_set(data / "train", images, size, base, rng)  # later classes never appear in the base batch
    for i, new in enumerate(every[len(base):], 1):  # old classes appear, left unlabelled (but for --joint)
        write_set(data / f"batch-{i:02d}", step_images, size, every[:len(base) + i], rng,
                  labelled=None if joint else {new}, must=new)
    (data / "classes.yaml").write_text("".join(f"{i}: {n}\n" for i, n in enumerate(["background", *SHAPES[:classes]])))
    ws = out / "ws"
    incseg("init", str(ws), cwd=out)
    if changes:
        set_params(ws / "params.yaml", changes)
    incseg("data", "add", str(data / "holdout"), "--holdout", "--classes", str(data / "classes.yaml"), cwd=ws)
    first = merge(data, stream) if joint else data / "train"
    incseg("data", "add", str(first), "--batch-id", "batch-00", cwd=ws)
    clock = time.perf_counter()
    incseg("bootstrap", "--metrics", str(out / "metrics.json"), cwd=ws)
    result = {"look": f"foreign_look.py --images {images} --holdout {holdout} --size {size} --classes {classes} "
                      f"--seed {seed} --stream {stream} --step-images {step_images}" + (" --joint" if joint else ""),
              "seconds": round(time.perf_counter() - clock), "metrics": json.loads((out / "metrics.json").read_text()),
              "set": changes or {}, "curves": newest_run(ws)["curves"]}
    result["updates"] = [] if joint else run_updates(ws, data, stream)
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def merge(data: Path, stream: int) -> Path:
    """The base batch and the `stream` later ones in one folder, data/joint (files renamed by their batch)."""
    import shutil

    joint = data / "joint"
    for part in ["train", *(f"batch-{i:02d}" for i in range(1, stream + 1))]:
        for kind in ("images", "masks"):
            (joint / kind).mkdir(parents=True, exist_ok=True)
            for f in sorted((data / part / kind).iterdir()):
                shutil.copyfile(f, joint / kind / f"{part}-{f.name}")
    return joint


def run_updates(ws: Path, data: Path, stream: int, add: bool = True) -> list[dict]:
    """`incseg update` on each later batch (added first when `add`), with what each decided."""
    updates = []
    for i in range(1, stream + 1):
        batch = f"batch-{i:02d}"
        if add:
            incseg("data", "add", str(data / batch), cwd=ws)
        clock = time.perf_counter()
        incseg("update", batch, cwd=ws, check=False)  # exit 1: rejected
        updates.append({"batch": batch, "seconds": round(time.perf_counter() - clock), **newest_run(ws)})
    return updates


def updates_again(out: Path, run: Path, changes: dict[str, object] | None = None) -> dict:
    """The updates of the earlier run in `run` again, from its base model, with `changes` set."""
    import shutil
    import sqlite3

    from incseg.datastore import git

    before = json.loads((run / "result.json").read_text())
    ws = out / "ws"
    shutil.copytree(run / "ws", ws, symlinks=True)
    with sqlite3.connect(ws / "mlflow.db") as db:  # the copy's new runs log their artifacts there, not in RUN's
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
                   (str((run / "ws").resolve()), str(ws.resolve())))
    incseg("promote", "1", cwd=ws)  # the bootstrap's version: the first registered
    if changes:
        set_params(ws / "params.yaml", changes)
        git(ws, "commit", "-qam", "foreign_look.py --updates-from: --set")
    result = {"look": before["look"], "updates_from": str(run), "set": changes or {},
              "metrics": before["metrics"], "updates": run_updates(ws, run / "source", len(before["updates"]),
                                                                    add=False)}
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    exit_on_sigterm()  # a `kill` stops the incseg command running (see `incseg`)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--images", type=int, default=720)
    ap.add_argument("--holdout", type=int, default=150)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--classes", type=int, default=5, choices=range(1, len(SHAPES) + 1))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stream", type=int, default=0, help="the last N classes come later, one batch each, "
                    "labelled for that class only; each is brought in with `incseg update`")
    ap.add_argument("--step-images", type=int, default=120, help="images per later batch")
    ap.add_argument("--joint", action="store_true", help="bootstrap the stream's images, every object labelled, "
                    "as one batch (the stream's joint upper bound; no updates)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="change the workspace's params.yaml after init (repeatable; the value is YAML)")
    ap.add_argument("--updates-from", type=Path, metavar="RUN",
                    help="re-run the updates of the run in RUN from its base model (see above)")
    a = ap.parse_args()
    import yaml

    bad = [c for c in a.set if "=" not in c]
    if bad:
        ap.error(f"--set wants SECTION.KEY=VALUE, got {bad[0]!r}")
    changes = {k: yaml.safe_load(v) for k, v in (c.split("=", 1) for c in a.set)}
    if a.out.exists():
        ap.error(f"{a.out} exists; give a new folder")
    if a.updates_from is not None:
        if a.joint:
            ap.error("--joint bootstraps a stream of its own; it does not go with --updates-from")
        if not (a.updates_from / "result.json").is_file():
            ap.error(f"{a.updates_from}: no result.json of a finished run there")
        a.out.mkdir(parents=True)
        print(json.dumps(updates_again(a.out, a.updates_from, changes), indent=1))
        sys.exit(0)
    a.out.mkdir(parents=True)
    if a.stream >= a.classes:
        ap.error("--stream must leave the base batch at least one class")
    print(json.dumps(main(a.out, a.images, a.holdout, a.size, a.classes, a.seed, a.stream, a.step_images, changes,
                          a.joint), indent=1))
