"""SIGKILL in the middle of training: nothing changes, the next watcher run resumes and finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from helpers import fault_params, set_params
from incseg.datastore import add_data
from incseg.registry import ModelRegistry


def test_killed_update_leaves_registry_untouched_and_resumes(champion_ws, stream_dir):
    from flows.watch import watch_registry

    ws = set_params(champion_ws, fault_params(update_max_steps=400, update_min_steps=400, eval_every=8))
    add_data(ws, stream_dir / "registry" / "batch-01")
    reg = ModelRegistry(ws)
    before_aliases, before_versions = reg.aliases(), [str(v.version) for v in reg.versions()]

    proc = subprocess.Popen([sys.executable, "-m", "incseg", "-C", str(ws.root), "watch"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    checkpoints = []
    while time.monotonic() < deadline and not checkpoints:
        checkpoints = list(ws.runs_dir.glob("update-batch-01-v1-*/train.pt"))
        assert proc.poll() is None, "the update finished before it could be killed"
        time.sleep(0.2)
    assert checkpoints, "no epoch checkpoint appeared"
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    assert reg.aliases() == before_aliases
    assert [str(v.version) for v in reg.versions()] == before_versions
    assert not any(b == "batch-01" for b, _ in reg.ledger())  # not marked processed

    results = watch_registry(str(ws.root))
    assert [r.batch_id for r in results] == ["batch-01"]
    assert results[0].status in ("promoted", "rejected")
    run = reg.client.get_run(results[0].run_id)
    assert int(run.data.tags["resumed_from_step"]) >= 8  # continued from the last checkpoint
    assert len(reg.versions()) == len(before_versions) + 1
