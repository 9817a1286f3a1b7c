"""Scale-out on real engines: validation on a local Dask cluster, training under torchrun (DDP)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from PIL import Image

from helpers import make_workspace, set_params, tiny_params
from incseg.config import ValidationParams
from incseg.pipeline import Batch, train_candidate
from incseg.registry import ModelRegistry
from incseg.update import judge
from incseg.validation import validate_table

N_CLASSES = 5


@pytest.fixture
def damaged_batch(stream_dir, tmp_path):
    """A copy of batch-01 with a truncated image and a mask carrying an unknown label id."""
    dst = tmp_path / "registry" / "batch-01"
    shutil.copytree(stream_dir / "registry" / "batch-01", dst)
    images = sorted((dst / "images").glob("*.png"))
    images[3].write_bytes(images[3].read_bytes()[:100])
    mask = dst / "masks" / images[7].name
    Image.new("L", Image.open(mask).size, 9).save(mask)
    return dst, images[3].stem, images[7].stem


def test_validation_on_a_local_dask_cluster_matches_the_thread_pool(damaged_batch, prefect_api):
    from flows.validation import extract_file_table, task_runner

    batch, truncated, unknown = damaged_batch
    reports, tables = {}, {}
    for kind in ("thread", "dask"):
        p = ValidationParams(task_runner=kind, workers=2)
        flow = extract_file_table.with_options(task_runner=task_runner(p))
        tables[kind] = flow(str(batch), N_CLASSES, shard_size=16)
        reports[kind] = validate_table(batch.name, tables[kind].copy(), p, N_CLASSES, [])[0].to_dict()
    pd.testing.assert_frame_equal(tables["thread"], tables["dask"])
    assert reports["thread"] == reports["dask"]
    assert len(tables["dask"]) == len(list((batch / "images").glob("*.png")))
    assert reports["dask"]["bad_stems"] == sorted([truncated, unknown])


def test_ddp_update_matches_one_process_and_registers_one_version(tmp_path, prefect_api):
    from flows.update import bootstrap, incremental_update

    single = tiny_params(train={"bootstrap_epochs": 12, "update_epochs": 6})
    ddp = tiny_params(train={"bootstrap_epochs": 12, "update_epochs": 6, "distributed": {"nproc": 2}})
    ws = make_workspace(tmp_path / "ws", ddp)
    boot = bootstrap("batch-00", str(ws.root))
    assert boot.status == "promoted" and boot.metrics["candidate.miou"] > 0.3

    reg = ModelRegistry(ws)
    champion = reg.load(reg.require_champion(), tmp_path / "models")
    batch = Batch.load(ws.registry_dir / "batch-01")
    alone, _ = train_candidate(single, champion.model, batch, champion.memory, progress=False)
    alone_miou = judge(ws, alone, champion.model, batch).candidate["miou"]

    result = incremental_update("batch-01", str(ws.root))
    assert [str(mv.version) for mv in reg.versions()] == ["1", "2"]  # rank 0 registered once
    assert result.candidate_version == "2"
    assert abs(result.metrics["candidate.miou"] - alone_miou) < 0.1, (result.metrics["candidate.miou"], alone_miou)
    run = reg.client.get_run(result.run_id)
    assert run.data.tags["world_size"] == "2"
    steps = [m.step for m in reg.client.get_metric_history(result.run_id, "train_loss")]
    assert steps == list(range(1, 7))  # one value per epoch: only rank 0 logs

    # a NaN on the ranks stops them all; the parent sees the divergence, nothing is registered
    diverging = tiny_params(train={"update_epochs": 2, "update_lr": 1e30, "distributed": {"nproc": 2}})
    ws = set_params(ws, diverging)
    bad = incremental_update("batch-02", str(ws.root))
    assert bad.status == "diverged" and "loss became" in bad.reason
    assert len(reg.versions()) == 2 and reg.aliases()["champion"] == result.champion_after
