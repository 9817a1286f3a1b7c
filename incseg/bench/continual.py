"""The continual-learning benchmark: every strategy on one seeded class-incremental stream.

Each strategy starts from the same base model and sees the batches in order; `joint`
retrains from scratch on every batch so far (the upper bound). No gate is applied: the
benchmark measures the strategies themselves, every candidate goes on to the next batch; what the
product's gate (`params.gate`, `pipeline.judge`) would have said of each update is reported beside it.
Results: the accuracy matrix, final mIoU (all / old / new / hIoU), average forgetting, the gate's
verdicts and cost per step.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from rich.console import Console
from incseg.config import UPDATE_RULE_SHARED, Params
from incseg.continual import strategies
from incseg.continual.memory import ExemplarMemory
from incseg.data.layout import BatchInfo, list_batches, read_classes
from incseg.data.synthetic import synthesize
from incseg.metrics import harmonic_mean
from incseg.pipeline import Batch, Judgement, holdout_matrix, judge, train_base, train_candidate
from incseg.bench import ABLATION
from incseg.bench.recipe import with_changes
from incseg.workspace import Workspace

STRATEGIES = (*strategies.STRATEGIES, "joint")  # joint: retrain on all data so far (the upper bound)
CEILING_CHECK = "the ceiling check"  # joint once more, at twice the budget: what a partial result may still lack


@dataclass
class Step:
    batch_id: str
    iou: list[float]  # per class id over classes.yaml, NaN for a class not taught yet (its pixels are left out)
    images: int
    seconds: float
    steps: int = 0  # optimizer steps
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, validation mIoU)
    best_step: int = 0  # the step whose weights were kept
    stopped: str = ""  # converged | max_steps
    trace: list[dict] = field(default_factory=list)  # traced runs: the holdout at every evaluation
    gate: dict = field(default_factory=dict)  # an update: the gate's verdict against the model before it
    memory: int = 0  # an update: the exemplars kept after it, for the next one to replay


@dataclass
class Scenario:
    classes: dict[int, str]
    learned_at: dict[int, int]  # class id -> step that introduced it
    runs: dict[str, list[Step]] = field(default_factory=dict)
    ceiling_check: dict = field(default_factory=dict)  # joint at twice the budget and patience, whole stream


def quick_params(base: Params) -> Params:
    """A couple of minutes on 2 cores: 32 px, a width-8 U-Net, two new classes, short budgets."""
    p = base.model_copy(deep=True)
    p.data.image_size = p.synth.size = 32
    p.synth.base_images, p.synth.step_images, p.synth.holdout_per_class, p.synth.new_classes = 96, 64, 6, 2
    p.model.width = 8
    p.train.bootstrap_max_steps, p.train.bootstrap_min_steps = 600, 200
    p.train.update_max_steps, p.train.update_min_steps, p.train.eval_every = 300, 100, 50
    p.train.patience = 3  # the budgets and rule these quick results were measured with
    for key, value in UPDATE_RULE_SHARED.items():  # updates stop by the same rule
        setattr(p.train, key, value)
    p.continual.memory_size = 32
    return p


def full_params(base: Params) -> Params:
    """The user's params with a longer stream: three new classes, then the domain shift."""
    p = base.model_copy(deep=True)
    p.synth.new_classes = max(p.synth.new_classes, 3)
    p.synth.domain_shift = True
    return p


def joint_params(params: Params, budget_scale: float) -> Params:
    """The bootstrap's rule with `budget_scale` x its step limits. A longer budget (scale > 1) also
    waits `budget_scale` x longer for a gain before each LR drop and the stop: with the patience
    unchanged, the rule ends a run long before a doubled cap (the stream's joint stopped at 4200 of
    8000 steps, while patience 6 ran to the cap and gained 2.7-5 points; benchmarks/results/quality-log.md,
    "The ceiling is not one yet")."""
    p = params.model_copy(deep=True)
    p.train.bootstrap_max_steps = round(p.train.bootstrap_max_steps * budget_scale)
    p.train.bootstrap_min_steps = round(p.train.bootstrap_min_steps * budget_scale)
    if budget_scale > 1:
        p.train.patience = round(p.train.patience * budget_scale)
    return p


