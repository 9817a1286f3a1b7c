"""Dataset-level confusion matrix and the IoU figures derived from it."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from incseg import dist


class ConfusionMatrix:
    """Rows: ground truth, columns: prediction; label 255 (and any id >= n) is skipped. With
    `per_image`, each image's own matrix is kept too (`images`, in update order), for resampling."""

    def __init__(self, num_classes: int, per_image: bool = False):
        self.n = num_classes
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64)
        self.images: list[torch.Tensor] | None = [] if per_image else None

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        """Add a batch of (B x H x W) label maps, or one (H x W)."""
        if self.images is not None and target.dim() == 3:
            for t, p in zip(target, pred):
                self.update(t, p)
            return
        t, p = target.flatten().long(), pred.flatten().long()
        keep = (t >= 0) & (t < self.n)
        idx = self.n * t[keep].to(self.mat.device) + p[keep].to(self.mat.device)
        counts = torch.bincount(idx, minlength=self.n**2).reshape(self.n, self.n)
        self.mat += counts
        if self.images is not None:
            self.images.append(counts)

    def all_reduce(self) -> None:
        """Sum the matrix over all processes of a distributed run (a no-op in one process)."""
        dist.all_sum(self.mat)

    def iou(self) -> torch.Tensor:
        """Per-class IoU; NaN for a class neither in ground truth nor predicted."""
        return _iou(self.mat)

    def present(self) -> list[int]:
        """Classes that occur in the ground truth."""
        return [c for c in range(self.n) if self.mat[c].sum() > 0]

    def pixel_accuracy(self) -> float:
        total = self.mat.sum().item()
        return self.mat.diag().sum().item() / total if total else float("nan")


def resampled_iou(images: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Per-class IoU of each resample of the images: `weights` (R x N) says how often each of the N
    per-image matrices is drawn in each of R resamples. (R x C), NaN where a resample's ground truth
    has no pixel of the class (`mean_iou` leaves those out)."""
    stack = torch.stack(images).double()  # N x C x C
    n = stack.shape[-1]
    mats = (weights.double() @ stack.reshape(len(images), -1)).reshape(-1, n, n)
    iou = _iou(mats)
    return torch.where(mats.sum(-1) > 0, iou, torch.full_like(iou, float("nan")))


def _iou(mats: torch.Tensor) -> torch.Tensor:
    """Per-class IoU of one (C x C) confusion matrix or a stack (... x C x C); NaN where a class is
    neither in ground truth nor predicted."""
    tp = mats.diagonal(dim1=-2, dim2=-1).double()
    union = mats.sum(-2).double() + mats.sum(-1).double() - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def bootstrap_weights(n: int, resamples: int, seed: int = 0) -> torch.Tensor:
    """(resamples x n) counts: each row draws n of n items with replacement (the image bootstrap)."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (resamples, n), generator=g)
    return torch.zeros(resamples, n).scatter_add_(1, draws, torch.ones(resamples, n))


def mean_iou(cm: ConfusionMatrix, classes: Iterable[int] | None = None) -> float:
    """Mean IoU over `classes` (default: all) that occur in the ground truth."""
    iou = cm.iou()
    scope = [c for c in (range(cm.n) if classes is None else classes) if c in set(cm.present())]
    return float(iou[scope].mean()) if scope else float("nan")


def harmonic_mean(a: float, b: float) -> float:
    if a != a or b != b:  # NaN: one group is empty
        return a if b != b else b
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def iou_report(cm: ConfusionMatrix, old: Iterable[int], new: Iterable[int], names: dict[int, str]) -> dict:
    """Per-class IoU and the means: over old + new (`miou`), old, new, and their harmonic mean."""
    old, new = sorted(set(old)), sorted(set(new) - set(old))
    iou = cm.iou()
    per_class = {names.get(c, str(c)): (None if iou[c] != iou[c] else round(float(iou[c]), 4)) for c in range(cm.n)}
    m_old, m_new = mean_iou(cm, old), mean_iou(cm, new)
    return {
        "per_class": per_class,
        "miou": mean_iou(cm, old + new),
        "miou_old": m_old,
        "miou_new": m_new,
        "hiou": harmonic_mean(m_old, m_new),
        "pixel_accuracy": cm.pixel_accuracy(),
        "in_scope": old + new,
    }


def report_metrics(prefix: str, report: dict) -> dict[str, float]:
    """An `iou_report` as flat metric names: `<prefix>.miou`, `<prefix>.iou.<class>` (NaN/None left out;
    `<class>` as `metric_names` writes it)."""
    out = {f"{prefix}.{k}": float(report[k]) for k in ("miou", "miou_old", "miou_new", "hiou") if report[k] == report[k]}
    keys = metric_names(report["per_class"])
    out.update({f"{prefix}.iou.{k}": float(v) for k, v in zip(keys, report["per_class"].values()) if v is not None})
    return out


_REFUSED = re.compile(r"[^\w .:-]")  # what MLflow refuses in a metric name, and "/" (a path separator in its store)


def metric_names(names: Iterable[str]) -> list[str]:
    """Class names (in id order) as MLflow takes them in metric names: a character it refuses (`(`, `#`,
    `/`, ...) becomes `_` (`person (walking)` -> `person _walking_`); a name left empty, or one an earlier
    name already became, gets its id after a `-`. Letters of any script, digits, spaces, `.`, `:`, `-` stay."""
    keys: list[str] = []
    for c, name in enumerate(names):
        key = _REFUSED.sub("_", str(name)).strip()
        keys.append(f"{key}-{c}" if not key or key in keys else key)
    return keys
