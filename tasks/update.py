"""Prefect tasks of bootstrap and update: one retryable unit each. Each composes the learning
steps (`incseg.pipeline`) with the registry's writes (`incseg.registry`); no logic of its own."""

from __future__ import annotations

import functools
import shutil

from prefect import task
from prefect.cache_policies import NO_CACHE

from incseg import launch, pipeline
from incseg.continual.memory import ExemplarMemory
from incseg.data.layout import DataError
from incseg.lineage import lineage_tags
from incseg.pipeline import Batch, CheckedBatch, Judgement
from incseg.processes import owner_tags
from incseg.reports import review_figures
from incseg.registry import LoadedModel, ModelRegistry, RegistryError, RegistryUnavailable, reachable
from incseg.training import DivergenceError
from incseg.workspace import Workspace


def transient(task, task_run, state) -> bool:
    """Retry I/O and registry hiccups, never deterministic failures (bad data, no champion, NaN)."""
    try:
        state.result()
    except RegistryUnavailable:
        return True
    except (DataError, RegistryError, DivergenceError, ValueError):
        return False
    except Exception:
        return True
    return False


IO = {"retries": 3, "retry_delay_seconds": [1, 2, 4], "retry_condition_fn": transient, "cache_policy": NO_CACHE}


def registry_task(fn):
    """A task that talks to the tracking store: store failures name the URI and are retried."""

    @functools.wraps(fn)
    def wrapper(ws: Workspace, *args, **kwargs):
        with reachable(ws.tracking_uri):
            return fn(ws, *args, **kwargs)

    return task(**IO)(wrapper)


@task(cache_policy=NO_CACHE)
def check_batch(ws: Workspace, batch_id: str, table=None) -> CheckedBatch:
    """Great Expectations suite over the batch's file table; bad pairs go to quarantine/<batch_id>/."""
    return pipeline.check_batch(ws, batch_id, table)


@registry_task
def load_champion(ws: Workspace) -> LoadedModel:
    reg = ModelRegistry(ws)
    return reg.load(reg.require_champion(), ws.runs_dir / "models")


@registry_task
def start_run(ws: Workspace, kind: str, checked: CheckedBatch, parent: str | None) -> str:
    """An MLflow run for the batch: params, lineage and owner tags, the validation report."""
    batch = checked.batch
    lineage = lineage_tags(checked.report.batch_id, checked.root, batch.classes if batch else None, parent)
    reg = ModelRegistry(ws)
    run_id = reg.start_run(f"{kind}-{checked.report.batch_id}",
                           {"incseg.kind": kind, "outcome": "running", **lineage, **owner_tags()}, ws.params.flat())
    reg.log_validation(run_id, checked)
    if checked.data_docs is not None:  # logged with the run: the scratch copy is not needed
        shutil.rmtree(checked.data_docs, ignore_errors=True)
    return run_id


@task(cache_policy=NO_CACHE)
def train_base(ws: Workspace, batch: Batch, run_id: str):
    """The first model from scratch: (model, exemplar memory, `pipeline.cap_note` for its verdict)."""
    reg = ModelRegistry(ws)
    scratch = pipeline.scratch_dir(ws, batch, None)
    model, result = launch.train_step(ws, reg, run_id, batch, scratch / "train.pt")
    reg.record_training(run_id, result)
    return model, pipeline.refresh_memory(ws, ExemplarMemory.empty(), batch, run_id), pipeline.cap_note(result)


@task(cache_policy=NO_CACHE)
def train_candidate(ws: Workspace, champion: LoadedModel, batch: Batch, run_id: str):
    """Continue the champion on the batch. Resumes from the last checkpoint of an interrupted
    attempt at the same (batch content, champion) pair."""
    reg = ModelRegistry(ws)
    scratch = pipeline.scratch_dir(ws, batch, champion.version)
    model, result = launch.train_step(ws, reg, run_id, batch, scratch / "train.pt", champion.model, champion.memory)
    reg.record_training(run_id, result)
    return model, pipeline.refresh_memory(ws, champion.memory, batch, run_id)


@registry_task
def close_orphaned_runs(ws: Workspace) -> list[str]:
    """Runs a killed update left RUNNING are closed KILLED (their owner is provably gone)."""
    return ModelRegistry(ws).close_orphaned_runs()


@registry_task
def register_candidate(ws: Workspace, run_id: str, model, memory, batch: Batch, parent: str | None) -> str:
    """Log the model, its checkpoint and memory, and register it as a pending `challenger`."""
    reg = ModelRegistry(ws)
    uri = reg.log_model(run_id, model, pipeline.class_names(ws, model), memory, ws.params.data.image_size,
                        ws.holdout_shape())
    return str(reg.register(run_id, uri, lineage_tags(batch.batch_id, batch.root, batch.classes, parent)).version)


@task(cache_policy=NO_CACHE)
def judge(ws: Workspace, run_id: str, candidate, champion, batch: Batch, champion_size: int | None = None
          ) -> Judgement:
    """Both models on the holdout (the champion at the size it was trained at), the gate's decision, and
    the pictures for reviewers."""
    judgement = pipeline.judge(ws, candidate, champion, batch, champion_size)
    models = {"candidate": candidate} if champion is None else {"champion": champion, "candidate": candidate}
    figures = review_figures(ws, judgement, models, {"champion": champion_size} if champion_size else None)
    ModelRegistry(ws).log_judgement(run_id, judgement, figures)
    return judgement


@registry_task
def publish_verdict(ws: Workspace, run_id: str, version: str, judgement: Judgement,
                    tags: dict[str, str] | None = None) -> tuple[str, str | None]:
    return ModelRegistry(ws).publish(run_id, version, judgement, tags)


@registry_task
def finish_run(ws: Workspace, run_id: str, outcome: str, reason: str, failed: bool = False,
               version: str | None = None) -> None:
    """Close the MLflow run; a version left pending by a failure is marked `failed`, never served."""
    reg = ModelRegistry(ws)
    if version is not None:
        reg.record_verdict(version, outcome, reason, {})
    reg.finish_run(run_id, outcome, reason, failed=failed)
