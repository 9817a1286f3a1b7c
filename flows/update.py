"""The bootstrap and incremental-update flows: the mission, one task per line."""

from __future__ import annotations

from prefect import flow, get_run_logger

from incseg.config import Workspace
from incseg.training import DivergenceError
from incseg.update import UpdateResult, metric_dict
from flows.validation import batch_file_table
from tasks.update import (
    evaluate_candidate,
    finish_run,
    load_champion,
    publish_verdict,
    register_candidate,
    start_run,
    train_base,
    train_candidate,
    validate_batch,
)


def rejected_batch(ws: Workspace, kind: str, checked, champion: str | None) -> UpdateResult:
    """A batch-level validation failure: recorded as a run with its report; nothing trains."""
    reason = "validation failed: " + "; ".join(checked.report.batch_errors)
    get_run_logger().error("batch %s rejected: %s", checked.report.batch_id, reason)
    run_id = start_run(ws, kind, checked, champion)
    finish_run(ws, run_id, "invalid", reason)
    return UpdateResult(checked.report.batch_id, "invalid", reason, None, champion, champion, run_id)


@flow(name="bootstrap")
def bootstrap(batch_id: str, workspace: str = ".") -> UpdateResult:
    """Train the first model on one batch and make it version 1, `champion`."""
    ws = Workspace(workspace)
    checked = validate_batch(ws, batch_id, batch_file_table(ws, batch_id))
    if checked.batch is None:
        return rejected_batch(ws, "bootstrap", checked, None)
    batch = checked.batch
    run_id = start_run(ws, "bootstrap", checked, None)
    version = None
    try:
        model, memory = train_base(ws, batch, run_id)
        version = register_candidate(ws, run_id, model, memory, batch, None)
        judgement = evaluate_candidate(ws, run_id, model, None, batch)
        champion = publish_verdict(ws, run_id, version, judgement)
    except BaseException as err:
        finish_run(ws, run_id, "failed", f"{type(err).__name__}: {err}", failed=True, version=version)
        raise
    finish_run(ws, run_id, judgement.decision.status, judgement.decision.reason)
    return UpdateResult(batch_id, "promoted", judgement.decision.reason, version, None, champion, run_id,
                        metric_dict("candidate", judgement.candidate))


@flow(name="incremental-update")
def incremental_update(batch_id: str, workspace: str = ".") -> UpdateResult:
    """Validate the batch, continue the champion on it, judge on the holdout, promote or keep."""
    log = get_run_logger()
    ws = Workspace(workspace)
    champion = load_champion(ws)
    checked = validate_batch(ws, batch_id, batch_file_table(ws, batch_id))
    if checked.batch is None:
        return rejected_batch(ws, "update", checked, champion.version)
    batch = checked.batch
    run_id = start_run(ws, "update", checked, champion.version)
    try:
        candidate, memory = train_candidate(ws, champion, batch, run_id)
    except DivergenceError as err:
        finish_run(ws, run_id, "diverged", str(err))
        return UpdateResult(batch_id, "diverged", str(err), None, champion.version, champion.version, run_id)
    except BaseException as err:
        finish_run(ws, run_id, "failed", f"{type(err).__name__}: {err}", failed=True)
        raise
    version = None
    try:
        version = register_candidate(ws, run_id, candidate, memory, batch, champion.version)
        judgement = evaluate_candidate(ws, run_id, candidate, champion.model, batch)
        after = publish_verdict(ws, run_id, version, judgement)
    except BaseException as err:
        finish_run(ws, run_id, "failed", f"{type(err).__name__}: {err}", failed=True, version=version)
        raise
    decision = judgement.decision
    finish_run(ws, run_id, decision.status, decision.reason)
    log.info("batch %s: %s (%s)", batch_id, decision.status, decision.reason)
    metrics = {**metric_dict("candidate", judgement.candidate), **metric_dict("champion", judgement.champion)}
    return UpdateResult(batch_id, decision.status, decision.reason, version, champion.version, after, run_id, metrics)
