"""Scale-out on real engines: validation on a local Dask cluster, training under torchrun (DDP)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from helpers import make_workspace, set_params, tiny_params
from incseg.config import ValidationParams
from incseg.pipeline import Batch, train_candidate
from incseg.registry import ModelRegistry
from incseg.validation import validate_table

pytestmark = [pytest.mark.slow, pytest.mark.cost(90)]

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


DDP = {"bootstrap_max_steps": 48, "bootstrap_min_steps": 48, "update_max_steps": 36, "update_min_steps": 36,
       "eval_every": 12}


@pytest.fixture(scope="module")
def ddp_champion(tmp_path_factory, prefect_api):
    """A workspace whose updates train under torchrun on 2 CPU processes; the champion they start
    from is bootstrapped once in this process (the updates are what is under test)."""
    from flows.update import bootstrap

    ws = make_workspace(tmp_path_factory.mktemp("ddp") / "ws", tiny_params(train=DDP))
    boot = bootstrap("batch-00", str(ws.root))
    assert boot.status == "promoted" and boot.candidate_version == "1"
    return set_params(ws, tiny_params(train={**DDP, "distributed": {"nproc": 2}}))


def test_ddp_update_tracks_one_process_and_registers_one_version(ddp_champion, tmp_path):
    """Same data, same global batch: the DDP loss curve follows the one-process curve, and rank 0
    alone logs and registers."""
    from flows.update import incremental_update

    ws = ddp_champion
    reg = ModelRegistry(ws)
    champion = reg.load(reg.require_champion(), tmp_path / "models")
    batch = Batch.load(ws.registry_dir / "batch-01")
    _, alone = train_candidate(tiny_params(train=DDP), champion.model, batch, champion.memory, progress=False)

    elastic = set(Path(tempfile.gettempdir()).glob("torchelastic_*"))
    result = incremental_update("batch-01", str(ws.root))
    assert [str(mv.version) for mv in reg.versions()] == ["1", "2"]  # rank 0 registered once
    assert set(Path(tempfile.gettempdir()).glob("torchelastic_*")) == elastic  # torchrun's logs: in the scratch
    assert not list(ws.runs_dir.glob("update-batch-01-*"))  # which the verdict cleared
    assert result.candidate_version == "2"
    run = reg.client.get_run(result.run_id)
    assert run.data.tags["world_size"] == "2"
    ddp_loss = [(m.step, m.value) for m in reg.client.get_metric_history(result.run_id, "train_loss")]
    assert [s for s, _ in ddp_loss] == [12, 24, 36]  # one value per evaluation: only rank 0 logs
    for (_, ddp), point in zip(ddp_loss, alone.evals):
        assert abs(ddp - point.loss) < 0.25 * point.loss, (ddp_loss, [e.loss for e in alone.evals])
    assert ddp_loss[-1][1] < ddp_loss[0][1]  # and it learns


def test_torchrun_logs_beside_the_job_unless_its_args_name_a_folder():
    from incseg.launch import torchrun_command

    job = Path("/scratch/torchrun/job.json")
    assert "--log-dir=/scratch/torchrun/logs" in torchrun_command(job, 2, [])
    own = torchrun_command(job, 2, ["--log-dir=/var/log/elastic", "--nnodes=2"])
    assert [a for a in own if a.startswith("--log")] == ["--log-dir=/var/log/elastic"] and "--standalone" not in own


def test_a_nan_on_the_ranks_stops_them_all_and_registers_nothing(ddp_champion):
    from flows.update import incremental_update

    reg = ModelRegistry(ddp_champion)
    before = (reg.aliases(), len(reg.versions()))
    diverging = tiny_params(train={**DDP, "update_max_steps": 4, "eval_every": 2, "update_lr": 1e30,
                                   "distributed": {"nproc": 2}})
    ws = set_params(ddp_champion, diverging)
    bad = incremental_update("batch-02", str(ws.root))
    assert bad.status == "diverged" and "loss became" in bad.reason
    assert (reg.aliases(), len(reg.versions())) == before
    assert reg.client.get_run(bad.run_id).data.tags["outcome"] == "diverged"
