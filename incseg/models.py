"""Segmentation models, the plain checkpoint format, and head expansion for new classes.

Every model carries `taught`: the class ids some batch has labelled for it (background included).
Its head has a row for every id up to the largest, so a batch that brings class 5 before class 4
leaves row 4 untaught: that row is silenced (its logit a constant `UNTAUGHT_LOGIT`, so it is never
predicted and, its probability being exactly 0, never trained), evaluation leaves class 4's pixels
out, and the batch that brings it later gets it as a new class (`add_classes`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

ARCHS = ("unet", "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")
UNTAUGHT_LOGIT = -1e4  # an untaught row's constant logit: exp() of it is 0 in float32, and fits float16


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """A small U-Net: `depth` down-sampling stages (channels doubling at each), skip connections,
    a 1x1 classifier `head`."""

    def __init__(self, num_classes: int, width: int = 16, depth: int = 3):
        super().__init__()
        chans = [width * 2**i for i in range(depth)]
        self.enc = nn.ModuleList([_block(cin, c) for cin, c in zip([3, *chans], chans)])
        self.bottleneck = _block(chans[-1], 2 * chans[-1])
        self.up = nn.ModuleList([nn.ConvTranspose2d(c * 2, c, 2, stride=2) for c in reversed(chans)])
        self.dec = nn.ModuleList([_block(c * 2, c) for c in reversed(chans)])
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        step = 2 ** len(self.enc)
        pad = ((-h) % step, (-w) % step)
        x = nn.functional.pad(x, (0, pad[1], 0, pad[0]))
        skips = []
        for enc in self.enc:
            x = enc(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)[..., :h, :w]


class TorchvisionSegmenter(nn.Module):
    """torchvision's segmentation models (random init, no downloads) returning plain logits."""

    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        from torchvision.models import segmentation

        builder = getattr(segmentation, arch)
        self.net = builder(weights=None, weights_backbone=None, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


def build_model(arch: str, num_classes: int, width: int = 16, depth: int = 3) -> nn.Module:
    if arch == "unet":
        model: nn.Module = UNet(num_classes, width, depth)
    elif arch in ARCHS:
        model = TorchvisionSegmenter(arch, num_classes)
    else:
        raise ValueError(f"unknown model.arch {arch!r}; choose one of {', '.join(ARCHS)}")
    model.arch, model.width, model.depth = arch, width, depth
    model.taught = tuple(range(num_classes))
    return model


def label_map(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The class id of the largest logit along `dim` (ties: the lowest id, as `argmax`). torch's
    `max(dim).indices`: `argmax` is 5-7x slower on CPU in torch 2.14 (340 against 51 ms for 5 classes at
    1024 x 2048 px; 23 against 3 ms for a 32-image 64 px batch of 6)."""
    return logits.max(dim=dim).indices


def taught_classes(model: nn.Module) -> list[int]:
    """The class ids some batch has labelled for the model, background included."""
    return sorted(getattr(model, "taught", range(num_classes(model))))


def _head_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every conv that emits class logits."""
    if isinstance(model, UNet):
        return [(model, "head")]
    clf = model.net.classifier
    if hasattr(clf, "low_classifier"):  # LR-ASPP sums two classifier convs
        return [(clf, "low_classifier"), (clf, "high_classifier")]
    return [(clf, str(len(clf) - 1))]


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classifier convs' parameters (what a new class adds to)."""
    return [p for parent, name in _head_slots(model) for p in getattr(parent, name).parameters()]


def param_groups(model: nn.Module, lr: float, head_lr_scale: float) -> list[dict]:
    """AdamW groups: the classifier at `lr * head_lr_scale`, the rest at `lr`."""
    head = {id(p) for p in head_parameters(model)}
    return [{"params": [p for p in model.parameters() if id(p) not in head], "lr": lr},
            {"params": [p for p in model.parameters() if id(p) in head], "lr": lr * head_lr_scale}]


def num_classes(model: nn.Module) -> int:
    parent, name = _head_slots(model)[0]
    return getattr(parent, name).out_channels


def _start_rows(conv: nn.Conv2d, rows: list[int], init: str, n_fresh: int) -> None:
    """Give `rows` of a classifier conv a new class's start: background's weights with its bias lowered
    by log(n_fresh + 1) (MiB), or PyTorch's default draw (`random`)."""
    if init == "background":
        conv.weight[rows] = conv.weight[:1].clone()
        if conv.bias is not None:
            conv.bias[rows] = conv.bias[0] - math.log(n_fresh + 1)
    else:
        ref = nn.Conv2d(conv.in_channels, len(rows), conv.kernel_size, bias=conv.bias is not None)
        conv.weight[rows] = ref.weight.to(conv.weight)
        if conv.bias is not None:
            conv.bias[rows] = ref.bias.to(conv.bias)


@torch.no_grad()
def expand_classes(model: nn.Module, n_new: int, init: str = "background") -> nn.Module:
    """Grow every classifier conv by `n_new` outputs; old-class logits stay identical.

    `init="background"` (MiB's initialisation): new-class weights copy the background's, since
    new classes are carved out of background, where the old model put them; their bias is
    lowered by log(n_new + 1) so that background still wins at first and predictions do not
    jump. `init="random"`: PyTorch's default initialisation of the new rows.
    """
    if n_new <= 0:
        return model
    if init not in ("background", "random"):
        raise ValueError(f"unknown head init {init!r}: background | random")
    for parent, name in _head_slots(model):
        old: nn.Conv2d = getattr(parent, name)
        new = nn.Conv2d(old.in_channels, old.out_channels + n_new, old.kernel_size, old.stride,
                        old.padding, bias=old.bias is not None).to(old.weight.device)
        new.weight[: old.out_channels] = old.weight
        if old.bias is not None:
            new.bias[: old.out_channels] = old.bias
        if init == "background":  # random: the new conv's own draw
            _start_rows(new, list(range(old.out_channels, new.out_channels)), init, n_new)
        setattr(parent, name, new)
    return model


@torch.no_grad()
def set_taught(model: nn.Module, ids: list[int]) -> nn.Module:
    """Record that the model was taught classes `ids` (background always); every other row of its
    head is silenced: zero weights, `UNTAUGHT_LOGIT` as its bias."""
    taught = sorted(set(ids) | {0})
    silent = [c for c in range(num_classes(model)) if c not in taught]
    for parent, name in _head_slots(model):
        conv: nn.Conv2d = getattr(parent, name)
        conv.weight[silent] = 0.0
        if conv.bias is not None:
            conv.bias[silent] = UNTAUGHT_LOGIT
    model.taught = tuple(taught)
    return model


@torch.no_grad()
def add_classes(model: nn.Module, ids: list[int], init: str = "background") -> nn.Module:
    """Make the model ready to learn classes `ids`: grow the head to the largest id, give every
    class among `ids` it was never taught a fresh row (`expand_classes`' initialisation, over the
    classes fresh in this batch), count them as taught, and silence the rows of ids skipped
    (`set_taught`)."""
    fresh, before = sorted(set(ids) - set(taught_classes(model))), num_classes(model)
    expand_classes(model, max([*ids, before - 1]) + 1 - before, init)
    if init != "background":  # grown rows are already drawn
        fresh = [c for c in fresh if c < before]
    if fresh:
        for parent, name in _head_slots(model):
            _start_rows(getattr(parent, name), fresh, init, len(fresh))
    return set_taught(model, [*taught_classes(model), *ids])


def feature_modules(model: nn.Module) -> list[nn.Module]:
    """Where feature distillation taps a model: the U-Net's encoder stages and bottleneck, a
    torchvision segmenter's backbone (its feature maps)."""
    if isinstance(model, UNet):
        return [*model.enc, model.bottleneck]
    return [model.net.backbone]


def stem_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The earliest encoder stage (generic edge and colour filters): the U-Net's first block,
    a torchvision backbone's first feature block."""
    if isinstance(model, UNet):
        return list(model.enc[0].parameters())
    return list(model.net.backbone["0"].parameters())


@torch.no_grad()
def fuse_weights(new: nn.Module, old: nn.Module, old_weight: float) -> nn.Module:
    """Endpoints weight fusion (EWF, Xiao et al. 2023): every parameter and BatchNorm statistic
    the old model has becomes `old_weight * old + (1 - old_weight) * new`; the classifier rows
    of classes the old model was not taught keep their new values."""
    if old_weight <= 0:
        return new
    fresh = sorted(set(taught_classes(new)) - set(taught_classes(old)))
    kept = [(conv, conv.weight[fresh].clone(), None if conv.bias is None else conv.bias[fresh].clone())
            for conv in (getattr(parent, name) for parent, name in _head_slots(new))]
    old_state = old.state_dict()
    for key, value in new.state_dict().items():
        before = old_state.get(key)
        if before is None or not value.is_floating_point():
            continue
        target = value[: before.shape[0]] if value.dim() else value  # a grown head: only the old rows
        target.lerp_(before.to(value), old_weight)
    for conv, weight, bias in kept:
        conv.weight[fresh] = weight
        if bias is not None:
            conv.bias[fresh] = bias
    return new


def checkpoint(model: nn.Module, classes: dict[int, str], **extra: Any) -> dict[str, Any]:
    """The plain, pickle-free checkpoint: architecture, class list and state_dict."""
    return {
        "arch": model.arch,
        "width": model.width,
        "depth": model.depth,
        "num_outputs": num_classes(model),
        "taught": taught_classes(model),
        "classes": {int(k): v for k, v in classes.items()},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def save_checkpoint(path: Path, model: nn.Module, classes: dict[int, str], **extra: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint(model, classes, **extra), tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
    return path


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[int, str], dict[str, Any]]:
    """(model, classes, the whole checkpoint dict), loaded with `weights_only=True`."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    classes = {int(k): v for k, v in ckpt["classes"].items()}
    model = build_model(ckpt["arch"], ckpt["num_outputs"], ckpt["width"], ckpt.get("depth", 3))
    model.load_state_dict(ckpt["state_dict"])
    model.taught = tuple(ckpt.get("taught", range(ckpt["num_outputs"])))  # older checkpoints: every row
    return model, classes, ckpt


def trained_scale(ckpt: dict[str, Any]) -> tuple[int, tuple[int, int] | None]:
    """(training size, (height, width) of the images it was set against or None) of a registered
    model's checkpoint; 64 and None for checkpoints from before they were recorded."""
    native = ckpt.get("native_size")
    return int(ckpt.get("image_size", 64)), (int(native[0]), int(native[1])) if native else None
