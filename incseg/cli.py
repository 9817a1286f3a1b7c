"""The `incseg` command line: parses, calls flows or the library, prints."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Column, Table
from rich.text import Text
from typer.core import TyperGroup

from incseg.bench import ABLATION
from incseg.config import PARAMS_FILE, UPDATE_RULE_SHARED, ConfigError, Style
from incseg.data.layout import (IMAGE_SUFFIXES, IMAGES_DIR, MASKS_DIR, BatchInfo, DataError, list_batches, list_files,
                                 read_classes)
from incseg.datastore import StoreError, batch_root, holdout_gap
from incseg.workspace import Workspace


class Failure(Exception):
    """An expected failure (bad input, missing champion, unknown version)."""


def expected_failures() -> tuple[type[Exception], ...]:
    """The errors that end a command with one line. The heavy modules' errors are looked up only if
    the command imported them (an error of a module never imported cannot have been raised), so a
    bad `params.yaml` is reported at once, not after importing MLflow and torch."""
    import sys

    kinds: list[type[Exception]] = [Failure, ConfigError, DataError, StoreError]
    for module, name in (("incseg.registry", "RegistryError"), ("incseg.training", "DivergenceError")):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return tuple(kinds)


class _Group(TyperGroup):
    """Expected failures become one line on stderr and exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as err:
            if not isinstance(err, expected_failures()):
                raise
            Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {err}", highlight=False)
            raise typer.Exit(1) from None


app = typer.Typer(cls=_Group, help="Keep a segmentation model up to date incrementally.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False,
                  rich_markup_mode="markdown")
