"""The continual benchmark's ceiling alone: `joint` on the whole stream, once.

`incseg bench` retrains `joint` from scratch after every batch (that is what its images-processed
and accuracy-matrix columns need) and then once more at twice the budget: hours per look on a
laptop. This script runs only the last of those retrainings (every batch of the same seeded stream,
full labels, the bootstrap's convergence-driven rule with its step limits, and above 1 its patience,
times BUDGET_SCALE), printing a line per evaluation, and writes its holdout IoU,
steps, images, seconds and validation curve as JSON. Run it from a project folder (it reads
`params.yaml` there, like `incseg bench`):

    python benchmarks/joint_final.py STYLE OUT.json [BUDGET_SCALE]
"""

import json
import sys
import tempfile
from pathlib import Path

from incseg.bench import continual as b
from incseg.config import load_params
from incseg.data.layout import read_classes
from incseg.processes import exit_on_sigterm


def main(style: str, out: Path, scale: float = 1.0) -> dict:
    params = b.full_params(load_params(Path("params.yaml")))  # the stream `incseg bench` makes
    params.synth.style = style
    with tempfile.TemporaryDirectory(prefix="incseg-joint-") as tmp:
        ws, _, _, full = b.stream(params, Path(tmp))
        names = read_classes(ws.classes_file)
        res = b.joint_once(ws, full, sorted({c for x in full for c in x.classes}), scale, progress=True)
    res = {"style": style, "budget_scale": scale, "batch_images": [len(x.pairs) for x in full], **res,
           "iou": {names[c]: v for c, v in res["iou"].items()}}
    out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    exit_on_sigterm()  # a `kill` removes the stream's temporary folder
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 1.0)))