def train_joint(ws: Workspace, full: list[Batch], classes: list[int], budget_scale: float = 1.0,
                progress: bool = False):
    """The upper bound: from scratch on every batch so far with *full* labels (what the generator
    knows), with the bootstrap's convergence-driven budget (`joint_params`); `progress`: a bar, or a
    line per evaluation in a log."""
    p = joint_params(ws.params, budget_scale)
    pairs = [pair for b in full for pair in b.pairs]
    joint = Batch(f"joint-{full[-1].batch_id}", full[-1].root, pairs, BatchInfo(full[-1].batch_id, classes=classes))
    return train_base(Workspace(ws.root, p), joint, progress=progress)


def stream(params: Params, root: Path) -> tuple[Workspace, list, list[Batch], list[Batch]]:
    """The seeded stream under `root`: (workspace, each batch's synth info, the batches as labelled
    for the learner, the same images with every class labelled, for joint)."""
    ws = Workspace(root, params)
    infos = synthesize(ws.data_dir, params.synth)
    synthesize(root / "full", params.synth.model_copy(update={"old_classes": "keep"}))
    batches = [Batch.load(ws.registry_dir / b) for b in list_batches(ws.registry_dir)]
    return ws, infos, batches, [Batch.load(root / "full" / "registry" / b.batch_id) for b in batches]


def joint_once(ws: Workspace, full: list[Batch], classes: list[int], budget_scale: float = 1.0,
               progress: bool = False) -> dict:
    """Joint on `full`, trained once: steps, images, seconds, holdout mIoU over `classes`, IoU per
    class id and the validation curve (the ceiling check; `benchmarks/joint_final.py`)."""
    t0 = time.perf_counter()
    model, result = train_joint(ws, full, classes, budget_scale, progress)
    iou = _iou(ws, model)
    return {"steps": result.steps, "images": result.images_processed, "seconds": round(time.perf_counter() - t0, 1),
            "miou_all": _mean(iou, classes), "iou": {c: round(iou[c], 4) for c in classes},
            "curve": [(e.step, round(e.val_miou, 4)) for e in result.evals]}


def run_scenario(params: Params, chosen: tuple[str, ...] = STRATEGIES, console: Console | None = None,
                 ceiling_check: bool = True,
                 on_done: Callable[[Scenario, tuple[str, ...]], None] | None = None,
                 variants: dict[str, dict[str, object]] | None = None, updates: int | None = None,
                 trace: tuple[str, ...] = ()) -> Scenario:
    """Run every chosen strategy; `on_done(scenario, still_pending)` after each one finishes (and
    after the ceiling check), so a run of hours keeps what it has measured if it is stopped.

    A chosen name is a strategy, an `ABLATION` entry or one of `variants` (name -> param changes,
    the default strategy otherwise); `updates` stops each after that many updates; the runs named in
    `trace` also score the holdout at every evaluation (`Step.trace`)."""
    console = console or Console()
    named = {**ABLATION, **(variants or {})}
    ceiling = "joint" in chosen and ceiling_check
    with tempfile.TemporaryDirectory(prefix="incseg-bench-") as tmp:
        ws, infos, batches, full = stream(params, Path(tmp))
        params = ws.params  # `data.image_size: auto` resolved from the stream's own holdout
        classes = read_classes(ws.classes_file)
        learned = {c: 0 for c in batches[0].classes}
        for i, info in enumerate(infos[1:], start=1):
            learned.update({c: i for c in info.new_classes})
        scenario = Scenario(classes, learned)
        t0 = time.perf_counter()
        base, result = train_base(ws, batches[0], progress=False)
        base_step = _step(ws, batches[0], base, result, time.perf_counter() - t0)
        console.print(f"base model on {batches[0].batch_id}: {result.steps} steps (best {result.best_step}), "
                      f"{result.images_processed} images, {base_step.seconds:.0f} s; {_per_class(scenario, base_step, 0)}")
        for strategy in chosen:
            steps = [base_step]
            changes = named.get(strategy, {} if strategy == "joint" else {"continual.strategy": strategy})
            p = with_changes(params, changes)  # joint is no continual strategy: it trains on the params as they are
            model, memory = base, ExemplarMemory.empty()
            memory = memory.refreshed(batches[0].pairs, batches[0].batch_id, batches[0].classes,
                                      p.continual.memory_size, Path(tmp) / strategy / "memory-0",
                                      image_size=p.data.image_size)
            for i, batch in enumerate(batches[1:][:updates], start=1):
                t0, traced = time.perf_counter(), []
                if strategy == "joint":
                    model, result = train_joint(ws, full[: i + 1], _known(scenario, i))
                else:
                    before = model
                    model, result = train_candidate(p, model, batch, memory, progress=False,
                                                    on_eval=_tracer(ws, traced) if strategy in trace else None)
                    memory = memory.refreshed(batch.pairs, batch.batch_id, batch.classes, p.continual.memory_size,
                                              Path(tmp) / strategy / f"memory-{i}", image_size=p.data.image_size)
                seconds, verdict = time.perf_counter() - t0, None
                if strategy != "joint":  # what the product would do with this candidate (the stream goes on)
                    verdict = judge(ws, model, before, batch)  # its candidate matrix is the step's holdout score
                steps.append(_step(ws, batch, model, result, seconds, traced, verdict,
                                   0 if strategy == "joint" else len(memory.items)))
                gate = f"; gate: {steps[-1].gate['status']}" if steps[-1].gate else ""
                console.print(f"  {strategy:>14} after {batch.batch_id}: mIoU(all) "
                              f"{_mean(steps[-1].iou, _known(scenario, i)):.3f}, {result.steps} steps "
                              f"(best {result.best_step}), {steps[-1].seconds:.0f} s; {_per_class(scenario, steps[-1], i)}"
                              f"{gate}")
            scenario.runs[strategy] = steps
            if on_done is not None:
                on_done(scenario, tuple(x for x in chosen if x not in scenario.runs) + (
                    (CEILING_CHECK,) if ceiling else ()))
        if ceiling:
            scenario.ceiling_check = joint_once(ws, full, sorted(learned), budget_scale=2.0)
            console.print(f"  joint with twice the budget and patience: mIoU(all) {scenario.ceiling_check['miou_all']:.3f}, "
                          f"{scenario.ceiling_check['steps']} steps")
            if on_done is not None:
                on_done(scenario, ())
    return scenario


