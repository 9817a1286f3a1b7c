"""Which registry batches still need an update: DVC's data version minus MLflow's ledger."""

from __future__ import annotations

from dataclasses import dataclass

from incseg.config import Workspace
from incseg.data.layout import list_batches
from incseg.datastore import tracked_batches
from incseg.registry import ModelRegistry


@dataclass(frozen=True)
class PendingBatch:
    batch_id: str
    data_hash: str


def pending(ws: Workspace) -> list[PendingBatch]:
    """DVC-tracked batches whose (id, content hash) has no finished run yet, oldest first.

    A batch whose content changed under the same id has a new hash, so it is new data.
    """
    done = ModelRegistry(ws).ledger()
    return [PendingBatch(b, h) for b, h in tracked_batches(ws.registry_dir).items() if (b, h) not in done]


def is_pending(ws: Workspace, item: PendingBatch) -> bool:
    """Re-checked under the update lock: another watcher may have processed it meanwhile."""
    return tracked_batches(ws.registry_dir).get(item.batch_id) == item.data_hash and \
        (item.batch_id, item.data_hash) not in ModelRegistry(ws).ledger()


def untracked(ws: Workspace) -> list[str]:
    """Batch folders that DVC does not track (the watcher ignores them)."""
    tracked = tracked_batches(ws.registry_dir)
    return [b for b in list_batches(ws.registry_dir) if b not in tracked]
