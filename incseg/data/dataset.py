"""Image/mask datasets and their joint transforms (plain torch: one resize op for training,
evaluation and serving, `incseg.inference` uses the same `normalize` and bilinear resize)."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from cachetools import LRUCache, cached
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import Dataset

from incseg.data.layout import Pair, read_image, read_mask

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
# Decoded pairs kept per process: every epoch, validation and holdout evaluation reads the same files
# again; decoding them again cost ~7 % of a tiny model's training time (32 px). Least recently used
# pairs go first beyond this size; a file is read again when its size or mtime changes.
DECODED_CACHE_BYTES = 512 * 2**20
MIN_KEPT_SIDE = 256  # `kept_side` is never below this


def kept_side(image_size: int) -> int:
    """The shorter side, in pixels, that work at the training size `image_size` needs at most: twice
    it (a random crop of half the area still has more pixels than training uses), and at least
    `MIN_KEPT_SIDE`. Larger images are read (`read_pair`) and kept as exemplars scaled down to it."""
    return max(MIN_KEPT_SIDE, 2 * image_size)


def scaled_down(image: np.ndarray, mask: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The pair scaled to `side` on its shorter side when it is larger (aspect kept; the image bilinear,
    which PIL antialiases when shrinking, the mask's ids by nearest neighbour); as it is otherwise."""
    h, w = mask.shape
    if min(h, w) <= side:
        return image, mask
    size = (round(w * side / min(h, w)), round(h * side / min(h, w)))
    return (np.array(Image.fromarray(image).resize(size, Image.BILINEAR)),
            np.array(Image.fromarray(mask).resize(size, Image.NEAREST)))


def _file_key(pair: Pair, side: int | None = None) -> tuple:
    image, mask = os.stat(pair.image), os.stat(pair.mask)
    return pair.image, image.st_mtime_ns, image.st_size, pair.mask, mask.st_mtime_ns, mask.st_size, side


@cached(LRUCache(DECODED_CACHE_BYTES, getsizeof=lambda arrays: sum(a.nbytes for a in arrays)), key=_file_key,
        lock=threading.Lock())
def read_pair(pair: Pair, side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The pair's image and mask, decoded (shared: never modify them in place); with `side`, scaled down
    to it (`scaled_down`). A camera's 2048 x 1024 PNG took 60 ms to decode, and cropping and resizing it
    10 ms on every step, against ~25 ms of a width-16 U-Net's step per 96 px image; the cache held 60 of
    them, 1200 at the side a 96 px training needs."""
    image, mask = read_image(pair.image), read_mask(pair.mask)
    return (image, mask) if side is None else scaled_down(image, mask, side)


_MEAN, _STD = torch.tensor(MEAN)[:, None, None] * 255, torch.tensor(STD)[:, None, None] * 255


def normalize(rgb: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W float, normalised as the models see it: (x / 255 - MEAN) / STD."""
    return _scale(torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1))


def _scale(x: torch.Tensor) -> torch.Tensor:  # 0-255 float -> normalised (a linear map: commutes with resizing)
    return x.sub_(_MEAN).div_(_STD)


def resize_pair(x: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (3 x h x w float) bilinear with antialiasing, mask (h x w ids) nearest, to size x size."""
    x = F.interpolate(x[None], (size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), (size, size), mode="nearest")[0, 0]
    return x, mask.long()


def crop_box(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """A random (top, left, height, width) covering `scale` of the area at an aspect ratio in `ratio`
    (log-uniform), drawn from torch's RNG as torchvision's RandomResizedCrop draws it; the whole
    image when ten draws do not fit."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = h * w * torch.empty(1).uniform_(*scale).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return torch.randint(0, h - ch + 1, (1,)).item(), torch.randint(0, w - cw + 1, (1,)).item(), ch, cw
    return 0, 0, h, w


class PairTransform:
    """(H x W x 3 uint8 image, H x W uint8 mask) -> (3 x size x size normalised float, size x size int64
    label ids). With `augment`: a random horizontal flip and, for a `crop_probability` share of the
    samples, a random resized crop (scale 0.5-1, aspect 3/4-4/3) first, applied to image and mask
    together; the other samples and, without `augment`, every sample: a plain resize of the whole
    image, as evaluation sees it. `color_jitter` s > 0 (with `augment`) also varies the image's
    brightness, contrast and saturation by a random factor in [1 - s, 1 + s] and its hue by up to s / 4
    (torchvision's `ColorJitter`), the mask untouched."""

    def __init__(self, size: int, augment: bool, crop_probability: float = 1.0,
                 scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 color_jitter: float = 0.0):
        self.size, self.augment, self.crop_probability = size, augment, crop_probability
        self.scale, self.ratio = scale, ratio
        self.jitter = None
        if augment and color_jitter > 0:
            from torchvision.transforms import v2

            self.jitter = v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                                         hue=min(0.5, color_jitter / 4))

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(mask))
        # at probability 1 no coin is tossed: the random stream, and so the weights, of runs from
        # before the knob are reproduced
        if self.augment and (self.crop_probability >= 1 or torch.rand(1).item() < self.crop_probability):
            top, left, h, w = crop_box(*y.shape, self.scale, self.ratio)
            x, y = x[top:top + h, left:left + w], y[top:top + h, left:left + w]
        x, y = resize_pair(x.permute(2, 0, 1).float(), y, self.size)  # crop first: only its pixels are converted
        if self.augment and torch.rand(1).item() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        if self.jitter is not None:  # on 0-1 values; none drawn when off, so earlier runs are reproduced
            x = self.jitter(x.div_(255).clamp_(0, 1)).mul_(255)
        return _scale(x.contiguous()), y.contiguous()


def train_transforms(size: int, augment: bool, crop_probability: float, color_jitter: float = 0.0) -> PairTransform:
    """Random flip, and a random resized crop for `crop_probability` of the samples, applied to image
    and mask together (mask: nearest); colour jitter of strength `color_jitter` on the image. No
    default for the crop: the product passes `train.crop_probability` (`pipeline.training_transform`)."""
    return PairTransform(size, augment, crop_probability, color_jitter=color_jitter)


def eval_transforms(size: int) -> PairTransform:
    return PairTransform(size, augment=False)


class SegmentationFolder(Dataset):
    """Pairs read lazily; each item is (image, mask, annotated).

    `annotated` is a bool vector over the model's classes: the label ids this sample's
    batch annotated. Background pixels may hide any class outside it (background shift).
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        transform: PairTransform,
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
        image, mask = self.transform(*read_pair(self.pairs[i], kept_side(self.transform.size)))
        return image, mask, self.annotated
