"""Hostile names and poisoned labels: refused or rejected, never followed, never promoted."""

from __future__ import annotations

import os
import shutil

import pytest
from typer.testing import CliRunner

from incseg.cli import app
from incseg.data.layout import DataError
from incseg.data.synthetic import poison_batch
from incseg.datastore import add_data
from incseg.registry import ModelRegistry

from helpers import fault_params, make_workspace

pytestmark = [pytest.mark.slow, pytest.mark.cost(95)]

@pytest.mark.parametrize("batch_id", ["../outside", "/etc", "..", ".hidden", "a/b"])
def test_hostile_batch_ids_are_refused(champion_ws, stream_dir, batch_id):
    runner = CliRunner()
    result = runner.invoke(app, ["-C", str(champion_ws.root), "update", batch_id])
    assert result.exit_code == 1 and "invalid batch id" in result.output
    result = runner.invoke(app, ["-C", str(champion_ws.root), "data", "add", str(stream_dir / "registry" / "batch-01"),
                                 "--batch-id", batch_id])
    assert result.exit_code == 1 and "invalid batch id" in result.output
    assert ModelRegistry(champion_ws).aliases() == {"champion": "1"}


def test_symlinked_batch_folder_is_refused(champion_ws, tmp_path, stream_dir):
    from incseg.pipeline import check_batch

    outside = tmp_path / "outside"
    shutil.copytree(stream_dir / "registry" / "batch-01", outside)
    link = champion_ws.registry_dir / "batch-07-link"
    link.symlink_to(outside, target_is_directory=True)
    try:
        with pytest.raises(DataError, match="symbolic link"):
            check_batch(champion_ws, "batch-07-link")
    finally:
        link.unlink()


def test_symlinked_files_inside_a_batch_are_not_followed(stream_dir, tmp_path):
    """A batch folder placed in a plain workspace (no DVC, where every folder counts) with one image
    replaced by a link to a system file: the link is named, not read, not copied to quarantine."""
    from incseg.pipeline import check_batch

    ws = make_workspace(tmp_path / "plain", fault_params())
    shutil.rmtree(ws.registry_dir / "batch-02")  # else the copy below is a re-sent batch
    batch = ws.registry_dir / "batch-08-links"
    shutil.copytree(stream_dir / "registry" / "batch-02", batch)
    victim = sorted((batch / "images").iterdir())[0]
    victim.unlink()
    os.symlink("/etc/hostname", victim)
    checked = check_batch(ws, "batch-08-links")
    failure = next(f for f in checked.report.failures if f.stem == victim.stem)
    assert failure.check == "image_readable" and "symbolic link" in failure.observed
    assert victim.stem not in {p.stem for p in checked.batch.pairs}
    assert not (ws.quarantine_dir / "batch-08-links" / "images" / victim.name).exists()


def test_poisoned_batch_passes_validation_and_is_rejected_by_the_gate(champion_ws, tmp_path, stream_dir):
    from flows.update import incremental_update

    ws = champion_ws
    poison_batch(stream_dir / "registry" / "batch-00", tmp_path / "batch-09-poisoned")
    add_data(ws, tmp_path / "batch-09-poisoned")
    result = incremental_update("batch-09-poisoned", str(ws.root))
    assert result.status == "rejected"
    # which check fires first is a learned detail (one class's steep drop, or a smaller drop of every
    # class that only the mean shows); that a quality check of the gate fires is not
    failed = {part.split(" failed:")[0].split(":")[0] for part in result.reason.split("; ") if " failed:" in part}
    assert failed and failed <= {"miou_gain", "class_drop"}, result.reason
    assert not (ws.quarantine_dir / "batch-09-poisoned").exists()  # validation found nothing wrong
    reg = ModelRegistry(ws)
    assert reg.aliases() == {"champion": "1"}
    mv = reg.version(result.candidate_version)  # registered, judged, never served
    assert mv.tags["status"] == "rejected" and mv.tags["reason"] == result.reason
    assert result.metrics["candidate.miou"] < result.metrics["champion.miou"]
