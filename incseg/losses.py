"""Segmentation losses; every one ignores label 255."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from incseg.data.layout import IGNORE


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, ignore_index=IGNORE)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
              annotated: torch.Tensor | None = None) -> torch.Tensor:
    """1 - multi-class soft Dice over valid pixels, averaged over classes.

    The +1 smoothing makes a class absent from both target and prediction score 1,
    while predicted mass on an absent class still costs. `annotated` (B, C) bool marks the
    classes each sample's batch labels: where a sample labels only some classes, its background
    pixels may hide the others, so they count only for the classes it labels (there they are
    known negatives) and not for background or the unlabelled classes.
    """
    n = logits.shape[1]
    valid = (target != IGNORE).unsqueeze(1)
    if annotated is not None:
        partial = (~annotated).any(dim=1)
        trusted = annotated.clone()
        trusted[:, 0] = False  # background itself is what a partial sample cannot vouch for
        trusted |= ~partial[:, None]  # a fully labelled sample vouches for every class
        valid = valid & ((target != 0).unsqueeze(1) | trusted[:, :, None, None])
    probs = logits.softmax(dim=1) * valid
    onehot = F.one_hot(target.clamp(0, n - 1), n).permute(0, 3, 1, 2) * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    card = probs.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * inter + smooth) / (card + smooth)).mean()


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, ce_weight: float = 1.0, dice_weight: float = 0.5
) -> torch.Tensor:
    return ce_weight * cross_entropy(logits, target) + dice_weight * dice_loss(logits, target)
