"""ONNX export of a model version, checked against PyTorch with ONNX Runtime on the holdout.

The graph takes `image` (N x 3 x H x W, normalised as in training; batch and spatial size
dynamic) and returns `logits` (N x C x H x W). The class list travels in the ONNX metadata
(`classes`, JSON) and beside the file as `classes.json`; so do `image_size` (the square side the
model was trained and judged at), `native_size` (JSON [height, width] of the holdout images it was
set against, when known) and `taught` (JSON: the class ids some batch taught it; other rows were
never trained). `incseg predict` scales an image's height by image_size / native height and its
width by image_size / native width, as training did; what then fits in image_size is resized whole
to image_size x image_size, anything larger is tiled (`inference.logits_at_own_size`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from incseg.models import taught_classes

MIN_AGREEMENT = 0.999


@dataclass
class OnnxCheck:
    pixels: int
    agreement: float  # share of pixels with the same argmax
    max_abs_diff: float  # largest logit difference

    @property
    def ok(self) -> bool:
        return self.agreement >= MIN_AGREEMENT


def export_onnx(model: nn.Module, path: Path, size: int, classes: dict[int, str],
                native_size: tuple[int, int] | None = None) -> Path:
    """Write the model as ONNX with dynamic batch, height and width."""
    import onnx
    from torch.export import Dim

    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    example = torch.zeros(1, 3, size, size)
    dynamic = ({0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC},)
    torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_shapes=dynamic, dynamo=True, optimize=True, verbose=False)
    graph = onnx.load(str(path))
    props = {"classes": json.dumps({str(k): v for k, v in classes.items()}), "image_size": str(size),
             "taught": json.dumps(taught_classes(model)), "producer": "incseg"}
    if native_size is not None:
        props["native_size"] = json.dumps(list(native_size))
    onnx.helper.set_model_props(graph, props)
    onnx.save(graph, str(path))  # one self-contained file: the weights inline
    path.with_name(path.name + ".data").unlink(missing_ok=True)  # the exporter's external-data copy
    path.with_name("classes.json").write_text(json.dumps({str(k): v for k, v in classes.items()}, indent=2))
    return path


def session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_onnx(path: Path, model: nn.Module, batches) -> OnnxCheck:
    """Run both on every batch of images (N x 3 x H x W tensors); compare argmax and logits."""
    sess = session(path)
    model = model.cpu().eval()
    same = total = 0
    worst = 0.0
    for images in batches:
        ours = model(images).numpy()
        theirs = sess.run(["logits"], {"image": images.numpy()})[0]
        same += int((ours.argmax(1) == theirs.argmax(1)).sum())
        total += ours.shape[0] * ours.shape[2] * ours.shape[3]
        worst = max(worst, float(np.abs(ours - theirs).max()))
    return OnnxCheck(total, same / max(total, 1), worst)


def check_record(check: OnnxCheck) -> dict:
    return {**asdict(check), "ok": check.ok, "min_agreement": MIN_AGREEMENT}