data_app = typer.Typer(help="Create and bring in data batches.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()

DEMO_MARKER = ".incseg-demo"


def run() -> None:
    """The `incseg` program. SIGTERM ends it as Ctrl-C does (`processes.exit_on_sigterm`), so the
    Prefect server `serve` started, or the one Prefect's ephemeral API starts for a flow run, goes too."""
    import sys

    from incseg.processes import exit_on_sigterm

    exit_on_sigterm()
    sys.exit(app(prog_name="incseg"))


def workspace(ctx: typer.Context, required: bool = True) -> Workspace:
    """The workspace `-C` names. Where `required`, a folder without `params.yaml` is refused: a mistyped
    `-C` (or a command run in the wrong folder) made a folder and an empty MLflow store there, and
    `incseg models` listed no versions."""
    root = Path(ctx.obj["workspace"])
    if required and not (root / PARAMS_FILE).is_file():
        raise Failure(f"{root.resolve()}: not an incseg workspace (no {PARAMS_FILE}): `incseg init {root}` makes one, "
                      "or `-C DIR` names one")
    return Workspace(root)


@app.callback()
def main(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Option("-C", "--workspace", help="Workspace directory.")] = Path("."),
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N (overrides train.device).")] = None,
) -> None:
    """Every command works on a workspace: params.yaml, data/, the MLflow store, git + DVC."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    quiet_mlflow()
    if device:
        os.environ["INCSEG_DEVICE"] = device
    ctx.obj = {"workspace": directory}


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Folder to scaffold (created if missing).")],
    remote: Annotated[Optional[str], typer.Option(help="DVC remote URL (default: DIR/dvc-remote).")] = None,
) -> None:
    """Scaffold a workspace: params.yaml, data/, git + DVC with a local remote."""
    from incseg.datastore import init_workspace

    root = init_workspace(directory, remote)
    console.print(f"workspace ready at {root.resolve()}")


@data_app.command("synth")
def data_synth(
    ctx: typer.Context,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: the workspace's data/).")] = None,
    size: Annotated[Optional[int], typer.Option(help="Image side in pixels.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    style: Annotated[Optional[Style], typer.Option(help="The look (default: synth.style).")] = None,
) -> None:
    """Write the seeded synthetic class-incremental stream: holdout, batches, classes.yaml."""
    from incseg.config import SynthParams
    from incseg.data.synthetic import synthesize
    from incseg.datastore import dvc_remote, has_dvc, track_all

    ws = workspace(ctx, required=False)
    chosen = {"size": size, "seed": seed, "style": style}
    p = SynthParams.model_validate({**ws.params.synth.model_dump(), **{k: v for k, v in chosen.items() if v is not None}})
    target = out or ws.data_dir
    infos = synthesize(target, p)
    table = Table("batch", "kind", "annotated classes", "new classes", title=f"synthetic stream in {target}")
    for i in infos:
        table.add_row(i.batch_id, i.kind, ", ".join(map(str, i.classes)), ", ".join(map(str, i.new_classes)))
    console.print(table)
    if out is None and has_dvc(ws.root):  # into the workspace: registered like `data add` does it
        folders = [ws.holdout_dir, *(ws.registry_dir / i.batch_id for i in infos)]
        track_all(ws.root, folders, f"data: synthetic stream ({p.style}, seed {p.seed})", [ws.classes_file])
        console.print(f"registered with DVC: holdout and {len(infos)} batches (committed"
                      f"{', pushed' if dvc_remote(ws.root) else ''})")
        announce(ws, [i.batch_id for i in infos], required=False)


@data_app.command("add")
def data_add(
    ctx: typer.Context,
    src: Annotated[Path, typer.Argument(help=f"A folder of {IMAGES_DIR}/ + {MASKS_DIR}/ (paired by file name), "
                                             "a Pascal VOC or a Cityscapes layout.")],
    batch_id: Annotated[Optional[str], typer.Option(help="Registry batch id (default: SRC's folder name).")] = None,
    holdout: Annotated[bool, typer.Option("--holdout", help="Make SRC the fixed holdout instead.")] = False,
    force: Annotated[bool, typer.Option(help="Allow replacing an existing holdout.")] = False,
    layout: Annotated[str, typer.Option(help="auto | folder | voc | cityscapes")] = "auto",
    split: Annotated[str, typer.Option(help="VOC image set / Cityscapes split to import.")] = "train",
    classes: Annotated[Optional[Path], typer.Option(help="classes.yaml to install if the workspace has none, or "
                                                    "its names with new classes after them (ids it names stay).")
                       ] = None,
    colours: Annotated[Optional[Path], typer.Option(help="Colour-coded RGB masks: a YAML table of label id -> "
                                                    "[R, G, B] or \"#RRGGBB\" (255: ignore); every colour "
                                                    "in a mask must be listed. A table of greys reads gray "
                                                    "masks too (black-and-white masks: 0: '#000000', 1: "
                                                    "'#ffffff'). Installed as the workspace's if it has "
                                                    "none: later batches and `predict` use it.")] = None,
) -> None:
    """Bring a batch into the DVC-tracked registry (dvc add, git commit, dvc push)."""
    from rich.progress import track

    from incseg.datastore import add_data

    ws = workspace(ctx, required=False)
    console.print(f"{src}: reading and copying the pairs, then dvc add, git commit, dvc push ...", highlight=False)
    dst, info, h = add_data(ws, src, batch_id, holdout=holdout, force=force, layout=layout, split=split,
                            classes=classes, colours=colours,
                            progress=lambda pairs: track(pairs, description=f"importing {src.name}", console=console,
                                                         transient=True, disable=not console.is_terminal))
    console.print(f"{dst.name}: {len(list((dst / 'masks').iterdir()))} pairs, classes {info.classes}, DVC {h}")
    gap = None if holdout else holdout_gap(ws, dst.name, info.classes)
    if gap:  # said now, while the user is here: an update on it would be refused, and the watcher wait on it
        console.print(f"[yellow]warning:[/yellow] {gap}; until then updates on it are refused, and the watcher "
                      "leaves it waiting (later batches go on)", highlight=False)
    if holdout:  # a fresh look: the size `auto` stands for follows the new holdout
        from incseg.validation.history import trained_on_holdout

        fresh = Workspace(ws.root)
        shape = fresh.holdout_shape()
        console.print(f"holdout images {size_text(shape)} (width x height, median): models train at "
                      f"{fresh.params.data.image_size} px (data.image_size)"
                      if shape else "the holdout has no readable images")
        shared = trained_on_holdout(ws, len(read_classes(ws.classes_file))) if ws.classes_file.exists() else {}
        if shared:  # the batches' models were trained on these images: their verdicts would be inflated
            listed = ", ".join(f"{b} ({n})" for b, n in shared.items())
            console.print(f"[yellow]warning:[/yellow] {sum(shared.values())} of the holdout's images are in "
                          f"registered batches: {listed}; models trained on them are judged on their own "
                          "training images (later batches holding them are refused those files)", highlight=False)
    else:
        announce(ws, [dst.name], required=False)


@app.command()
def notify(
    ctx: typer.Context,
    batch_ids: Annotated[list[str], typer.Argument(help="Registered batch ids (committed and pushed).")],
) -> None:
    """Emit `incseg.batch.registered` for batches already registered (a CI job, a git hook on
    another machine): a served watcher updates on them at once. Needs PREFECT_API_URL."""
    announce(workspace(ctx), batch_ids, required=True)


def announce(ws: Workspace, batch_ids: list[str], required: bool) -> bool:
    """The data-version event for each batch; one line when it could not be sent (a failure when
    `required`). True if sent."""
    from flows.events import batch_registered, server_url

    if server_url() is None:
        message = "no event sent: PREFECT_API_URL is not set (the ephemeral API runs no automations)"
        if required:
            raise Failure(message)
        console.print(f"{message}; a served watcher finds the batch on its next scheduled tick")
        return False
    try:
        for batch_id in batch_ids:
            batch_registered(ws, batch_id)
    except (OSError, RuntimeError, TimeoutError) as err:  # websockets' errors derive from these
        message = f"event not sent to {server_url()}: {type(err).__name__}: {str(err)[:200]}"
        if required:
            raise Failure(message) from None
        console.print(f"[yellow]warning:[/yellow] {message}; a served watcher finds the batch on its next tick")
        return False
    console.print(f"event incseg.batch.registered sent for {', '.join(batch_ids)}")
    return True


@app.command()
def watch(
    ctx: typer.Context,
    metrics: Annotated[Optional[Path], typer.Option(help="Write the champion's metrics here (for DVC).")] = None,
) -> None:
    """Update on every new data version in the registry now (what the schedule runs)."""
    flows_ready()
    from flows.watch import watch_registry
    from incseg.registry import ModelRegistry

    ws = workspace(ctx)
    results = watch_registry(str(ws.root))
    if not results:
        console.print("no new data version: nothing to do")
    for r in results:
        print_result(r)
    if metrics is not None:
        write_json(ws.path(metrics), ModelRegistry(ws).champion_metrics())


@app.command()
def serve(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port of the local Prefect server started when PREFECT_API_URL is unset.")] = 4200,
) -> None:
    """Serve the watcher on the schedule in params.yaml (Prefect; Ctrl-C stops)."""
    quiet_prefect()
    os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"  # a long-running service should say what it does
    from flows.events import server_url
    from flows.watch import prefect_api, serve_watcher

    ws = workspace(ctx)
    s = ws.params.schedule
    if server_url() is None:
        free_port_or_fail(port, "the local Prefect server")
    with prefect_api(port) as url:
        console.print(f"serving the watcher for {ws.root} every {s.cron or f'{s.interval_seconds} s'} via {url}")
        serve_watcher(ws)


@app.command()
def validate(
    ctx: typer.Context,
    path: Annotated[Optional[Path], typer.Argument(help="A batch folder, or the registry folder to validate every "
                                                        "batch (default: the workspace's registry).")] = None,
    quarantine_to: Annotated[Optional[Path], typer.Option("--quarantine", help="Copy failing pairs here.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write a JSON summary here.")] = None,
    no_fail: Annotated[bool, typer.Option("--no-fail", help="Exit 0 even when a batch would be rejected.")] = False,
    docs: Annotated[Optional[Path], typer.Option(help="Write GX's Data Docs site here (one folder per batch, "
                                                      "open index.html).")] = None,
    split: Annotated[str, typer.Option(help="VOC image set / Cityscapes split to validate (as `data add`).")] = "train",
    colours: Annotated[Optional[Path], typer.Option(help="Colour table of colour-coded masks, as `data add "
                                                    "--colours` (default: the workspace's, if any).")] = None,
) -> None:
    """Validate with the Great Expectations suite; exit 1 when a batch would be rejected. A Pascal VOC
    or Cityscapes folder, or one of colour-coded masks, is validated as `incseg data add` would
    register it."""
    import tempfile

    ws = workspace(ctx, required=False)
    path = ws.registry_dir if path is None else path
    if not path.is_dir():
        raise Failure(f"{path} is not a folder")
    docs_root = ws.path(docs) if docs is not None else None
    with tempfile.TemporaryDirectory(prefix="incseg-validate-") as tmp:
        batches = [path / b for b in list_batches(path)] if path.resolve() == ws.registry_dir else \
            [as_registered(ws, path, split, colours, Path(tmp))]
        layouts = Path(tmp) / "classes.yaml"  # a VOC / Cityscapes layout's names, where the workspace has none
        n = len(read_classes(layouts if layouts.exists() and not ws.classes_file.exists() else ws.classes_file))
        summary = {b.name: validate_one(ws, b, n, quarantine_to, docs_root / b.name if docs_root else None)
                   for b in batches}
    if report is not None:
        write_json(ws.path(report), {"batches": summary, "rejected": sorted(k for k, v in summary.items() if v["rejected"])})
    if any(v["rejected"] for v in summary.values()) and not no_fail:
        raise typer.Exit(1)


def as_registered(ws: Workspace, src: Path, split: str, colours: Path | None, tmp: Path) -> Path:
    """The folder to validate for SRC: itself when it is in the registry's layout (images/ + masks/) with
    label-id masks; a Pascal VOC or Cityscapes layout, or colour-coded masks with a colour table
    (`colours`, else the workspace's), imported into `tmp` as `data add` would (ids mapped, a layout's
    class names in `tmp/classes.yaml`), since the suite reads the registry's layout and label ids."""
    from incseg.data.importers import colour_coded, detect_layout, import_batch, read_colours

    try:
        layout = detect_layout(src)
    except DataError:
        return src  # no known layout: the suite reports what is missing
    colours = colours or (ws.colours_file if ws.colours_file.exists() else None)
    if layout == "folder" and (colours is None or not colour_coded(src, read_colours(colours))):
        return src  # as it is: each bad file is named by the suite (an import stops at the first)
    what = f"{layout} layout, split {split}" if layout != "folder" else f"colour-coded masks, colours from {colours}"
    dst = tmp / src.resolve().name
    with console.status(f"reading {src} ({what}) as `incseg data add` would ..."):
        import_batch(src, dst, layout, split, tmp / "classes.yaml" if layout != "folder" else None, colours)
    console.print(f"{src}: {what}: validated as `incseg data add` would register it")
    return dst


