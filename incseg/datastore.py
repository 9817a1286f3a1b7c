"""The workspace's git + DVC repository: scaffolding and the data registry's versions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from incseg.config import PARAMS_FILE, Params

WORKSPACE_GITIGNORE = """\
# local state of the embedded defaults (MLflow store, scratch, quarantine, DVC remote)
/mlflow.db
/mlartifacts/
/runs/
/quarantine/
/dvc-remote/
"""


class StoreError(RuntimeError):
    """A git or DVC command failed; the message carries its output."""


def run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StoreError(f"`{' '.join(cmd)}` failed in {cwd}: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def git(root: Path, *args: str) -> str:
    """git, with a fallback identity where none is configured (fresh CI machines)."""
    who = subprocess.run(["git", "config", "user.email"], cwd=root, capture_output=True, text=True).stdout.strip()
    identity = [] if who else ["-c", "user.name=incseg", "-c", "user.email=incseg@localhost"]
    return run(["git", *identity, *args], root)


def dvc(root: Path, *args: str) -> str:
    return run([sys.executable, "-m", "dvc", *args], root)


def write_default_params(path: Path) -> None:
    header = "# incseg parameters: every knob, one section per concern. Paths are relative to this folder.\n"
    path.write_text(header + yaml.safe_dump(Params().model_dump(), sort_keys=False))


def init_workspace(root: Path, remote: str | None = None) -> Path:
    """A fresh workspace: params.yaml, data/, git + DVC initialised, a default DVC remote."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / PARAMS_FILE).exists():
        write_default_params(root / PARAMS_FILE)
    (root / "data" / "registry").mkdir(parents=True, exist_ok=True)
    gitignore = root / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text(WORKSPACE_GITIGNORE)
    if not (root / ".git").exists():
        git(root, "init", "-q")
    if not (root / ".dvc").exists():
        dvc(root, "init", "-q")
        dvc(root, "config", "core.analytics", "false")
        dvc(root, "remote", "add", "-d", "storage", remote or str((root / "dvc-remote").resolve()))
    git(root, "add", "-A")
    if git(root, "status", "--porcelain").strip():
        git(root, "commit", "-q", "-m", "incseg init")
    return root
