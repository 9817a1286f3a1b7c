"""Image/mask datasets with joint transforms (torchvision.transforms.v2 + tv_tensors)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from cachetools import LRUCache, cached
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from incseg.data.layout import Pair, read_image, read_mask

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
# Decoded pairs kept per process: every epoch, validation and holdout evaluation reads the same files
# again; decoding them again cost ~7 % of a tiny model's training time (32 px). Least recently used
# pairs go first beyond this size; a file is read again when its size or mtime changes.
DECODED_CACHE_BYTES = 512 * 2**20


def _file_key(pair: Pair) -> tuple:
    image, mask = os.stat(pair.image), os.stat(pair.mask)
    return pair.image, image.st_mtime_ns, image.st_size, pair.mask, mask.st_mtime_ns, mask.st_size


@cached(LRUCache(DECODED_CACHE_BYTES, getsizeof=lambda arrays: sum(a.nbytes for a in arrays)), key=_file_key,
        lock=threading.Lock())
def read_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """The pair's image and mask, decoded (shared: never modify them in place)."""
    return read_image(pair.image), read_mask(pair.mask)


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
        image, mask = self.transform(*to_sample(*read_pair(self.pairs[i])))
        return image, mask, self.annotated