def _step(ws: Workspace, batch: Batch, model, result, seconds: float, trace: list[dict] | None = None,
          verdict: Judgement | None = None, memory: int = 0) -> Step:
    iou = [float(v) for v in verdict.matrices["candidate"].iou()] if verdict else _iou(ws, model)
    return Step(batch.batch_id, iou, result.images_processed, seconds, result.steps,
                [(e.step, e.val_miou) for e in result.evals], result.best_step, result.stopped, trace or [],
                verdict.decision.to_dict() if verdict else {}, memory)


def _tracer(ws: Workspace, into: list[dict]) -> Callable:
    """An `on_eval` that appends the loss, the validation score and the holdout IoU per class id."""
    def on_eval(point, model) -> None:
        into.append({"step": point.step, "loss": round(point.loss, 4), "val_miou": round(point.val_miou, 4),
                     "holdout_iou": [round(v, 4) for v in _iou(ws, model)]})
    return on_eval


def _per_class(s: Scenario, step: Step, i: int) -> str:
    """The holdout IoU of each class known after step i, for the progress lines."""
    return " ".join(f"{s.classes[c]} {step.iou[c]:.3f}" for c in _known(s, i))


def _iou(ws: Workspace, model) -> list[float]:
    return [float(v) for v in holdout_matrix(ws, model).iou()]


def _known(s: Scenario, step: int) -> list[int]:
    return sorted(c for c, at in s.learned_at.items() if at <= step)


def _mean(iou: list[float], classes: list[int]) -> float:
    vals = [iou[c] for c in classes if not math.isnan(iou[c])]
    return float(np.mean(vals)) if vals else float("nan")


def summary(s: Scenario) -> dict[str, dict]:
    """Final mIoU all/old/new, hIoU, average forgetting (IoU points) and cost, per strategy."""
    last = max(s.learned_at.values()) if s.learned_at else 0
    old = [c for c, at in s.learned_at.items() if at == 0]
    new = [c for c, at in s.learned_at.items() if at > 0]
    out = {}
    for name, steps in s.runs.items():
        final = steps[-1].iou
        m_old, m_new = _mean(final, old), _mean(final, new)
        forgetting = [steps[at].iou[c] - final[c] for c, at in s.learned_at.items()
                      if at < last and c != 0 and not math.isnan(final[c])]
        out[name] = {
            "miou_all": _mean(final, sorted(s.learned_at)), "miou_old": m_old, "miou_new": m_new,
            "hiou": harmonic_mean(m_old, m_new),
            "forgetting_points": 100 * float(np.mean(forgetting)) if forgetting else 0.0,
            "images": sum(st.images for st in steps), "seconds": sum(st.seconds for st in steps),
            "update_images": sum(st.images for st in steps[1:]),  # joint's: its retrainings after the base
            "step_seconds": [round(st.seconds, 1) for st in steps[1:]],
            "steps": [st.steps for st in steps[1:]],
            # each class's IoU right after the update that brought it
            "new_class_iou": {s.classes[c]: round(steps[at].iou[c], 4) for c, at in sorted(s.learned_at.items())
                              if at > 0 and not math.isnan(steps[at].iou[c])},
        }
        if any(st.gate for st in steps[1:]):  # the gate's verdict on each update, in order
            out[name]["gate"] = [{"batch": st.batch_id, "status": st.gate["status"], "reason": st.gate["reason"],
                                  "close_calls": st.gate.get("close_calls", [])} for st in steps[1:]]
    if s.ceiling_check and "joint" in out:
        out["joint"]["ceiling_check"] = s.ceiling_check
        out["joint"]["curve_last"] = s.runs["joint"][-1].curve
    return out


