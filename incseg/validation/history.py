"""What the registry held before a batch: image hashes (duplicates) and statistics (drift).

Profiles are cached per batch under `runs/profiles/`, keyed by a cheap fingerprint of the
batch's files (names, sizes, mtimes), so validating a new batch reads only that batch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from incseg.data.layout import list_batches
from incseg.workspace import Workspace


@dataclass
class BatchProfile:
    batch_id: str
    fingerprint: str
    images: int
    image_sha256: list[str]
    class_share: list[float]  # mean pixel share of each class id
    brightness_mean: float
    brightness_std: float


def fingerprint(batch_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in batch_dir.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(batch_dir)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def profile_of(batch_id: str, table: pd.DataFrame, n_classes: int, fp: str = "") -> BatchProfile:
    ok = table[table["image_ok"] & table["mask_ok"]] if len(table) else table
    cols = [f"class_fraction_{c}" for c in range(n_classes)]
    share = ok[cols].fillna(0).mean().tolist() if len(ok) and set(cols) <= set(ok.columns) else [0.0] * n_classes
    bright = ok["brightness"].dropna() if "brightness" in ok else pd.Series(dtype=float)
    hashes = table["image_sha256"].dropna().tolist() if "image_sha256" in table else []
    return BatchProfile(batch_id, fp, len(ok), hashes, share, float(bright.mean()) if len(bright) else float("nan"),
                        float(bright.std(ddof=0)) if len(bright) else float("nan"))


def read_cached_profile(f: Path) -> BatchProfile | None:
    """A cached profile, or None when it is missing or damaged (it is then recomputed)."""
    try:
        prof = BatchProfile(**json.loads(f.read_bytes().decode("utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return None
    fields_ok = (isinstance(prof.fingerprint, str) and isinstance(prof.images, int) and isinstance(prof.image_sha256, list)
                 and isinstance(prof.class_share, list) and all(isinstance(x, (int, float)) for x in prof.class_share)
                 and all(isinstance(x, (int, float)) for x in (prof.brightness_mean, prof.brightness_std)))
    return prof if fields_ok else None


def earlier_profiles(registry: Path, batch_id: str | None, n_classes: int, cache: Path) -> list[BatchProfile]:
    """Profiles of the batches that sort before `batch_id` (the data seen so far); all when None."""
    return [cached_profile(registry / other, n_classes, cache / f"{other}.json") for other in list_batches(registry)
            if batch_id is None or other < batch_id]


def holdout_hashes(ws: Workspace, n_classes: int) -> frozenset[str]:
    """The holdout's image hashes: a training batch holding one of its images would be judged on what
    it was trained on (validation's `not_in_holdout`). Cached as a batch's profile is."""
    if not ws.holdout_dir.is_dir():
        return frozenset()
    return frozenset(cached_profile(ws.holdout_dir, n_classes, ws.runs_dir / "profiles-holdout" / "holdout.json")
                     .image_sha256)


def cached_profile(folder: Path, n_classes: int, f: Path) -> BatchProfile:
    """The profile of the batch `folder`, read from the cache file `f` while the folder's fingerprint
    matches, else computed and written there."""
    from incseg.validation.table import file_table

    fp = fingerprint(folder)
    cached = read_cached_profile(f)
    if cached is not None and cached.fingerprint == fp and len(cached.class_share) == n_classes:
        return cached
    prof = profile_of(folder.name, file_table(folder, n_classes), n_classes, fp)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(asdict(prof)))
    return prof


def reference(profiles: list[BatchProfile], n_classes: int) -> dict | None:
    """Pooled class shares and brightness of earlier batches; None when there are none."""
    usable = [p for p in profiles if p.images > 0]
    if not usable:
        return None
    w = np.array([p.images for p in usable], dtype=float)
    share = np.average(np.array([p.class_share for p in usable]), axis=0, weights=w)
    means = np.array([p.brightness_mean for p in usable])
    mean = float(np.average(means, weights=w))
    var = float(np.average(np.array([p.brightness_std for p in usable]) ** 2 + (means - mean) ** 2, weights=w))
    return {"class_share": share.tolist(), "brightness_mean": mean, "brightness_std": max(var**0.5, 1e-6),
            "batches": [p.batch_id for p in usable]}


def trained_on_holdout(ws: Workspace, n_classes: int) -> dict[str, int]:
    """Registered batch -> how many of its images the holdout holds (none listed when it holds none):
    the models trained on those batches would be judged on what they were trained on."""
    held = holdout_hashes(ws, n_classes)
    counts = {p.batch_id: sum(h in held for h in p.image_sha256)
              for p in earlier_profiles(ws.registry_dir, None, n_classes, ws.runs_dir / "profiles")}
    return {b: n for b, n in counts.items() if n}
