"""Data pushed from another machine: the watcher pulls the registry (git + DVC) before it looks.

Two clones of one workspace, as two machines hold them: a producer that runs `incseg data add`
(commit, `dvc push`, `git push`) and a serving machine that only runs the watcher.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from incseg.cli import app
from incseg.datastore import add_data, git, init_workspace
from incseg.registry import ModelRegistry
from incseg.workspace import Workspace

from helpers import fault_params, seed_store

pytestmark = [pytest.mark.slow, pytest.mark.cost(95)]
runner = CliRunner()


def head(root: Path) -> str:
    return git(root, "rev-parse", "HEAD").strip()


@pytest.fixture(scope="module")
def machines(tmp_path_factory, stream_dir, prefect_api):
    """origin.git and a DVC remote (the shared things), a producer clone with the holdout and batch-00
    pushed, and a serving clone that has never seen the data (no `dvc pull` by hand)."""
    top = tmp_path_factory.mktemp("machines")
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(top / "origin.git")], check=True)
    producer = init_workspace(top / "producer", remote=str(top / "dvc-remote"))
    (producer / "params.yaml").write_text(yaml.safe_dump(fault_params().model_dump()))
    git(producer, "commit", "-qam", "tiny params")
    git(producer, "branch", "-M", "main")
    git(producer, "remote", "add", "origin", str(top / "origin.git"))
    git(producer, "push", "-q", "-u", "origin", "main")
    prod = Workspace(producer)
    add_data(prod, stream_dir / "holdout", holdout=True, classes=stream_dir / "classes.yaml")
    add_data(prod, stream_dir / "registry" / "batch-00")  # commits, `dvc push`, `git push`
    subprocess.run(["git", "clone", "-q", str(top / "origin.git"), str(top / "server")], check=True)
    seed_store(top / "server")
    return prod, Workspace(top / "server")


def test_the_watcher_pulls_what_another_machine_pushed(machines, stream_dir):
    from flows.watch import watch_registry

    prod, server = machines
    assert not (server.registry_dir / "batch-00").exists()  # only the .dvc file came with the clone
    assert [(r.batch_id, r.status) for r in watch_registry(str(server.root))] == [("batch-00", "promoted")]
    assert (server.registry_dir / "batch-00" / "batch.yaml").exists() and server.holdout_dir.exists()

    add_data(prod, stream_dir / "registry" / "batch-01")  # on the producer: the server hears nothing
    assert [r.batch_id for r in watch_registry(str(server.root))] == ["batch-01"]  # judged: quality is not the point
    assert head(server.root) == head(prod.root)
    assert sorted(b for b, _ in ModelRegistry(server).ledger()) == ["batch-00", "batch-01"]


def test_a_divergent_or_unreachable_upstream_fails_in_one_line_and_changes_nothing(machines, stream_dir):
    prod, server = machines
    versions = len(ModelRegistry(server).versions())
    # the serving machine committed something of its own; the producer pushed another batch
    (server.root / "NOTES.md").write_text("local note\n")
    git(server.root, "add", "NOTES.md")
    git(server.root, "commit", "-qm", "a local commit")
    add_data(prod, stream_dir / "registry" / "batch-02")
    before = head(server.root)
    result = runner.invoke(app, ["-C", str(server.root), "watch"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "git pull --ff-only" in errors[0], result.output
    assert head(server.root) == before and not (server.registry_dir / "batch-02.dvc").exists()
    assert len(ModelRegistry(server).versions()) == versions

    git(server.root, "remote", "set-url", "origin", str(server.root.parent / "gone.git"))
    result = runner.invoke(app, ["-C", str(server.root), "watch"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "gone.git" in errors[0], result.output
    assert head(server.root) == before and len(ModelRegistry(server).versions()) == versions

    shutil.rmtree(prod.root.parent / "dvc-remote")  # the data's store is gone: git moves, DVC cannot follow
    git(server.root, "remote", "set-url", "origin", str(server.root.parent / "origin.git"))
    git(server.root, "reset", "-q", "--hard", "HEAD~1")  # the local commit dropped: a fast-forward again
    before = head(server.root)
    result = runner.invoke(app, ["-C", str(server.root), "watch"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "dvc pull" in errors[0], result.output
    assert head(server.root) == before  # the checkout went back with the data it cannot fetch
    assert len(ModelRegistry(server).versions()) == versions
