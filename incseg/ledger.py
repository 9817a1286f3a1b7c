"""Which batches are registered, and which still need an update: the registry's data version
minus MLflow's ledger. Every entry point (watch, bootstrap, update, `dvc repro`) uses this rule."""

from __future__ import annotations

from dataclasses import dataclass

from incseg.data.layout import list_batches
from incseg.datastore import has_dvc, tracked_batches
from incseg.lineage import batch_hash
from incseg.registry import ModelRegistry
from incseg.workspace import Workspace


@dataclass(frozen=True)
class PendingBatch:
    batch_id: str
    data_hash: str


def registered(ws: Workspace) -> dict[str, str]:
    """Batch id -> content hash of every registered batch, in id order (oldest first). In a DVC
    workspace a batch is registered once DVC tracks it (`incseg data add`, `incseg data synth`); in
    a plain folder without DVC, every batch folder is."""
    if has_dvc(ws.root):
        return tracked_batches(ws.registry_dir)
    return {b: batch_hash(ws.registry_dir / b) for b in list_batches(ws.registry_dir)}


def pending(ws: Workspace) -> list[PendingBatch]:
    """Registered batches whose (id, content hash) has no finished run yet, oldest first.

    A batch whose content changed under the same id has a new hash, so it is new data.
    """
    done = ModelRegistry(ws).ledger()
    return [PendingBatch(b, h) for b, h in registered(ws).items() if (b, h) not in done]


def is_pending(ws: Workspace, item: PendingBatch) -> bool:
    """Re-checked under the update lock: another watcher may have processed it meanwhile."""
    return registered(ws).get(item.batch_id) == item.data_hash and \
        (item.batch_id, item.data_hash) not in ModelRegistry(ws).ledger()


def untracked(ws: Workspace) -> list[str]:
    """Batch folders that are not registered (every entry point ignores them)."""
    known = registered(ws)
    return [b for b in list_batches(ws.registry_dir) if b not in known]
