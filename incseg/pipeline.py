"""The steps of a bootstrap and of an incremental update, as plain functions.

Prefect tasks wrap these one to one; tests and benchmarks call them directly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from incseg.config import Params, TrainParams, Workspace
from incseg.continual.memory import ExemplarMemory
from incseg.continual.strategies import make_objective, training_set, uses_distillation
from incseg.data.dataset import SegmentationFolder, eval_transforms, train_transforms
from incseg.data.layout import BatchInfo, DataError, Pair, find_pairs, read_classes
from incseg.metrics import ConfusionMatrix, mean_iou
from incseg.models import build_model, expand_classes, num_classes, param_groups
from incseg.training import (Budget, EvalPoint, TrainResult, evaluate, make_loader, resolve_device, seed_everything,
                             split_validation, train)


@dataclass
class Batch:
    """A batch ready for training: its pairs (after validation) and what it annotates."""

    batch_id: str
    root: Path
    pairs: list[Pair]
    info: BatchInfo

    @classmethod
    def load(cls, root: Path, pairs: list[Pair] | None = None) -> Batch:
        pairs = find_pairs(root) if pairs is None else pairs
        if not pairs:
            raise DataError(f"{root}: no image/mask pairs (expected images/<stem>.png and masks/<stem>.png)")
        return cls(root.name, root, pairs, BatchInfo.read(root))

    @property
    def classes(self) -> list[int]:
        return sorted(set(self.info.classes) | {0})


def class_names(ws: Workspace, model: nn.Module) -> dict[int, str]:
    """Names of the model's outputs from `classes.yaml` (an id it lacks is named by its number)."""
    names = read_classes(ws.classes_file)
    return {c: names.get(c, str(c)) for c in range(num_classes(model))}


def holdout_set(ws: Workspace, n_classes: int) -> SegmentationFolder:
    pairs = find_pairs(ws.holdout_dir)
    if not pairs:
        raise DataError(f"{ws.holdout_dir}: the holdout is empty (run `incseg data synth` or `incseg data add --holdout`)")
    return SegmentationFolder(pairs, eval_transforms(ws.params.data.image_size), n_classes)


def holdout_matrix(ws: Workspace, model: nn.Module, device: torch.device | None = None) -> ConfusionMatrix:
    """Confusion matrix of `model` on the fixed holdout over every class in `classes.yaml`."""
    n = len(read_classes(ws.classes_file))
    loader = make_loader(holdout_set(ws, n), ws.params.eval.batch_size, shuffle=False)
    return evaluate(model, loader, n, device or resolve_device(ws.params.train.device))


def budget(train: TrainParams, *, from_scratch: bool) -> Budget:
    """The step budget from `params.yaml: train` for a bootstrap or an update."""
    if from_scratch:
        return Budget(train.bootstrap_max_steps, train.bootstrap_min_steps, train.eval_every, train.patience,
                      decays=train.lr_decays)
    return Budget(train.update_max_steps, train.update_min_steps, train.eval_every, train.patience,
                  decays=train.lr_decays)


def validation_score(pairs: list[Pair], params: Params, n_classes: int, annotated: list[int],
                     device: torch.device) -> Callable[[nn.Module], float] | None:
    """mIoU on the batch's validation split over what its labels can judge: every annotated
    class, but not background when the batch labels only some classes (its background may
    hide the others). None when the batch is too small for a split."""
    if not pairs:
        return None
    data = SegmentationFolder(pairs, eval_transforms(params.data.image_size), n_classes, annotated)
    loader = make_loader(data, params.eval.batch_size, shuffle=False)
    partial = set(range(n_classes)) - set(annotated) - {0}
    scope = [c for c in sorted(set(annotated) | {0}) if c < n_classes and not (partial and c == 0)]

    def score(model: nn.Module) -> float:
        return mean_iou(evaluate(model, loader, n_classes, device), scope)

    return score


def train_base(
    ws: Workspace, batch: Batch, *, progress: bool = True, on_eval: Callable[[EvalPoint, nn.Module], None] | None = None,
    checkpoint_path: Path | None = None,
) -> tuple[nn.Module, TrainResult]:
    """A first model from scratch on one batch, with a head for every class it annotates."""
    p = ws.params
    seed_everything(p.train.seed)
    n = max(batch.classes) + 1
    device = resolve_device(p.train.device)
    model = build_model(p.model.arch, n, p.model.width)
    fit, held = split_validation(batch.pairs, p.train.val_fraction, p.train.seed)
    data = SegmentationFolder(fit, train_transforms(p.data.image_size, p.train.augment), n)
    loader = make_loader(data, p.train.batch_size, shuffle=True, num_workers=p.train.num_workers, seed=p.train.seed)
    result = train(
        model, loader, make_objective("naive", p.train, p.continual, None), budget(p.train, from_scratch=True),
        lr=p.train.lr, weight_decay=p.train.weight_decay, device=device,
        validate=validation_score(held, p, n, list(range(n)), device),
        checkpoint_path=checkpoint_path, on_eval=on_eval, progress=progress, description=f"bootstrap {batch.batch_id}",
    )
    return model.cpu(), result


def train_candidate(
    params: Params, champion: nn.Module, batch: Batch, memory: ExemplarMemory, *, progress: bool = True,
    on_eval: Callable[[EvalPoint, nn.Module], None] | None = None, checkpoint_path: Path | None = None,
) -> tuple[nn.Module, TrainResult]:
    """Continue training a copy of the champion on the batch with the configured strategy.

    The head grows first if the batch brings class ids the champion does not know.
    """
    p, strategy = params, params.continual.strategy
    seed_everything(p.train.seed)
    student = copy.deepcopy(champion)
    n = max(num_classes(champion), max(batch.classes) + 1)
    expand_classes(student, n - num_classes(champion))
    device = resolve_device(p.train.device)
    teacher = copy.deepcopy(champion).to(device) if uses_distillation(strategy) else None
    transform = train_transforms(p.data.image_size, p.train.augment)
    fit, held = split_validation(batch.pairs, p.train.val_fraction, p.train.seed)
    data = SegmentationFolder(fit, transform, n, batch.classes)
    data, sampler = training_set(data, memory, strategy, p.continual.replay_fraction, transform, n)
    loader = make_loader(data, p.train.batch_size, shuffle=True, sampler=sampler,
                         num_workers=p.train.num_workers, seed=p.train.seed)
    result = train(
        student, loader, make_objective(strategy, p.train, p.continual, teacher), budget(p.train, from_scratch=False),
        lr=p.train.update_lr, weight_decay=p.train.weight_decay, device=device,
        param_groups=param_groups(student, p.train.update_lr, p.continual.head_lr_scale),
        validate=validation_score(held, p, n, batch.classes, device),
        checkpoint_path=checkpoint_path, on_eval=on_eval, progress=progress,
        description=f"update {batch.batch_id} ({strategy})",
    )
    return student.cpu(), result
