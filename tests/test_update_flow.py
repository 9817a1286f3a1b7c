"""The update flow for real: MLflow SQLite store in a tmp dir, Prefect's test harness."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from incseg.cli import app
from incseg.registry import AWAITING, ModelRegistry, RegistryError
from incseg.workspace import Workspace

from helpers import make_workspace, tiny_params

pytestmark = [pytest.mark.slow, pytest.mark.cost(250)]

# The tiny config's gate (helpers.tiny_params) asks 0.1 of a new class; the tiny update reaches
# 0.3-0.5 on every machine seen: a relation to the champion and a wide margin, not an edge.
NEW_CLASS_MARGIN = 2.0


@pytest.fixture(scope="module")
def history(tmp_path_factory, prefect_api):
    """bootstrap on batch-00, then a good batch (new class). (A poisoned batch is rejected in
    faults/test_bad_input.py.)"""
    from flows.update import bootstrap, incremental_update

    ws = make_workspace(tmp_path_factory.mktemp("update-ws"))
    boot = bootstrap("batch-00", str(ws.root))
    aliases_after_boot = ModelRegistry(ws).aliases()
    good = incremental_update("batch-01", str(ws.root))
    aliases_after_good = ModelRegistry(ws).aliases()
    return ws, boot, aliases_after_boot, good, aliases_after_good


def test_bootstrap_registers_v1_as_champion(history):
    ws, boot, aliases, *_ = history
    assert boot.status == "promoted" and boot.candidate_version == "1"
    assert aliases == {"champion": "1"}
    assert boot.metrics["candidate.miou"] > 0.5


def test_the_bootstrap_verdict_says_whether_its_step_cap_ended_training(history):
    ws, boot, *_ = history
    tags = ModelRegistry(ws).client.get_run(boot.run_id).data.tags
    capped = tags["stopped"] == "max_steps"
    assert boot.reason.startswith("bootstrap: first model, holdout mIoU over 3 classes 0.")  # background + 2 shapes
    assert tags["reason"] == boot.reason
    assert ("-step cap before the validation score levelled off" in boot.reason) == capped
    assert (f"from step {tags['best_step']}" in boot.reason) == capped


def test_good_batch_with_new_class_is_promoted(history):
    ws, _, _, good, aliases = history
    assert good.status == "promoted", good.reason
    assert aliases == {"champion": "2"}
    assert good.metrics["champion.iou.triangle"] == 0.0
    assert good.metrics["candidate.iou.triangle"] > NEW_CLASS_MARGIN * ws.params.gate.min_new_class_iou
    gate = ws.params.gate
    for name in ("background", "square", "circle"):
        assert good.metrics[f"candidate.iou.{name}"] >= good.metrics[f"champion.iou.{name}"] - gate.max_class_drop


def test_lineage_tags_on_every_version(history):
    ws, *_ = history
    _, boot, _, good, _ = history
    reg = ModelRegistry(ws)
    versions = [reg.version(r.candidate_version) for r in (boot, good)]
    assert [str(v.version) for v in versions] == ["1", "2"]
    for mv in versions:
        for key in ("status", "reason", "parent_version", "batch_id", "data_hash", "code_version", "run_id"):
            assert key in mv.tags, (mv.version, key)
    assert versions[1].tags["parent_version"] == "1" and versions[1].tags["batch_id"] == "batch-01"
    assert versions[1].tags["data_hash"].startswith(("sha256:", "md5:"))


def test_run_has_reviewable_artifacts(history, tmp_path):
    ws, _, _, good, *_ = history
    reg = ModelRegistry(ws)
    paths = {a.path for a in reg.client.list_artifacts(good.run_id)}
    assert {"decision.json", "plots", "checkpoint", "memory", "validation"} <= paths
    docs = {a.path for a in reg.client.list_artifacts(good.run_id, "validation/data_docs")}
    assert "validation/data_docs/index.html" in docs  # GX's Data Docs, opened from the artifact view
    review = {a.path for a in reg.client.list_artifacts(good.run_id, "review")}
    assert {"review/verdict.md", "review/iou.json"} <= review
    plots = {a.path for a in reg.client.list_artifacts(good.run_id, "plots")}
    assert {"plots/confusion_candidate.png", "plots/holdout_preview.png"} <= plots
    tags = reg.client.get_run(good.run_id).data.tags
    steps = [m.step for m in reg.client.get_metric_history(good.run_id, "holdout_miou")]
    assert steps == [m.step for m in reg.client.get_metric_history(good.run_id, "val_miou")]
    assert steps[-1] == int(tags["steps"]) and int(tags["best_step"]) in steps
    assert all(s % ws.params.train.eval_every == 0 for s in steps[:-1])
    assert tags["stopped"] in ("converged", "max_steps")
    import json

    decision = json.loads(open(reg.client.download_artifacts(good.run_id, "decision.json", str(tmp_path))).read())
    assert decision["status"] == "promoted" and decision["candidate"]["per_class"]["triangle"] > 0
    for check in decision["checks"]:  # each with its interval over resamples of the holdout's images
        lo, hi = check["interval"]
        assert lo <= hi and (not check["close_call"] or lo <= check["threshold"] <= hi), check
    close = [c["name"] for c in decision["checks"] if c["close_call"]]
    assert decision["close_calls"] == close and tags["close_calls"] == (", ".join(close) or "none")
    assert reg.version(good.candidate_version).tags["close_calls"] == tags["close_calls"]
    card = open(reg.client.download_artifacts(good.run_id, "review/verdict.md", str(tmp_path))).read()
    assert "interval over holdout images" in card
    assert reg.client.get_run(good.run_id).data.params["continual.strategy"] == "replay+distill"


def test_logged_state_dict_round_trips(history, tmp_path):
    ws, _, _, good, *_ = history
    reg = ModelRegistry(ws)
    loaded = reg.load(reg.version(good.candidate_version), tmp_path)
    assert loaded.classes[3] == "triangle"
    assert len(loaded.memory.items) <= ws.params.continual.memory_size
    import mlflow.pyfunc
    from incseg.data.layout import find_pairs, read_image
    from incseg.inference import segment

    rgb = read_image(find_pairs(ws.holdout_dir)[0].image)
    served = mlflow.pyfunc.load_model(f"models:/{reg.name}/{good.candidate_version}").predict(rgb)
    assert np.array_equal(np.array(served[0]), segment(loaded.model, rgb, ws.params.data.image_size))


def models_listing(ws, width: int) -> str:
    """What `incseg models` prints in a console `width` columns wide (the CLI's console takes its width
    from the terminal or COLUMNS, which CliRunner's terminal_width does not set)."""
    import io

    from rich.console import Console

    from incseg.cli import models_table

    console = Console(file=io.StringIO(), width=width)
    console.print(models_table(ws, width))
    return console.file.getvalue()


def test_models_lists_close_calls(history):
    ws, _, _, good, _ = history
    out = models_listing(ws, 300)
    assert "close calls" in out
    close = ModelRegistry(ws).version(good.candidate_version).tags["close_calls"]
    row = next(line for line in out.splitlines() if "batch-01" in line)
    assert (close in row) if close != "none" else ("none" not in row)


def test_models_in_an_80_column_console_shows_every_column_and_whole_reasons(history):
    """At 80 columns (a pipe, a CI log, a small terminal) the table dropped batch, mIoU and parent (the
    demo's: version, alias, status and mIoU) and cut each reason to a few words; now the reasons and close
    calls go below it, whole."""
    ws, *_ = history
    out = models_listing(ws, 80)
    assert all(h in out for h in ("version", "status", "batch", "mIoU (classes)", "parent")), out
    reg = ModelRegistry(ws)
    flat = " ".join(out.split())
    for mv in reg.versions():
        row = next(line for line in out.splitlines() if line.split()[:1] == [str(mv.version)])
        assert mv.tags["batch_id"] in row and f"{mv.tags['candidate_miou']} ({mv.tags['miou_classes']})" in row, out
        assert f"version {mv.version}: {' '.join(mv.tags['reason'].split())}" in flat, out
        if mv.tags.get("close_calls", "none") != "none":
            assert f"close calls: {' '.join(mv.tags['close_calls'].split())})" in flat, out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_models_in_a_wide_console_cuts_a_long_reason_not_the_other_columns(history):
    """A console wide enough for a reason column (the demo's log at 200 columns) but narrower than the
    longest reason: rich squeezed version, alias, status, mIoU and parent to nothing to fit it. Now, at
    every width, each row keeps its short columns; a reason cut to the room left is repeated whole below."""
    ws, *_ = history
    reg = ModelRegistry(ws)
    cut_somewhere = False
    for width in range(80, 320, 6):
        out = models_listing(ws, width)
        flat = " ".join(out.split())
        for mv in reg.versions():
            row = next(line for line in out.splitlines() if line.split()[:1] == [str(mv.version)])
            assert all(mv.tags[k] in row for k in ("batch_id", "candidate_miou", "status")), (width, out)
            if "…" in row:
                cut_somewhere = True
                assert f"version {mv.version}: {' '.join(mv.tags['reason'].split())}" in flat, (width, out)
        assert max(len(line) for line in out.splitlines()) <= width
    assert cut_somewhere  # the widths tried include one where the reason column is too narrow for a reason


def test_rollback_and_promote_from_the_cli(history):
    ws, *_ = history
    runner = CliRunner()
    reg = ModelRegistry(ws)
    memory_of = {v: {it.stem for it in reg.load(reg.version(v), ws.runs_dir / "t").memory.items} for v in ("1", "2")}
    assert memory_of["1"] != memory_of["2"]
    result = runner.invoke(app, ["-C", str(ws.root), "rollback", "--reason", "test"])
    assert result.exit_code == 0, result.output
    assert reg.aliases()["champion"] == "1"
    served = reg.load(reg.require_champion(), ws.runs_dir / "after-rollback").memory
    assert {it.stem for it in served.items} == memory_of["1"]  # the memory rolled back with the model
    assert reg.version("2").tags["rolled_back_reason"] == "test"
    before = reg.aliases()
    result = runner.invoke(app, ["-C", str(ws.root), "promote", "42"])
    assert result.exit_code == 1 and "no version 42" in result.output
    assert reg.aliases() == before
    result = runner.invoke(app, ["-C", str(ws.root), "promote", "2"])
    assert result.exit_code == 0 and reg.aliases()["champion"] == "2"
    assert "note:" not in result.output  # a version the gate promoted: nothing to remark
    listing = runner.invoke(app, ["-C", str(ws.root), "models"])
    assert "champion" in listing.output and "promoted" in listing.output
    # version 1 marked as a person would leave it: turned down (the status and reason tags a verdict writes)
    tags = {k: reg.version("1").tags.get(k, "") for k in ("status", "reason")}
    reg.record_verdict("1", "rejected", "rejected by test: too coarse", {})
    try:
        result = runner.invoke(app, ["-C", str(ws.root), "promote", "1", "--reason", "needed back"])
        assert result.exit_code == 0 and reg.aliases()["champion"] == "1"
        flat = " ".join(result.output.split())
        assert "note: version 1 was rejected (rejected by test: too coarse); it serves by hand now" in flat
        assert "`incseg rollback` returns to 2" in flat
        assert reg.version("1").tags["champion_set_reason"] == "needed back"
        # one awaiting approval is served through `approve`, which closes its waiting update
        reg.client.set_model_version_tag(reg.name, "2", "status", AWAITING)
        result = runner.invoke(app, ["-C", str(ws.root), "promote", "2"])
        assert result.exit_code == 1 and "`incseg approve 2`" in " ".join(result.output.split())
        assert reg.aliases()["champion"] == "1"
    finally:
        reg.client.set_model_version_tag(reg.name, "2", "status", "promoted")
        reg.record_verdict("1", tags["status"], tags["reason"], {})
        reg.set_champion("2", "test restores the history")


def test_rejected_batch_is_recorded_and_changes_nothing(history):
    from flows.update import incremental_update

    ws, *_ = history
    reg = ModelRegistry(ws)
    before, n_versions = reg.aliases(), len(reg.versions())
    shutil.copytree(ws.registry_dir / "batch-01", ws.registry_dir / "batch-06-resent")
    result = incremental_update("batch-06-resent", str(ws.root))
    assert result.status == "invalid" and "re-send" in result.reason and "batch-01" in result.reason
    assert reg.aliases() == before and len(reg.versions()) == n_versions
    assert reg.client.get_run(result.run_id).data.tags["outcome"] == "invalid"
    result = CliRunner().invoke(app, ["-C", str(ws.root), "validate", str(ws.registry_dir / "batch-06-resent")])
    assert result.exit_code == 1 and "re-send" in result.output
    # a batch of files nothing can read: the verdict says why and where each file's reason is
    unreadable = ws.registry_dir / "batch-07-unreadable"
    shutil.copytree(ws.registry_dir / "batch-01", unreadable)
    for image in (unreadable / "images").glob("*.png"):
        image.write_bytes(b"")
    result = incremental_update("batch-07-unreadable", str(ws.root))
    assert result.status == "invalid" and "most often image_readable" in result.reason, result.reason
    assert "quarantine/batch-07-unreadable/reason.json" in result.reason, result.reason
    assert reg.aliases() == before and len(reg.versions()) == n_versions


def test_update_without_champion_says_bootstrap_first(tmp_path, prefect_api):
    ws = make_workspace(tmp_path / "ws", tiny_params())
    result = CliRunner().invoke(app, ["-C", str(ws.root), "update", "batch-01"])
    assert result.exit_code == 1
    assert "incseg bootstrap" in result.output
    assert "Flow run" not in result.output and "Traceback" not in result.output  # one line, no Prefect run
    with pytest.raises(RegistryError):
        ModelRegistry(Workspace(ws.root)).require_champion()
    shutil.rmtree(ws.root)


def test_a_bootstrap_while_a_champion_exists_is_judged_against_it(tmp_path, prefect_api):
    """A second `incseg bootstrap` (a retrain from scratch, or the getting-started commands run again)
    replaced the champion unjudged. Now it is the champion's challenger under the same gate: a model from
    one batch that was never taught the champion's classes (IoU 0 against theirs) is rejected."""
    from flows.update import bootstrap

    ws = make_workspace(tmp_path / "ws")
    assert bootstrap("batch-00", str(ws.root)).status == "promoted"
    again = bootstrap("batch-01", str(ws.root))  # batch-01 labels the triangle only: squares and circles untaught
    assert again.status == "rejected" and again.candidate_version == "2", again.reason
    assert (again.champion_before, again.champion_after) == ("1", "1")
    assert "class_drop:square failed" in again.reason and "class_drop:circle failed" in again.reason
    assert again.reason.startswith("bootstrap against champion version 1: ")  # not an update's verdict
    assert again.metrics["candidate.iou.square"] == 0.0 < again.metrics["champion.iou.square"]
    reg = ModelRegistry(ws)
    assert reg.aliases()["champion"] == "1" and reg.version("2").tags["status"] == "rejected"