def accuracy_matrix(s: Scenario, strategy: str) -> tuple[list[str], list[list[float]]]:
    """Rows: steps; columns: the base classes, then each class as it is introduced (mIoU)."""
    groups = {"base": [c for c, at in s.learned_at.items() if at == 0]}
    for c, at in sorted(s.learned_at.items()):
        if at > 0:
            groups[s.classes[c]] = [c]
    rows = [[_mean(st.iou, cols) if min(s.learned_at[c] for c in cols) <= i else float("nan")
             for cols in groups.values()] for i, st in enumerate(s.runs[strategy])]
    return list(groups), rows


def targets(summ: dict[str, dict], default: str) -> list[tuple[str, bool, str]]:
    """The learner issue's targets, each with whether it is met and the measured numbers.

    Images processed, as the issue words it: all updates together against joint's retrainings after
    each batch, the base model (the same on both sides) counted on neither; the measured column also
    gives the ratio with the base counted on both sides (base + every update against base + every
    retraining, the `images` column of the table)."""
    d, j, n = summ[default], summ.get("joint"), summ.get("naive")
    out = []
    if j:
        out.append(("converged joint mIoU(all) >= 0.85", j["miou_all"] >= 0.85, f"{j['miou_all']:.3f}"))
        check = j.get("ceiling_check")
        if check:
            gain = 100 * (check["miou_all"] - j["miou_all"])
            out.append(("joint with twice the budget and patience adds < 1 point", gain < 1,
                        f"{check['miou_all']:.3f} ({gain:+.1f} points, {check['steps']} steps)"))
        out.append(("final mIoU(all) >= 0.90 x joint", d["miou_all"] >= 0.9 * j["miou_all"],
                    f"{d['miou_all']:.3f} vs {0.9 * j['miou_all']:.3f}"))
        u, ju = d["update_images"], j["update_images"]
        out.append(("images processed by all updates <= 0.25 x joint's retrainings (the base on neither side)",
                    u <= 0.25 * ju, f"{u} vs {0.25 * ju:.0f} ({u / max(ju, 1):.2f} x); with the base on both sides "
                    f"{d['images']} vs {j['images']} ({d['images'] / max(j['images'], 1):.2f} x)"))
    worst = min(d["new_class_iou"].values()) if d["new_class_iou"] else float("nan")
    out.append(("every new class >= 0.6 IoU after its update", worst >= 0.6,
                ", ".join(f"{k} {v:.2f}" for k, v in d["new_class_iou"].items())))
    out.append(("average forgetting <= 3 IoU points", d["forgetting_points"] <= 3,
                f"{d['forgetting_points']:.1f} points"))
    if n:
        out.append(("naive visibly forgets (> 10 points)", n["forgetting_points"] > 10,
                    f"{n['forgetting_points']:.1f} points"))
    if len(d["step_seconds"]) > 1:
        ds = d["step_seconds"]
        flat = max(ds) <= 1.2 * np.mean(ds) and min(ds) >= 0.8 * np.mean(ds)
        joint = f"; joint: {j['step_seconds']} s" if j else ""
        out.append(("update wall time flat (+-20 %) as history grows", bool(flat), f"{default}: {ds} s{joint}"))
    return out


