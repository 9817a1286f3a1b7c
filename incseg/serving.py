"""The model as an MLflow pyfunc: images in, label-id masks out.

`mlflow models serve -m "models:/<name>@champion" --env-manager local` serves it. Accepted
inputs (the scoring server's JSON formats):

- base64-encoded image files (PNG/JPEG) in a column `image`:
  `{"dataframe_records": [{"image": "<base64>"}]}`
- one RGB image as a uint8 array: `{"inputs": [[[r, g, b], ...], ...]}` (H x W x 3), or a batch
  of equal-size images (N x H x W x 3).

Each image is segmented at its own size (`incseg.inference.segment`); the answer is one H x W
mask of label ids per image: `{"predictions": [[[0, 0, 1, ...], ...]]}`.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import mlflow.pyfunc
import numpy as np

CHECKPOINT_ARTIFACT = "checkpoint"


def decode_images(model_input) -> list[np.ndarray]:
    """The request's images as HxWx3 uint8 arrays."""
    import pandas as pd

    from incseg.data.layout import open_image, rgb_array

    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ValueError(f"expected a column 'image' of base64 images, got columns {list(model_input.columns)}")
        out = []
        for i, value in enumerate(model_input["image"]):
            try:
                raw = base64.b64decode(value, validate=True)
            except (ValueError, TypeError) as err:
                raise ValueError(f"image {i}: not base64 ({err})") from err
            with open_image(io.BytesIO(raw), f"image {i}") as im:
                out.append(rgb_array(im, f"image {i}"))
        return out
    if isinstance(model_input, dict) and "image" in model_input:
        return decode_images(pd.DataFrame({"image": np.atleast_1d(model_input["image"])}))
    arr = np.asarray(model_input)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected H x W x 3 or N x H x W x 3 RGB values, got shape {arr.shape}")
    return [np.clip(a, 0, 255).astype(np.uint8) for a in arr]


def encode_png(path: Path) -> str:
    """A file's base64 text, as the `image` column expects it."""
    return base64.b64encode(Path(path).read_bytes()).decode()


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """Loads the plain checkpoint (pickle-free) and returns one label mask per image."""

    def load_context(self, context) -> None:
        from incseg.models import load_checkpoint, trained_scale

        self.model, self.classes, ckpt = load_checkpoint(Path(context.artifacts[CHECKPOINT_ARTIFACT]))
        self.size, self.native = trained_scale(ckpt)
        self.model.eval()

    # The inputs above (a DataFrame of base64 files, or arrays) fit no one MLflow type hint, and
    # `decode_images` validates them with messages of its own: MLflow's hint-based validation (and
    # its warning about a missing hint, printed by every process that imports this class) is off.
    _skip_type_hint_validation = True

    def predict(self, context, model_input, params=None):
        from incseg.inference import segment

        return [segment(self.model, rgb, self.size, native=self.native).tolist() for rgb in decode_images(model_input)]
