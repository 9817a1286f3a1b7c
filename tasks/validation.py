"""Prefect task of the parallel validation: one shard of per-file metadata extraction."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from incseg.validation.table import Entry, file_rows


@task(cache_policy=NO_CACHE)
def extract_rows(entries: list[Entry], n_classes: int) -> list[dict]:
    """Decode the shard's files and measure them (sizes, label ids, hashes, errors)."""
    return file_rows(entries, n_classes)
