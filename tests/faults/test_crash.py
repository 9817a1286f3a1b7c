"""SIGKILL in the middle of training: nothing changes, the next watcher run resumes and finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import fault_params, prefect_home, set_params
from incseg import processes
from incseg.datastore import add_data
from incseg.registry import ModelRegistry

pytestmark = [pytest.mark.slow, pytest.mark.cost(120)]

def test_killed_update_leaves_registry_untouched_and_resumes(champion_ws, stream_dir):
    from flows.watch import watch_registry

    ws = set_params(champion_ws, fault_params(update_max_steps=80, update_min_steps=80, eval_every=8))
    add_data(ws, stream_dir / "registry" / "batch-01")
    reg = ModelRegistry(ws)
    before_aliases, before_versions = reg.aliases(), [str(v.version) for v in reg.versions()]

    command = [sys.executable, "-m", "incseg", "-C", str(ws.root), "watch"]
    # its own ephemeral API, so the update lock is the file lock the kernel releases when the process
    # dies (a server's lease on a killed holder lasts until it expires: minutes)
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
           "PREFECT_HOME": str(prefect_home(ws.root.parent / "prefect"))}
    log = ws.root.parent / "watch.log"  # what the watcher said, for a failure's message

    def said() -> str:
        return log.read_text(errors="replace")[-3000:]

    with log.open("wb") as out, processes.running(command, sig=signal.SIGKILL, env=env, stdout=out,
                                                  stderr=subprocess.STDOUT) as proc:
        deadline = time.monotonic() + 180
        checkpoints = []
        while time.monotonic() < deadline and not checkpoints:
            checkpoints = list(ws.runs_dir.glob("update-batch-01-v1-*/train.pt"))
            assert proc.poll() is None, f"the watcher exited {proc.returncode} before it could be killed:\n{said()}"
            time.sleep(0.2)
        assert checkpoints, f"no checkpoint appeared:\n{said()}"
        time.sleep(1.0)
    # leaving the block SIGKILLed the watcher's whole process group

    assert reg.aliases() == before_aliases
    assert [str(v.version) for v in reg.versions()] == before_versions
    assert not any(b == "batch-01" for b, _ in reg.ledger())  # not marked processed
    killed = [r for r in reg.running_runs() if r.data.tags.get("batch_id") == "batch-01"]
    assert len(killed) == 1  # left RUNNING by the dead process, for now

    results = watch_registry(str(ws.root))
    assert [r.batch_id for r in results] == ["batch-01"]
    assert results[0].status in ("promoted", "rejected")
    run = reg.client.get_run(results[0].run_id)
    assert int(run.data.tags["resumed_from_step"]) >= 8  # continued from the last checkpoint
    assert len(reg.versions()) == len(before_versions) + 1
    # the dead process's run is closed, not left as a phantom in the UI
    phantom = reg.client.get_run(killed[0].info.run_id)
    assert phantom.info.status == "KILLED" and phantom.data.tags["outcome"] == "killed"
    assert f"process {phantom.data.tags['owner_pid']}" in phantom.data.tags["reason"]
    assert reg.running_runs() == []
    # the verdict is published: nothing is left to resume, so the scratch is gone
    assert list(ws.runs_dir.glob("update-batch-01-*")) == [] and not (ws.runs_dir / results[0].run_id).exists()
