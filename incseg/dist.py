"""Distributed helpers for code that runs inside a torchrun rank: torch only, no-ops in one process.

Rank and world size, all-reduce, a finite-loss vote, samplers that shard an epoch across ranks,
and the DDP wrapper. Every layer may import this; it imports nothing of incseg (as torchvision's
`references/segmentation/utils.py`).
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Sampler

# ---- inside a distributed run ---------------------------------------------------------
def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """`cuda` means this rank's own GPU (LOCAL_RANK) in a distributed run."""
    if device.type == "cuda" and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all ranks (in place for CPU tensors; NCCL needs a GPU copy)."""
    if not active():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.to(local_device(torch.device("cuda")))
        dist.all_reduce(on_gpu)
        tensor.copy_(on_gpu.cpu())
    else:
        dist.all_reduce(tensor)
    return tensor


def all_finite(loss: torch.Tensor) -> bool:
    """True on every rank only if the loss is finite on every rank (so all stop together)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0])
    return all_sum(bad).item() == 0


class StridedShard(Sampler[int]):
    """This rank's share of another sampler's epoch: every rank draws the same order (seeded by
    `seed + epoch`) and keeps every `world`-th index, padded so all ranks take equal steps."""

    def __init__(self, base: Sampler[int], seed: int):
        self.base, self.seed, self.epoch = base, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.base.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = list(self.base)
        world = world_size()
        order += order[: len(self) * world - len(order)]
        return iter(order[rank()::world])

    def __len__(self) -> int:
        return math.ceil(len(self.base) / world_size())


def shard(dataset: Dataset, sampler: Sampler | None, *, shuffle: bool, seed: int) -> Sampler | list[int]:
    """This rank's sampler: exact strided indices for evaluation (no padding, so all-reduced
    counts are exact), a `DistributedSampler` for training, or the replay mix cut into strides."""
    if sampler is not None:
        return StridedShard(sampler, seed)
    if not shuffle:
        return list(range(rank(), len(dataset), world_size()))
    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model as DDP sees it (SyncBatchNorm on GPUs), or unchanged outside a distributed run."""
    if not active():
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    return nn.parallel.DistributedDataParallel(model)
