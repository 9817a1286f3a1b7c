"""The `incseg` command line: parses, calls flows or the library, prints."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from incseg.config import ConfigError, Workspace
from incseg.data.layout import DataError, list_batches
from incseg.registry import RegistryError


class Failure(Exception):
    """An expected failure (bad input, missing champion, unknown version)."""


EXPECTED_FAILURES: tuple[type[Exception], ...] = (Failure, ConfigError, DataError, RegistryError)


class _Group(TyperGroup):
    """Expected failures become one line on stderr and exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EXPECTED_FAILURES as err:
            Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {err}", highlight=False)
            raise typer.Exit(1) from None


app = typer.Typer(cls=_Group, help="Keep a segmentation model up to date incrementally.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Create and bring in data batches.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()

DEMO_MARKER = ".incseg-demo"


def workspace(ctx: typer.Context) -> Workspace:
    return Workspace(ctx.obj["workspace"])


@app.callback()
def main(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Option("-C", "--workspace", help="Workspace directory.")] = Path("."),
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N (overrides train.device).")] = None,
) -> None:
    """Every command works on a workspace: params.yaml, data/, the MLflow store, git + DVC."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
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
) -> None:
    """Write the seeded synthetic class-incremental stream: holdout, batches, classes.yaml."""
    from incseg.data.synthetic import synthesize

    ws = workspace(ctx)
    p = ws.params.synth.model_copy(update={k: v for k, v in {"size": size, "seed": seed}.items() if v is not None})
    target = out or ws.data_dir
    infos = synthesize(target, p)
    table = Table("batch", "kind", "annotated classes", "new classes", title=f"synthetic stream in {target}")
    for i in infos:
        table.add_row(i.batch_id, i.kind, ", ".join(map(str, i.classes)), ", ".join(map(str, i.new_classes)))
    console.print(table)


@app.command()
def validate(
    ctx: typer.Context,
    batch_dir: Annotated[Path, typer.Argument(help="Batch folder with images/ and masks/.")],
    quarantine_to: Annotated[Optional[Path], typer.Option("--quarantine", help="Copy failing pairs here.")] = None,
) -> None:
    """Validate a batch with the Great Expectations suite; exit 1 when it would be rejected."""
    from incseg.data.layout import read_classes
    from incseg.validation import quarantine, validate_batch
    from incseg.validation.history import earlier_profiles

    ws = workspace(ctx)
    if not batch_dir.is_dir():
        raise Failure(f"{batch_dir} is not a folder")
    n = len(read_classes(ws.classes_file))
    in_registry = batch_dir.resolve().parent == ws.registry_dir
    earlier = earlier_profiles(ws.registry_dir, batch_dir.name if in_registry else None, n, ws.runs_dir / "profiles")
    with console.status(f"validating {batch_dir} ..."):
        report, table, _ = validate_batch(batch_dir, n, ws.params.validation, earlier)
    if report.failures:
        failures = Table("file", "check", "observed", "meaning", title=f"{len(report.bad_stems)} failing files",
                         box=box.SIMPLE)
        for f in report.failures:
            failures.add_row(f.stem, f.check, _short(f.observed, 30), f.message)
        console.print(failures)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    for e in report.batch_errors:
        console.print(f"[red]batch error:[/red] {e}")
    if quarantine_to is not None and quarantine(report, table, quarantine_to):
        console.print(f"failing pairs copied to {quarantine_to}")
    verdict = "[red]REJECTED[/red]" if report.rejected else "[green]accepted[/green]"
    console.print(f"{batch_dir.name}: {report.files} files, {len(report.valid_stems)} valid: {verdict}")
    if report.rejected:
        raise typer.Exit(1)


def quiet_prefect() -> None:
    """Prefect's own INFO lines would drown the CLI's output; warnings still show."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def print_result(result) -> None:
    colour = {"promoted": "green", "rejected": "yellow"}.get(result.status, "red")
    console.print(f"[bold]{result.batch_id}[/bold]: [{colour}]{result.status}[/{colour}] - {result.reason}")
    if result.candidate_version:
        console.print(f"  candidate version {result.candidate_version}; champion "
                      f"{result.champion_before or '-'} -> {result.champion_after or '-'}")


@app.command()
def bootstrap(
    ctx: typer.Context,
    batch_id: Annotated[Optional[str], typer.Option(help="Batch to train on (default: the oldest).")] = None,
) -> None:
    """Train the first model on one batch; register it as a version with alias `champion`."""
    quiet_prefect()
    from flows.update import bootstrap as bootstrap_flow

    ws = workspace(ctx)
    batches = list_batches(ws.registry_dir)
    if not batches:
        raise Failure(f"no batches in {ws.registry_dir}: run `incseg data synth` or `incseg data add`")
    result = bootstrap_flow(batch_id or batches[0], str(ws.root))
    print_result(result)
    write_metrics(ws, result)