def validate_one(ws: Workspace, batch_dir: Path, n: int, quarantine_to: Path | None, docs: Path | None) -> dict:
    from incseg.validation import quarantine, validate_batch
    from incseg.validation.history import earlier_profiles, holdout_hashes

    in_registry = batch_dir.resolve().parent == ws.registry_dir
    earlier = earlier_profiles(ws.registry_dir, batch_dir.name if in_registry else None, n, ws.runs_dir / "profiles")
    held = frozenset() if batch_dir.resolve() == ws.holdout_dir.resolve() else holdout_hashes(ws, n)
    with console.status(f"validating {batch_dir} ..."):
        report, table, _ = validate_batch(batch_dir, n, ws.params.validation, earlier, docs=docs, holdout=held)
    if report.failures:
        failures = Table("file", "check", "observed", "meaning", box=box.SIMPLE,
                         title=f"{batch_dir.name}: {len(report.bad_stems)} failing files")
        for f in report.failures[:SHOWN_FAILURES]:
            failures.add_row(f.stem, f.check, _short(f.observed, 200), f.message)  # the reason whole (wrapped)
        console.print(failures)
        if len(report.failures) > SHOWN_FAILURES:  # a folder failing as a whole (RGB masks...): not 10,000 rows
            counts = Counter(f.check for f in report.failures[SHOWN_FAILURES:])
            console.print(f"... and {len(report.failures) - SHOWN_FAILURES} more failures ("
                          + ", ".join(f"{c} {n}" for c, n in counts.most_common())
                          + "): `--report FILE` lists every one", highlight=False)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    for e in report.batch_errors:
        console.print(f"[red]batch error:[/red] {e}")
    if quarantine_to is not None and quarantine(report, table, quarantine_to / batch_dir.name):
        console.print(f"failing pairs copied to {quarantine_to / batch_dir.name}")
    if docs is not None:
        console.print(f"Data Docs: {docs / 'index.html'}")
    verdict = "[red]REJECTED[/red]" if report.rejected else "[green]accepted[/green]"
    console.print(f"{batch_dir.name}: {report.files} files, {len(report.valid_stems)} valid: {verdict}")
    return {"files": report.files, "valid": len(report.valid_stems), "rejected": report.rejected,
            "warnings": len(report.warnings), "failures": [asdict(f) for f in report.failures]}


