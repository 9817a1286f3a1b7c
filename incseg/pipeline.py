"""The learning steps of a bootstrap and of an incremental update, as plain functions: check a
batch, train (from scratch or from the champion), judge on the holdout. No registry writes here
(those are `incseg.registry`'s); Prefect tasks compose the two, tests and benchmarks call these
directly.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from incseg.config import Params, TrainParams
from incseg.continual.memory import ExemplarMemory
from incseg.continual.strategies import (feature_taps, make_objective, replay_shares, training_set,
                                        uses_distillation)
from incseg.data.dataset import SegmentationFolder, eval_transforms, train_transforms
from incseg.data.layout import (IGNORE, IMAGES_DIR, MASK_SUFFIX, MASKS_DIR, BatchInfo, DataError, Pair, find_pairs,
                               read_classes)
from incseg.datastore import batch_root, holdout_gap
from incseg.gate import Decision, decide
from incseg.lineage import batch_hash
from incseg.metrics import ConfusionMatrix, bootstrap_weights, iou_report, report_metrics, resampled_iou
from incseg.models import (add_classes, build_model, fuse_weights, num_classes, param_groups, set_taught,
                           stem_parameters, taught_classes)
from incseg.training import (FAST_LAYOUT, Budget, EvalPoint, TrainResult, evaluate, make_loader, resolve_device,
                             seed_everything, split_validation, train)
from incseg.validation import ValidationReport, quarantine, valid_pairs, validate_batch
from incseg.validation.history import earlier_profiles, holdout_hashes
from incseg.workspace import Workspace


@dataclass
class Batch:
    """A batch ready for training: its pairs (after validation) and what it annotates."""

    batch_id: str
    root: Path
    pairs: list[Pair]
    info: BatchInfo

    @classmethod
    def load(cls, root: Path, pairs: list[Pair] | None = None) -> Batch:
        pairs = find_pairs(root) if pairs is None else pairs
        if not pairs:
            raise DataError(f"{root}: no image/mask pairs (expected {IMAGES_DIR}/<stem>.png and "
                            f"{MASKS_DIR}/<stem>{MASK_SUFFIX})")
        return cls(root.name, root, pairs, BatchInfo.read(root))

    @property
    def classes(self) -> list[int]:
        return sorted(set(self.info.classes) | {0})


@dataclass
class CheckedBatch:
    """A validated batch: the report, GX's raw result, and the trainable part (None if rejected)."""

    root: Path
    report: ValidationReport
    gx_result: dict
    batch: Batch | None
    data_docs: Path | None = None  # GX's Data Docs site of this validation (scratch; logged with the run)


def check_batch(ws: Workspace, batch_id: str, table=None) -> CheckedBatch:
    """Run the GX suite on the batch; quarantine failing pairs; keep the rest for training.
    `table` is the batch's file table when it was extracted in parallel shards."""
    root = batch_root(ws, batch_id)
    n = len(read_classes(ws.classes_file))
    earlier = earlier_profiles(ws.registry_dir, batch_id, n, ws.runs_dir / "profiles")
    held = holdout_hashes(ws, n)
    docs = ws.runs_dir / "data-docs" / batch_id
    shutil.rmtree(docs, ignore_errors=True)
    report, table, raw = validate_batch(root, n, ws.params.validation, earlier, table, docs, held)
    quarantine(report, table, ws.quarantine_dir / batch_id)
    if report.rejected:
        return CheckedBatch(root, report, raw, None, docs)
    pairs = valid_pairs(table, report)
    if (root / "batch.yaml").exists():
        info = BatchInfo.read(root)
    else:  # annotated classes: the label ids found in the valid masks
        ids = {int(i) for v in table[table["stem"].isin(report.valid_stems)]["label_ids"] for i in str(v).split(",")}
        info = BatchInfo(batch_id, classes=sorted(ids - {IGNORE}))
    return CheckedBatch(root, report, raw, Batch(batch_id, root, pairs, info), docs)


def scratch_dir(ws: Workspace, batch: Batch, champion_version: str | None) -> Path:
    """Where a training attempt keeps its resumable checkpoint: one folder per (batch content,
    champion), so a retry of the same update resumes and anything else starts afresh."""
    kind = f"update-{batch.batch_id}-v{champion_version}" if champion_version else f"bootstrap-{batch.batch_id}"
    return ws.runs_dir / f"{kind}-{batch_hash(batch.root)[-12:]}"


