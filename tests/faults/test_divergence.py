"""A NaN/inf loss stops the update with a reason; nothing is registered as promoted."""

import pytest

from helpers import fault_params, set_params
from incseg.datastore import add_data
from incseg.registry import ModelRegistry

pytestmark = [pytest.mark.slow, pytest.mark.cost(60)]


def test_divergent_training_is_rejected_not_promoted(champion_ws, stream_dir):
    from flows.update import incremental_update

    ws = set_params(champion_ws, fault_params(update_lr=1e30))
    add_data(ws, stream_dir / "registry" / "batch-02")
    reg = ModelRegistry(ws)
    before, n = reg.aliases(), len(reg.versions())
    result = incremental_update("batch-02", str(ws.root))
    assert result.status == "diverged" and "loss became" in result.reason
    assert reg.aliases() == before and len(reg.versions()) == n
    assert [str(v.version) for v in reg.versions() if v.tags.get("status") == "promoted"] == ["1"]
    assert reg.client.get_run(result.run_id).data.tags["outcome"] == "diverged"
    assert any(b == "batch-02" and o == "diverged" for (b, _), o in reg.ledger().items())
