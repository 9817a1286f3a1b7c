"""Batch validation: per-file table → Great Expectations suite → report, quarantine.

Validation never changes the registry (it is versioned data): bad file pairs are copied
to `quarantine/<batch_id>/` with a `reason.json`, and training skips them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from incseg.config import ValidationParams
from incseg.data.layout import BLACK_AND_WHITE, Pair, nothing_labelled
from incseg.validation.history import BatchProfile, profile_of, reference
from incseg.validation.suite import MESSAGES, OBSERVED, run_suite
from incseg.validation.table import file_table


@dataclass
class FileFailure:
    stem: str
    check: str
    observed: str
    message: str


@dataclass
class ValidationReport:
    batch_id: str
    files: int
    failures: list[FileFailure] = field(default_factory=list)
    batch_errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    valid_stems: list[str] = field(default_factory=list)
    drift: dict = field(default_factory=dict)

    @property
    def rejected(self) -> bool:
        return bool(self.batch_errors)

    @property
    def bad_stems(self) -> list[str]:
        return sorted({f.stem for f in self.failures})

    def to_dict(self) -> dict:
        return {**asdict(self), "rejected": self.rejected, "bad_stems": self.bad_stems}

    def markdown(self) -> str:
        lines = [f"# Validation of `{self.batch_id}`", "",
                 f"{self.files} files, {len(self.valid_stems)} valid, {len(self.bad_stems)} quarantined; "
                 f"**{'REJECTED' if self.rejected else 'accepted'}**", ""]
        for title, items in (("Batch errors", self.batch_errors), ("Warnings", self.warnings)):
            if items:
                lines += [f"## {title}", *[f"- {i}" for i in items], ""]
        if self.failures:
            lines += ["## File failures", "", "| file | check | observed | meaning |", "|---|---|---|---|"]
            lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in (f.stem, f.check, f.observed, f.message))
                      + " |" for f in self.failures]  # a `|` in a file name or a reason would split its cell
        return "\n".join(lines) + "\n"


def _with_history_columns(table: pd.DataFrame, earlier: list[BatchProfile], holdout: Collection[str]) -> pd.DataFrame:
    seen = {h: p.batch_id for p in earlier for h in p.image_sha256}
    sha = table["image_sha256"] if "image_sha256" in table else pd.Series([None] * len(table), dtype=object)
    table["seen_in"] = [seen.get(h, "") if isinstance(h, str) else "" for h in sha]
    table["in_holdout"] = [isinstance(h, str) and h in holdout for h in sha]
    table["first_of_hash"] = ~(sha.notna() & sha.duplicated(keep="first"))
    return table


def _observed(table: pd.DataFrame, stem: str, check: str) -> str:
    col = OBSERVED.get(check)
    if col is None or col not in table:
        return ""
    value = table.loc[table["stem"] == stem, col].iloc[0]
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def validate_table(batch_id: str, table: pd.DataFrame, p: ValidationParams, n_classes: int,
                   earlier: list[BatchProfile], docs: Path | None = None, holdout: Collection[str] = ()
                   ) -> tuple[ValidationReport, dict]:
    """Run the suite on an extracted table; returns the report and GX's raw result (and writes
    GX's Data Docs for it into `docs`, if given). `holdout`: the holdout's image hashes
    (`history.holdout_hashes`), which a training batch must not contain."""
    table = _with_history_columns(table, earlier, holdout)
    ref = reference(earlier, n_classes)
    outcomes, raw = run_suite(table, p, ref, docs)
    report = ValidationReport(batch_id, len(table))
    for o in outcomes:
        if o.success:
            continue
        if o.failing_stems:
            report.failures += [FileFailure(s, o.check, _observed(table, s, o.check), MESSAGES[o.check])
                                for s in o.failing_stems]
        elif o.severity == "warning":
            report.warnings.append(f"{o.check}: {MESSAGES[o.check]}, observed {_figure(o.observed)}")
        else:
            report.batch_errors.append(f"{o.check}: {MESSAGES[o.check]}, observed {_figure(o.observed)}")
    bad = set(report.bad_stems)
    report.valid_stems = [s for s in table["stem"] if s not in bad]
    _batch_level(report, table, p, ref, n_classes)
    return report, raw


def _commonest(report: ValidationReport) -> str:
    """Why most files failed, for a batch rejected as a whole: the commonest check, its count, one file's
    reason (a folder of 16-bit photos read "0/12 valid" and nothing more)."""
    if not report.failures:
        return ""
    stems: dict[str, set[str]] = {}
    for f in report.failures:
        stems.setdefault(f.check, set()).add(f.stem)
    check = max(stems, key=lambda c: len(stems[c]))
    example = next(f for f in report.failures if f.check == check)
    return f"; most often {check} ({len(stems[check])} files; e.g. {example.stem}: {example.observed})"


def _figure(value: object) -> str:
    """An observed value as read: a float to four significant digits (GX gives a mean's full repr)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _batch_level(report: ValidationReport, table: pd.DataFrame, p: ValidationParams, ref: dict | None,
                 n_classes: int) -> None:
    """Re-send, too few valid files, nothing labelled but ignore, and class-distribution drift."""
    if report.files == 0:
        report.batch_errors.append("empty batch: no images or masks found")
        return
    ids = {int(i) for row in table.get("label_ids", ()) if isinstance(row, str) for i in row.split(",") if i}
    if nothing_labelled(ids):  # each file fails as empty: say why they all do
        report.batch_errors.append(f"nothing labelled: {BLACK_AND_WHITE}")
    resent = table["seen_in"].ne("").mean()
    if resent > p.max_resent_fraction:
        sources = sorted(set(table["seen_in"]) - {""})
        report.batch_errors.append(f"re-send: {resent:.0%} of the images are already in the registry ({', '.join(sources)})")
    valid = len(report.valid_stems) / report.files
    if valid < p.min_valid_fraction:
        report.batch_errors.append(f"too few valid files: {len(report.valid_stems)}/{report.files} ({valid:.0%} < "
                                   f"{p.min_valid_fraction:.0%}, validation.min_valid_fraction)" + _commonest(report))
    if ref is not None and report.valid_stems:
        now = profile_of(report.batch_id, table[table["stem"].isin(report.valid_stems)], n_classes).class_share
        distance = 0.5 * float(np.abs(np.array(now) - np.array(ref["class_share"])).sum())
        report.drift = {"class_distance": round(distance, 4), "reference_batches": ref["batches"],
                        "class_share": [round(x, 4) for x in now], "reference_share": [round(x, 4) for x in ref["class_share"]]}
        if distance > p.drift_max_class_distance:
            msg = f"class_drift: class pixel shares moved {distance:.3f} (total variation) from the data seen so far"
            (report.batch_errors if p.drift_blocks else report.warnings).append(msg)