def clear_scratch(ws: Workspace, run_id: str, batch: Batch | None, champion_version: str | None) -> None:
    """Once a verdict is published nothing needs resuming: drop the checkpoint and the run's files."""
    if batch is not None:
        shutil.rmtree(scratch_dir(ws, batch, champion_version), ignore_errors=True)
    shutil.rmtree(ws.runs_dir / run_id, ignore_errors=True)


def refresh_memory(ws: Workspace, memory: ExemplarMemory, batch: Batch, run_id: str) -> ExemplarMemory:
    """The candidate's memory: the champion's plus this batch, written to the run's scratch."""
    p = ws.params.continual
    out = ws.runs_dir / run_id / "memory"
    return memory.refreshed(batch.pairs, batch.batch_id, batch.classes, p.memory_size, out, ws.params.train.seed,
                            image_size=ws.params.data.image_size)


def class_names(ws: Workspace, model: nn.Module) -> dict[int, str]:
    """Names of the model's outputs from `classes.yaml` (an id it lacks is named by its number)."""
    names = read_classes(ws.classes_file)
    return {c: names.get(c, str(c)) for c in range(num_classes(model))}


def holdout_pairs(ws: Workspace) -> list[Pair]:
    """The holdout's pairs; an empty holdout is an error. Every run is judged on it: the flows ask first,
    so a missing holdout fails a run before its training, not after."""
    pairs = find_pairs(ws.holdout_dir)
    if not pairs:
        raise DataError(f"{ws.holdout_dir}: the holdout is empty "
                        "(run `incseg data synth` or `incseg data add --holdout`)")
    return pairs


def require_holdout_labels(ws: Workspace, batch: Batch) -> None:
    """The gate judges each class a batch labels on the holdout's pixels of it: a class the holdout
    never labels could be neither measured nor kept from being forgotten. The flows ask before training."""
    gap = holdout_gap(ws, batch.batch_id, batch.classes)
    if gap:
        raise DataError(gap)


def holdout_set(ws: Workspace, n_classes: int, size: int | None = None) -> SegmentationFolder:
    """The holdout at `size` (default: `data.image_size`)."""
    return SegmentationFolder(holdout_pairs(ws), eval_transforms(size or ws.params.data.image_size), n_classes)


def holdout_matrix(ws: Workspace, model: nn.Module, device: torch.device | None = None,
                   taught: list[int] | None = None, per_image: bool = False, size: int | None = None
                   ) -> ConfusionMatrix:
    """Confusion matrix of `model` on the fixed holdout over every class in `classes.yaml`.

    Pixels of a class not taught yet (not in `taught`, by default the model's own) are left
    out, as in the test protocol of MiB and the methods after it: a holdout labelled with every
    class up front would otherwise charge a model for what it calls objects it has never been
    shown (a ring or a cross called triangle right after the triangle batch)."""
    n = len(read_classes(ws.classes_file))
    loader = make_loader(holdout_set(ws, n, size), ws.params.eval.batch_size, shuffle=False)
    return evaluate(model, loader, n, device or resolve_device(ws.params.train.device),
                    taught=taught_classes(model) if taught is None else taught, per_image=per_image)


def budget(train: TrainParams, *, from_scratch: bool) -> Budget:
    """The step budget from `params.yaml: train` for a bootstrap or an update."""
    if from_scratch:
        return Budget(train.bootstrap_max_steps, train.bootstrap_min_steps, train.eval_every, train.patience,
                      judge_from=train.bootstrap_judge_from, decays=train.lr_decays, anneal=train.anneal_fraction,
                      average=train.average_weights, smoothing=train.score_smoothing)
    every = train.eval_every if train.update_eval_every is None else train.update_eval_every
    decays = train.lr_decays if train.update_lr_decays is None else train.update_lr_decays
    patience = train.patience if train.update_patience is None else train.update_patience
    average = train.average_weights if train.update_average_weights is None else train.update_average_weights
    return Budget(train.update_max_steps, train.update_min_steps, every, patience,
                  decays=decays, anneal=train.anneal_fraction, average=average, smoothing=train.score_smoothing)


def training_transform(p: Params):
    """The augmentation every training sample gets (`train.augment`, `crop_probability`, `color_jitter`)."""
    return train_transforms(p.data.image_size, p.train.augment, p.train.crop_probability, p.train.color_jitter)


