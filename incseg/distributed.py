"""Data-parallel training with PyTorch DDP, launched by `torchrun`.

With `train.distributed.nproc > 1` the training step runs as
`torchrun --standalone --nproc-per-node N -m incseg.distributed JOB.json`. Every rank trains on
its shard of each epoch (a `DistributedSampler`, or the replay mix cut into strides), DDP
all-reduces the gradients, confusion matrices are all-reduced before metrics are computed, and
only rank 0 writes: epoch checkpoints, MLflow metrics and the trained model. The parent process
(the Prefect task) reads that model back and registers it, so one update = one model version.

The helpers below are no-ops in a plain single process, so the same loops serve both.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Sampler

from incseg import processes

DIVERGED_EXIT = 3


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


# ---- launching -------------------------------------------------------------------------
@dataclass
class TrainingJob:
    """What a torchrun worker needs: the step, the data, the starting model, where to write."""

    kind: str  # bootstrap | update
    workspace: str
    params: dict
    batch_id: str
    batch_root: str
    pairs: list[tuple[str, str, str]]
    classes: list[int]
    run_id: str
    checkpoint_path: str
    out_dir: str
    champion_checkpoint: str | None = None
    memory_root: str | None = None


def backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def torchrun_command(job_file: Path, nproc: int, extra: list[str]) -> list[str]:
    standalone = [] if any(a.startswith("--rdzv") or a.startswith("--nnodes") for a in extra) else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *standalone, f"--nproc-per-node={nproc}", *extra,
            "-m", "incseg.distributed", str(job_file)]


def launch(job: TrainingJob, nproc: int, extra_args: list[str] | None = None):
    """Run the job under torchrun and return rank 0's (model, TrainResult).

    A diverged loss comes back as `DivergenceError`; any other worker failure as a
    RuntimeError carrying the end of torchrun's output.
    """
    from incseg.models import load_checkpoint
    from incseg.training import DivergenceError, EvalPoint, TrainResult

    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.pt", "result.json", "error.json"):
        (out / stale).unlink(missing_ok=True)
    job_file = out / "job.json"
    job_file.write_text(json.dumps(asdict(job), indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    tail: deque[str] = deque(maxlen=20)
    proc = processes.start(torchrun_command(job_file, nproc, extra_args or []), env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for line in proc.stdout:  # rank 0's progress, as it happens
            tail.append(line.rstrip())
            print(f"[torchrun] {line.rstrip()}", flush=True)
        proc.wait()
    finally:  # also when this process is interrupted: no rank outlives the launcher
        processes.stop(proc, grace=15)
        proc.stdout.close()
    if (out / "error.json").exists():
        err = json.loads((out / "error.json").read_text())
        if err["type"] == "DivergenceError":
            raise DivergenceError(err["message"])
        raise RuntimeError(f"distributed training failed: {err['type']}: {err['message']}")
    if proc.returncode != 0 or not (out / "model.pt").exists():
        joined = "\n".join(tail)
        raise RuntimeError(f"torchrun exited with code {proc.returncode}:\n{joined}")
    model, _, _ = load_checkpoint(out / "model.pt")
    raw = json.loads((out / "result.json").read_text())
    for done in ("model.pt", "champion.pt"):  # job.json and result.json stay for the record
        (out / done).unlink(missing_ok=True)
    return model, TrainResult([EvalPoint(**e) for e in raw["evals"]], raw["resumed_from"], raw["world_size"],
                              raw["best_step"], raw["stopped"])


def job_for(ws, run_id: str, batch, checkpoint_path: Path, champion: nn.Module | None, memory) -> TrainingJob:
    """The job file's content; the champion travels as a plain checkpoint in the job folder."""
    from incseg.models import save_checkpoint
    from incseg.update import class_names

    out = checkpoint_path.parent / "torchrun"
    champion_file = None
    if champion is not None:
        champion_file = str(save_checkpoint(out / "champion.pt", champion, class_names(ws, champion)))
    return TrainingJob(
        kind="update" if champion is not None else "bootstrap", workspace=str(ws.root),
        params=ws.params.model_dump(), batch_id=batch.batch_id, batch_root=str(batch.root),
        pairs=[(p.stem, str(p.image), str(p.mask)) for p in batch.pairs], classes=list(batch.info.classes),
        run_id=run_id, checkpoint_path=str(checkpoint_path), out_dir=str(out), champion_checkpoint=champion_file,
        memory_root=str(memory.root) if memory is not None and memory.root is not None else None,
    )


# ---- the worker --------------------------------------------------------------------------
def run_job(job: TrainingJob):
    """The training step of `job` in this process (one rank of a distributed run)."""
    from incseg.config import Params, Workspace
    from incseg.continual.memory import ExemplarMemory
    from incseg.data.layout import BatchInfo, Pair
    from incseg.models import load_checkpoint
    from incseg.pipeline import Batch
    from incseg.registry import ModelRegistry
    from incseg.update import train_step

    ws = Workspace(job.workspace, Params.model_validate(job.params))
    pairs = [Pair(stem, Path(image), Path(mask)) for stem, image, mask in job.pairs]
    batch = Batch(job.batch_id, Path(job.batch_root), pairs, BatchInfo(job.batch_id, classes=job.classes))
    champion = load_checkpoint(Path(job.champion_checkpoint))[0] if job.champion_checkpoint else None
    memory = ExemplarMemory.load(Path(job.memory_root)) if job.memory_root else ExemplarMemory.empty()
    return train_step(ws, ModelRegistry(ws), job.run_id, batch, Path(job.checkpoint_path), champion, memory)


def main(job_file: str) -> int:
    from incseg.config import Params, Workspace
    from incseg.models import save_checkpoint
    from incseg.training import DivergenceError, resolve_device
    from incseg.update import class_names

    job = TrainingJob(**json.loads(Path(job_file).read_text()))
    device = resolve_device(job.params["train"]["device"])
    dist.init_process_group(backend(device))
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
    out = Path(job.out_dir)
    try:
        model, result = run_job(job)
    except Exception as err:
        if is_main():
            (out / "error.json").write_text(json.dumps({"type": type(err).__name__, "message": str(err)}))
        dist.destroy_process_group()
        return DIVERGED_EXIT if isinstance(err, DivergenceError) else 1
    if is_main():
        ws = Workspace(job.workspace, Params.model_validate(job.params))
        save_checkpoint(out / "model.pt", model, class_names(ws, model))
        (out / "result.json").write_text(json.dumps(
            {"evals": [asdict(e) for e in result.evals], "resumed_from": result.resumed_from, "world_size": world_size(),
             "best_step": result.best_step, "stopped": result.stopped}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
