"""Image/mask datasets with joint transforms (torchvision.transforms.v2 + tv_tensors)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from incseg.data.layout import Pair, read_image, read_mask

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def train_transforms(size: int, augment: bool = True) -> v2.Transform:
    """Random resized crop and flip applied to image and mask together (mask: nearest)."""
    geometry = (
        [v2.RandomResizedCrop((size, size), scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        if augment
        else [v2.Resize((size, size), antialias=True)]
    )
    return v2.Compose([*geometry, *_to_tensors()])


def eval_transforms(size: int) -> v2.Transform:
    return v2.Compose([v2.Resize((size, size), antialias=True), *_to_tensors()])


def _to_tensors() -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(MEAN, STD),
    ]


def to_sample(image: np.ndarray, mask: np.ndarray) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    return tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)), tv_tensors.Mask(torch.from_numpy(mask))


class SegmentationFolder(Dataset):
    """Pairs read lazily; each item is (image, mask, annotated).

    `annotated` is a bool vector over the model's classes: the label ids this sample's
    batch annotated. Background pixels may hide any class outside it (background shift).
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        transform: v2.Transform,
        num_classes: int,
        annotated: Iterable[int] | None = None,
    ):
        self.pairs = list(pairs)
        self.transform = transform
        flags = torch.ones(num_classes, dtype=torch.bool)
        if annotated is not None:
            flags[:] = False
            flags[[c for c in annotated if c < num_classes]] = True
            flags[0] = True
        self.annotated = flags

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        pair = self.pairs[i]
        image, mask = self.transform(*to_sample(read_image(pair.image), read_mask(pair.mask)))
        return image, mask, self.annotated