def validation_score(groups: list[tuple[list[Pair], list[int]]], params: Params, n_classes: int,
                     device: torch.device) -> Callable[[nn.Module], float] | None:
    """Mean IoU over the classes that some group of validation pairs can judge, each class pooled over
    the groups whose labels judge it: every class a group annotates, but not background when the group
    labels only some classes (its background may hide the others). A group is (pairs, annotated
    classes): the batch's validation split, and for an update the held-back exemplars of each earlier
    label set. None when the first group (the batch's own split) is empty: too small a batch."""
    if not groups or not groups[0][0]:
        return None
    judged = []
    for pairs, annotated in groups:
        if not pairs:
            continue
        data = SegmentationFolder(pairs, eval_transforms(params.data.image_size), n_classes, annotated)
        partial = set(range(n_classes)) - set(annotated) - {0}
        scope = [c for c in sorted(set(annotated) | {0}) if c < n_classes and not (partial and c == 0)]
        judged.append((make_loader(data, params.eval.batch_size, shuffle=False), scope))

    def score(model: nn.Module) -> float:
        matrices = [(evaluate(model, loader, n_classes, device), scope) for loader, scope in judged]
        ious = []
        for c in sorted({c for _, scope in judged for c in scope}):
            pooled = ConfusionMatrix(n_classes)  # every group whose labels judge c
            for cm, scope in matrices:
                if c in scope:
                    pooled.mat += cm.mat
            if c in pooled.present():
                ious.append(pooled.iou()[c])
        return float(torch.stack(ious).mean()) if ious else float("nan")

    return score


def train_base(
    ws: Workspace, batch: Batch, *, progress: bool = True, on_eval: Callable[[EvalPoint, nn.Module], None] | None = None,
    checkpoint_path: Path | None = None,
) -> tuple[nn.Module, TrainResult]:
    """A first model from scratch on one batch, with a head for every class it annotates."""
    p = ws.params
    seed_everything(p.train.seed)
    n = max(batch.classes) + 1
    device = resolve_device(p.train.device)
    model = build_model(p.model.arch, n, p.model.width, p.model.depth)
    model = set_taught(model, batch.classes)  # an id it skips: a silent row
    fit, held = split_validation(batch.pairs, p.train.val_fraction, p.train.seed)
    data = SegmentationFolder(fit, training_transform(p), n)
    loader = make_loader(data, p.train.batch_size, shuffle=True, num_workers=p.train.num_workers, seed=p.train.seed)
    result = train(
        model, loader, make_objective("naive", p.train, p.continual, None), budget(p.train, from_scratch=True),
        lr=p.train.lr, weight_decay=p.train.weight_decay, device=device,
        validate=validation_score([(held, list(range(n)))], p, n, device),
        checkpoint_path=checkpoint_path, on_eval=on_eval, progress=progress,
        description=f"bootstrap {batch.batch_id} at {p.data.image_size} px",
    )
    return model.cpu(), result


def cap_note(result: TrainResult) -> str:
    """For a run from scratch that its step cap ended, a clause for its verdict: the plateau rule had
    not seen the validation score level off, so more steps may still gain (empty when the rule
    stopped it, or when there was no validation split to judge by)."""
    if result.stopped == "converged" or not any(e.val_miou == e.val_miou for e in result.evals):
        return ""
    return (f"; it reached its {result.steps}-step cap before the validation score levelled off (best weights "
            f"from step {result.best_step}): a larger train.bootstrap_max_steps, with train.patience raised in "
            "proportion, may still gain")  # the cap raised alone lost (recipe.md, the bootstrap's budget on a GPU)


def confused_replay(params: Params, champion: nn.Module, batch: Batch, memory: ExemplarMemory, n_classes: int,
                    device: torch.device) -> dict[int, float] | None:
    """Each exemplar class's share of an update's replay with `continual.replay_toward_confused`
    (`replay_shares`: the champion's answers on the batch's pixels of classes it was not taught say
    which old classes it takes them for); None when off or nothing is replayed."""
    toward = params.continual.replay_toward_confused
    if toward <= 0 or not memory.items or params.continual.replay_fraction <= 0:
        return None
    new = [c for c in batch.classes if c not in taught_classes(champion)]
    data = SegmentationFolder(batch.pairs, eval_transforms(params.data.image_size), n_classes, batch.classes)
    loader = make_loader(data, params.eval.batch_size, shuffle=False)
    taken_for = evaluate(copy.deepcopy(champion), loader, n_classes, device)
    return replay_shares(taken_for, new, sorted(memory.per_class()), toward)


