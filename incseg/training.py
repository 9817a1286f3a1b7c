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
from typing import Literal

import numpy as np
import torch
from rich import get_console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler

from incseg import dist
from incseg.data.layout import IGNORE
from incseg.metrics import ConfusionMatrix
from incseg.models import label_map

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite: the update stops and its candidate is rejected."""


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` is CUDA when present, else CPU; INCSEG_DEVICE (the CLI's --device) overrides params.
    In a distributed run `cuda` is the rank's own GPU."""
    spec = os.environ.get("INCSEG_DEVICE") or spec
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    return dist.local_device(torch.device(spec))


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
    if dist.active():
        sampler = dist.shard(dataset, sampler, shuffle=shuffle, seed=seed)
        batch_size, shuffle = max(1, batch_size // dist.world_size()), False
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=num_workers, drop_last=False, generator=torch.Generator().manual_seed(seed),
    )


@dataclass
class EvalPoint:
    """One evaluation of a training run: `step` optimizer steps done, the mean training loss
    since the previous point, the validation split's mIoU (NaN without a split)."""

    step: int
    loss: float
    val_miou: float
    images: int  # over all ranks, since the previous point
    seconds: float = 0.0  # wall time of those optimizer steps (no evaluation)


@dataclass
class TrainResult:
    evals: list[EvalPoint] = field(default_factory=list)
    resumed_from: int = 0  # optimizer steps restored from a checkpoint
    world_size: int = 1  # processes that trained it (torchrun / DDP)
    best_step: int = 0  # the step whose weights were kept
    stopped: str = ""  # why training ended: converged | max_steps
    lr_decays: int = 0  # plateaus that lowered the learning rate

    @property
    def images_processed(self) -> int:
        return sum(e.images for e in self.evals)

    @property
    def steps(self) -> int:
        return self.evals[-1].step if self.evals else 0

    @property
    def seconds(self) -> float:
        return sum(e.seconds for e in self.evals)


@dataclass(frozen=True)
class Budget:
    """How long to train: evaluate every `eval_every` steps; when `patience` evaluations in a row
    did not beat the best by `min_delta`, go back to the best weights and multiply the learning
    rate by `decay_factor` (at most `decays` times), then stop (not before `min_steps`, never
    beyond `max_steps`). Evaluations before `judge_from` are logged but not judged: no weights from
    before it are kept and no plateau is counted (from scratch, a half-trained model's lucky score on
    a small validation split would otherwise be what every later LR drop restarts from). A run that
    reaches the last `anneal` share of `max_steps` lowers its
    learning rate linearly to zero at `max_steps`, so that a capped run ends on settled weights,
    not mid-stride at the peak rate. `average` says what is evaluated and kept instead of the latest
    step's weights: "ema", an exponential moving average over about the last `eval_every` steps;
    "swa", the uniform average of every step's weights from half the first evaluation on (stochastic
    weight averaging; a plateau's return to the best weights returns the average to them too).
    `smoothing` < 1 counts plateaus on an exponential moving average of the validation scores (the
    newest score's weight) instead of on the raw score, so one lucky evaluation at a high learning
    rate does not start the wait that drops it; the weights kept are still those of the best raw score."""

    max_steps: int
    min_steps: int = 0
    eval_every: int = 200
    patience: int = 3
    min_delta: float = 0.002
    decays: int = 2
    decay_factor: float = 0.2
    anneal: float = 0.25
    average: Literal["off", "ema", "swa"] = "off"
    judge_from: int = 0
    smoothing: float = 1.0


class LearningRate:
    """LR factor per step: a linear warm-up over min(`warmup`, total / 10) steps, then constant,
    lowered by `decay` on each plateau of the validation score, and linearly to zero over the last
    `anneal` share of `total` (`cosine=True`, for training with nothing to validate on: a cosine
    decay to 1 % at `total` instead)."""

    def __init__(self, total: int, cosine: bool, warmup: int = 200, anneal: float = 0.0):
        self.total, self.cosine, self.warm, self.scale = total, cosine, max(1, min(warmup, total // 10)), 1.0
        self.anneal_steps = round(anneal * total)

    def __call__(self, step: int) -> float:
        if step < self.warm:
            return self.scale * (step + 1) / self.warm
        if not self.cosine:
            return self.scale * (min(1.0, (self.total - step) / self.anneal_steps) if self.anneal_steps else 1.0)
        t = min(1.0, (step - self.warm) / max(1, self.total - self.warm))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))


class CapTimeColumn(TimeRemainingColumn):
    """The time left to the step cap, read as the bound it is: the convergence rule often stops sooner
    (at the defaults' 16000-step cap a bootstrap showed hours left)."""

    def render(self, task) -> Text:
        left = super().render(task)
        return left if task.time_remaining is None else Text(f"at most {left.plain} left", style=left.style)


