"""The steps of bootstrap and incremental update that touch the registry, as plain functions.

Order matters for safety: train first (no registry change), then log and register the
candidate as `challenger` with `status=pending`, judge it on the holdout, and only then
move `champion`. A crash before the verdict never moves `champion`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

import incseg
from incseg.config import Workspace
from incseg.continual.memory import ExemplarMemory
from incseg.data.dataset import eval_transforms
from incseg.data.layout import BatchInfo, DataError, find_pairs, read_classes
from incseg.datastore import dvc_hash, safe_batch_id
from incseg.gate import Decision, decide
from incseg.metrics import ConfusionMatrix, iou_report, mean_iou
from incseg.models import num_classes
from incseg import pipeline
from incseg.pipeline import Batch, class_names, holdout_matrix
from incseg.registry import ModelRegistry
from incseg.training import TrainResult
from incseg.validation import ValidationReport, quarantine, valid_pairs, validate_batch
from incseg.validation.history import earlier_profiles


@dataclass
class UpdateResult:
    """What an update decided, with the numbers behind it."""

    batch_id: str
    status: str  # promoted | rejected | invalid | diverged
    reason: str
    candidate_version: str | None = None
    champion_before: str | None = None
    champion_after: str | None = None
    run_id: str | None = None
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- data and lineage ------------------------------------------------------------------
def batch_hash(batch_dir: Path) -> str:
    """The batch's content hash: DVC's md5 from `<batch>.dvc` when tracked, else a sha256 of its files."""
    tracked = dvc_hash(batch_dir.with_name(batch_dir.name + ".dvc"))
    if tracked:
        return tracked
    h = hashlib.sha256()
    for f in sorted(p for p in batch_dir.rglob("*") if p.is_file()):
        h.update(f.relative_to(batch_dir).as_posix().encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return "sha256:" + h.hexdigest()


def code_version() -> str:
    """The git commit of the incseg code, or its package version outside a checkout."""
    src = Path(incseg.__file__).resolve().parent
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else f"incseg=={incseg.__version__}"


def lineage_tags(batch: Batch, parent: str | None) -> dict[str, str]:
    return {
        "batch_id": batch.batch_id,
        "data_hash": batch_hash(batch.root),
        "parent_version": parent or "",
        "code_version": code_version(),
        "batch_classes": ",".join(map(str, batch.classes)),
    }


@dataclass
class CheckedBatch:
    """A validated batch: the report, GX's raw result, and the trainable part (None if rejected)."""

    root: Path
    report: ValidationReport
    gx_result: dict
    batch: Batch | None


def batch_root(ws: Workspace, batch_id: str) -> Path:
    """The batch's folder in the registry; refuses links and unknown ids."""
    root = ws.registry_dir / safe_batch_id(batch_id)
    if root.is_symlink():
        raise DataError(f"{root} is a symbolic link: batches must be real folders of the registry")
    if not root.is_dir():
        raise DataError(f"no batch '{batch_id}' in {ws.registry_dir}")
    return root


def check_batch(ws: Workspace, batch_id: str, table=None) -> CheckedBatch:
    """Run the GX suite on the batch; quarantine failing pairs; keep the rest for training.
    `table` is the batch's file table when it was extracted in parallel shards."""
    root = batch_root(ws, batch_id)
    n = len(read_classes(ws.classes_file))
    earlier = earlier_profiles(ws.registry_dir, batch_id, n, ws.runs_dir / "profiles")
    report, table, raw = validate_batch(root, n, ws.params.validation, earlier, table)
    quarantine(report, table, ws.quarantine_dir / batch_id)
    if report.rejected:
        return CheckedBatch(root, report, raw, None)
    pairs = valid_pairs(table, report)
    if (root / "batch.yaml").exists():
        info = BatchInfo.read(root)
    else:  # annotated classes: the label ids found in the valid masks
        ids = {int(i) for v in table[table["stem"].isin(report.valid_stems)]["label_ids"] for i in str(v).split(",")}
        info = BatchInfo(batch_id, classes=sorted(ids - {255}))
    return CheckedBatch(root, report, raw, Batch(batch_id, root, pairs, info))


# ---- runs --------------------------------------------------------------------------------
def owner_tags() -> dict[str, str]:
    """Which process owns a run: host, pid and the pid's start time (pids are reused)."""
    import socket

    import psutil

    me = psutil.Process()
    return {"owner_host": socket.gethostname(), "owner_pid": str(me.pid), "owner_started": f"{me.create_time():.3f}"}


def owner_alive(tags: dict[str, str]) -> bool:
    """False only when the owning process is provably gone: on this host and no longer running.
    A run owned by another host (or without owner tags) is assumed alive."""
    import socket

    import psutil

    if tags.get("owner_host") != socket.gethostname() or not tags.get("owner_pid"):
        return True
    try:
        proc = psutil.Process(int(tags["owner_pid"]))
        return f"{proc.create_time():.3f}" == tags.get("owner_started") and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return False