def update_sets(params: Params, batch: Batch, memory: ExemplarMemory, n_classes: int,
                class_share: dict[int, float] | None = None,
                ) -> tuple[Dataset, Sampler | None, list[tuple[list[Pair], list[int]]]]:
    """What an update trains on (the batch less its validation split, with the replayed memory as the
    strategy says, each class's exemplars `class_share` of it if given) and the groups its early stop
    scores (`validation_score`): the batch's split, then, with `continual.memory_val_fraction`, the
    exemplars held back from replay, one group per label set."""
    p = params
    transform = training_transform(p)
    fit, held = split_validation(batch.pairs, p.train.val_fraction, p.train.seed)
    replayed, checked = memory.held_back(p.continual.memory_val_fraction if held else 0.0, p.train.seed)
    data, sampler = training_set(SegmentationFolder(fit, transform, n_classes, batch.classes), replayed,
                                 p.continual.strategy, p.continual.replay_fraction, transform, n_classes, class_share)
    return data, sampler, [(held, batch.classes), *(([checked.pair(it) for it in items], list(annotated))
                                                   for annotated, items in checked.by_label_set().items())]


def train_candidate(
    params: Params, champion: nn.Module, batch: Batch, memory: ExemplarMemory, *, progress: bool = True,
    on_eval: Callable[[EvalPoint, nn.Module], None] | None = None, checkpoint_path: Path | None = None,
) -> tuple[nn.Module, TrainResult]:
    """Continue training a copy of the champion on the batch with the configured strategy.

    Classes the champion was not taught get fresh classifier rows first (`models.add_classes`).
    """
    p, strategy = params, params.continual.strategy
    seed_everything(p.train.seed)
    student = add_classes(copy.deepcopy(champion), batch.classes, p.continual.head_init)
    n = num_classes(student)
    if p.continual.freeze_stem:
        for param in stem_parameters(student):
            param.requires_grad_(False)
    device = resolve_device(p.train.device)
    teacher = copy.deepcopy(champion).to(device, memory_format=FAST_LAYOUT) if uses_distillation(strategy) else None
    data, sampler, checks = update_sets(p, batch, memory, n, confused_replay(p, champion, batch, memory, n, device))
    loader = make_loader(data, p.train.batch_size, shuffle=True, sampler=sampler,
                         num_workers=p.train.num_workers, seed=p.train.seed)
    taps = feature_taps(student, teacher) if teacher is not None and p.continual.feature_distill_weight > 0 \
        else contextlib.nullcontext()
    with taps as features:
        result = train(
            student, loader, make_objective(strategy, p.train, p.continual, teacher, features),
            budget(p.train, from_scratch=False), lr=p.train.update_lr, weight_decay=p.train.weight_decay,
            device=device, param_groups=param_groups(student, p.train.update_lr, p.continual.head_lr_scale),
            validate=validation_score(checks, p, n, device),
            checkpoint_path=checkpoint_path, on_eval=on_eval, progress=progress,
            description=f"update {batch.batch_id} ({strategy}) at {p.data.image_size} px",
        )
    student = fuse_weights(student.cpu(), champion, p.continual.fuse_old_weight)
    for param in student.parameters():
        param.requires_grad_(True)
    return student, result


