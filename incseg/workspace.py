"""The workspace: a directory with `params.yaml`, `data/`, the MLflow store and the git/DVC metadata.

Where everything sits on disk (the data registry, the holdout, quarantine, scratch space for runs),
the tracking URI, and the parameters with `data.image_size: auto` made the size it stands for from
the holdout images' headers.
"""

from __future__ import annotations

import os
from pathlib import Path

from incseg.config import PARAMS_FILE, Params, load_params
from incseg.data.layout import IMAGES_DIR, list_files, upright_size

AUTO_IMAGE_SIZE = (64, 96)  # `data.image_size: auto` stays within these: below 64 too little detail is left to
# learn from, and each step costs about (size / 64)^2 (96 px: twice 64's, benchmarks/results/quality-log.md)


def auto_image_size(shape: tuple[int, int] | None) -> int:
    """The training size `auto` stands for, given the data's (height, width): its shorter side rounded
    to a multiple of 16 (the U-Net halves it four times), within `AUTO_IMAGE_SIZE`; the lower bound
    when there are no images yet."""
    low, high = AUTO_IMAGE_SIZE
    return low if shape is None else max(low, min(high, 16 * round(min(shape) / 16)))


class Workspace:
    """A directory with `params.yaml`, `data/`, the MLflow store and the git/DVC metadata."""

    def __init__(self, root: Path | str = ".", params: Params | None = None):
        self.root = Path(root).resolve()
        self.declared = params if params is not None else load_params(self.root / PARAMS_FILE)  # `auto` kept
        self._params = self.declared

    @property
    def params(self) -> Params:
        """The parameters, with `data.image_size: auto` replaced by the size it stands for from the
        holdout's images (`auto_image_size`), once the holdout has images; until then the lower bound."""
        if self._params.data.image_size != "auto":
            return self._params
        shape = self.holdout_shape()
        resolved = self._params.model_copy(deep=True)
        resolved.data.image_size = auto_image_size(shape)
        if shape is not None:  # the holdout is fixed once it exists: resolved for good
            self._params = resolved
        return resolved

    def holdout_shape(self, sample: int = 64) -> tuple[int, int] | None:
        """The median (height, width) of up to `sample` of the holdout's images, spread over them (read
        from the file headers), or None while it has none: the scale the model is trained at is set
        against it, and `incseg predict` scales images of other sizes by the same factor."""
        from PIL import Image, UnidentifiedImageError

        files = list_files(self.holdout_dir / IMAGES_DIR)
        sizes = []
        for f in files[:: max(1, len(files) // sample)][:sample]:
            try:
                with Image.open(f) as im:
                    sizes.append(upright_size(im))
            except (OSError, UnidentifiedImageError):
                continue  # not an image: validation reports it by name
        if not sizes:
            return None
        widths, heights = sorted(w for w, _ in sizes), sorted(h for _, h in sizes)
        return heights[len(sizes) // 2], widths[len(sizes) // 2]

    def path(self, relative: str | Path) -> Path:
        p = Path(relative)
        return p if p.is_absolute() else self.root / p

    @property
    def data_dir(self) -> Path:
        return self.path(self._params.data.root)

    @property
    def classes_file(self) -> Path:
        return self.data_dir / "classes.yaml"

    @property
    def colours_file(self) -> Path:
        """The colour table of colour-coded masks (`data add --colours`), when the data has one."""
        return self.data_dir / "colours.yaml"

    @property
    def holdout_dir(self) -> Path:
        return self.data_dir / "holdout"

    @property
    def registry_dir(self) -> Path:
        return self.data_dir / "registry"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    @property
    def runs_dir(self) -> Path:
        """Scratch space for checkpoints and reports of runs in progress."""
        return self.root / "runs"

    @property
    def tracking_uri(self) -> str:
        """`MLFLOW_TRACKING_URI` wins; a relative SQLite path is taken from the workspace."""
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self._params.mlflow.tracking_uri
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not Path(uri[len(prefix):]).is_absolute():
            return prefix + str(self.root / uri[len(prefix):])
        return uri

    @property
    def artifact_location(self) -> str | None:
        """Where a new experiment keeps artifacts (local stores only; a server decides itself)."""
        if not self.tracking_uri.startswith("sqlite:"):
            return None
        return self.path(self._params.mlflow.artifact_root).as_uri()
