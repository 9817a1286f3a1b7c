"""Pictures for reviewers in the MLflow UI: confusion matrix and holdout overlays."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from incseg.data.dataset import eval_transforms  # noqa: E402
from incseg.data.layout import IGNORE, Pair, find_pairs, read_classes, read_image, read_mask  # noqa: E402
from incseg.metrics import ConfusionMatrix  # noqa: E402
from incseg.models import label_map  # noqa: E402
from incseg.pipeline import Judgement  # noqa: E402
from incseg.workspace import Workspace  # noqa: E402

PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
     [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128]],
    dtype=np.uint8,
)


def colorize(mask: np.ndarray) -> np.ndarray:
    out = PALETTE[mask % len(PALETTE)]
    out[mask == IGNORE] = 255
    return out


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    blend = image * (1 - alpha) + colorize(mask) * alpha
    return np.where((mask == 0)[..., None], image, blend).astype(np.uint8)


def confusion_figure(cm: ConfusionMatrix, names: dict[int, str]) -> plt.Figure:
    """Row-normalised confusion matrix (ground truth rows, prediction columns)."""
    mat = cm.mat.double()
    norm = (mat / mat.sum(1, keepdim=True).clamp(min=1)).numpy()
    labels = [names.get(i, str(i)) for i in range(cm.n)]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * cm.n, 1 + 0.6 * cm.n))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(norm):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.5 else "black")
    ax.set_xticks(range(cm.n), labels, rotation=45, ha="right")
    ax.set_yticks(range(cm.n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    fig.tight_layout()
    return fig


@torch.no_grad()
def preview_figure(models: dict[str, nn.Module], pairs: list[Pair], sizes: dict[str, int]) -> plt.Figure:
    """Rows of holdout images: the image, ground truth, then each model's prediction, overlaid; each
    model sees the image at its own size (`sizes`: the one it is judged and served at)."""
    cols = 2 + len(models)
    fig, axes = plt.subplots(len(pairs), cols, figsize=(2 * cols, 2 * len(pairs)), squeeze=False)
    transforms = {name: eval_transforms(sizes[name]) for name in models}
    for row, pair in zip(axes, pairs):
        image, mask = read_image(pair.image), read_mask(pair.mask)
        panels = [image, overlay(image, mask)]
        for name, model in models.items():
            x, _ = transforms[name](image, mask)
            logits = model.eval()(x[None].float())
            logits = nn.functional.interpolate(logits, size=mask.shape, mode="bilinear")
            panels.append(overlay(image, label_map(logits)[0].numpy().astype(np.uint8)))
        for ax, panel, title in zip(row, panels, ["image", "ground truth", *models]):
            ax.imshow(panel)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return fig


def review_figures(ws: Workspace, j: Judgement, models: dict[str, nn.Module],
                   sizes: dict[str, int] | None = None) -> dict[str, plt.Figure]:
    """What a reviewer looks at in the run: the candidate's confusion matrix and holdout overlays, each
    model at its size in `sizes` (by default `data.image_size`; the champion's own, as the gate judged it)."""
    figures = {"plots/confusion_candidate.png": confusion_figure(j.matrices["candidate"], read_classes(ws.classes_file))}
    pairs = find_pairs(ws.holdout_dir)
    step = max(1, len(pairs) // max(1, ws.params.eval.preview_images))
    preview = pairs[::step][: ws.params.eval.preview_images]
    if preview:
        at = {name: (sizes or {}).get(name) or ws.params.data.image_size for name in models}
        figures["plots/holdout_preview.png"] = preview_figure(models, preview, at)
    return figures