@dataclass
class Judgement:
    """The gate's decision with the holdout reports (`metrics.iou_report`) and matrices behind it."""

    decision: Decision
    candidate: dict
    champion: dict
    matrices: dict[str, ConfusionMatrix]

    def metrics(self) -> dict[str, float]:
        """Both reports as flat metric names (`candidate.miou`, `champion.iou.<class>`; no champion, no champion's)."""
        out = report_metrics("candidate", self.candidate)
        if self.champion:
            out.update(report_metrics("champion", self.champion))
        return out

    def record(self) -> dict:
        """decision.json: the verdict and both reports, JSON-clean (NaN as null)."""
        import json

        def clean(report: dict) -> dict:
            return json.loads(json.dumps(report, default=float).replace("NaN", "null"))

        return {**self.decision.to_dict(), "candidate": clean(self.candidate), "champion": clean(self.champion) or None}

    def iou_table(self) -> dict[str, list]:
        """Per-class holdout IoU of champion and candidate side by side (an MLflow table)."""
        names = list(self.candidate["per_class"])
        cand = [self.candidate["per_class"][n] for n in names]
        champ = [(self.champion or {}).get("per_class", {}).get(n) for n in names]
        change = [None if a is None or b is None else round(a - b, 4) for a, b in zip(cand, champ)]
        return {"class": names, "champion": champ, "candidate": cand, "change": change}

    def card(self, status: str) -> str:
        """The verdict as a page a reviewer reads: status, reason, every gate check, the IoU table."""
        def f(v) -> str:
            return "-" if v is None or v != v else f"{v:.3f}"

        def cell(text) -> str:  # a class named `a|b` would split its row's cells
            return str(text).replace("|", "\\|")

        lines = [f"# Verdict: {status.replace('_', ' ')}", "", self.decision.reason, ""]
        if self.decision.checks:
            def spread(c) -> str:
                return "-" if c.interval is None else (f"{c.interval[0]:.3f} - {c.interval[1]:.3f}"
                                                       + (" (**close call**)" if c.close_call else ""))

            lines += ["| check | passed | value | limit | interval over holdout images | detail |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {cell(c.name)} | {'yes' if c.passed else '**no**'} | {c.observed} | {c.threshold} | "
                      f"{spread(c)} | {cell(c.detail)} |" for c in self.decision.checks]
            lines.append("")
        t = self.iou_table()
        lines += ["| class | champion | candidate | change |", "|---|---|---|---|"]
        lines += [f"| {cell(n)} | {f(a)} | {f(b)} | {f(c)} |" for n, a, b, c in zip(t["class"], t["champion"],
                                                                                   t["candidate"], t["change"])]
        lines += ["", f"mIoU: champion {f((self.champion or {}).get('miou'))}, candidate {f(self.candidate['miou'])}"]
        return "\n".join(lines) + "\n"


def judge(ws: Workspace, candidate: nn.Module, champion: nn.Module | None, batch: Batch,
          champion_size: int | None = None) -> Judgement:
    """Evaluate both models on the holdout with the same code and scope, then apply the gate. The
    candidate is judged at `data.image_size`, the champion at the size it was trained at and is served
    at (`champion_size`; `data.image_size` changed, or `auto` follows a replaced holdout): judged at
    the other, it looked worse than it serves, and a worse candidate could replace it.

    Without a champion (the first bootstrap) the candidate is promoted and its numbers recorded.
    """
    names = read_classes(ws.classes_file)
    old = taught_classes(champion) if champion is not None else []
    new = [c for c in batch.classes if c not in old]
    # both judged on the same pixels: those of the classes either was taught (an update's candidate knows all
    # its champion's; a bootstrap's challenger is charged for the champion's classes it never learned)
    taught = sorted(set(taught_classes(candidate)) | set(old))
    per_image = champion is not None and ws.params.gate.interval_resamples > 0
    cms = {"candidate": holdout_matrix(ws, candidate, taught=taught, per_image=per_image)}
    if champion is not None:
        cms["champion"] = holdout_matrix(ws, champion, taught=taught, per_image=per_image, size=champion_size)
    reports = {k: iou_report(cm, old, new, names) for k, cm in cms.items()}
    if champion is None:
        first = reports["candidate"]
        reason = f"bootstrap: first model, holdout mIoU over {len(first['in_scope'])} classes {first['miou']:.3f}"
        return Judgement(Decision(True, reason), reports["candidate"], {}, cms)
    resampled = None
    if per_image and cms["candidate"].images:  # the same resampled images for both: a paired bootstrap
        weights = bootstrap_weights(len(cms["candidate"].images), ws.params.gate.interval_resamples)
        resampled = (resampled_iou(cms["candidate"].images, weights), resampled_iou(cms["champion"].images, weights))
    decision = decide(reports["candidate"], reports["champion"], old, new, names, ws.params.gate, resampled)
    size = ws.params.data.image_size
    if champion_size not in (None, size):
        decision.reason += (f" (the champion judged at the {champion_size} px it was trained at, the candidate at "
                            f"{size} px)")
    return Judgement(decision, reports["candidate"], reports["champion"], cms)


def export_checked(ws: Workspace, model: nn.Module, classes: dict[int, str], out: Path, size: int,
                   native_size: tuple[int, int] | None = None):
    """The model (trained at `size`, on images of `native_size`) as an ONNX file, checked against
    PyTorch on the holdout at that size: (path, `export.OnnxCheck`)."""
    from incseg.export import check_onnx, export_onnx

    path = export_onnx(model, out, size, classes, native_size)
    holdout = holdout_set(ws, len(read_classes(ws.classes_file)), size)
    loader = make_loader(holdout, ws.params.eval.batch_size, shuffle=False)
    return path, check_onnx(path, model, (x for x, _, _ in loader))