def write_metrics(ws: Workspace, result) -> None:
    """metrics.json for `dvc metrics show`: the outcome and the candidate's holdout IoU."""
    import json

    payload = {"status": result.status, "version": result.candidate_version, **result.metrics}
    (ws.root / "metrics.json").write_text(json.dumps(payload, indent=2, sort_keys=True))


@app.command("update")
def update_cmd(ctx: typer.Context, batch_id: Annotated[str, typer.Argument(help="Batch id in data/registry/.")]) -> None:
    """Run the incremental update flow on one batch: validate, train, judge, promote or keep."""
    quiet_prefect()
    from flows.update import incremental_update

    ws = workspace(ctx)
    result = incremental_update(batch_id, str(ws.root))
    print_result(result)
    write_metrics(ws, result)
    if result.status == "invalid":
        raise typer.Exit(1)


def models_table(ws: Workspace) -> Table:
    from incseg.registry import ModelRegistry

    reg = ModelRegistry(ws)
    by_version: dict[str, list[str]] = {}
    for alias, v in reg.aliases().items():
        by_version.setdefault(str(v), []).append(alias)
    table = Table("version", "alias", "status", "batch", "mIoU", "parent", "reason", title=f"model '{reg.name}'",
                  box=box.SIMPLE)
    room = max(12, console.width - 70)
    for mv in reg.versions():
        t = mv.tags
        table.add_row(str(mv.version), ",".join(by_version.get(str(mv.version), [])), t.get("status", ""), t.get("batch_id", ""),
                      t.get("candidate_miou", ""), t.get("parent_version", ""), _short(t.get("reason", ""), room))
    return table


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command()
def models(ctx: typer.Context) -> None:
    """List model versions with alias, status, reason, batch and mIoU."""
    console.print(models_table(workspace(ctx)))


@app.command()
def promote(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="Model version to serve.")],
    reason: Annotated[str, typer.Option(help="Why (recorded in tags).")] = "manual promotion",
) -> None:
    """Move `champion` to VERSION by hand."""
    from incseg.registry import ModelRegistry

    previous = ModelRegistry(workspace(ctx)).set_champion(version, reason)
    console.print(f"champion: {previous or '-'} -> {version}")


@app.command()
def rollback(
    ctx: typer.Context,
    reason: Annotated[str, typer.Option(help="Why (recorded in tags).")] = "manual rollback",
) -> None:
    """Move `champion` back to the version it pointed to before."""
    from incseg.registry import ModelRegistry

    frm, to = ModelRegistry(workspace(ctx)).rollback(reason)
    console.print(f"champion: {frm} -> {to}")


@app.command()
def ui(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Open the MLflow UI on the workspace's store (runs, metrics, pictures, model versions)."""
    import subprocess
    import sys

    ws = workspace(ctx)
    console.print(f"MLflow UI for {ws.tracking_uri} at http://127.0.0.1:{port}")
    subprocess.run([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", ws.tracking_uri,
                    "--host", "127.0.0.1", "--port", str(port)], check=False)


@app.command()
def demo(
    directory: Annotated[Path, typer.Argument(help="Demo workspace (re-created on each run).")] = Path("demo-workspace"),
) -> None:
    """The whole loop on synthetic data: bootstrap, each batch through the update, a poisoned batch."""
    quiet_prefect()
    from flows.update import bootstrap as bootstrap_flow
    from flows.update import incremental_update
    from incseg.data.synthetic import poison_batch, synthesize
    from incseg.datastore import init_workspace

    if directory.exists():
        if not (directory / DEMO_MARKER).exists() and any(directory.iterdir()):
            raise Failure(f"{directory} exists and is not a demo workspace; choose another folder")
        shutil.rmtree(directory)
    init_workspace(directory)
    (directory / DEMO_MARKER).touch()
    ws = Workspace(directory)
    console.rule("1. synthetic class-incremental stream")
    infos = synthesize(ws.data_dir, ws.params.synth)
    poisoned = poison_batch(ws.registry_dir / infos[-1].batch_id, ws.registry_dir / f"batch-{len(infos):02d}-poisoned")
    console.print(f"{len(infos)} batches + 1 poisoned ({poisoned.batch_id}) in {ws.registry_dir}")
    console.rule(f"2. bootstrap on {infos[0].batch_id}")
    print_result(bootstrap_flow(infos[0].batch_id, str(ws.root)))
    results = []
    for batch_id in [i.batch_id for i in infos[1:]] + [poisoned.batch_id]:
        console.rule(f"3. incremental update: {batch_id}")
        results.append(incremental_update(batch_id, str(ws.root)))
        print_result(results[-1])
    console.rule("4. model versions")
    console.print(models_table(ws))
    console.print(f"Review runs, metrics, pictures and versions: incseg -C {directory} ui  (http://127.0.0.1:5000)")
