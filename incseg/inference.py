"""Segmenting images with a trained model: at their own size, as palette PNGs and overlays.

An image is first scaled as training scaled its images (training size / the size of the data it
was trained on, both in the checkpoint), so objects keep the scale the model learned: an image of
the training data's own size is then resized to the training size and the logits resized back,
exactly as evaluation judged the holdout; a larger one is covered by overlapping training-size
tiles whose logits are averaged (sliding window). `predict_images` never stops on a bad file: it
reports it and goes on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from incseg.data.dataset import normalize
from incseg.data.layout import IGNORE, DataError, read_image
from incseg.models import label_map


def _starts(length: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, max(1, length - tile + 1), stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


@torch.no_grad()
def logits_at_own_size(model: nn.Module, rgb: np.ndarray, size: int, device: torch.device,
                       native: tuple[int, int] | None = None, overlap: float = 0.25) -> torch.Tensor:
    """Class logits (C x H x W) for the whole image at its own resolution. `native` is the (height,
    width) of the images the model was trained on (None: the training size); the image is scaled by
    size / native first, as training scaled those."""
    model.eval()
    x = normalize(rgb)[None].to(device)
    h, w = x.shape[-2:]
    nh, nw = native or (size, size)
    sh, sw = max(1, round(h * size / nh)), max(1, round(w * size / nw))
    if sh <= size and sw <= size:
        out = model(nn.functional.interpolate(x, (size, size), mode="bilinear", antialias=True, align_corners=False))
        return nn.functional.interpolate(out, (h, w), mode="bilinear", align_corners=False)[0].cpu()
    if (sh, sw) != (h, w):
        x = nn.functional.interpolate(x, (sh, sw), mode="bilinear", antialias=True, align_corners=False)
    ph, pw = max(0, size - sh), max(0, size - sw)  # a thin, long image: pad the short side up to a tile
    x = nn.functional.pad(x, (0, pw, 0, ph), mode="reflect" if ph < sh and pw < sw else "replicate")
    stride = max(1, int(size * (1 - overlap)))
    total, count = None, torch.zeros(1, 1, *x.shape[-2:], device=device)
    for top in _starts(x.shape[-2], size, stride):
        for left in _starts(x.shape[-1], size, stride):
            out = model(x[..., top:top + size, left:left + size])
            if total is None:
                total = torch.zeros(1, out.shape[1], *x.shape[-2:], device=device)
            total[..., top:top + size, left:left + size] += out
            count[..., top:top + size, left:left + size] += 1
    out = (total / count)[..., :sh, :sw]
    if (sh, sw) != (h, w):
        out = nn.functional.interpolate(out, (h, w), mode="bilinear", align_corners=False)
    return out[0].cpu()


def segment(model: nn.Module, rgb: np.ndarray, size: int, device: torch.device | None = None,
            native: tuple[int, int] | None = None) -> np.ndarray:
    """The label-id mask (H x W, uint8) of one RGB image (`native`: as in `logits_at_own_size`)."""
    logits = logits_at_own_size(model, rgb, size, device or torch.device("cpu"), native)
    return label_map(logits, dim=0).numpy().astype(np.uint8)


def palette(colours: dict[int, int] | None = None) -> list[int]:
    """Pascal VOC's colour map (256 entries); 255 (ignore) is white. `colours`, a colour table
    (`importers.read_colours`: packed RGB -> label id), gives its ids their own colours."""
    table = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        table += [r, g, b]
    table[3 * IGNORE: 3 * IGNORE + 3] = [255, 255, 255]
    for packed, i in (colours or {}).items():
        table[3 * i: 3 * i + 3] = [packed >> 16, packed >> 8 & 255, packed & 255]
    return table


def mask_image(mask: np.ndarray, colours: list[int] | None = None) -> Image.Image:
    """A palette PNG of label ids: the pixel values are the ids, viewers show colours (`palette()`'s
    unless given)."""
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(colours or palette())
    return im


def overlay(rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.5, colours: list[int] | None = None) -> Image.Image:
    """The image with the mask's colours blended over its labelled (non-background) pixels."""
    colours = np.array(colours or palette(), dtype=np.float32).reshape(256, 3)[mask]
    blend = rgb.astype(np.float32) * (1 - alpha) + colours * alpha
    out = np.where((mask > 0)[..., None], blend, rgb.astype(np.float32))
    return Image.fromarray(out.round().astype(np.uint8))


@dataclass
class PredictReport:
    written: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # file name -> why

    def to_dict(self) -> dict:
        return {**asdict(self), "n_written": len(self.written), "n_skipped": len(self.skipped)}


def predict_images(model: nn.Module, files: list[Path], out: Path, size: int, *, native: tuple[int, int] | None = None,
                   with_overlay: bool = False, device: torch.device | None = None,
                   progress: Iterator | None = None, colours: list[int] | None = None) -> PredictReport:
    """Write `out/<stem>.png` (palette mask) and, with `with_overlay`, `out/<stem>_overlay.png` for
    each image file of `files` (`size`, `native`: as in `logits_at_own_size`; `colours`: a `palette`);
    unreadable images are listed in the report and in `out/report.json`, as is an image whose stem an
    earlier one took (`a.jpg` after `a.png`: its mask would overwrite that one's)."""
    out.mkdir(parents=True, exist_ok=True)
    report = PredictReport()
    taken: dict[str, str] = {}
    for path in progress(files) if progress else files:
        if path.stem in taken:
            report.skipped[path.name] = (f"{path}: {taken[path.stem]} has the same stem and its mask is "
                                         f"{out / path.stem}.png: rename one to segment both")
            continue
        taken[path.stem] = path.name
        try:
            rgb = read_image(path)
        except DataError as err:
            report.skipped[path.name] = str(err)
            continue
        mask = segment(model, rgb, size, device, native)
        mask_image(mask, colours).save(out / f"{path.stem}.png")
        if with_overlay:
            overlay(rgb, mask, colours=colours).save(out / f"{path.stem}_overlay.png")
        report.written.append(path.name)
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report
