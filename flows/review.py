"""A person's last word on a candidate (`gate.approval: manual`, or `close_calls` and a close call).

An update whose candidate passed every check leaves it `awaiting_approval`. With a Prefect server
the update flow then pauses for a typed run input (approve / reject + comment), so a reviewer can
decide in the Prefect UI; `incseg approve` / `incseg reject` decide from a terminal and resume a
paused run with the same input, so either way the run ends with the decision. Without a server
(the ephemeral API) the run ends `awaiting_approval` and the CLI decides later.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.input import RunInput

from incseg.registry import AWAITING, ModelRegistry
from incseg.workspace import Workspace
from flows.events import server_url
from tasks.update import registry_task


class Review(RunInput):
    """The reviewer's decision on the candidate, as the Prefect UI shows it."""

    approve: bool
    comment: str = ""


@registry_task
def decide(ws: Workspace, version: str, approve: bool, comment: str, by: str) -> str:
    """Apply a decision if the version still waits for one; the version's status after."""
    reg = ModelRegistry(ws)
    if reg.version(version).tags.get("status") == AWAITING:
        if approve:
            reg.approve(version, comment, by=by)
        else:
            reg.reject(version, comment or "rejected", by=by)
    return reg.version(version).tags["status"]


@task(cache_policy=NO_CACHE)
def champion_version(ws: Workspace) -> str | None:
    champion = ModelRegistry(ws).champion()
    return str(champion.version) if champion else None


def await_review(ws: Workspace, version: str) -> tuple[str, str]:
    """Inside the update flow: wait for the decision on `version` (with a Prefect server), bounded by
    `gate.approval_timeout_s` (a timeout rejects: `approval timed out`). (status, reason) after."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    log = get_run_logger()
    if server_url() is None:
        reason = f"awaiting approval: `incseg approve {version}` or `incseg reject {version} --reason TEXT`"
        log.warning("version %s %s", version, reason)
        return AWAITING, reason
    timeout = ws.params.gate.approval_timeout_s
    log.warning("version %s passed every check and awaits approval: resume this run with a decision, or run "
                "`incseg approve %s` / `incseg reject %s` (timeout %d s)", version, version, version, timeout)
    try:
        review = pause_flow_run(wait_for_input=Review, timeout=timeout, poll_interval=min(10, max(1, timeout // 4)),
                                key=f"review-v{version}")
    except FlowPauseTimeout:
        status = decide(ws, version, False, "approval timed out", "incseg")
    else:
        status = decide(ws, version, review.approve, review.comment, "prefect-ui")
    return status, ModelRegistry(ws).version(version).tags.get("reason", "")


def resume_review(ws: Workspace, version: str, approve: bool, comment: str) -> bool:
    """After a CLI decision: resume the update run paused on `version`, if one is, with the same
    decision (the run finds it made and ends with it). True if a run was resumed."""
    from uuid import UUID

    from prefect.exceptions import FlowPauseTimeout, NotPausedError, ObjectNotFound
    from prefect.flow_runs import resume_flow_run

    run_id = ModelRegistry(ws).version(version).tags.get("flow_run_id")
    if not run_id or server_url() is None:
        return False
    try:
        resume_flow_run(UUID(run_id), run_input={"approve": approve, "comment": comment})
    except (FlowPauseTimeout, NotPausedError, ObjectNotFound, RuntimeError, ValueError):  # not paused (any more), gone
        return False
    return True
