"""An update that fails on its way: a NaN loss, a fault after registration, broken files in the
batch. Nothing is promoted that should not be, every run and version says what happened."""

import json
import shutil

import pytest

from helpers import fault_params, set_params, tiny_params
from incseg.datastore import add_data
from incseg.registry import ModelRegistry, RegistryError

pytestmark = [pytest.mark.slow, pytest.mark.cost(90)]


def test_divergent_training_is_rejected_not_promoted(champion_ws, stream_dir):
    from flows.update import incremental_update

    ws = set_params(champion_ws, fault_params(update_lr=1e30))
    try:
        add_data(ws, stream_dir / "registry" / "batch-03")
        reg = ModelRegistry(ws)
        before, n = reg.aliases(), len(reg.versions())
        promoted = [str(v.version) for v in reg.versions() if v.tags.get("status") == "promoted"]
        result = incremental_update("batch-03", str(ws.root))
    finally:
        set_params(ws, fault_params())
    assert result.status == "diverged" and "loss became" in result.reason
    assert reg.aliases() == before and len(reg.versions()) == n
    assert [str(v.version) for v in reg.versions() if v.tags.get("status") == "promoted"] == promoted
    assert reg.client.get_run(result.run_id).data.tags["outcome"] == "diverged"
    assert any(b == "batch-03" and o == "diverged" for (b, _), o in reg.ledger().items())


def test_failure_after_registration_fails_the_run_marks_the_version_and_moves_no_alias(champion_ws, stream_dir,
                                                                                       monkeypatch):
    """A fault injected between registering the candidate and judging it (INCSEG_FAILPOINT)."""
    from flows.update import FAILPOINT_ENV, InjectedFault, incremental_update

    ws = champion_ws
    add_data(ws, stream_dir / "registry" / "batch-02")
    reg = ModelRegistry(ws)
    before, n_versions = reg.aliases(), len(reg.versions())
    monkeypatch.setenv(FAILPOINT_ENV, "after_register")
    with pytest.raises(InjectedFault):
        incremental_update("batch-02", str(ws.root))
    monkeypatch.delenv(FAILPOINT_ENV)
    versions = reg.versions()
    assert len(versions) == n_versions + 1  # it was registered before the fault ...
    failed = versions[-1]
    assert failed.tags["status"] == "failed" and "InjectedFault" in failed.tags["reason"]
    assert reg.aliases() == before  # ... but never served, and `challenger` was taken off it
    run = reg.client.get_run(failed.tags["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["outcome"] == "failed"
    assert not any(b == "batch-02" for b, _ in reg.ledger())  # a failed run is retried later
    with pytest.raises(RegistryError, match="failed"):
        reg.set_champion(failed.version, "must not serve")


def test_partly_bad_batch_trains_on_the_rest_and_quarantines(champion_ws, tmp_path):
    """A new batch (other seed) with two broken files: the update runs on the other 62."""
    from flows.update import incremental_update
    from incseg.data.synthetic import synthesize

    ws = champion_ws
    synthesize(tmp_path / "other", tiny_params(synth={"seed": 7}).synth)
    src = tmp_path / "batch-05-mixed"
    shutil.copytree(tmp_path / "other" / "registry" / "batch-02", src)
    broken = sorted((src / "images").glob("*.png"))[:2]
    broken[0].write_bytes(b"")
    broken[1].write_text("not a png")
    add_data(ws, src)
    registered = ws.registry_dir / "batch-05-mixed" / "images"
    result = incremental_update("batch-05-mixed", str(ws.root))
    assert result.status in ("promoted", "rejected"), result.reason
    reasons = json.loads((ws.quarantine_dir / "batch-05-mixed" / "reason.json").read_text())["files"]
    assert set(reasons) == {p.stem for p in broken}
    assert all((registered / p.name).exists() for p in broken)  # the registry keeps what it was given
    reg = ModelRegistry(ws)
    def artifact(path: str) -> str:
        return open(reg.client.download_artifacts(result.run_id, path, str(tmp_path))).read()

    report = json.loads(artifact("validation/report.json"))
    assert report["bad_stems"] == sorted(p.stem for p in broken) and len(report["valid_stems"]) == 62
    assert "image_readable" in artifact("validation/report.md")