def free_port_or_fail(port: int, what: str) -> None:
    from incseg.processes import port_taken

    if port_taken(port):
        raise Failure(f"port {port} on 127.0.0.1 is in use (another server?): give {what} another with --port N")


SHOWN_FAILURES = 20  # rows of `incseg validate`'s failure table; the rest are counted by check


def write_json(path: Path, payload: dict) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))


def flows_ready() -> None:
    """Before a command runs flows: Prefect's output quieted, and on a machine without a Prefect
    database yet the ephemeral API started under a file lock (`flows.watch.start_ephemeral_api`), so
    that commands started together do not race on creating it."""
    quiet_prefect()
    from flows.watch import start_ephemeral_api

    start_ephemeral_api()


def quiet_mlflow() -> None:
    """Every command: MLflow's download bars and INFO lines (its tables created; a version registered,
    which `registry.events_at_log_level` holds to this level) repeat what the command prints. A level
    the user set is kept; INCSEG_DEBUG=1 keeps them all."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if os.environ.get("INCSEG_DEBUG"):
        return
    import logging

    level = os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    logging.getLogger("mlflow").setLevel(level.upper())  # and if it already is


def quiet_prefect() -> None:
    """Prefect's INFO lines would drown the CLI's output; warnings still show, as one line each: the
    failure itself is reported by the CLI (INCSEG_DEBUG=1 keeps tracebacks)."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    if os.environ.get("INCSEG_DEBUG"):
        return
    import logging

    make_record = logging.getLogRecordFactory()

    def one_line(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if record.name.startswith("prefect"):
            record.exc_info = None
        return record

    logging.setLogRecordFactory(one_line)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def print_result(result) -> None:
    colour = {"promoted": "green", "rejected": "yellow", "waiting": "yellow"}.get(result.status, "red")
    console.print(f"[bold]{result.batch_id}[/bold]: [{colour}]{result.status}[/{colour}] - {result.reason}")
    if result.candidate_version:
        console.print(f"  candidate version {result.candidate_version}; champion "
                      f"{result.champion_before or '-'} -> {result.champion_after or '-'}")


@app.command()
def bootstrap(
    ctx: typer.Context,
    batch: Annotated[Optional[str], typer.Argument(metavar="batch_id", show_default=False, help="Batch id in "
                                                   "data/registry/ (default: the oldest registered).")] = None,
    batch_id: Annotated[Optional[str], typer.Option(help="The same, as an option (scripts, dvc.yaml).")] = None,
    if_missing: Annotated[bool, typer.Option("--if-missing", help="Do nothing when a champion exists.")] = False,
    metrics: Annotated[Optional[Path], typer.Option(help="Write the champion's metrics here (for DVC).")] = None,
) -> None:
    """Train a model from scratch on one batch: the first becomes `champion`; a later one is judged
    against the champion by the gate, like an update's candidate."""
    if batch is not None and batch_id is not None and batch != batch_id:
        raise Failure(f"two batches named: {batch} and --batch-id {batch_id}; give one")
    batch_id = batch or batch_id
    flows_ready()
    from flows.update import bootstrap as bootstrap_flow
    from incseg.registry import ModelRegistry

    ws = workspace(ctx)
    reg = ModelRegistry(ws)
    champion = reg.champion()
    if if_missing and champion is not None:
        console.print(f"champion is version {champion.version}: nothing to bootstrap")
    else:
        from incseg.ledger import registered

        batches = list(registered(ws))
        if not batches:
            raise Failure(f"no registered batches in {ws.registry_dir}: run `incseg data add` or `incseg data synth`")
        refuse_early(ws, batch_id or batches[0])
        print_result(bootstrap_flow(batch_id or batches[0], str(ws.root)))
    if metrics is not None:
        write_json(ws.path(metrics), reg.champion_metrics())


def refuse_early(ws: Workspace, batch_id: str) -> None:
    """What the bootstrap and update flows refuse at once, said in one line before a flow run (whose failure
    Prefect would log as an error too): an unknown batch id, no holdout, a class the holdout labels nowhere."""
    from incseg.pipeline import holdout_pairs

    root = batch_root(ws, batch_id)
    holdout_pairs(ws)
    if (root / "batch.yaml").is_file():  # the classes the flow reads (`pipeline.check_batch`)
        gap = holdout_gap(ws, batch_id, BatchInfo.read(root).classes)
        if gap:
            raise Failure(gap)


@app.command("update")
def update_cmd(ctx: typer.Context, batch_id: Annotated[str, typer.Argument(help="Batch id in data/registry/.")]) -> None:
    """Run the incremental update flow on one batch: validate, train, judge, promote or keep."""
    from incseg.registry import ModelRegistry, RegistryUnavailable, reachable

    ws = workspace(ctx)
    refuse_early(ws, batch_id)
    with contextlib.suppress(RegistryUnavailable), reachable(ws.tracking_uri):  # a store that does not answer:
        ModelRegistry(ws).require_champion()  # the flow retries and reports it; no champion: said in one line now
    flows_ready()
    from flows.update import incremental_update

    result = incremental_update(batch_id, str(ws.root))
    print_result(result)
    if result.status == "invalid":
        raise typer.Exit(1)


READABLE_REASON = 40  # columns the reason needs beside the others; in a narrower console it goes below the table


def models_table(ws: Workspace, width: int) -> RenderableType:
    """The versions as a table for a console `width` columns wide. Every short column is shown whole;
    the reason gets what is left (a longer one is cut there and repeated whole under the table), or,
    where that is too little, a line of its own under the table (with the close calls)."""
    from incseg.registry import ModelRegistry

    reg = ModelRegistry(ws)
    by_version: dict[str, list[str]] = {}
    for alias, v in reg.aliases().items():
        by_version.setdefault(str(v), []).append(alias)
    rows = []
    for mv in reg.versions():
        t = mv.tags
        close = t.get("close_calls", "none")
        over = f" ({t['miou_classes']})" if "miou_classes" in t else ""  # the classes it is a mean over
        rows.append([str(mv.version), ",".join(by_version.get(str(mv.version), [])), t.get("status", ""),
                     t.get("batch_id", ""), t.get("candidate_miou", "") + over, t.get("parent_version", ""),
                     "" if close == "none" else close, t.get("reason", "")])
    heads = ("version", "alias", "status", "batch", "mIoU (classes)", "parent", "close calls")
    # the short columns keep their full width (a status is read whole)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]
    columns = [Column(h, no_wrap=True, min_width=w) for h, w in zip(heads, widths)]
    room = width - sum(widths) - 3 * (len(heads) + 1) - 1  # 3: a column's padding and rule; 1: the right edge
    if room >= READABLE_REASON:  # a longer reason is cut to the room (uncapped, rich squeezed the short columns to 0)
        table = Table(*columns, Column("reason", overflow="ellipsis", no_wrap=True, max_width=room),
                      title=f"model '{reg.name}'", box=box.SIMPLE)
        for r in rows:
            table.add_row(*r)
        return Group(table, *(Text(f"version {r[0]}: {r[-1]}") for r in rows if len(r[-1]) > room))  # cut: whole
    table = Table(*columns[:-1], title=f"model '{reg.name}'", box=box.SIMPLE)
    for r in rows:
        table.add_row(*r[:-2])
    return Group(table, *(Text(f"version {r[0]}: {r[-1]}" + (f" (close calls: {r[-2]})" if r[-2] else ""))
                          for r in rows if r[-1] or r[-2]))


def size_text(shape: tuple[int, int]) -> str:
    """An image size held as (height, width), written as sizes are: "120 x 90 px" is 120 wide."""
    return f"{shape[1]} x {shape[0]} px"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command()
def models(ctx: typer.Context) -> None:
    """List model versions with alias, status, batch, mIoU, close calls (gate checks that other holdout
    images could have decided otherwise) and reason."""
    console.print(models_table(workspace(ctx), console.width))


@app.command()
def promote(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="Model version to serve.")],
    reason: Annotated[str, typer.Option(help="Why (recorded in tags).")] = "manual promotion",
) -> None:
    """Move `champion` to VERSION by hand (a version the gate turned down too: the override is recorded)."""
    from incseg.registry import ModelRegistry

    reg = ModelRegistry(workspace(ctx))
    previous = reg.set_champion(version, reason)
    console.print(f"champion: {previous or '-'} -> {version}")
    tags = reg.version(version).tags
    if previous != version and tags.get("status") not in (None, "promoted"):
        console.print(f"note: version {version} was {tags['status']} ({tags.get('reason', 'no reason recorded')});"
                      " it serves by hand now" + (f", `incseg rollback` returns to {previous}" if previous else ""),
                      markup=False)


