"""Update strategies: what an update trains on and which loss it minimises."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, WeightedRandomSampler

from incseg.config import ContinualParams, TrainParams
from incseg.continual.distillation import (mistaken_objects, new_class_pixels, pod_distillation, pseudo_label,
                                          unbiased_cross_entropy, unbiased_distillation)
from incseg.continual.memory import ExemplarMemory
from incseg.data.dataset import SegmentationFolder
from incseg.losses import dice_loss, segmentation_loss
from incseg.metrics import ConfusionMatrix
from incseg.models import feature_modules

STRATEGIES = ("naive", "replay", "distill", "replay+distill")
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def uses_replay(strategy: str) -> bool:
    return "replay" in strategy


def uses_distillation(strategy: str) -> bool:
    return "distill" in strategy


def training_set(
    batch: SegmentationFolder, memory: ExemplarMemory, strategy: str, replay_fraction: float, transform, n_classes: int,
    class_share: dict[int, float] | None = None,
) -> tuple[Dataset, WeightedRandomSampler | None]:
    """The batch alone, or the batch mixed with the memory so that about `replay_fraction`
    of every epoch comes from the memory (an epoch still covers the batch about once). The replay
    draws every exemplar equally, or with `class_share` (`replay_shares`) each class's exemplars
    together that share of it."""
    if not uses_replay(strategy) or not memory.items or replay_fraction <= 0:
        return batch, None
    groups = memory.by_label_set()
    parts: list[SegmentationFolder] = [batch] + [
        SegmentationFolder([memory.pair(it) for it in items], transform, n_classes, annotated)
        for annotated, items in groups.items()
    ]
    kept = [it for items in groups.values() for it in items]
    if class_share is None:
        replayed = [replay_fraction / len(kept)] * len(kept)
    else:
        counts = memory.per_class()
        replayed = [replay_fraction * class_share.get(it.primary, 0.0) / counts[it.primary] for it in kept]
    weights = [(1 - replay_fraction) / len(batch)] * len(batch) + replayed
    n_samples = round(len(batch) / (1 - replay_fraction))
    return ConcatDataset(parts), WeightedRandomSampler(weights, n_samples, replacement=True)


def replay_shares(taken_for: ConfusionMatrix, new: list[int], kept: list[int], toward: float) -> dict[int, float]:
    """Each kept class's share of the replay: `1 - toward` spread evenly, `toward` in proportion to how
    many pixels labelled with a `new` class the champion took for that class (`taken_for`: labels x
    the champion's answers, on the batch). All even when it took them for none of the kept classes."""
    taken = taken_for.mat[new][:, kept].sum(dim=0).double()
    if taken.sum() == 0:
        return {c: 1 / len(kept) for c in kept}
    share = (1 - toward) / len(kept) + toward * taken / taken.sum()
    return {c: float(v) for c, v in zip(kept, share)}


def partial_label_loss(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
                       train: TrainParams, trusted: torch.Tensor | None = None) -> torch.Tensor:
    """Unbiased CE + Dice where labels are trustworthy: the background of a partially
    labelled sample may hide classes its batch did not annotate (but on `trusted` pixels)."""
    return train.ce_weight * unbiased_cross_entropy(logits, target, annotated, trusted) + train.dice_weight * dice_loss(
        logits, target, annotated=annotated)


Features = tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]


@contextmanager
def feature_taps(student: nn.Module, teacher: nn.Module) -> Iterator[Features]:
    """The intermediate features (`models.feature_modules`) of each model's latest forward pass,
    for feature distillation; the hooks are removed on exit."""
    taps: Features = ({}, {})
    handles = []
    for store, model in zip(taps, (student, teacher)):
        for k, module in enumerate(feature_modules(model)):
            def keep(mod, args, out, store=store, k=k):
                store[k] = out
            handles.append(module.register_forward_hook(keep))
    try:
        yield taps
    finally:
        for h in handles:
            h.remove()


def _flat(features: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for k in sorted(features):
        f = features[k]
        out.extend(f.values() if isinstance(f, dict) else [f])
    return out


def make_objective(strategy: str, train: TrainParams, cont: ContinualParams, teacher: nn.Module | None,
                   features: Features | None = None) -> Objective:
    """loss(logits, images, target, annotated) for the strategy; `teacher` is the old model;
    `features` (from `feature_taps`) adds PLOP's feature distillation at `cont.feature_distill_weight`."""
    if not uses_distillation(strategy) or teacher is None:
        return lambda logits, images, target, annotated: segmentation_loss(
            logits, target, train.ce_weight, train.dice_weight
        )
    teacher.eval()
    taught = getattr(teacher, "taught", None)  # None: all its outputs

    def objective(logits, images, target, annotated):
        with torch.no_grad():
            old = teacher(images)
        skip = None if cont.distill_new_class_pixels else new_class_pixels(target, old.shape[1], taught)
        trusted = None
        if cont.mistaken_object_share > 0:  # no distillation where the old model is wrong by the label either
            trusted = mistaken_objects(old, target, cont.mistaken_object_share, taught)
            skip = trusted if skip is None else skip | trusted
        if cont.pseudo_label_threshold > 0:
            target, annotated = pseudo_label(target, annotated, old, cont.pseudo_label_threshold, taught, trusted)
        loss = partial_label_loss(logits, target, annotated, train, trusted) + cont.distill_weight * \
            unbiased_distillation(logits, old, taught, skip)
        if features is not None and cont.feature_distill_weight > 0:
            loss = loss + cont.feature_distill_weight * pod_distillation(_flat(features[0]), _flat(features[1]))
        return loss

    return objective