def progress_bar(enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), CapTimeColumn(), disable=not enabled, transient=False,
    )


# Models and image batches are trained and evaluated channels-last (NHWC): the U-Net's convolutions
# ran 10-13 % faster so on 2 CPU cores (width 8 at 32 px to width 16 at 64 px), and it is the layout
# GPUs' convolution kernels prefer. Only 4-D tensors change; checkpoints load into any layout.
FAST_LAYOUT = torch.channels_last


def train(
    model: nn.Module,
    loader: DataLoader,
    objective: Callable[..., torch.Tensor],
    budget: Budget,
    *,
    lr: float,
    weight_decay: float = 0.0,
    device: torch.device = torch.device("cpu"),
    validate: Callable[[nn.Module], float] | None = None,
    param_groups: list[dict] | None = None,
    checkpoint_path: Path | None = None,
    on_eval: Callable[[EvalPoint, nn.Module], None] | None = None,
    progress: bool = True,
    description: str = "train",
) -> TrainResult:
    """AdamW with a short warm-up and a cosine decay over `budget.max_steps`, stopped early when
    `validate(model)` (the validation split's mIoU) stops improving; the best weights are kept.

    A resumable checkpoint is written at every evaluation; when `checkpoint_path` already holds
    one for the same model and budget, training resumes from it. Under torchrun the model trains
    as DDP (every rank sees the same all-reduced validation score, so all stop together); only
    rank 0 writes checkpoints and shows progress."""
    model.to(device, memory_format=FAST_LAYOUT)
    opt = torch.optim.AdamW(param_groups or model.parameters(), lr=lr, weight_decay=weight_decay)
    rate = LearningRate(budget.max_steps, cosine=validate is None, anneal=budget.anneal)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    result = TrainResult(world_size=dist.world_size())
    state = _resume(checkpoint_path, model, opt, sched, result, budget)
    best, best_state, waited, decays = state["best"], state["best_state"], state["waited"], state["decays"]
    trend, trend_best = state["trend"], state["trend_best"]  # the smoothed score that plateaus are counted on
    averaged, average_from = None, 0
    if budget.average != "off":  # torch's averages of parameters and BatchNorm statistics
        ema = get_ema_multi_avg_fn(1 - 1 / budget.eval_every) if budget.average == "ema" else None
        averaged = AveragedModel(model, multi_avg_fn=ema, use_buffers=True)  # no fn: the uniform (SWA) mean
        if budget.average == "swa":  # the first evaluation judges an average of steps already
            average_from = min(budget.eval_every, budget.max_steps) // 2
        if state["averaged"] is not None:
            averaged.load_state_dict(state["averaged"])
    judged = averaged.module if averaged is not None else model  # the weights evaluated and kept
    rate.scale = budget.decay_factor ** decays
    parallel = dist.wrap(model, device)
    step, epoch = result.steps, state["epoch"]
    clock, total, seen = time.perf_counter(), 0.0, 0
    # a log (a pipe, a file, torchrun's ranks) gets a line per evaluation and no bar: a bar there shows
    # nothing until the end, and then its last frame cut to the log's width
    lines = progress and dist.is_main() and (dist.active() or not get_console().is_terminal)
    with progress_bar(progress and not dist.active() and not lines) as bar:
        task = bar.add_task(description, total=budget.max_steps, completed=step, info="")
        while step < budget.max_steps and not result.stopped:
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            epoch += 1
            parallel.train()
            for images, masks, annotated in loader:
                images = images.to(device, memory_format=FAST_LAYOUT)
                masks, annotated = masks.to(device), annotated.to(device)
                loss = objective(parallel(images), images, masks, annotated)
                if not dist.all_finite(loss):
                    raise DivergenceError(f"loss became {loss.item()} at step {step + 1}; update stopped")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if averaged is not None and step >= average_from:
                    averaged.update_parameters(model)
                step += 1
                total += loss.item() * len(images)
                seen += len(images)
                bar.update(task, completed=step)
                if step % budget.eval_every and step < budget.max_steps:
                    continue
                total, seen = dist.all_sum(torch.tensor([total, float(seen)], dtype=torch.float64)).tolist()
                seconds = time.perf_counter() - clock
                score = validate(judged) if validate is not None else float("nan")
                point = EvalPoint(step, total / max(seen, 1), score, int(seen), seconds)
                result.evals.append(point)
                improved = score == score and score > best + budget.min_delta
                if score == score:
                    trend = score if trend is None else budget.smoothing * score + (1 - budget.smoothing) * trend
                if validate is None:  # nothing to judge by: the latest weights are the best
                    result.best_step = step
                elif step < budget.judge_from and step < budget.max_steps:
                    pass  # still climbing: a score this early is no candidate to keep or to wait on
                else:
                    rising, first = trend is not None and trend > trend_best + budget.min_delta, best_state is None
                    if improved or first:
                        best, result.best_step = (score if improved else best), step
                        best_state = {k: v.detach().clone().cpu() for k, v in judged.state_dict().items()}
                    trend_best = trend if rising else trend_best
                    waited = 0 if rising or first else waited + 1
                if step >= budget.max_steps:  # the budget is spent, plateau or not
                    result.stopped = "max_steps"
                elif waited >= budget.patience and decays < budget.decays:  # a plateau: lower the LR, from the best
                    decays, waited = decays + 1, 0
                    rate.scale = budget.decay_factor ** decays
                    model.load_state_dict(best_state)
                    if averaged is not None:
                        averaged.module.load_state_dict(best_state)
                elif step >= budget.min_steps and waited >= budget.patience:
                    result.stopped = "converged"
                if checkpoint_path is not None and dist.is_main():
                    _save_state(checkpoint_path, model, opt, sched, result, budget,
                                {"best": best, "best_state": best_state, "waited": waited, "epoch": epoch,
                                 "trend": trend, "trend_best": trend_best,
                                 "decays": decays, "averaged": averaged.state_dict() if averaged is not None else None})
                if on_eval is not None:
                    on_eval(point, judged)
                parallel.train()
                info = f"loss {point.loss:.4f}" + (f" val mIoU {score:.3f}" if score == score else "")
                bar.update(task, info=info)
                if lines:
                    ranks = dist.world_size()
                    print(f"{description}: step {step}/{budget.max_steps} {info} ({seen / max(seconds, 1e-9):.0f} "
                          f"images/s{f' on {ranks} ranks' if ranks > 1 else ''})", flush=True)
                clock, total, seen = time.perf_counter(), 0.0, 0
                if result.stopped:
                    break
    if best_state is None and averaged is not None:  # nothing validated: the average of the last steps
        best_state = averaged.module.state_dict()
    if best_state is not None:
        model.load_state_dict(best_state)
    result.lr_decays = decays
    return result


