"""How an update's stopping rule plays out: one base model, then the first updates under each rule.

The bench's seeded stream (`incseg bench`'s full scenario at the params given, one look), the base
model trained once at those params, then updates 1..K of the default strategy under each rule below,
each rule from the same base. Writes, per rule and update: steps, best step, why it stopped, the
validation curve and the holdout IoU per class id. With `--trace`, every evaluation of the
`constant LR` rule also scores the holdout (the raw trajectory behind update-recipe.md section 5).

    python benchmarks/update_rule.py STYLE OUT.json [--updates K] [--params params.yaml] [--rules a,b] [--trace]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from incseg.bench import continual as b
from incseg.bench.recipe import with_changes
from incseg.config import load_params
from incseg.continual.memory import ExemplarMemory
from incseg.pipeline import holdout_matrix, train_base, train_candidate

RULES: dict[str, dict[str, object]] = {
    "shared rule (before)": {"train.update_eval_every": None, "train.update_lr_decays": None},
    "update rule (default)": {},
    "update rule + cap 800": {"train.update_max_steps": 800},
    "constant LR": {"train.patience": 10**6, "train.anneal_fraction": 0.0},  # never stops: the trajectory
}


def main(style: str, out: Path, updates: int, params_file: Path, rules: list[str], trace: bool) -> dict:
    params = b.full_params(load_params(params_file))
    params.synth.style = style
    log: dict = {"style": style, "params": str(params_file), "rules": {}}
    with tempfile.TemporaryDirectory(prefix="incseg-update-rule-") as tmp:
        ws, _, batches, _ = b.stream(params, Path(tmp))

        def hold(model) -> list[float]:
            return [round(float(v), 4) for v in holdout_matrix(ws, model).iou()]

        t0 = time.perf_counter()
        base, r = train_base(ws, batches[0], progress=False)
        log["base"] = {"steps": r.steps, "best_step": r.best_step, "holdout_iou": hold(base),
                       "seconds": round(time.perf_counter() - t0)}
        for name in rules:
            p = with_changes(params, RULES[name])
            model, memory = base, ExemplarMemory.empty().refreshed(
                batches[0].pairs, batches[0].batch_id, batches[0].classes, params.continual.memory_size,
                Path(tmp) / name / "memory-0")
            rows = log["rules"][name] = []
            for i, batch in enumerate(batches[1:updates + 1], start=1):
                points: list[dict] = []

                def on_eval(point, m, points=points):
                    if trace and name == "constant LR":
                        points.append({"step": point.step, "loss": round(point.loss, 4),
                                       "val_miou": round(point.val_miou, 4), "holdout_iou": hold(m)})

                t0 = time.perf_counter()
                model, r = train_candidate(p, model, batch, memory, progress=False, on_eval=on_eval)
                memory = memory.refreshed(batch.pairs, batch.batch_id, batch.classes, params.continual.memory_size,
                                          Path(tmp) / name / f"memory-{i}")
                rows.append({"batch": batch.batch_id, "new_classes": [c for c in batch.classes if c],
                             "steps": r.steps, "best_step": r.best_step, "stopped": r.stopped,
                             "lr_decays": r.lr_decays, "holdout_iou": hold(model),
                             "seconds": round(time.perf_counter() - t0),
                             "curve": [(e.step, round(e.val_miou, 4)) for e in r.evals], "trace": points})
                out.write_text(json.dumps(log, indent=1) + "\n")
                print(name, batch.batch_id, {k: rows[-1][k] for k in ("steps", "best_step", "stopped", "holdout_iou")},
                      flush=True)
    out.write_text(json.dumps(log, indent=1) + "\n")
    return log


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("style")
    ap.add_argument("out", type=Path)
    ap.add_argument("--updates", type=int, default=2, help="how many of the stream's updates (default 2)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--rules", default=",".join(list(RULES)[:2]), help=f"comma-separated, of: {', '.join(RULES)}")
    ap.add_argument("--trace", action="store_true", help="score the holdout at every evaluation of 'constant LR'")
    a = ap.parse_args()
    main(a.style, a.out, a.updates, a.params, a.rules.split(","), a.trace)
