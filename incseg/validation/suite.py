"""The Great Expectations suite over the per-file table, and what its results mean per file.

GX runs on an ephemeral context with a pandas data source; results come back in the
`COMPLETE` format with the `stem` of every failing row, so each failure names its file.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from incseg.config import ValidationParams

# check name -> what a failure means, for the report
MESSAGES = {
    "image_present": "mask without image",
    "mask_present": "image without mask",
    "image_readable": "image unreadable",
    "mask_readable": "mask unreadable",
    "mask_single_channel": "mask is not a single-channel label map (8-bit L or palette P; RGB or 16-bit masks are refused)",
    "same_size": "image and mask sizes differ",
    "width_within_bounds": "image width out of bounds (validation.min_size, max_size)",
    "height_within_bounds": "image height out of bounds (validation.min_size, max_size)",
    "known_label_ids": "mask has label ids not in classes.yaml",
    "ignore_fraction_bounded": "too much of the mask is ignore, 255 (validation.max_ignore_fraction)",
    "mask_not_empty": ("mask is all background/ignore (validation.min_foreground_fraction; 0 takes images without "
                       "objects)"),
    "unique_in_batch": "duplicate of another image in this batch",
    "not_in_registry": "image already in the registry",
    "not_in_holdout": "image is in the holdout (the gate's test set): training on it would inflate every verdict",
    "batch_size": "number of files in the batch out of bounds (validation.min_images, max_images)",
    "brightness_drift": "mean brightness far from the data seen so far (validation.drift_max_brightness_shift)",
}
# columns whose value explains a failure of that check
OBSERVED = {
    "image_present": "image_error", "mask_present": "mask_error",
    "image_readable": "image_error", "mask_readable": "mask_error",
    "mask_single_channel": "mask_mode", "same_size": "size_match", "width_within_bounds": "width",
    "height_within_bounds": "height", "known_label_ids": "unknown_label_ids", "ignore_fraction_bounded": "ignore_fraction",
    "mask_not_empty": "foreground_fraction", "unique_in_batch": "image_sha256", "not_in_registry": "seen_in", "not_in_holdout": "in_holdout",
}


@functools.lru_cache(maxsize=1)
def _context():
    """One ephemeral GX context per process (importing GX costs seconds), progress bars off."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for name in [n for n in logging.root.manager.loggerDict if n.startswith("great_expectations")] + \
            ["great_expectations"]:  # GX sets INFO on some of its own loggers: lines a user cannot act on
        logging.getLogger(name).setLevel(logging.WARNING)

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = ctx.data_sources.add_pandas("incseg").add_dataframe_asset("files").add_batch_definition_whole_dataframe("all")
    return gx, ctx, batch_def


def build_suite(p: ValidationParams, reference: dict | None):
    gx, _, _ = _context()
    E = gx.expectations

    def check(name, expectation, severity="critical"):
        expectation.meta = {"check": name}
        expectation.notes = f"{name}: a failure means {MESSAGES[name]}"  # shown in the Data Docs
        expectation.severity = severity
        return expectation

    def in_set(column, values):
        return E.ExpectColumnValuesToBeInSet(column=column, value_set=values)

    exps = [
        check("image_present", in_set("has_image", [True])),
        check("mask_present", in_set("has_mask", [True])),
        check("image_readable", in_set("image_read", [True])),
        check("mask_readable", in_set("mask_read", [True])),
        check("mask_single_channel", in_set("mask_mode", ["L", "P"])),
        check("same_size", in_set("size_match", [True])),
        check("width_within_bounds", E.ExpectColumnValuesToBeBetween(column="width", min_value=p.min_size, max_value=p.max_size)),
        check("height_within_bounds", E.ExpectColumnValuesToBeBetween(column="height", min_value=p.min_size, max_value=p.max_size)),
        check("known_label_ids", in_set("unknown_label_ids", [""])),
        check("ignore_fraction_bounded", E.ExpectColumnValuesToBeBetween(column="ignore_fraction", min_value=0,
                                                                         max_value=p.max_ignore_fraction)),
        check("mask_not_empty", E.ExpectColumnValuesToBeBetween(column="foreground_fraction",
                                                                min_value=p.min_foreground_fraction, max_value=1)),
        check("unique_in_batch", in_set("first_of_hash", [True])),
        check("not_in_registry", in_set("seen_in", [""])),
        check("not_in_holdout", in_set("in_holdout", [False])),
        check("batch_size", E.ExpectTableRowCountToBeBetween(min_value=p.min_images, max_value=p.max_images)),
    ]
    if reference is not None:
        shift = p.drift_max_brightness_shift * reference["brightness_std"]
        exps.append(check(
            "brightness_drift",
            E.ExpectColumnMeanToBeBetween(column="brightness", min_value=reference["brightness_mean"] - shift,
                                          max_value=reference["brightness_mean"] + shift),
            "critical" if p.drift_blocks else "warning",
        ))
    return gx.ExpectationSuite(name="incseg-batch", expectations=exps)


@dataclass
class ExpectationOutcome:
    check: str
    success: bool
    severity: str
    failing_stems: list[str]
    observed: object


def run_suite(table: pd.DataFrame, p: ValidationParams, reference: dict | None, docs: Path | None = None
              ) -> tuple[list[ExpectationOutcome], dict]:
    """Validate the table; returns per-check outcomes and GX's raw JSON result. With `docs`, GX's
    own Data Docs site for this validation (suite and result pages, `index.html`) is written there."""
    gx, ctx, batch_def = _context()
    suite = build_suite(p, reference)
    result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": ["stem"]}
    if docs is None:
        result = batch_def.get_batch(batch_parameters={"dataframe": table}).validate(suite, result_format=result_format)
    else:
        result = _validate_with_docs(gx, ctx, batch_def, suite, table, result_format, docs)
    outcomes = []
    for r in result.results:
        cfg = r.expectation_config
        failing = [row["stem"] for row in (r.result or {}).get("unexpected_index_list") or []]
        outcomes.append(ExpectationOutcome(cfg.meta["check"], bool(r.success), str(cfg.severity.value
                                           if hasattr(cfg.severity, "value") else cfg.severity),
                                           failing, (r.result or {}).get("observed_value")))
    return outcomes, result.to_json_dict()


DOCS_SITE = "incseg"


def _validate_with_docs(gx, ctx, batch_def, suite, table: pd.DataFrame, result_format: dict, docs: Path):
    """The same validation as a GX Checkpoint whose UpdateDataDocsAction builds a Data Docs site in
    `docs` that shows this validation only (the in-memory result store is emptied first)."""
    from great_expectations.checkpoint import UpdateDataDocsAction

    docs.mkdir(parents=True, exist_ok=True)
    if DOCS_SITE in (ctx.variables.data_docs_sites or {}):
        ctx.delete_data_docs_site(DOCS_SITE)
    ctx.add_data_docs_site(DOCS_SITE, {
        "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs.resolve())},
    })
    store = ctx.validation_results_store
    for key in store.list_keys():
        store.remove_key(key)
    suite = ctx.suites.add_or_update(suite)
    definition = ctx.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=suite.name, data=batch_def, suite=suite))
    checkpoint = ctx.checkpoints.add_or_update(gx.Checkpoint(
        name=suite.name, validation_definitions=[definition], result_format=result_format,
        actions=[UpdateDataDocsAction(name="data-docs", site_names=[DOCS_SITE])]))
    return next(iter(checkpoint.run(batch_parameters={"dataframe": table}).run_results.values()))
