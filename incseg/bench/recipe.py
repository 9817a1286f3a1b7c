"""The recipe ablation: which training recipe converges, from scratch, on more than one look.

For every look of the generator (`synth.style`), a joint set with every class labelled
(`images` training images, 4 classes, a separate holdout) is bootstrapped with each recipe
variant: the default params with a few keys changed. Reported: holdout mIoU, the step the
kept weights come from, steps run, seconds, and the validation curve. No recipe sees the
holdout; early stopping watches the batch's own validation split, as in production.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rich.console import Console

from incseg.config import STYLES, Params
from incseg.data.layout import list_batches
from incseg.data.synthetic import synthesize
from incseg.metrics import mean_iou
from incseg.pipeline import Batch, holdout_matrix, train_base
from incseg.workspace import Workspace

# name -> changes to the default params ("section.key": value)
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "no LR drop on plateaus": {"train.lr_decays": 0},
    "patience 3, max 4000 steps (before)": {"train.patience": 3, "train.bootstrap_max_steps": 4000},
    "lr 3e-3": {"train.lr": 3e-3},
    "lr 3e-2": {"train.lr": 3e-2},
    "dice 0 (CE only)": {"train.dice_weight": 0.0},
    "dice 1.0": {"train.dice_weight": 1.0},
    "no augmentation": {"train.augment": False},
    "crop every sample (before)": {"train.crop_probability": 1.0},
    "width 24": {"model.width": 24},
}


def with_changes(base: Params, changes: dict[str, object]) -> Params:
    raw = base.model_dump()
    for key, value in changes.items():
        section, name = key.split(".")
        raw[section][name] = value
    return Params.model_validate(raw)


def dataset_params(base: Params, style: str, images: int, size: int) -> Params:
    """A joint, fully labelled 4-class set of the look: one batch plus a holdout."""
    return with_changes(base, {"synth.style": style, "synth.size": size, "data.image_size": size,
                               "synth.base_classes": 4, "synth.new_classes": 0, "synth.domain_shift": False,
                               "synth.base_images": images, "synth.holdout_per_class": max(4, images // 20),
                               "synth.seed": 11})


def run(base: Params, variants: list[str], styles: tuple[str, ...] = STYLES, images: int = 720, size: int = 64,
        console: Console | None = None) -> dict:
    console = console or Console()
    rows = []
    for style in styles:
        with tempfile.TemporaryDirectory(prefix=f"incseg-recipe-{style}-") as tmp:
            data_params = dataset_params(base, style, images, size)
            synthesize(Path(tmp) / "data", data_params.synth)
            for name in variants:
                p = with_changes(data_params, VARIANTS[name])
                ws = Workspace(Path(tmp), p)
                batch = Batch.load(ws.registry_dir / list_batches(ws.registry_dir)[0])
                t0 = time.perf_counter()
                model, result = train_base(ws, batch, progress=False, on_eval=lambda e, m: console.print(
                    f"    {style} / {name}: step {e.step} loss {e.loss:.3f} val mIoU {e.val_miou:.3f}", highlight=False))
                seconds = time.perf_counter() - t0
                miou = mean_iou(holdout_matrix(ws, model))
                rows.append({"style": style, "variant": name, "holdout_miou": round(miou, 4),
                             "best_step": result.best_step, "steps": result.steps, "stopped": result.stopped,
                             "images": result.images_processed, "seconds": round(seconds, 1),
                             "curve": [(e.step, round(e.val_miou, 4)) for e in result.evals]})
                console.print(f"  {style:>7} | {name:<18} holdout mIoU {miou:.3f}, best at step {result.best_step} "
                              f"of {result.steps} ({result.stopped}), {seconds:.0f} s")
    return {"images": images, "size": size, "rows": rows}


def markdown(result: dict, command: str) -> str:
    lines = ["# Recipe ablation", "", f"Made by `{command}`: every look, a fully labelled 4-class set of "
             f"{result['images']} training images at {result['size']} px, bootstrapped from scratch with each "
             "variant of the default params; early stopping on the set's own 10 % validation split.", "",
             "| look | variant | holdout mIoU | best step | steps run | stopped | seconds |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['style']} | {r['variant']} | {r['holdout_miou']:.3f} | {r['best_step']} | {r['steps']} | "
                     f"{r['stopped']} | {r['seconds']} |")
    lines += ["", "## Validation curves (step: mIoU)", ""]
    for r in result["rows"]:
        lines.append(f"- {r['style']} / {r['variant']}: " + ", ".join(f"{s}: {v:.2f}" for s, v in r["curve"]))
    return "\n".join(lines) + "\n"