def close_orphaned_runs(reg: ModelRegistry) -> list[str]:
    """Runs left RUNNING by a killed update (SIGKILL, power loss) are marked KILLED with a reason,
    so the UI shows no phantom runs. Only runs whose owning process is provably dead are touched."""
    closed = []
    for run in reg.running_runs():
        if owner_alive(run.data.tags):
            continue
        reason = (f"killed: process {run.data.tags.get('owner_pid')} on {run.data.tags.get('owner_host')} "
                  "ended before the run finished")
        reg.client.set_tag(run.info.run_id, "outcome", "killed")
        reg.client.set_tag(run.info.run_id, "reason", reason)
        reg.end_run(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


def scratch_dir(ws: Workspace, batch: Batch, champion_version: str | None) -> Path:
    """Where a training attempt keeps its resumable checkpoint: one folder per (batch content,
    champion), so a retry of the same update resumes and anything else starts afresh."""
    kind = f"update-{batch.batch_id}-v{champion_version}" if champion_version else f"bootstrap-{batch.batch_id}"
    return ws.runs_dir / f"{kind}-{batch_hash(batch.root)[-12:]}"


def clear_scratch(ws: Workspace, run_id: str, batch: Batch | None, champion_version: str | None) -> None:
    """Once a verdict is published nothing needs resuming: drop the checkpoint and the run's files."""
    import shutil

    if batch is not None:
        shutil.rmtree(scratch_dir(ws, batch, champion_version), ignore_errors=True)
    shutil.rmtree(ws.runs_dir / run_id, ignore_errors=True)


def start_run(reg: ModelRegistry, kind: str, checked: CheckedBatch, parent: str | None) -> str:
    """An MLflow run for the batch, with params, lineage tags and the validation report."""
    batch_id = checked.report.batch_id
    lineage = lineage_tags(checked.batch, parent) if checked.batch else {
        "batch_id": batch_id, "data_hash": batch_hash(checked.root), "parent_version": parent or ""}
    tags = {"incseg.kind": kind, "outcome": "running", **lineage, **owner_tags()}
    run_id = reg.start_run(f"{kind}-{batch_id}", tags, reg.ws.params.flat())
    reg.client.log_dict(run_id, checked.report.to_dict(), "validation/report.json")
    reg.client.log_text(run_id, checked.report.markdown(), "validation/report.md")
    reg.client.log_dict(run_id, checked.gx_result, "validation/gx_result.json")
    return run_id


def record_training(reg: ModelRegistry, run_id: str, result: TrainResult) -> None:
    tags = {"resumed_from_step": result.resumed_from, "world_size": result.world_size, "steps": result.steps,
            "best_step": result.best_step, "stopped": result.stopped or "max_steps", "lr_decays": result.lr_decays}
    for k, v in tags.items():
        reg.client.set_tag(run_id, k, str(v))
    reg.client.log_metric(run_id, "images_processed", result.images_processed)
    reg.client.log_metric(run_id, "train_seconds", result.seconds)


def refresh_memory(ws: Workspace, memory: ExemplarMemory, batch: Batch, run_id: str) -> ExemplarMemory:
    """The candidate's memory: the champion's plus this batch, written to the run's scratch."""
    p = ws.params.continual
    out = ws.runs_dir / run_id / "memory"
    return memory.refreshed(batch.pairs, batch.batch_id, batch.classes, p.memory_size, out, ws.params.train.seed)


def log_candidate(ws: Workspace, reg: ModelRegistry, run_id: str, model: nn.Module, memory: ExemplarMemory,
                  tags: dict[str, str]) -> str:
    """Log the model, its checkpoint and memory, and register it as a pending challenger."""
    uri = reg.log_model(run_id, model, class_names(ws, model), memory, ws.params.data.image_size)
    return str(reg.register(run_id, uri, tags).version)


# ---- judging -----------------------------------------------------------------------------
@dataclass
class Judgement:
    decision: Decision
    candidate: dict
    champion: dict
    matrices: dict[str, ConfusionMatrix]


def judge(ws: Workspace, candidate: nn.Module, champion: nn.Module | None, batch: Batch) -> Judgement:
    """Evaluate both models on the holdout with the same code and scope, then apply the gate.

    Without a champion (bootstrap) the candidate is promoted and its numbers recorded.
    """
    names = read_classes(ws.classes_file)
    old = list(range(num_classes(champion))) if champion is not None else []
    new = [c for c in batch.classes if c not in old]
    cms = {"candidate": holdout_matrix(ws, candidate)}
    if champion is not None:
        cms["champion"] = holdout_matrix(ws, champion)
    reports = {k: iou_report(cm, old, new, names) for k, cm in cms.items()}
    if champion is None:
        reason = f"bootstrap: first model, holdout mIoU {reports['candidate']['miou']:.3f}"
        return Judgement(Decision(True, reason), reports["candidate"], {}, cms)
    decision = decide(reports["candidate"], reports["champion"], old, new, names, ws.params.gate)
    return Judgement(decision, reports["candidate"], reports["champion"], cms)


def metric_dict(prefix: str, report: dict) -> dict[str, float]:
    out = {f"{prefix}.{k}": float(report[k]) for k in ("miou", "miou_old", "miou_new", "hiou")
           if report[k] == report[k]}
    out.update({f"{prefix}.iou.{n}": float(v) for n, v in report["per_class"].items() if v is not None})
    return out


def log_judgement(ws: Workspace, reg: ModelRegistry, run_id: str, j: Judgement,
                  models: dict[str, nn.Module]) -> None:
    """decision.json, per-class IoU metrics of both models, the confusion matrix and overlay grid."""
    from incseg.reports import confusion_figure, preview_figure

    champion = metric_dict("champion", j.champion) if j.champion else {}
    for k, v in {**metric_dict("candidate", j.candidate), **champion}.items():
        reg.client.log_metric(run_id, k, v)
    reg.client.log_dict(run_id, decision_record(j), "decision.json")
    names = read_classes(ws.classes_file)
    _log_figure(reg, run_id, confusion_figure(j.matrices["candidate"], names), "plots/confusion_candidate.png")
    pairs = find_pairs(ws.holdout_dir)
    step = max(1, len(pairs) // max(1, ws.params.eval.preview_images))
    preview = pairs[::step][: ws.params.eval.preview_images]
    if preview:
        fig = preview_figure(models, preview, eval_transforms(ws.params.data.image_size))
        _log_figure(reg, run_id, fig, "plots/holdout_preview.png")


def _log_figure(reg: ModelRegistry, run_id: str, fig, path: str) -> None:
    import matplotlib.pyplot as plt

    reg.client.log_figure(run_id, fig, path)
    plt.close(fig)  # long-running watchers must not accumulate open figures


def decision_record(j: Judgement) -> dict:
    return {**j.decision.to_dict(), "candidate": _clean(j.candidate), "champion": _clean(j.champion) or None}


def _clean(report: dict) -> dict:
    return json.loads(json.dumps(report, default=float).replace("NaN", "null"))


def publish(reg: ModelRegistry, run_id: str, version: str, j: Judgement) -> str | None:
    """Record the verdict on the version; move `champion` only on promotion. Returns the champion after."""
    metrics = {"candidate_miou": f"{j.candidate['miou']:.4f}"}
    if j.champion:
        metrics["champion_miou"] = f"{j.champion['miou']:.4f}"
    reg.judge(version, j.decision.status, j.decision.reason, metrics)
    if j.decision.promote:
        reg.set_champion(version, j.decision.reason)
    reg.client.set_tag(run_id, "outcome", j.decision.status)
    reg.client.set_tag(run_id, "model_version", version)
    champion = reg.champion()
    return str(champion.version) if champion else None


def export_version(ws: Workspace, reg: ModelRegistry, mv, out: Path):
    """ONNX file of the version, checked on the holdout; logged to its run (and tagged) when it agrees."""
    from incseg.export import check_onnx, check_record, export_onnx
    from incseg.training import make_loader

    loaded = reg.load(mv, ws.runs_dir / "models")
    size = ws.params.data.image_size
    path = export_onnx(loaded.model, out / f"{reg.name}-v{loaded.version}.onnx", size, loaded.classes)
    holdout = pipeline.holdout_set(ws, len(read_classes(ws.classes_file)))
    check = check_onnx(path, loaded.model, (x for x, _, _ in make_loader(holdout, ws.params.eval.batch_size, shuffle=False)))
    if check.ok:
        for f in (path, path.with_name("classes.json")):
            reg.client.log_artifact(loaded.run_id, str(f), "onnx")
        reg.client.log_dict(loaded.run_id, check_record(check), "onnx/check.json")
        for k, v in {"onnx": f"onnx/{path.name}", "onnx_argmax_agreement": f"{check.agreement:.6f}",
                     "onnx_max_abs_diff": f"{check.max_abs_diff:.3g}"}.items():
            reg.client.set_model_version_tag(reg.name, loaded.version, k, v)
    return path, check


def record_outcome(reg: ModelRegistry, run_id: str, outcome: str, reason: str) -> None:
    reg.client.set_tag(run_id, "outcome", outcome)
    reg.client.set_tag(run_id, "reason", reason[:4900])



def champion_metrics(reg: ModelRegistry) -> dict:
    """The serving version and its holdout IoU, as recorded on its run (for metrics.json)."""
    mv = reg.champion()
    if mv is None:
        return {"champion_version": None}
    metrics = reg.client.get_run(mv.tags.get("run_id") or mv.run_id).data.metrics
    return {"champion_version": str(mv.version), "batch_id": mv.tags.get("batch_id"),
            **{k[len("candidate."):]: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith("candidate.")}}