@app.command()
def approve(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="A version awaiting approval (see `incseg models`).")],
    comment: Annotated[str, typer.Option(help="Why (recorded in the version's tags).")] = "",
) -> None:
    """Serve a candidate that awaits approval (gate.approval: manual): `champion` moves to it."""
    from flows.review import resume_review
    from incseg.registry import ModelRegistry

    ws = workspace(ctx)
    previous = ModelRegistry(ws).approve(version, comment)
    console.print(f"approved version {version}; champion: {previous or '-'} -> {version}")
    if resume_review(ws, version, True, comment):
        console.print("the update run waiting for this decision was resumed")


@app.command()
def reject(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="A version awaiting approval (see `incseg models`).")],
    reason: Annotated[str, typer.Option(help="Why (recorded in the version's tags).")],
) -> None:
    """Turn down a candidate that awaits approval: it is marked rejected, `champion` stays."""
    from flows.review import resume_review
    from incseg.registry import ModelRegistry

    ws = workspace(ctx)
    ModelRegistry(ws).reject(version, reason)
    console.print(f"rejected version {version}: {reason}")
    if resume_review(ws, version, False, reason):
        console.print("the update run waiting for this decision was resumed")


@app.command()
def rollback(
    ctx: typer.Context,
    reason: Annotated[str, typer.Option(help="Why (recorded in tags).")] = "manual rollback",
) -> None:
    """Move `champion` back to the version it pointed to before."""
    from incseg.registry import ModelRegistry

    frm, to = ModelRegistry(workspace(ctx)).rollback(reason)
    console.print(f"champion: {frm} -> {to}")


