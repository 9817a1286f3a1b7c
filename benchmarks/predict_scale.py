"""What prediction gets wrong when it does not scale images as training scaled its data.

Takes a workspace's champion (e.g. the one `incseg demo DIR` leaves) and its holdout, enlarges every
holdout image and mask FACTOR times (bilinear / nearest), and scores the champion's masks on them
two ways, both through `incseg.inference.segment`:
  scaled: told that its data were that size (`native`), as a version trained on images FACTOR times
          its training size is now; the image is scaled back by the same ratio first;
  tiled:  not told (`native=None`), as every image larger than the training size was segmented
          before: training-size tiles at the image's own scale, objects FACTOR times the size learned.
Writes OUT (JSON): mIoU over the champion's classes for each factor and way.

    python benchmarks/predict_scale.py WORKSPACE OUT [--factors 1 2 3]
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from incseg.data.layout import find_pairs, read_image, read_mask
from incseg.inference import segment
from incseg.metrics import ConfusionMatrix
from incseg.registry import ModelRegistry
from incseg.workspace import Workspace


def main(workspace: Path, factors: list[int]) -> dict:
    ws = Workspace(workspace)
    reg = ModelRegistry(ws)
    loaded = reg.load(reg.require_champion(), ws.runs_dir / "predict-scale")
    n = max(loaded.classes) + 1
    result = {"workspace": str(workspace), "version": loaded.version, "image_size": loaded.image_size,
              "classes": loaded.classes, "miou": {}}
    for factor in factors:
        matrices = {"scaled": ConfusionMatrix(n), "tiled": ConfusionMatrix(n)}
        for pair in find_pairs(ws.holdout_dir):
            rgb, mask = read_image(pair.image), read_mask(pair.mask)
            h, w = mask.shape
            big = np.asarray(Image.fromarray(rgb).resize((w * factor, h * factor), Image.BILINEAR))
            truth = torch.from_numpy(np.asarray(Image.fromarray(mask).resize((w * factor, h * factor), Image.NEAREST))
                                     .astype(np.int64))
            for way, native in (("scaled", (h * factor, w * factor)), ("tiled", None)):
                pred = segment(loaded.model, big, loaded.image_size, native=native)
                matrices[way].update(truth, torch.from_numpy(pred.astype(np.int64)))  # ids >= n are skipped
        result["miou"][f"{factor}x"] = {way: round(float(cm.iou().nanmean()), 4) for way, cm in matrices.items()}
        print(factor, result["miou"][f"{factor}x"], flush=True)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 2, 3])
    a = ap.parse_args()
    a.out.write_text(json.dumps(main(a.workspace, a.factors), indent=1) + "\n")