def _save_state(path: Path, model, opt, sched, result: TrainResult, budget: Budget, loop: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "evals": [vars(e) for e in result.evals], "budget": vars(budget), "best_step": result.best_step,
                "stopped": result.stopped, **loop}, tmp)
    tmp.replace(path)


def _resume(path: Path | None, model, opt, sched, result: TrainResult, budget: Budget) -> dict:
    fresh = {"best": float("-inf"), "best_state": None, "waited": 0, "epoch": 0, "decays": 0, "averaged": None,
             "trend": None, "trend_best": float("-inf")}
    if path is None or not path.exists():
        return fresh
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        same = shapes == {k: v.shape for k, v in state["model"].items()} and state.get("budget") == vars(budget)
    except Exception as err:  # noqa: BLE001 - a damaged scratch checkpoint only costs the progress
        log.warning("checkpoint %s is unreadable (%s); starting over", path, err)
        return fresh
    if not same:
        log.warning("checkpoint %s is for another model or budget; starting over", path)
        return fresh
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    result.evals = [EvalPoint(**e) for e in state["evals"]]
    result.best_step, result.stopped = state["best_step"], state["stopped"]
    result.resumed_from = result.steps
    log.info("resumed from %s at step %d", path, result.resumed_from)
    return {k: state.get(k, v) for k, v in fresh.items()}


def split_validation(pairs: list, fraction: float, seed: int, at_most: int = 256) -> tuple[list, list]:
    """(train, validation): a seeded `fraction` of the pairs for early stopping (never the gate's
    holdout). Batches under 10 pairs keep everything for training and get no validation split."""
    if fraction <= 0 or len(pairs) < 10:
        return list(pairs), []
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = min(at_most, max(1, round(fraction * len(pairs))))
    val = sorted(order[:n_val].tolist())
    keep = sorted(order[n_val:].tolist())
    return [pairs[i] for i in keep], [pairs[i] for i in val]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
             taught: list[int] | None = None, per_image: bool = False) -> ConfusionMatrix:
    """Confusion matrix of the model's argmax over every pixel of `loader` (of every rank's shard,
    all-reduced, in a distributed run). With `taught`, pixels whose ground truth is a class id not
    in it (a class no batch has taught yet) are left out. `per_image` keeps each image's matrix
    (`ConfusionMatrix.images`, this process's images only)."""
    model.to(device, memory_format=FAST_LAYOUT).eval()
    cm = ConfusionMatrix(num_classes, per_image=per_image)
    untaught = None
    if taught is not None:
        untaught = torch.ones(IGNORE + 1, dtype=torch.bool)
        untaught[[c for c in taught if 0 <= c <= IGNORE]] = False
    for images, masks, _ in loader:
        if untaught is not None:
            masks = masks.masked_fill(untaught[masks.clamp(0, IGNORE)], IGNORE)
        cm.update(masks, label_map(model(images.to(device, memory_format=FAST_LAYOUT))).cpu())
    cm.all_reduce()
    return cm

