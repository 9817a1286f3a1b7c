"""A person's last word (`gate.approval: manual`) on the run's Prefect server, and the reviewer's
view of a verdict in MLflow (the IoU table and the verdict card)."""

from __future__ import annotations

import json
import threading
import time
from uuid import UUID

import pytest
from typer.testing import CliRunner

from incseg.cli import app
from incseg.registry import AWAITING, ModelRegistry

from helpers import fault_params, make_workspace, set_params

pytestmark = [pytest.mark.slow, pytest.mark.cost(130)]
runner = CliRunner()

# every automatic check passes (the learned numbers are not what is under test here)
LENIENT = {"min_miou_gain": -1.0, "max_class_drop": 1.0, "min_new_class_iou": 0.0, "approval": "manual"}


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory, prefect_api):
    from flows.update import bootstrap

    ws = make_workspace(tmp_path_factory.mktemp("review-ws"), fault_params())
    ws = set_params(ws, ws.params.model_copy(update={"gate": ws.params.gate.model_copy(update=LENIENT)}))
    assert bootstrap("batch-00", str(ws.root)).status == "promoted"  # nothing to hold a first model against
    return ws


class Update(threading.Thread):
    """An update flow run in the background, as a served watcher runs it."""

    def __init__(self, ws, batch_id: str):
        super().__init__(daemon=True)
        self.ws, self.batch_id, self.result, self.error = ws, batch_id, None, None

    def run(self):
        from flows.update import incremental_update

        try:
            self.result = incremental_update(self.batch_id, str(self.ws.root))
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err

    def paused_version(self, timeout: float = 240) -> str:
        """The version the run waits on, once its flow run is PAUSED on the server."""
        from prefect.client.orchestration import get_client

        deadline = time.monotonic() + timeout
        reg = ModelRegistry(self.ws)
        while time.monotonic() < deadline:
            assert self.is_alive(), f"the update ended without pausing: {self.result or self.error}"
            waiting = [v for v in reg.versions() if v.tags.get("status") == AWAITING]
            if waiting:
                with get_client(sync_client=True) as client:
                    state = client.read_flow_run(UUID(waiting[0].tags["flow_run_id"])).state
                if state is not None and state.is_paused():
                    return str(waiting[0].version)
            time.sleep(1)
        raise AssertionError(f"no paused update within {timeout:.0f} s")

    def finished(self):
        self.join(timeout=240)
        assert not self.is_alive() and self.error is None, self.error
        return self.result


def test_a_paused_update_resumed_with_an_approve_input_promotes(reviewed):
    from prefect.flow_runs import resume_flow_run

    reg = ModelRegistry(reviewed)
    update = Update(reviewed, "batch-01")
    update.start()
    version = update.paused_version()
    assert version == "2" and reg.aliases() == {"champion": "1", "challenger": "2"}  # champion waits
    assert "awaiting_approval" in runner.invoke(app, ["-C", str(reviewed.root), "models"]).output
    resume_flow_run(UUID(reg.version(version).tags["flow_run_id"]), run_input={"approve": True, "comment": "looks right"})
    result = update.finished()
    assert (result.status, result.champion_after) == ("promoted", "2")
    tags = reg.version("2").tags
    assert tags["status"] == "promoted" and tags["approved_by"] == "prefect-ui" and tags["approval_comment"] == "looks right"
    assert reg.aliases() == {"champion": "2"}


def test_cli_decisions_end_the_wait_and_are_recorded(reviewed, monkeypatch):
    monkeypatch.setenv("INCSEG_USER", "ana")
    reg = ModelRegistry(reviewed)
    update = Update(reviewed, "batch-02")
    update.start()
    version = update.paused_version()
    approved = runner.invoke(app, ["-C", str(reviewed.root), "approve", version, "--comment", "checked the previews"])
    assert approved.exit_code == 0 and "was resumed" in approved.output, approved.output
    result = update.finished()
    assert (result.status, result.champion_after) == ("promoted", version)
    tags = reg.version(version).tags
    assert (tags["approved_by"], tags["approval_comment"], tags["previous_champion"]) == ("ana", "checked the previews", "2")
    assert tags["approved_at"]

    update = Update(reviewed, "batch-03")
    update.start()
    turned_down = update.paused_version()
    rejected = runner.invoke(app, ["-C", str(reviewed.root), "reject", turned_down, "--reason", "masks look shifted"])
    assert rejected.exit_code == 0, rejected.output
    result = update.finished()
    assert result.status == "rejected" and "masks look shifted" in result.reason
    assert reg.aliases() == {"champion": version}  # the rejected candidate never served
    assert reg.version(turned_down).tags["rejected_by"] == "ana"
    run = reg.client.get_run(result.run_id).data.tags
    assert (run["outcome"], run["reason"]) == ("rejected", "rejected by ana: masks look shifted")

    for bad in (turned_down, "42", "1"):  # rejected, unknown, long decided
        out = runner.invoke(app, ["-C", str(reviewed.root), "approve", bad])
        assert out.exit_code == 1 and len(out.output.strip().splitlines()) == 1, out.output
    assert reg.aliases() == {"champion": version}


