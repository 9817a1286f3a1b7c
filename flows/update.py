"""The bootstrap and incremental-update flows: the mission, one task per line."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from prefect import flow, get_run_logger

from incseg.registry import AWAITING
from incseg.pipeline import clear_scratch, holdout_pairs, require_holdout_labels
from incseg.training import DivergenceError
from incseg.workspace import Workspace
from flows.review import await_review, champion_version
from flows.validation import batch_file_table
from tasks.update import (
    check_batch,
    close_orphaned_runs,
    judge,
    finish_run,
    load_champion,
    publish_verdict,
    register_candidate,
    start_run,
    train_base,
    train_candidate,
)

FAILPOINT_ENV = "INCSEG_FAILPOINT"


@dataclass
class UpdateResult:
    """What an update decided, with the numbers behind it."""

    batch_id: str
    status: str  # promoted | rejected | awaiting_approval | invalid | diverged | waiting (the watcher's: below)
    reason: str
    candidate_version: str | None = None
    champion_before: str | None = None
    champion_after: str | None = None
    run_id: str | None = None
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def run_tags() -> dict[str, str]:
    """The Prefect flow run behind a version (a paused review is resumed through it)."""
    from prefect.runtime import flow_run

    return {"flow_run_id": str(flow_run.id)} if flow_run.id else {}


class InjectedFault(RuntimeError):
    """Raised at a named point of a flow when INCSEG_FAILPOINT names it (fault-injection tests)."""


def failpoint(name: str) -> None:
    if os.environ.get(FAILPOINT_ENV) == name:
        raise InjectedFault(f"fault injected at {name} ({FAILPOINT_ENV})")


class Attempt:
    """What a run has produced so far, for the failure bookkeeping."""

    def __init__(self, ws: Workspace, run_id: str):
        self.ws, self.run_id, self.version = ws, run_id, None


@contextmanager
def recorded(ws: Workspace, run_id: str):
    """Any failure inside closes the run FAILED with the error as its reason and marks a version
    it registered `failed` (never served); a divergence closes it `diverged`. The error still
    propagates. The one place for a flow's failure bookkeeping."""
    attempt = Attempt(ws, run_id)
    try:
        yield attempt
    except DivergenceError as err:  # a verdict, not a crash: in the ledger, so the batch is not retried
        finish_run(ws, run_id, "diverged", str(err), version=attempt.version)
        raise
    except BaseException as err:
        finish_run(ws, run_id, "failed", f"{type(err).__name__}: {err}", failed=True, version=attempt.version)
        raise


def rejected_batch(ws: Workspace, kind: str, checked, champion: str | None) -> UpdateResult:
    """A batch-level validation failure: recorded as a run with its report; nothing trains."""
    reason = "validation failed: " + "; ".join(checked.report.batch_errors)
    reasons = ws.quarantine_dir / checked.report.batch_id / "reason.json"
    if reasons.is_file():
        shown = reasons.relative_to(ws.root) if reasons.is_relative_to(ws.root) else reasons
        reason += f" (each file's reason: {shown})"
    get_run_logger().error("batch %s rejected: %s", checked.report.batch_id, reason)
    run_id = start_run(ws, kind, checked, champion)
    finish_run(ws, run_id, "invalid", reason)
    clear_scratch(ws, run_id, None, champion)
    return UpdateResult(checked.report.batch_id, "invalid", reason, None, champion, champion, run_id)


def published(ws: Workspace, run_id: str, version: str, judgement, reason: str) -> tuple[str, str | None, str]:
    """Publish the gate's verdict; where it waits for a person (gate.approval: manual, or close_calls and a
    close call), wait for the decision. Returns the status, the champion after and the reason."""
    status, after = publish_verdict(ws, run_id, version, judgement, run_tags())
    if status == AWAITING:
        finish_run(ws, run_id, status, reason)
        status, reason = await_review(ws, version)
        after = champion_version(ws)
    return status, after, reason


@flow(name="bootstrap")
def bootstrap(batch_id: str, workspace: str = ".") -> UpdateResult:
    """Train a model from scratch on one batch. The first becomes version 1, `champion`; while a champion
    exists the new model is its challenger, judged by the same gate as an update's candidate (one batch's
    model that forgets what the champion was taught is rejected): a bootstrap never replaces a better model."""
    ws = Workspace(workspace)
    holdout_pairs(ws)  # no holdout, no verdict: before the training
    close_orphaned_runs(ws)
    current = load_champion(ws) if champion_version(ws) else None
    before = current.version if current else None
    checked = check_batch(ws, batch_id, batch_file_table(ws, batch_id))
    if checked.batch is None:
        return rejected_batch(ws, "bootstrap", checked, before)
    batch = checked.batch
    require_holdout_labels(ws, batch)  # a class the holdout lacks gets no verdict: before the training
    run_id = start_run(ws, "bootstrap", checked, None)
    with recorded(ws, run_id) as attempt:
        model, memory, cap_note = train_base(ws, batch, run_id)
        attempt.version = register_candidate(ws, run_id, model, memory, batch, None)
        failpoint("after_register")
        judgement = judge(ws, run_id, model, current.model if current else None, batch,
                          current.image_size if current else None)
        # the verdict (a challenger's says whose), and whether the budget was what ended training
        against = f"bootstrap against champion version {before}: " if before else ""
        status, after, reason = published(ws, run_id, attempt.version, judgement,
                                          against + judgement.decision.reason + cap_note)
    finish_run(ws, run_id, status, reason)
    clear_scratch(ws, run_id, batch, None)
    return UpdateResult(batch_id, status, reason, attempt.version, before, after, run_id, judgement.metrics())


@flow(name="incremental-update")
def incremental_update(batch_id: str, workspace: str = ".") -> UpdateResult:
    """Validate the batch, continue the champion on it, judge on the holdout, promote or keep."""
    log = get_run_logger()
    ws = Workspace(workspace)
    holdout_pairs(ws)  # no holdout, no verdict: before the training
    close_orphaned_runs(ws)
    champion = load_champion(ws)
    checked = check_batch(ws, batch_id, batch_file_table(ws, batch_id))
    if checked.batch is None:
        return rejected_batch(ws, "update", checked, champion.version)
    batch = checked.batch
    require_holdout_labels(ws, batch)  # a class the holdout lacks gets no verdict: before the training
    run_id = start_run(ws, "update", checked, champion.version)
    try:
        with recorded(ws, run_id) as attempt:
            candidate, memory = train_candidate(ws, champion, batch, run_id)
            attempt.version = register_candidate(ws, run_id, candidate, memory, batch, champion.version)
            failpoint("after_register")
            judgement = judge(ws, run_id, candidate, champion.model, batch, champion.image_size)
            status, after, reason = published(ws, run_id, attempt.version, judgement, judgement.decision.reason)
    except DivergenceError as err:  # recorded above; nothing was registered
        clear_scratch(ws, run_id, batch, champion.version)
        return UpdateResult(batch_id, "diverged", str(err), None, champion.version, champion.version, run_id)
    finish_run(ws, run_id, status, reason)
    clear_scratch(ws, run_id, batch, champion.version)
    log.info("batch %s: %s (%s)", batch_id, status, reason)
    return UpdateResult(batch_id, status, reason, attempt.version, champion.version, after, run_id, judgement.metrics())