VersionOpt = Annotated[Optional[str], typer.Option("--version", help="Model version (default: the champion).")]
AliasOpt = Annotated[Optional[str], typer.Option("--alias", help="Model alias instead of a version, e.g. challenger.")]


@app.command()
def predict(
    ctx: typer.Context,
    images: Annotated[list[Path], typer.Argument(help="Image files (png, jpg, bmp, tif, webp) or folders of them "
                                                      "to segment.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for <stem>.png label masks (palette PNGs, in the "
                                                    "colours of `data add --colours` when the data has them).")],
    version: VersionOpt = None,
    alias: AliasOpt = None,
    with_overlay: Annotated[bool, typer.Option("--overlay", help="Also write <stem>_overlay.png.")] = False,
) -> None:
    """Segment every image with the champion (or --version / --alias) at the image's own size."""
    from rich.progress import track

    from incseg.data.importers import read_colours
    from incseg.inference import palette, predict_images
    from incseg.models import taught_classes
    from incseg.registry import ModelRegistry
    from incseg.training import resolve_device

    missing = [str(p) for p in images if not p.exists()]
    if missing:
        raise Failure(f"no such file or folder: {', '.join(missing)}")
    files = [f for p in images for f in (list_files(p) if p.is_dir() else [p])]
    if not files:
        raise Failure(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, images))}")
    ws = workspace(ctx)
    reg = ModelRegistry(ws)
    loaded = reg.load(reg.resolve(version, alias), ws.runs_dir / "models")
    seen = f" from {size_text(loaded.native_size)} images (width x height)" if loaded.native_size else ""
    taught = [loaded.classes.get(c, str(c)) for c in taught_classes(loaded.model)]  # not every output: VOC has 21
    console.print(f"model '{reg.name}' version {loaded.version}, taught {len(taught)} classes ({', '.join(taught)}), "
                  f"trained at {loaded.image_size} px{seen}", highlight=False)
    colours = palette(read_colours(ws.colours_file)) if ws.colours_file.exists() else None  # the data's own
    report = predict_images(loaded.model, files, out, loaded.image_size, native=loaded.native_size,
                            with_overlay=with_overlay, colours=colours,
                            device=resolve_device(ws.params.train.device),
                            progress=lambda files: track(files, description="segmenting", console=console))
    for name, why in report.skipped.items():
        console.print(f"[yellow]skipped[/yellow] {name}: {why}")
    console.print(f"{len(report.written)} written, {len(report.skipped)} skipped -> {out}")


@app.command()
def export(
    ctx: typer.Context,
    fmt: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
    version: VersionOpt = None,
    out: Annotated[Path, typer.Option(help="Folder for the exported file.")] = Path("exports"),
) -> None:
    """Export a version (default: the champion) to ONNX, check it with ONNX Runtime on the
    holdout, and log it to the version."""
    from incseg.export import MIN_AGREEMENT
    from incseg.pipeline import export_checked
    from incseg.registry import ModelRegistry

    if fmt != "onnx":
        raise Failure(f"unknown --format {fmt!r}; supported: onnx")
    ws = workspace(ctx)
    reg = ModelRegistry(ws)
    loaded = reg.load(reg.resolve(version), ws.runs_dir / "models")
    path, check = export_checked(ws, loaded.model, loaded.classes, ws.path(out) / f"{reg.name}-v{loaded.version}.onnx",
                                 loaded.image_size, loaded.native_size)
    if check.ok:
        reg.log_onnx(loaded, path, check)
    console.print(f"{path}: argmax agreement {check.agreement:.4%} on {check.pixels} holdout pixels, "
                  f"max abs logit difference {check.max_abs_diff:.2e}")
    if not check.ok:
        raise Failure(f"ONNX Runtime disagrees with PyTorch on {1 - check.agreement:.3%} of pixels "
                      f"(allowed {1 - MIN_AGREEMENT:.1%}); not logged")
    console.print("logged to the version's run under onnx/")