def markdown(s: Scenario, summ: dict, default: str, command: str, style: str = "shapes") -> str:
    lines = ["# Continual-learning benchmark", "", f"Made by `{command}`; the look: `{style}`. Joint retrains from "
             "scratch on all data so far with full labels until its validation split stops improving (the upper "
             "bound); images count the shared base model on both sides (the targets count it on neither). IoU "
             "after each step is scored on the holdout's pixels of the classes the model knows by then (classes "
             "still to come are left out, as in MiB's test protocol).", "",
             "| strategy | mIoU all | old | new | hIoU | forgetting (pts) | images | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in summ.items():
        lines.append(f"| {name}{' (default)' if name == default else ''} | {r['miou_all']:.3f} | {r['miou_old']:.3f} | "
                     f"{r['miou_new']:.3f} | {r['hiou']:.3f} | {r['forgetting_points']:.1f} | {r['images']} | "
                     f"{r['seconds']:.0f} |")
    if default in summ:  # the targets judge the default strategy
        lines += ["", "## Targets", "", "| target | met | measured |", "|---|---|---|"]
        lines += [f"| {t} | {'yes' if ok else '**no**'} | {m} |" for t, ok, m in targets(summ, default)]
    for name in s.runs:
        cols, rows = accuracy_matrix(s, name)
        lines += ["", f"## Accuracy matrix: {name}", "", "| after | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for st, row in zip(s.runs[name], rows):
            lines.append(f"| {st.batch_id} | " + " | ".join("" if math.isnan(v) else f"{v:.3f}" for v in row) + " |")
    lines += ["", "## Seconds per step (update time as history grows)", "", "| strategy | " +
              " | ".join(st.batch_id for st in next(iter(s.runs.values()))[1:]) + " |",
              "|---|" + "---|" * (len(next(iter(s.runs.values()))) - 1)]
    lines += [f"| {name} | " + " | ".join(str(x) for x in r["step_seconds"]) + " |" for name, r in summ.items()]
    gated = {name: r["gate"] for name, r in summ.items() if "gate" in r}
    if gated:
        lines += ["", "## What the gate would do (the stream goes on with every candidate)", "",
                  "Each update's candidate judged against the model before it by `params.gate`, as the product judges "
                  "it; a rejection's reason names the failed check, and a close call is a check that passes at one "
                  "end of its interval over the holdout's images and fails at the other.", "",
                  "| strategy | " + " | ".join(v["batch"] for v in next(iter(gated.values()))) + " | promoted |",
                  "|---|" + "---|" * (len(next(iter(gated.values()))) + 1)]
        def cell(v: dict) -> str:
            if v["status"] != "promoted":
                return f"**rejected**: {v['reason']}"
            return "promoted" + (f" (close call: {', '.join(v['close_calls'])})" if v.get("close_calls") else "")

        lines += [f"| {name} | " + " | ".join(cell(v) for v in verdicts) +
                  f" | {sum(v['status'] == 'promoted' for v in verdicts)} of {len(verdicts)} |"
                  for name, verdicts in gated.items()]
    if "joint" in s.runs:
        lines += ["", "## Joint's validation curve on the whole stream (step: mIoU)", "",
                  ", ".join(f"{st}: {v:.3f}" for st, v in s.runs["joint"][-1].curve)]
    return "\n".join(lines) + "\n"


def plot(s: Scenario, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, steps in s.runs.items():
        a.plot(range(len(steps)), [_mean(st.iou, _known(s, i)) for i, st in enumerate(steps)], marker="o", label=name)
        b.plot(range(1, len(steps)), [st.seconds for st in steps[1:]], marker="o", label=name)
    a.set(title="holdout mIoU over the classes known so far", xlabel="step", ylabel="mIoU")
    b.set(title="wall time per update", xlabel="step", ylabel="seconds")
    a.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(s: Scenario, params: Params, out: Path, quick: bool, ablation: bool = False,
          pending: tuple[str, ...] = ()) -> tuple[Path, str]:
    """`continual[-ablation]-<look>[-quick]` .md (table + plot), .json (summary) and .png under `out`;
    `pending` names what a partial result still lacks."""
    import json

    style = params.synth.style
    name = f"continual{'-ablation' if ablation else ''}-{style}" + ("-quick" if quick else "")
    command = "incseg bench" + (" --ablation" if ablation else "") + (" --quick" if quick else "") + f" --style {style}"
    chosen = [*s.runs, *(x for x in pending if x != CEILING_CHECK)]
    if not ablation and tuple(chosen) != STRATEGIES:  # the report names the command that made it
        command += f' --strategies "{",".join(chosen)}"'
    summ = summary(s)
    text = markdown(s, summ, params.continual.strategy, command, style)
    if pending:
        text = f"**Partial result: still running {', '.join(pending)}.**\n\n" + text
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text + f"\n![plot]({name}.png)\n")
    (out / f"{name}.json").write_text(json.dumps(summ, indent=2))
    plot(s, out / f"{name}.png")
    return out / name, text
