"""MiB's losses for background shift (Cermelli et al., CVPR 2020).

A new batch labels old classes as background; the old model calls new classes
background. Both losses merge the right logits instead of trusting "background".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from incseg.data.layout import IGNORE
from incseg.models import label_map


def _taught(n_old: int, taught: list[int] | None) -> list[int]:
    """The class ids an old model of `n_old` outputs was `taught`, sorted (None: all its outputs)."""
    return list(range(n_old)) if taught is None else sorted(taught)


def unbiased_cross_entropy(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
                           trusted: torch.Tensor | None = None) -> torch.Tensor:
    """CE where a background pixel may be background or any class its batch did not annotate.

    `annotated` is (B, C) bool: the classes labelled in each sample's batch; the (B, H, W) bool
    `trusted` pixels labelled background are background alone (`mistaken_objects`).
    """
    log_p = logits.log_softmax(dim=1)
    hidden = ~annotated
    hidden[:, 0] = True
    bg = log_p.masked_fill(~hidden[:, :, None, None], float("-inf")).logsumexp(dim=1)
    picked = log_p.gather(1, target.clamp(0, logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
    lp = torch.where((target == 0) if trusted is None else (target == 0) & ~trusted, bg, picked)
    valid = target != IGNORE
    return -(lp[valid]).mean() if valid.any() else logits.sum() * 0


def unbiased_distillation(student: torch.Tensor, teacher: torch.Tensor,
                          taught: list[int] | None = None, skip: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) over the teacher's `taught` classes (default: all its outputs), where
    background absorbs every other class: the student's new ones, and on both sides a row no batch
    has taught (an id a batch skipped). Averaged over all pixels, with the (B, H, W) bool `skip`
    pixels counted as zero (`new_class_pixels`: where a label says the teacher's answer is wrong).

    Zero when the student equals the teacher; new classes are never punished for
    taking pixels that the teacher called background.
    """
    n_old = teacher.shape[1]
    fg = [c for c in _taught(n_old, taught) if c != 0]

    def merged(log_p: torch.Tensor) -> torch.Tensor:
        rest = [c for c in range(log_p.shape[1]) if c not in fg]  # background first
        return torch.cat([log_p[:, rest].logsumexp(dim=1, keepdim=True), log_p[:, fg]], dim=1)

    kl = F.kl_div(merged(student.log_softmax(dim=1)), merged(teacher.log_softmax(dim=1)), log_target=True,
                  reduction="none").sum(1)
    return (kl if skip is None else kl.masked_fill(skip, 0.0)).mean()


def new_class_pixels(target: torch.Tensor, n_old: int, taught: list[int] | None = None) -> torch.Tensor:
    """(B, H, W) bool: pixels labelled with a class the old model (`n_old` outputs) was not `taught`
    (default: all its outputs). The old model's answer there is wrong by the label, often an old
    class the new one resembles, and distilling it pulls the new class toward that old class."""
    taught_ids = torch.tensor(_taught(n_old, taught), device=target.device)
    return (target != 0) & (target != IGNORE) & ~torch.isin(target, taught_ids)


@torch.no_grad()
def mistaken_objects(teacher: torch.Tensor, target: torch.Tensor, min_share: float,
                     taught: list[int] | None = None) -> torch.Tensor:
    """(B, H, W) bool: background-labelled pixels of the old model's mistaken objects. An object is a
    connected region the old model (`teacher` logits) gives one class it was `taught`; it is mistaken
    when at least `min_share` of it is labelled with a class the old model was not taught: it took the
    new object for an old class and filled in around it (a crescent and its bite, called one ellipse).
    Its pixels labelled background are then background the old model got wrong, not an old object left
    unlabelled, and MiB's "background or an old class" would keep the mistake."""
    n_old = teacher.shape[1]
    fg = [c for c in _taught(n_old, taught) if c != 0]
    calls = label_map(teacher).cpu().numpy()
    new = new_class_pixels(target, n_old, taught).cpu().numpy()
    out = np.zeros_like(new)
    for b in np.flatnonzero(new.any(axis=(1, 2))):  # a sample without new-class pixels (replay) has none
        for c in fg:
            regions, n = ndimage.label(calls[b] == c)
            if n == 0:
                continue
            share = np.bincount(regions.ravel(), weights=new[b].ravel(), minlength=n + 1) / np.maximum(
                np.bincount(regions.ravel(), minlength=n + 1), 1)
            share[0] = 0  # not a region
            out[b] |= share[regions] >= min_share
    return torch.from_numpy(out).to(target.device) & (target == 0)


@torch.no_grad()
def pseudo_label(target: torch.Tensor, annotated: torch.Tensor, teacher: torch.Tensor,
                 threshold: float, taught: list[int] | None = None,
                 trusted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PLOP (Douillard et al., CVPR 2021): a background pixel takes the old model's class,
    background included, where the old model is confident (max probability >= `threshold`)
    in a class it was `taught` (default: all its outputs), and is ignored where it is not;
    labelled pixels keep their label, and so do `trusted` background pixels (`mistaken_objects`:
    there the old model is confidently wrong). Returns the new target and what each sample now
    annotates: its own classes and every class the old model was taught (so the loss trusts
    the background that is left)."""
    taught = _taught(teacher.shape[1], taught)
    prob, cls = teacher.softmax(dim=1).max(dim=1)
    sure = (prob >= threshold) & torch.isin(cls, torch.tensor(taught, device=cls.device))
    background = target == 0
    if trusted is not None:
        background &= ~trusted
    target = torch.where(background, torch.where(sure, cls, torch.full_like(cls, IGNORE)), target)
    annotated = annotated.clone()
    annotated[:, taught] = True
    return target, annotated


def pod_distillation(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """PLOP's pooled output distillation (Douillard et al., CVPR 2021) of intermediate features:
    each squared feature map is summed over its width and over its height, the two profiles are
    L2-normalised, and their distance to the old model's is averaged over the layers. Zero when
    the features are equal; it keeps where things are without pinning every activation."""
    def profile(f: torch.Tensor) -> torch.Tensor:
        f = f.pow(2)
        return F.normalize(torch.cat([f.sum(dim=-1).flatten(1), f.sum(dim=-2).flatten(1)], dim=1), dim=1)

    distances = [(profile(s) - profile(t.detach())).norm(dim=1).mean() for s, t in zip(student, teacher)]
    return torch.stack(distances).mean()
