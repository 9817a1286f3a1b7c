"""Train and evaluate loops: device, seeding, per-epoch checkpoints, progress."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from incseg import distributed
from incseg.metrics import ConfusionMatrix

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite: the update stops and its candidate is rejected."""


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` is CUDA when present, else CPU; INCSEG_DEVICE (the CLI's --device) overrides params.
    In a distributed run `cuda` is the rank's own GPU."""
    spec = os.environ.get("INCSEG_DEVICE") or spec
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    return distributed.local_device(torch.device(spec))


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, sampler: Sampler | None = None,
    num_workers: int = 0, seed: int = 0,
) -> DataLoader:
    """In a distributed run each rank gets its shard and `batch_size / world` per step, so the
    global batch and the steps per epoch stay what they are in one process."""
    if distributed.active():
        sampler = distributed.shard(dataset, sampler, shuffle=shuffle, seed=seed)
        batch_size, shuffle = max(1, batch_size // distributed.world_size()), False
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=num_workers, drop_last=False, generator=torch.Generator().manual_seed(seed),
    )


@dataclass
class EpochStats:
    epoch: int
    loss: float
    images: int  # over all ranks
    seconds: float = 0.0  # wall time of the epoch's optimizer steps (no evaluation)


@dataclass
class TrainResult:
    epochs: list[EpochStats] = field(default_factory=list)
    resumed_from: int = 0
    world_size: int = 1  # processes that trained it (torchrun / DDP)

    @property
    def images_processed(self) -> int:
        return sum(e.images for e in self.epochs)


def progress_bar(enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not enabled, transient=False,
    )


def train(
    model: nn.Module,
    loader: DataLoader,
    objective: Callable[..., torch.Tensor],
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    device: torch.device = torch.device("cpu"),
    checkpoint_path: Path | None = None,
    on_epoch: Callable[[EpochStats, nn.Module], None] | None = None,
    progress: bool = True,
    description: str = "train",
) -> TrainResult:
    """AdamW + one-cycle schedule. Saves a resumable checkpoint after every epoch and, when
    `checkpoint_path` already holds one for the same model shape, resumes from it.
    Under torchrun the model trains as DDP; only rank 0 writes checkpoints and shows progress."""
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * len(loader)),
                                                pct_start=0.1)
    result = TrainResult()
    start = _resume(checkpoint_path, model, opt, sched, result, epochs)
    parallel = distributed.wrap(model, device)
    with progress_bar(progress and not distributed.active()) as bar:
        task = bar.add_task(description, total=epochs, completed=start, info="")
        for epoch in range(start, epochs):
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            stats = _train_epoch(parallel, loader, objective, opt, sched, device, epoch)
            result.epochs.append(stats)
            if checkpoint_path is not None and distributed.is_main():
                _save_state(checkpoint_path, model, opt, sched, result, epochs)
            if on_epoch is not None:
                on_epoch(stats, model)
            bar.update(task, advance=1, info=f"loss {stats.loss:.4f}")
            if progress and distributed.active() and distributed.is_main():  # lines: a pipe shows no bar
                print(f"{description}: epoch {stats.epoch}/{epochs} loss {stats.loss:.4f} "
                      f"({stats.images / max(stats.seconds, 1e-9):.0f} images/s on {distributed.world_size()} ranks)",
                      flush=True)
    return result


def _train_epoch(model, loader, objective, opt, sched, device, epoch) -> EpochStats:
    model.train()
    start = time.perf_counter()
    total, seen = 0.0, 0
    for images, masks, annotated in loader:
        images, masks, annotated = images.to(device), masks.to(device), annotated.to(device)
        loss = objective(model(images), images, masks, annotated)
        if not distributed.all_finite(loss):
            raise DivergenceError(f"loss became {loss.item()} in epoch {epoch + 1}; update stopped")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(images)
        seen += len(images)
    total, seen = distributed.all_sum(torch.tensor([total, float(seen)], dtype=torch.float64)).tolist()
    return EpochStats(epoch + 1, total / max(seen, 1), int(seen), time.perf_counter() - start)


def _save_state(path: Path, model, opt, sched, result: TrainResult, planned: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "epochs": [vars(e) for e in result.epochs], "planned_epochs": planned}, tmp)
    tmp.replace(path)


def _resume(path: Path | None, model, opt, sched, result: TrainResult, planned: int) -> int:
    if path is None or not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if shapes != {k: v.shape for k, v in state["model"].items()} or state.get("planned_epochs") != planned:
        log.warning("checkpoint %s is for another model or schedule; starting over", path)
        return 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    result.epochs = [EpochStats(**e) for e in state["epochs"]]
    result.resumed_from = len(result.epochs)
    log.info("resumed from %s after epoch %d", path, result.resumed_from)
    return result.resumed_from


def epochs_for(loader: DataLoader, epochs: int, min_steps: int) -> int:
    """`epochs`, raised so that training takes at least `min_steps` optimizer steps."""
    return max(epochs, math.ceil(min_steps / max(1, len(loader))))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device) -> ConfusionMatrix:
    """Confusion matrix of the model's argmax over every pixel of `loader` (of every rank's shard,
    all-reduced, in a distributed run)."""
    model.to(device).eval()
    cm = ConfusionMatrix(num_classes)
    for images, masks, _ in loader:
        cm.update(masks, model(images.to(device)).argmax(dim=1).cpu())
    cm.all_reduce()
    return cm

