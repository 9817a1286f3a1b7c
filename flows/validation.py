"""Per-file extraction of a batch's validation table, mapped over shards on a task runner.

The runner comes from `validation.task_runner` in params: a thread pool by default, a local
or remote Dask cluster (prefect-dask), or a Ray cluster (prefect-ray). The GX suite then runs
once on the assembled table, so every runner gives the same report.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import flow, unmapped

from incseg.config import ConfigError, ValidationParams
from incseg.data.layout import read_classes
from incseg.datastore import batch_root
from incseg.validation.table import assemble, file_entries, shards
from incseg.workspace import Workspace
from tasks.validation import extract_rows


def task_runner(p: ValidationParams):
    """The Prefect task runner that `validation.task_runner` names."""
    if p.task_runner == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=p.workers)
    if p.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if p.runner_address:
            return DaskTaskRunner(address=p.runner_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": p.workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": ":0"})
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as err:
        raise ConfigError("validation.task_runner: ray needs prefect-ray (pip install prefect-ray)") from err
    return RayTaskRunner(address=p.runner_address, init_kwargs=None if p.runner_address else {"num_cpus": p.workers})


@flow(name="extract-file-table")
def extract_file_table(batch_dir: str, n_classes: int, shard_size: int = 256) -> pd.DataFrame:
    """Decode every file of the batch in parallel shards and assemble the table the suite checks."""
    entries = file_entries(Path(batch_dir))
    futures = extract_rows.map(shards(entries, shard_size), unmapped(n_classes))
    return assemble([row for rows in futures.result() for row in rows], n_classes)


def batch_file_table(ws: Workspace, batch_id: str) -> pd.DataFrame:
    """The batch's file table, extracted on the task runner from params."""
    p = ws.params.validation
    root = batch_root(ws, batch_id)
    n = len(read_classes(ws.classes_file))
    return extract_file_table.with_options(task_runner=task_runner(p))(str(root), n, p.shard_size)
