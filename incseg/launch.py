"""Run a training step in this process, or under `torchrun` as DDP, and get its result back.

With `train.distributed.nproc > 1` the step runs as
`torchrun --standalone --nproc-per-node N -m incseg.launch JOB.json`. Every rank trains on its
shard of each epoch (see `incseg.dist`), DDP all-reduces the gradients, confusion matrices are
all-reduced before metrics are computed, and only rank 0 writes: checkpoints, MLflow metrics and
the trained model. The parent process (the Prefect task) reads that model back and registers it,
so one update = one model version. The worker runs the same `run_training` as one process does;
nothing here calls back into its caller.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as torch_dist
from torch import nn

from incseg import dist, pipeline, processes
from incseg.config import Params
from incseg.continual.memory import ExemplarMemory
from incseg.data.layout import BatchInfo, Pair
from incseg.metrics import mean_iou
from incseg.models import load_checkpoint, save_checkpoint, taught_classes
from incseg.pipeline import Batch, class_names, holdout_matrix
from incseg.training import DivergenceError, EvalPoint, TrainResult, resolve_device
from incseg.workspace import Workspace

if TYPE_CHECKING:
    from incseg.registry import ModelRegistry

DIVERGED_EXIT = 3


def eval_logger(ws: Workspace, reg: ModelRegistry | None, run_id: str, scope: list[int]):
    """on_eval callback: logs the training loss, the validation split's mIoU (what early stopping
    watches) and the holdout mIoU over `scope` (what the gate will judge) at each evaluation.
    Every rank of a distributed run evaluates its holdout shard; only rank 0 logs."""

    def log(point: EvalPoint, model: nn.Module) -> None:
        miou = mean_iou(holdout_matrix(ws, model), scope)
        if reg is not None and dist.is_main():
            reg.log_evaluation(run_id, point, miou)

    return log


def run_training(ws: Workspace, reg: ModelRegistry | None, run_id: str, batch: Batch, checkpoint_path: Path,
                 champion: nn.Module | None = None, memory: ExemplarMemory | None = None) -> tuple[nn.Module, TrainResult]:
    """Bootstrap (no champion) or continue the champion on the batch in this process (or rank),
    logging each evaluation to the run."""
    if champion is None:
        return pipeline.train_base(ws, batch, on_eval=eval_logger(ws, reg, run_id, batch.classes),
                                   checkpoint_path=checkpoint_path, progress=dist.is_main())
    scope = sorted(set(taught_classes(champion)) | set(batch.classes))
    return pipeline.train_candidate(ws.params, champion, batch, memory or ExemplarMemory.empty(),
                                    on_eval=eval_logger(ws, reg, run_id, scope), checkpoint_path=checkpoint_path,
                                    progress=dist.is_main())


def train_step(ws: Workspace, reg: ModelRegistry, run_id: str, batch: Batch, checkpoint_path: Path,
               champion: nn.Module | None = None, memory: ExemplarMemory | None = None) -> tuple[nn.Module, TrainResult]:
    """`run_training` here, or under torchrun when `train.distributed.nproc > 1` (rank 0's model back)."""
    spec = ws.params.train.distributed
    if spec.nproc > 1:
        return launch(job_for(ws, run_id, batch, checkpoint_path, champion, memory), spec.nproc, spec.torchrun_args)
    return run_training(ws, reg, run_id, batch, checkpoint_path, champion, memory)


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
    """torchrun on the job file; its log folder beside the job (torchrun's default is a new temp
    folder per run, never removed), unless `torchrun_args` names one."""
    standalone = [] if any(a.startswith("--rdzv") or a.startswith("--nnodes") for a in extra) else ["--standalone"]
    logs = [] if any(a.startswith(("--log-dir", "--log_dir")) for a in extra) else [f"--log-dir={job_file.parent / 'logs'}"]
    return [sys.executable, "-m", "torch.distributed.run", *standalone, *logs, f"--nproc-per-node={nproc}", *extra,
            "-m", "incseg.launch", str(job_file)]


def launch(job: TrainingJob, nproc: int, extra_args: list[str] | None = None):
    """Run the job under torchrun and return rank 0's (model, TrainResult).

    A diverged loss comes back as `DivergenceError`; any other worker failure as a
    RuntimeError carrying the end of torchrun's output.
    """
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
                              raw["best_step"], raw["stopped"], raw["lr_decays"])


def job_for(ws, run_id: str, batch, checkpoint_path: Path, champion: nn.Module | None, memory) -> TrainingJob:
    """The job file's content; the champion travels as a plain checkpoint in the job folder."""
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
    ws = Workspace(job.workspace, Params.model_validate(job.params))
    pairs = [Pair(stem, Path(image), Path(mask)) for stem, image, mask in job.pairs]
    batch = Batch(job.batch_id, Path(job.batch_root), pairs, BatchInfo(job.batch_id, classes=job.classes))
    champion = load_checkpoint(Path(job.champion_checkpoint))[0] if job.champion_checkpoint else None
    memory = ExemplarMemory.load(Path(job.memory_root)) if job.memory_root else ExemplarMemory.empty()
    reg = None
    if dist.is_main():  # only rank 0 logs: the other ranks need not load MLflow at all
        from incseg.registry import ModelRegistry

        reg = ModelRegistry(ws)
    return run_training(ws, reg, job.run_id, batch, Path(job.checkpoint_path), champion, memory)


def main(job_file: str) -> int:
    job = TrainingJob(**json.loads(Path(job_file).read_text()))
    device = resolve_device(job.params["train"]["device"])
    torch_dist.init_process_group(backend(device))
    if device.type == "cuda":
        torch.cuda.set_device(dist.local_device(device))
    out = Path(job.out_dir)
    try:
        model, result = run_job(job)
    except Exception as err:
        if dist.is_main():
            (out / "error.json").write_text(json.dumps({"type": type(err).__name__, "message": str(err)}))
        torch_dist.destroy_process_group()
        return DIVERGED_EXIT if isinstance(err, DivergenceError) else 1
    if dist.is_main():
        ws = Workspace(job.workspace, Params.model_validate(job.params))
        save_checkpoint(out / "model.pt", model, class_names(ws, model))
        (out / "result.json").write_text(json.dumps(
            {"evals": [asdict(e) for e in result.evals], "resumed_from": result.resumed_from, "world_size": dist.world_size(),
             "best_step": result.best_step, "stopped": result.stopped, "lr_decays": result.lr_decays}))
    torch_dist.barrier()
    torch_dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
