"""The event each new data version announces: `incseg.batch.registered`, a Prefect event.

Prefect has no file sensor, so the producer of the data emits it (`incseg data add`, `incseg
data synth`, `incseg notify` from a CI job or a git hook); `incseg serve` runs the watcher on a
deployment trigger for it. The ephemeral API runs no automations, so without a Prefect server
(`PREFECT_API_URL` unset) nothing is sent.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from incseg import ledger
from incseg.data.layout import DataError
from incseg.datastore import StoreError, git
from incseg.workspace import Workspace

EVENT = "incseg.batch.registered"


def resource_prefix(ws: Workspace) -> str:
    return f"incseg.batch.{ws.params.model.name}"


def server_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def batch_registered(ws: Workspace, batch_id: str):
    """Emit `incseg.batch.registered` for a registered batch: resource `incseg.batch.<model>.<batch>`,
    payload batch_id, data_hash, git revision, workspace and the registration time, to the Prefect
    server at PREFECT_API_URL (callers check `server_url()` first). Returns the event."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    data_hash = ledger.registered(ws).get(batch_id)
    if data_hash is None:
        raise DataError(f"batch '{batch_id}' is not registered in {ws.registry_dir} (bring it in with `incseg data add`)")
    try:
        revision = git(ws.root, "rev-parse", "HEAD").strip()
    except StoreError:  # a plain folder has no revision
        revision = ""
    event = Event(
        event=EVENT,
        resource={"prefect.resource.id": f"{resource_prefix(ws)}.{batch_id}", "prefect.resource.name": batch_id},
        payload={"batch_id": batch_id, "data_hash": data_hash, "git_revision": revision, "workspace": str(ws.root),
                 "model": ws.params.model.name, "registered_at": datetime.now(timezone.utc).isoformat()},
    )

    async def send() -> None:
        async with get_events_client(reconnection_attempts=2) as client:
            await client.emit(event)

    asyncio.run(send())
    return event