@app.command()
def ui(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Open the MLflow UI on the workspace's store (runs, metrics, pictures, model versions)."""
    import signal
    import sys

    from incseg import processes

    ws = workspace(ctx)
    free_port_or_fail(port, "the MLflow UI")
    console.print(f"MLflow UI for {ws.tracking_uri} at http://127.0.0.1:{port} (Ctrl-C stops it)")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", ws.tracking_uri, "--host", "127.0.0.1",
               "--port", str(port)]
    with processes.running(command, sig=signal.SIGINT) as proc:
        try:
            proc.wait()
        except KeyboardInterrupt:
            pass


@app.command()
def bench(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option("--quick", help="A reduced scenario (about two minutes).")] = False,
    out: Annotated[Path, typer.Option(help="Folder for the .md table, .json numbers and .png plot.")] = Path(
        "benchmarks/results"),
    strategies: Annotated[str, typer.Option(help="Comma-separated strategies to compare.")] = ",".join(
        ("naive", "replay", "distill", "replay+distill", "joint")),
    scale: Annotated[bool, typer.Option("--scale", help="Validation files/s per task runner and worker count; "
                                        "DDP vs one-process training throughput.")] = False,
    inference: Annotated[bool, typer.Option("--inference", help="Per-image latency of PyTorch eager and ONNX "
                                            "Runtime on CPU at 64, 256 and 512 px.")] = False,
    recipe: Annotated[bool, typer.Option("--recipe", help="Recipe ablation: bootstrap a fully labelled 4-class "
                                         "set of every look with each recipe variant.")] = False,
    variants: Annotated[str, typer.Option(help="With --recipe: comma-separated variants (default: all).")] = "",
    style: Annotated[Optional[Style], typer.Option(help="The continual benchmark's look "
                                                   "(default: synth.style).")] = None,
    ablation: Annotated[bool, typer.Option("--ablation", help="Forgetting-control ablation: naive, the default "
                                           "strategy, and the default with one knob changed each: "
                                           f"{'; '.join(ABLATION)}.")] = False,
) -> None:
    """Benchmark: continual strategies (default), scale-out (--scale) or inference latency
    (--inference); print and write tables.

    The continual scenario at default params takes hours on a laptop CPU (about 40 minutes per strategy
    and look on 2 cores, joint's ceiling check longer); --quick runs in minutes, and a stopped run keeps
    the tables of the strategies it finished."""
    import sys

    from rich.markdown import Markdown

    from incseg.bench import continual as b

    ws = workspace(ctx, required=False)
    if scale:
        return bench_scale(ws, quick, out)
    if inference:
        return bench_inference(ws, quick, out)
    if recipe:
        return bench_recipe(ws, quick, out, variants)
    # the params as written: the benchmark's stream is not the project's data, so `auto` is made the size
    # it stands for from the stream's own holdout (in `run_scenario`), not from the project's
    params = b.quick_params(ws.declared) if quick else b.full_params(ws.declared)
    if style is not None:
        params.synth.style = style
    chosen = tuple(x.strip() for x in strategies.split(",") if x.strip())
    if ablation:
        chosen = ("naive", params.continual.strategy, *b.ABLATION)
    unknown = set(chosen) - set(b.STRATEGIES) - set(b.ABLATION)
    if unknown:
        raise Failure(f"unknown strategies {sorted(unknown)}; choose from {', '.join(b.STRATEGIES)}")
    scenario = b.run_scenario(params, chosen, console, ceiling_check=not ablation,  # a stopped run keeps its tables
                              on_done=lambda partial, pending: b.write(partial, params, out, quick, ablation, pending))
    path, text = b.write(scenario, params, out, quick, ablation)
    console.print(Markdown(text))
    console.print(f"written: {path}.md, .json, .png  (python {sys.version.split()[0]})")


def bench_scale(ws: Workspace, quick: bool, out: Path) -> None:
    from incseg.bench import scale

    quiet_prefect()
    command = "incseg bench --scale" + (" --quick" if quick else "")
    result = scale.run(ws.params, extract_with_runner, quick, console)
    write_bench(out, "scale-quick" if quick else "scale", result, scale.markdown(result, command))


def bench_inference(ws: Workspace, quick: bool, out: Path) -> None:
    from incseg.bench import inference

    command = "incseg bench --inference" + (" --quick" if quick else "")
    result = inference.run(ws.params, quick, console)
    write_bench(out, "inference-quick" if quick else "inference", result, inference.markdown(result, command))


