"""`incseg bench --scale`: validation throughput per worker count, DDP vs one-process training.

Validation: the per-file extraction of one large batch of small files on each task runner and
worker count, timed once warm, with the start-up (Prefect, Dask cluster, first imports) apart. Training: the same bootstrap
job in this process and under `torchrun` with 2 (and 4 where there are the cores) processes,
as images per second over the optimizer steps (start-up and evaluation excluded, shown apart).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console

from incseg.config import Params
from incseg.data.layout import IMAGES_DIR, MASK_SUFFIX, MASKS_DIR, BatchInfo
from incseg.data.synthetic import synthesize
from incseg.workspace import Workspace

Extract = Callable[[Path, int, str, int, str | None], object]  # (batch, n_classes, runner, workers, address)


def write_small_files(out: Path, pairs: int, size: int = 128, seed: int = 0) -> Path:
    """`pairs` random image/mask pairs (2 files each): a large batch of small files."""
    rng = np.random.default_rng(seed)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (out / MASKS_DIR).mkdir(parents=True, exist_ok=True)
    for i in range(pairs):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(out / IMAGES_DIR / f"f{i:05d}.png")
        mask = np.zeros((size, size), np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        mask[y:y + size // 3, x:x + size // 3] = 1 + i % 2
        Image.fromarray(mask).save(out / MASKS_DIR / f"f{i:05d}{MASK_SUFFIX}")
    BatchInfo(out.name, classes=[1, 2]).write(out)
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def validation_rows(extract: Extract, batch: Path, workers: list[int], console: Console) -> list[dict]:
    """Files/s of the extraction flow per runner and worker count, once warm; start-up apart
    (a Dask cluster's start and its workers' first imports are paid once per cluster)."""
    from distributed import LocalCluster

    from incseg.validation.table import file_table

    files = sum(1 for _ in batch.rglob("*.png"))
    rows = []

    def row(runner: str, n: int, startup: float, seconds: float) -> None:
        rows.append({"runner": runner, "workers": n, "files": files, "startup_s": round(startup, 2),
                     "seconds": round(seconds, 2), "files_per_s": round(files / seconds, 1)})
        console.print(f"  validation {runner} x{n}: {files / seconds:.0f} files/s (start-up {startup:.1f} s)")

    row("none (plain loop, no Prefect)", 1, 0.0, _timed(lambda: file_table(batch, 3)))
    for n in workers:
        startup = _timed(lambda: extract(batch, 3, "thread", n, None))
        row("thread", n, startup, _timed(lambda: extract(batch, 3, "thread", n, None)))
    for n in workers:
        t0 = time.perf_counter()
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            extract(batch, 3, "dask", n, cluster.scheduler_address)
            startup = time.perf_counter() - t0
            row("dask", n, startup, _timed(lambda: extract(batch, 3, "dask", n, cluster.scheduler_address)))
    return rows


def training_rows(params: Params, procs: list[int], console: Console) -> list[dict]:
    """The same bootstrap job, in-process and under torchrun with each process count."""
    from incseg import launch
    from incseg.pipeline import Batch
    from incseg.registry import ModelRegistry

    rows = []
    with tempfile.TemporaryDirectory(prefix="incseg-bench-ddp-") as tmp:
        ws = Workspace(Path(tmp), params)
        synthesize(ws.data_dir, params.synth)
        batch = Batch.load(ws.registry_dir / "batch-00")
        reg = ModelRegistry(ws)
        for n in [1, *procs]:
            run_id = reg.start_run(f"bench-ddp-{n}", {}, {})
            ckpt = Path(tmp) / f"ckpt-{n}" / "train.pt"
            t0 = time.perf_counter()
            if n == 1:
                _, result = launch.run_training(ws, reg, run_id, batch, ckpt)
            else:
                job = launch.job_for(ws, run_id, batch, ckpt, None, None)
                _, result = launch.launch(job, n, params.train.distributed.torchrun_args)
            wall = time.perf_counter() - t0
            steps = result.evals[1:] or result.evals  # the first stretch warms up
            ips = sum(e.images for e in steps) / max(1e-9, sum(e.seconds for e in steps))
            rows.append({"mode": "one process" if n == 1 else f"torchrun x{n} (DDP, gloo/nccl)", "processes": n,
                         "images_per_s": round(ips, 1), "wall_s": round(wall, 1),
                         "final_loss": round(result.evals[-1].loss, 4)})
            console.print(f"  training {rows[-1]['mode']}: {ips:.0f} images/s, {wall:.0f} s wall")
    return rows


def scale_params(base: Params, quick: bool) -> Params:
    p = base.model_copy(deep=True)
    p.data.image_size = p.synth.size = 32 if quick else 64
    p.synth.base_images = 64 if quick else 256
    p.synth.holdout_per_class, p.synth.new_classes = 4, 0
    p.model.width = 8 if quick else 16
    p.train.bootstrap_max_steps, p.train.bootstrap_min_steps = (12 if quick else 96), 0
    p.train.eval_every, p.train.val_fraction = (4 if quick else 16), 0.0  # fixed length: a throughput probe
    p.train.device = "cpu" if quick else p.train.device
    return p


def run(base: Params, extract: Extract, quick: bool, console: Console | None = None) -> dict:
    console = console or Console()
    cores = os.cpu_count() or 1
    workers = [1, 2] if quick else [1, 2, 4]
    procs = [2] if quick or cores < 4 else [2, 4]
    with tempfile.TemporaryDirectory(prefix="incseg-bench-files-") as tmp:
        batch = write_small_files(Path(tmp) / "large-batch", 128 if quick else 4096)
        validation = validation_rows(extract, batch, workers, console)
    training = training_rows(scale_params(base, quick), procs, console)
    return {"cores": cores, "validation": validation, "training": training}


def markdown(result: dict, command: str) -> str:
    v, t = result["validation"], result["training"]
    lines = ["# Scale-out benchmark", "", f"Made by `{command}` on {result['cores']} CPU cores.", "",
             f"## Validation: per-file extraction of {v[0]['files']} files (128 px PNGs)", "",
             "| task runner | workers | start-up s | seconds (warm) | files/s (warm) |", "|---|---|---|---|---|"]
    lines += [f"| {r['runner']} | {r['workers']} | {r['startup_s']} | {r['seconds']} | {r['files_per_s']} |" for r in v]
    lines += ["", "## Training: one bootstrap job", "", "| mode | processes | images/s (steps) | wall s | final loss |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['processes']} | {r['images_per_s']} | {r['wall_s']} | {r['final_loss']} |" for r in t]
    return "\n".join(lines) + "\n"
