"""The continual benchmark's ceiling alone: `joint` on the whole stream, once.

`incseg bench` retrains `joint` from scratch after every batch (that is what its images-processed
and accuracy-matrix columns need) and then once more at twice the budget: hours per look on a
laptop. This script runs only the last of those retrainings (every batch of the same seeded stream,
full labels, the bootstrap's convergence-driven budget times BUDGET_SCALE) and writes its holdout IoU,
steps, images, seconds and validation curve as JSON. Run it from a project folder (it reads
`params.yaml` there, like `incseg bench`):

    python benchmarks/joint_final.py STYLE OUT.json [BUDGET_SCALE]
"""

import json
import sys
import tempfile
import time
from pathlib import Path

from incseg.bench import continual as b
from incseg.config import Workspace, load_params
from incseg.data.layout import list_batches, read_classes
from incseg.data.synthetic import synthesize
from incseg.pipeline import Batch


def main(style: str, out: Path, scale: float = 1.0) -> dict:
    params = b.full_params(load_params(Path("params.yaml")))  # the stream `incseg bench` makes
    params.synth.style = style
    with tempfile.TemporaryDirectory(prefix="incseg-joint-") as tmp:
        ws = Workspace(Path(tmp), params)
        synthesize(ws.data_dir, params.synth)
        synthesize(Path(tmp) / "full", params.synth.model_copy(update={"old_classes": "keep"}))
        classes = read_classes(ws.classes_file)
        full = [Batch.load(Path(tmp) / "full" / "registry" / x) for x in list_batches(ws.registry_dir)]
        known = sorted({c for x in full for c in x.classes})
        t0 = time.perf_counter()
        model, result = b.train_joint(ws, full, known, budget_scale=scale)
        iou = b._iou(ws, model)
        res = {"style": style, "budget_scale": scale, "steps": result.steps, "images": result.images_processed,
               "seconds": round(time.perf_counter() - t0, 1), "batch_images": [len(x.pairs) for x in full],
               "iou": {classes[c]: round(iou[c], 4) for c in known}, "miou_all": round(b._mean(iou, known), 4),
               "curve": [(e.step, round(e.val_miou, 4)) for e in result.evals]}
    out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 1.0)))
