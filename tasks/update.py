"""Prefect tasks of bootstrap and update: one retryable unit each, logic in `incseg.update`."""

from __future__ import annotations

import functools

from prefect import task
from prefect.cache_policies import NO_CACHE

from incseg import launch, pipeline, update
from incseg.continual.memory import ExemplarMemory
from incseg.config import Workspace
from incseg.data.layout import DataError
from incseg.registry import LoadedModel, ModelRegistry, RegistryError, RegistryUnavailable, reachable
from incseg.training import DivergenceError


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
def validate_batch(ws: Workspace, batch_id: str, table=None) -> update.CheckedBatch:
    """Great Expectations suite over the batch's file table; bad pairs go to quarantine/<batch_id>/."""
    return update.check_batch(ws, batch_id, table)


@registry_task
def load_champion(ws: Workspace) -> LoadedModel:
    reg = ModelRegistry(ws)
    return reg.load(reg.require_champion(), ws.runs_dir / "models")


@registry_task
def start_run(ws: Workspace, kind: str, checked: update.CheckedBatch, parent: str | None) -> str:
    return update.start_run(ModelRegistry(ws), kind, checked, parent)


@task(cache_policy=NO_CACHE)
def train_base(ws: Workspace, batch: pipeline.Batch, run_id: str):
    reg = ModelRegistry(ws)
    scratch = update.scratch_dir(ws, batch, None)
    model, result = launch.train_step(ws, reg, run_id, batch, scratch / "train.pt")
    update.record_training(reg, run_id, result)
    return model, update.refresh_memory(ws, ExemplarMemory.empty(), batch, run_id)


@task(cache_policy=NO_CACHE)
def train_candidate(ws: Workspace, champion: LoadedModel, batch: pipeline.Batch, run_id: str):
    """Continue the champion on the batch. Resumes from the last checkpoint of an interrupted
    attempt at the same (batch content, champion) pair."""
    reg = ModelRegistry(ws)
    scratch = update.scratch_dir(ws, batch, champion.version)
    model, result = launch.train_step(ws, reg, run_id, batch, scratch / "train.pt", champion.model, champion.memory)
    update.record_training(reg, run_id, result)
    return model, update.refresh_memory(ws, champion.memory, batch, run_id)


@registry_task
def close_orphaned_runs(ws: Workspace) -> list[str]:
    """Runs a killed update left RUNNING are closed KILLED (their owner is provably gone)."""
    return update.close_orphaned_runs(ModelRegistry(ws))


@registry_task
def register_candidate(ws: Workspace, run_id: str, model, memory, batch: pipeline.Batch, parent: str | None) -> str:
    return update.log_candidate(ws, ModelRegistry(ws), run_id, model, memory, update.lineage_tags(batch, parent))


@task(cache_policy=NO_CACHE)
def evaluate_candidate(ws: Workspace, run_id: str, candidate, champion, batch: pipeline.Batch) -> update.Judgement:
    """Both models on the holdout, the gate's decision, and the pictures for reviewers."""
    judgement = update.judge(ws, candidate, champion, batch)
    models = {"candidate": candidate} if champion is None else {"champion": champion, "candidate": candidate}
    update.log_judgement(ws, ModelRegistry(ws), run_id, judgement, models)
    return judgement


@registry_task
def publish_verdict(ws: Workspace, run_id: str, version: str, judgement: update.Judgement) -> str | None:
    return update.publish(ModelRegistry(ws), run_id, version, judgement)


@registry_task
def finish_run(ws: Workspace, run_id: str, outcome: str, reason: str, failed: bool = False,
               version: str | None = None) -> None:
    """Close the MLflow run; a version left pending by a failure is marked `failed`, never served."""
    reg = ModelRegistry(ws)
    if version is not None:
        reg.judge(version, outcome, reason, {})
    update.record_outcome(reg, run_id, outcome, reason)
    reg.end_run(run_id, failed=failed)