def bench_recipe(ws: Workspace, quick: bool, out: Path, variants: str) -> None:
    from incseg.bench import recipe

    chosen = [v.strip() for v in variants.split(",") if v.strip()] or list(recipe.VARIANTS)
    unknown = sorted(set(chosen) - set(recipe.VARIANTS))
    if unknown:
        raise Failure(f"unknown variants {unknown}; choose from {', '.join(recipe.VARIANTS)}")
    command = "incseg bench --recipe" + (" --quick" if quick else "")
    base = ws.params
    if quick:  # seconds, not minutes: short budgets on a small set (a smoke test of the ablation)
        base = recipe.with_changes(base, {"train.bootstrap_max_steps": 120, "train.bootstrap_min_steps": 60,
                                          "train.eval_every": 30, "model.width": 8})
    result = recipe.run(base, chosen, images=120 if quick else 720, size=32 if quick else 64, console=console)
    write_bench(out, "recipe-quick" if quick else "recipe", result, recipe.markdown(result, command))


def write_bench(out: Path, name: str, result: dict, text: str) -> None:
    import json

    from rich.markdown import Markdown

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    console.print(Markdown(text))
    console.print(f"written: {out / name}.md, .json")


def extract_with_runner(batch: Path, n_classes: int, runner: str, workers: int, address: str | None):
    """The validation table of `batch`, extracted by the Prefect flow on the named task runner."""
    from flows.validation import extract_file_table, task_runner
    from incseg.config import ValidationParams

    files = sum(1 for _ in (batch / IMAGES_DIR).iterdir())
    p = ValidationParams(task_runner=runner, workers=workers, runner_address=address,
                         shard_size=max(16, files // (4 * workers)))
    return extract_file_table.with_options(task_runner=task_runner(p))(str(batch), n_classes, p.shard_size)


DEMO_CHANGES = {"data": {"image_size": 48}, "synth": {"size": 48},
                "train": {"bootstrap_max_steps": 800, "bootstrap_min_steps": 400, "update_max_steps": 400,
                          "update_min_steps": 150, "eval_every": 50, "patience": 2, **UPDATE_RULE_SHARED}}


def write_demo_params(directory: Path, style: Style | None = None) -> None:
    """The demo's params.yaml: the defaults with smaller images and budgets, so the loop runs in minutes,
    and the synthetic stream's look `style` (default: the defaults')."""
    import yaml

    from incseg.config import load_params

    raw = load_params(directory / PARAMS_FILE).model_dump()
    for section, values in DEMO_CHANGES.items():
        raw[section].update(values)
    if style is not None:
        raw["synth"]["style"] = style
    header = "# incseg demo: the defaults with smaller images and training budgets (see `incseg demo --help`).\n"
    (directory / PARAMS_FILE).write_text(header + yaml.safe_dump(raw, sort_keys=False))


@app.command()
def demo(
    directory: Annotated[Path, typer.Argument(help="Demo workspace (re-created on each run).")] = Path("demo-workspace"),
    style: Annotated[Optional[Style], typer.Option(help="The synthetic stream's look (default: synth.style's "
                                                   "default).")] = None,
) -> None:
    """The whole loop on synthetic data: batches arrive through DVC, the watcher updates on each,
    a poisoned batch is rejected. The demo workspace trains on 48 px images with short budgets."""
    flows_ready()
    from flows.watch import watch_registry
    from incseg.data.synthetic import poison_batch, synthesize
    from incseg.datastore import add_data, init_workspace

    if directory.exists():
        if not (directory / DEMO_MARKER).exists() and any(directory.iterdir()):
            raise Failure(f"{directory} exists and is not a demo workspace; choose another folder")
        shutil.rmtree(directory)
    init_workspace(directory)
    (directory / DEMO_MARKER).touch()
    write_demo_params(directory, style)
    ws = Workspace(directory)
    t = ws.params.train
    console.print(f"demo budgets (a few minutes on a laptop; the defaults are for real data): {ws.params.data.image_size} px, "
                  f"bootstrap {t.bootstrap_min_steps}-{t.bootstrap_max_steps} steps, updates "
                  f"{t.update_min_steps}-{t.update_max_steps} steps, early stop every {t.eval_every}")
    incoming = ws.root / "incoming"
    console.rule(f"1. a synthetic class-incremental stream ({ws.params.synth.style}) arrives in incoming/")
    infos = synthesize(incoming, ws.params.synth)
    last = infos[-1].batch_id
    poisoned = poison_batch(incoming / "registry" / last, incoming / "registry" / f"batch-{len(infos):02d}-poisoned")
    add_data(ws, incoming / "holdout", holdout=True, classes=incoming / "classes.yaml")
    console.print(f"{len(infos)} batches + 1 poisoned; holdout added to {ws.holdout_dir} (DVC-tracked)")
    for step, batch_id in enumerate([i.batch_id for i in infos] + [poisoned.batch_id], start=2):
        console.rule(f"{step}. incseg data add {batch_id} && incseg watch")
        add_data(ws, incoming / "registry" / batch_id)
        for result in watch_registry(str(ws.root)):
            print_result(result)
    console.rule("the watcher again, with no new data")
    console.print(f"{len(watch_registry(str(ws.root)))} updates: the data version is unchanged")
    console.rule("model versions")
    console.print(models_table(ws, console.width))
    console.print(f"Review runs, metrics, pictures and versions: incseg -C {directory} ui  (http://127.0.0.1:5000)")
