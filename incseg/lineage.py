"""What a model version was made from: the batch's content hash and the code's commit."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import incseg
from incseg.datastore import dvc_hash


def batch_hash(batch_dir: Path) -> str:
    """The batch's content hash: DVC's md5 from `<batch>.dvc` when tracked, else a sha256 of its files."""
    tracked = dvc_hash(batch_dir.with_name(batch_dir.name + ".dvc"))
    if tracked:
        return tracked
    h = hashlib.sha256()
    for f in sorted(p for p in batch_dir.rglob("*") if p.is_file()):
        h.update(f.relative_to(batch_dir).as_posix().encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return "sha256:" + h.hexdigest()


def code_version() -> str:
    """The git commit of the incseg code, or its package version outside a checkout."""
    src = Path(incseg.__file__).resolve().parent
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else f"incseg=={incseg.__version__}"


def lineage_tags(batch_id: str, batch_dir: Path, classes: list[int] | None, parent: str | None) -> dict[str, str]:
    """Tags every run and version carries: batch, content hash, parent version, code commit."""
    tags = {"batch_id": batch_id, "data_hash": batch_hash(batch_dir), "parent_version": parent or "",
            "code_version": code_version()}
    if classes is not None:
        tags["batch_classes"] = ",".join(map(str, classes))
    return tags