def test_a_review_that_times_out_rejects(reviewed):
    ws = set_params(reviewed, reviewed.params.model_copy(update={
        "gate": reviewed.params.gate.model_copy(update={"approval_timeout_s": 3})}))
    champion = ModelRegistry(ws).aliases()["champion"]
    update = Update(ws, "batch-03")
    update.start()
    result = update.finished()
    assert result.status == "rejected" and "approval timed out" in result.reason, result
    assert ModelRegistry(ws).aliases() == {"champion": champion}


def test_the_run_shows_the_verdict_side_by_side(reviewed, tmp_path):
    reg = ModelRegistry(reviewed)
    run_id = reg.version("2").tags["run_id"]
    table = reg.client.download_artifacts(run_id, "review/iou.json", str(tmp_path))
    card = reg.client.download_artifacts(run_id, "review/verdict.md", str(tmp_path))
    with open(table) as f:
        rows = json.load(f)
    assert rows["columns"] == ["class", "champion", "candidate", "change"]
    classes = [r[0] for r in rows["data"]]
    assert {"background", "square", "circle", "triangle"} <= set(classes)
    with open(card) as f:
        text = f.read()
    assert text.startswith("# Verdict: awaiting approval") and "| miou_gain |" in text and "| triangle |" in text


def test_close_calls_mode_holds_only_a_pass_with_a_close_call(reviewed):
    """`gate.approval: close_calls`: the registry holds a passing candidate with a close call for a
    person and promotes a clear pass (verdicts made by hand here: which checks are close calls is a
    learned detail)."""
    import torch

    from incseg.gate import Check, Decision
    from incseg.metrics import ConfusionMatrix, iou_report
    from incseg.pipeline import Judgement
    from incseg.workspace import Workspace

    ws = Workspace(reviewed.root, reviewed.params.model_copy(update={
        "gate": reviewed.params.gate.model_copy(update={"approval": "close_calls"})}))
    reg = ModelRegistry(ws)
    champion = reg.aliases()["champion"]
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([[0, 1, 2, 3]]), torch.tensor([[0, 1, 2, 3]]))
    names = {0: "background", 1: "square", 2: "circle", 3: "triangle"}
    report = iou_report(cm, [0, 1, 2], [3], names)

    def publish(close: bool) -> tuple[str, str, str | None]:
        check = Check("new_class:triangle", True, 0.31, 0.3, "new class 'triangle' IoU 0.310", (0.25, 0.37), close)
        run_id = reg.start_run("hand-made verdict", {"batch_id": "batch-03"}, {})
        version = str(reg.register(run_id, reg.version(champion).source, {"batch_id": "batch-03"}).version)
        status, after = reg.publish(run_id, version, Judgement(Decision(True, "passed", [check]), report, report,
                                                               {"candidate": cm}))
        reg.end_run(run_id)
        return version, status, after

    try:
        held, status, after = publish(close=True)
        assert (status, after) == (AWAITING, champion)
        assert reg.version(held).tags["close_calls"] == "new_class:triangle"
        reg.reject(held, "superseded")  # nothing left waiting for the tests after this one
        clear, status, after = publish(close=False)
        assert (status, after) == ("promoted", clear) and reg.version(clear).tags["close_calls"] == "none"
    finally:  # the hand-made versions point at the champion's files under another run: serve the real one again
        reg.set_champion(champion, "after the hand-made verdicts")


def test_close_calls_mode_promotes_a_clear_pass_without_waiting(reviewed):
    """The lenient gate of this module has no close call to find (every resample passes every check),
    so under `close_calls` an update is promoted at once, on the run's Prefect server as served."""
    ws = set_params(reviewed, reviewed.params.model_copy(update={
        "gate": reviewed.params.gate.model_copy(update={"approval": "close_calls"})}))
    try:
        update = Update(ws, "batch-03")
        update.start()
        result = update.finished()
        assert result.status == "promoted" and "close call" not in result.reason, result
        assert ModelRegistry(ws).aliases()["champion"] == result.candidate_version
    finally:
        set_params(ws, reviewed.params)


def test_the_holdout_preview_shows_each_model_at_its_own_size(tmp_path):
    """The gate judges the champion at the size it was trained at; the reviewer's overlays showed it at
    the candidate's, so a champion trained at 64 px looked worse in the picture than it serves."""
    import numpy as np
    import torch
    from torch import nn

    from incseg.data.layout import find_pairs, write_pair
    from incseg.reports import preview_figure

    class Seen(nn.Module):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def forward(self, x):
            self.sizes.append(tuple(x.shape[-2:]))
            return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    write_pair(tmp_path, "a", np.zeros((80, 100, 3), np.uint8), np.zeros((80, 100), np.uint8))
    champion, candidate = Seen(), Seen()
    preview_figure({"champion": champion, "candidate": candidate}, find_pairs(tmp_path),
                   {"champion": 64, "candidate": 96})
    assert (champion.sizes, candidate.sizes) == ([(64, 64)], [(96, 96)])