def validate_batch(batch_dir: Path, n_classes: int, p: ValidationParams, earlier: list[BatchProfile] | None = None,
                   table: pd.DataFrame | None = None, docs: Path | None = None, holdout: Collection[str] = ()
                   ) -> tuple[ValidationReport, pd.DataFrame, dict]:
    """Validate the batch folder; `earlier` are the profiles of data seen so far, `holdout` the
    holdout's image hashes. `table` is the batch's file table when it was extracted elsewhere (in
    parallel shards); `docs`, a folder for GX's Data Docs of this validation."""
    table = file_table(batch_dir, n_classes) if table is None else table
    report, raw = validate_table(batch_dir.name, table, p, n_classes, earlier or [], docs, holdout)
    return report, table, raw


def valid_pairs(table: pd.DataFrame, report: ValidationReport) -> list[Pair]:
    ok = table[table["stem"].isin(report.valid_stems)]
    return [Pair(r.stem, Path(r.image_path), Path(r.mask_path)) for r in ok.itertuples()]


def quarantine(report: ValidationReport, table: pd.DataFrame, out: Path) -> Path | None:
    """Copy every failing file pair to `out/` with `reason.json`; the originals stay put."""
    if not report.failures:
        return None
    shutil.rmtree(out, ignore_errors=True)
    reasons: dict[str, list[dict]] = {}
    for f in report.failures:
        reasons.setdefault(f.stem, []).append({"check": f.check, "observed": f.observed, "message": f.message})
    for stem in reasons:
        row = table.loc[table["stem"] == stem].iloc[0]
        for kind in ("image", "mask"):
            src = row.get(f"{kind}_path")
            if isinstance(src, str) and Path(src).is_file() and not Path(src).is_symlink():
                (out / f"{kind}s").mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out / f"{kind}s" / Path(src).name)
    (out / "reason.json").write_text(json.dumps({"batch_id": report.batch_id, "files": reasons}, indent=2))
    return out
