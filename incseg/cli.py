"""The `incseg` command line: parses, calls flows or the library, prints."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from incseg.config import ConfigError, Workspace
from incseg.data.layout import DataError


class Failure(Exception):
    """An expected failure (bad input, missing champion, unknown version)."""


EXPECTED_FAILURES: tuple[type[Exception], ...] = (Failure, ConfigError, DataError)


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
) -> None:
    """Every command works on a workspace: params.yaml, data/, the MLflow store, git + DVC."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
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


def iou_table(title: str, reports: dict[str, dict]) -> Table:
    """Per-class IoU columns for each named report, then the means."""
    table = Table("class", *reports, title=title)
    first = next(iter(reports.values()))
    for name in first["per_class"]:
        table.add_row(name, *[_fmt(r["per_class"].get(name)) for r in reports.values()])
    for key in ("miou", "miou_old", "miou_new", "hiou"):
        table.add_row(f"[bold]{key}", *[_fmt(r[key]) for r in reports.values()])
    return table


def _fmt(v: float | None) -> str:
    return "-" if v is None or v != v else f"{v:.3f}"


@app.command()
def demo(
    directory: Annotated[Path, typer.Argument(help="Demo workspace (re-created on each run).")] = Path("demo-workspace"),
) -> None:
    """Run the product end to end on synthetic data in a fresh workspace."""
    from incseg.data.synthetic import synthesize
    from incseg.datastore import init_workspace
    from incseg.pipeline import Batch, holdout_report, train_base

    if directory.exists():
        if not (directory / DEMO_MARKER).exists() and any(directory.iterdir()):
            raise Failure(f"{directory} exists and is not a demo workspace; choose another folder")
        shutil.rmtree(directory)
    init_workspace(directory)
    (directory / DEMO_MARKER).touch()
    ws = Workspace(directory)
    console.rule("1. synthetic class-incremental stream")
    infos = synthesize(ws.data_dir, ws.params.synth)
    console.print(f"{len(infos)} batches in {ws.registry_dir}, holdout in {ws.holdout_dir}")
    console.rule("2. first model on the base batch")
    batch = Batch.load(ws.registry_dir / infos[0].batch_id)
    model, _ = train_base(ws, batch)
    report = holdout_report(ws, model, batch.classes, [])
    console.print(iou_table(f"holdout IoU after {batch.batch_id}", {"base model": report}))

