"""How an update's stopping rule plays out: one base model, then the first updates under each rule.

The bench's seeded scenario (`incseg bench`'s full stream at the params given, one look, its base
model trained once), then updates 1..K of the default strategy under each named rule below, each
rule from the same base (`bench.continual.run_scenario` with these rules as variants). Writes, per
rule and update: steps, best step, why it stopped, the validation curve and the holdout IoU per
class id. With `--trace`, every evaluation of every chosen rule also scores the holdout (with
`constant LR`: the raw trajectory behind update-recipe.md section 5). `--seed N` sets `train.seed` (the base model,
the validation splits, the batches' order); `--demo-size` applies the demo's changes to params
(48 px, short budgets: minutes instead of an hour, for several seeds; update-recipe.md section 7).

    python benchmarks/update_rule.py STYLE OUT.json [--updates K] [--params params.yaml] [--rules a,b] [--trace]
                                     [--seed N] [--demo-size]
"""

import argparse
import json
from pathlib import Path

from incseg.bench import continual as b
from incseg.bench.recipe import with_changes
from incseg.cli import DEMO_CHANGES
from incseg.config import load_params
from incseg.processes import exit_on_sigterm

RULES: dict[str, dict[str, object]] = {
    "shared rule (before)": {"train.update_eval_every": None, "train.update_lr_decays": None},
    "update rule (default)": {},
    "update rule + cap 800": {"train.update_max_steps": 800},
    "update rule + cap 3200": {"train.update_max_steps": 3200},  # does a new class still rising at 1600 gain?
    "constant LR": {"train.patience": 10**6, "train.anneal_fraction": 0.0},  # never stops: the trajectory
    "memory scored": {"continual.memory_val_fraction": 0.25},  # early stop also sees held-back exemplars
    "head x1": {"continual.head_lr_scale": 1.0},  # the classifier at the backbone's learning rate
    "head x3": {"continual.head_lr_scale": 3.0},
    "update_lr 3e-3": {"train.update_lr": 3e-3},  # an update's peak rate (the classifier still x10)
    "update_lr 3e-3 + head x3": {"train.update_lr": 3e-3, "continual.head_lr_scale": 3.0},
    "update_lr 1e-3": {"train.update_lr": 1e-3},
    "no distillation on new-class pixels": {"continual.distill_new_class_pixels": False},  # the label wins there
    "replay toward confused 0.5": {"continual.replay_toward_confused": 0.5},  # half of it: what new is taken for
}


def row(step: b.Step) -> dict:
    return {"batch": step.batch_id, "steps": step.steps, "best_step": step.best_step, "stopped": step.stopped,
            "holdout_iou": [round(v, 4) for v in step.iou], "seconds": round(step.seconds),
            "curve": [(s, round(v, 4)) for s, v in step.curve], "trace": step.trace, "gate": step.gate}


def main(style: str, out: Path, updates: int, params_file: Path, rules: list[str], trace: bool,
         seed: int | None = None, demo_size: bool = False) -> dict:
    params = load_params(params_file)
    if demo_size:
        params = with_changes(params, {f"{section}.{k}": v for section, values in DEMO_CHANGES.items()
                                       for k, v in values.items()})
    params = b.full_params(params)
    params.synth.style = style
    if seed is not None:
        params.train.seed = seed
    log: dict = {"style": style, "params": str(params_file), "seed": params.train.seed, "demo_size": demo_size,
                 "rules": {}}

    def save(scenario: b.Scenario, pending: tuple[str, ...]) -> None:
        runs = list(scenario.runs.values())
        log["base"] = row(runs[0][0]) if runs else None
        log["rules"] = {name: [row(s) for s in steps[1:]] for name, steps in scenario.runs.items()}
        out.write_text(json.dumps(log, indent=1) + "\n")

    b.run_scenario(params, tuple(rules), ceiling_check=False, on_done=save, variants=RULES, updates=updates,
                   trace=tuple(rules) if trace else ())
    return log


if __name__ == "__main__":
    exit_on_sigterm()  # a `kill` removes the stream's temporary folder
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("style")
    ap.add_argument("out", type=Path)
    ap.add_argument("--updates", type=int, default=2, help="how many of the stream's updates (default 2)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--rules", default=",".join(list(RULES)[:2]), help=f"comma-separated, of: {', '.join(RULES)}")
    ap.add_argument("--trace", action="store_true", help="score the holdout at every evaluation of every rule")
    ap.add_argument("--seed", type=int, help="train.seed (default: the params file's)")
    ap.add_argument("--demo-size", action="store_true", help="the demo's image size and budgets")
    a = ap.parse_args()
    unknown = set(a.rules.split(",")) - set(RULES)
    if unknown:
        ap.error(f"unknown rules {sorted(unknown)}; choose from {list(RULES)}")
    main(a.style, a.out, a.updates, a.params, a.rules.split(","), a.trace, a.seed, a.demo_size)
