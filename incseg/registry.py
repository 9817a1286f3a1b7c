"""MLflow tracking and Model Registry: runs, versions, lineage tags and the `champion` alias.
Every write to MLflow goes through `ModelRegistry` (the layers above never call the client).

The serving model is the version behind the alias `champion`; a candidate carries
`challenger` while it is judged. Every version keeps a plain, pickle-free checkpoint
(`checkpoint/model.pt`: arch, classes, state_dict) and its exemplar memory (`memory/`)
beside the MLflow pyfunc (`incseg.serving`), so an update can always load it.
"""

from __future__ import annotations

import getpass
import io
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from incseg.gate import needs_approval
from incseg.processes import owner_alive
from incseg.workspace import Workspace

if TYPE_CHECKING:  # torch and the learner load only where a model is written or read: `promote` stays light
    from torch import nn

    from incseg.continual.memory import ExemplarMemory
    from incseg.pipeline import CheckedBatch, Judgement
    from incseg.training import EvalPoint, TrainResult

CHAMPION, CHALLENGER = "champion", "challenger"
CHECKPOINT = "checkpoint/model.pt"
AWAITING = "awaiting_approval"  # passed every check; `champion` waits for a person (gate.approval: manual, close_calls)
FINAL_OUTCOMES = ("promoted", "rejected", "invalid", "diverged", AWAITING)
MEMORY = "memory"


class RegistryError(RuntimeError):
    """An expected registry failure: no champion yet, unknown version, unreachable store."""


class RegistryUnavailable(RegistryError):
    """The tracking store did not answer (closed port, locked SQLite file): worth a retry."""


@contextmanager
def reachable(uri: str):
    """Turn store failures into `RegistryUnavailable` with a message that names the URI."""
    import sqlite3

    import requests
    import sqlalchemy.exc

    try:
        yield
    except RegistryError:
        raise
    except (MlflowException, requests.exceptions.RequestException, sqlalchemy.exc.OperationalError,
            sqlite3.OperationalError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise RegistryUnavailable(f"MLflow store at {uri} failed: {first}") from err


# what `mlflow.register_model` prints to stderr whatever the `mlflow` logger's level
REGISTRATION_EVENTS = ("Successfully registered model ", "Registered model ", "Created version ")


@contextmanager
def events_at_log_level() -> Iterator[None]:
    """MLflow's registration events follow the `mlflow` logger's level, as its INFO lines do: below
    INFO (the CLI's default, `cli.quiet_mlflow`) they are dropped; any other line written to stderr
    meanwhile still reaches it."""
    if logging.getLogger("mlflow").isEnabledFor(logging.INFO):
        yield
        return
    caught = io.StringIO()
    try:
        with redirect_stderr(caught):
            yield
    finally:
        sys.stderr.writelines(line for line in caught.getvalue().splitlines(keepends=True)
                              if not line.startswith(REGISTRATION_EVENTS))


@dataclass
class LoadedModel:
    version: str
    model: nn.Module
    classes: dict[int, str]
    memory: ExemplarMemory
    run_id: str
    image_size: int  # the size it was trained and judged at
    native_size: tuple[int, int] | None  # the holdout images' (height, width) then (None: older checkpoints)


def who() -> str:
    return os.environ.get("INCSEG_USER") or getpass.getuser()


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def use_store(uri: str) -> None:
    """Point MLflow's fluent API at `uri` without leaking it into MLFLOW_TRACKING_URI
    (mlflow sets that variable, which would then override every other workspace's store)."""
    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class ModelRegistry:
    """One registered model (`model.name` in params) in the workspace's tracking store."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.uri = ws.tracking_uri
        self.name = ws.params.model.name
        # bounded: our tasks retry with backoff, MLflow's own HTTP retries would take minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        use_store(self.uri)
        self.client = MlflowClient(self.uri, self.uri)

    # ---- runs -------------------------------------------------------------------------
    def experiment_id(self) -> str:
        name = self.ws.params.mlflow.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        return self.client.create_experiment(name, artifact_location=self.ws.artifact_location)

    def start_run(self, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id(), run_name=run_name, tags=tags)
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run.info.run_id

    def log_validation(self, run_id: str, checked: CheckedBatch) -> None:
        """The batch's validation report (JSON + markdown), GX's raw result and GX's Data Docs site
        (`validation/data_docs/index.html`), under `validation/`."""
        self.client.log_dict(run_id, checked.report.to_dict(), "validation/report.json")
        self.client.log_text(run_id, checked.report.markdown(), "validation/report.md")
        self.client.log_dict(run_id, checked.gx_result, "validation/gx_result.json")
        if checked.data_docs is not None and (checked.data_docs / "index.html").exists():
            self.client.log_artifacts(run_id, str(checked.data_docs), "validation/data_docs")

    def log_evaluation(self, run_id: str, point: EvalPoint, holdout_miou: float) -> None:
        """One evaluation during training: loss, validation-split mIoU (early stopping's signal) and
        holdout mIoU (the gate's), at the optimizer step."""
        self.client.log_metric(run_id, "train_loss", point.loss, step=point.step)
        if point.val_miou == point.val_miou:
            self.client.log_metric(run_id, "val_miou", point.val_miou, step=point.step)
        self.client.log_metric(run_id, "holdout_miou", holdout_miou, step=point.step)

    def record_training(self, run_id: str, result: TrainResult) -> None:
        """How training went: steps, best step, why it stopped, images seen, seconds."""
        tags = {"resumed_from_step": result.resumed_from, "world_size": result.world_size, "steps": result.steps,
                "best_step": result.best_step, "stopped": result.stopped or "max_steps",
                "lr_decays": result.lr_decays}
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))
        self.client.log_metric(run_id, "images_processed", result.images_processed)
        self.client.log_metric(run_id, "train_seconds", result.seconds)

    def log_judgement(self, run_id: str, j: Judgement, figures: dict[str, Any]) -> None:
        """Per-class IoU metrics of both models, decision.json, and the figures (path -> matplotlib figure)."""
        import matplotlib.pyplot as plt

        for k, v in j.metrics().items():
            self.client.log_metric(run_id, k, v)
        self.client.log_dict(run_id, j.record(), "decision.json")
        for path, fig in figures.items():
            self.client.log_figure(run_id, fig, path)
            plt.close(fig)  # long-running watchers must not accumulate open figures

    def publish(self, run_id: str, version: str, j: Judgement, tags: dict[str, str] | None = None
                ) -> tuple[str, str | None]:
        """Record the verdict on the version and the run (with the reviewer's card and the IoU table);
        move `champion` only on promotion. With `gate.approval: manual`, an update that passed every
        check (with `close_calls`: one that passed with a close call) is left `awaiting_approval` with
        `challenger` on it (the first bootstrap has nothing to hold).
        Returns the status and the champion after."""
        import mlflow

        # the classes it is the mean over: a version taught more is scored over more (MiB's protocol)
        metrics = {"candidate_miou": f"{j.candidate['miou']:.4f}", "miou_classes": len(j.candidate["in_scope"])}
        if j.champion:
            metrics["champion_miou"] = f"{j.champion['miou']:.4f}"
            # checks whose interval over the holdout's images holds their limit: a verdict to read twice
            metrics["close_calls"] = ", ".join(c.name for c in j.decision.close_calls) or "none"
        status = j.decision.status
        if j.champion and needs_approval(j.decision, self.ws.params.gate.approval):
            status = AWAITING
            for k, v in {**metrics, **(tags or {}), "status": status, "reason": j.decision.reason[:4900]}.items():
                self.client.set_model_version_tag(self.name, version, k, str(v))
        else:
            self.record_verdict(version, status, j.decision.reason, {**metrics, **(tags or {})})
            if j.decision.promote:
                self.set_champion(version, j.decision.reason)
        self.client.set_tag(run_id, "outcome", status)
        if j.champion:
            self.client.set_tag(run_id, "close_calls", metrics["close_calls"])
        self.client.set_tag(run_id, "model_version", version)
        mlflow.log_table(data=j.iou_table(), artifact_file="review/iou.json", run_id=run_id)
        self.client.log_text(run_id, j.card(status), "review/verdict.md")
        champion = self.champion()
        return status, (str(champion.version) if champion else None)

    def awaiting(self, version: str) -> ModelVersion:
        mv = self.version(version)
        if mv.tags.get("status") != AWAITING:
            raise RegistryError(f"version {version} is not awaiting approval (status: {mv.tags.get('status') or 'none'})")
        return mv

    def approve(self, version: str, comment: str = "", by: str | None = None) -> str | None:
        """A person's yes: `champion` moves to the version awaiting approval; who, when and why are
        its tags. Returns the champion it replaced."""
        mv = self.awaiting(version)
        by = by or who()
        reason = f"approved by {by}" + (f": {comment}" if comment else "")
        self.record_verdict(str(mv.version), "promoted", reason, {"approved_by": by, "approved_at": _now(),
                                                           "approval_comment": comment})
        previous = self.set_champion(str(mv.version), reason)
        self._decided(mv, "promoted", reason)
        return previous

    def reject(self, version: str, reason: str, by: str | None = None) -> None:
        """A person's no: the version is `rejected` with the reason, `challenger` comes off it."""
        mv = self.awaiting(version)
        by = by or who()
        self.record_verdict(str(mv.version), "rejected", f"rejected by {by}: {reason}",
                   {"rejected_by": by, "rejected_at": _now(), "rejection_reason": reason})
        self._decided(mv, "rejected", f"rejected by {by}: {reason}")

    def _decided(self, mv: ModelVersion, outcome: str, reason: str) -> None:
        run_id = mv.tags.get("run_id")
        if run_id:
            self.client.set_tag(run_id, "outcome", outcome)
            self.client.set_tag(run_id, "reason", reason[:4900])
            self.client.log_text(run_id, f"# Decision: {outcome}\n\n{reason}\n", "review/decision.md")

    def finish_run(self, run_id: str, outcome: str, reason: str, failed: bool = False) -> None:
        """The run's `outcome` and `reason` tags (the ledger reads them), then close it."""
        self.client.set_tag(run_id, "outcome", outcome)
        self.client.set_tag(run_id, "reason", reason[:4900])
        self.end_run(run_id, failed=failed)

    def record_latency(self, run_id: str, event_time: str, started: float) -> dict[str, float]:
        """For an update a data event started: seconds from the event to the start of the flow run
        that handled it (`started`, a Unix time) and to the verdict (the MLflow run's end), as
        metrics; the event's time as a tag."""
        from datetime import datetime

        occurred = datetime.fromisoformat(event_time.replace("Z", "+00:00")).timestamp()
        latency = {"latency.event_to_start_s": started - occurred}
        end = self.client.get_run(run_id).info.end_time
        if end:
            latency["latency.event_to_verdict_s"] = end / 1000 - occurred
        self.client.set_tag(run_id, "event_time", event_time)
        for k, v in latency.items():
            self.client.log_metric(run_id, k, round(v, 3))
        return latency

    def close_orphaned_runs(self) -> list[str]:
        """Runs left RUNNING by a killed update (SIGKILL, power loss) are marked KILLED with a reason,
        so the UI shows no phantom runs. Only runs whose owning process is provably dead are touched."""
        closed = []
        for run in self.running_runs():
            if owner_alive(run.data.tags):
                continue
            reason = (f"killed: process {run.data.tags.get('owner_pid')} on {run.data.tags.get('owner_host')} "
                      "ended before the run finished")
            self.client.set_tag(run.info.run_id, "outcome", "killed")
            self.client.set_tag(run.info.run_id, "reason", reason)
            self.end_run(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
        return closed

    def ledger(self) -> dict[tuple[str, str], str]:
        """(batch_id, data_hash) -> outcome of every finished update or bootstrap run.

        Crashed or failed runs are not in it, so their batch is picked up again.
        """
        exp = self.client.get_experiment_by_name(self.ws.params.mlflow.experiment)
        if exp is None:
            return {}
        done: dict[tuple[str, str], str] = {}
        for run in self.client.search_runs([exp.experiment_id], max_results=50_000, order_by=["attributes.start_time ASC"]):
            t = run.data.tags
            if t.get("outcome") in FINAL_OUTCOMES and t.get("batch_id") and t.get("data_hash"):
                done[(t["batch_id"], t["data_hash"])] = t["outcome"]
        return done

    def end_run(self, run_id: str, failed: bool = False, status: str | None = None) -> None:
        self.client.set_terminated(run_id, status or ("FAILED" if failed else "FINISHED"))

    def running_runs(self) -> list:
        """Runs of this experiment that MLflow still shows as RUNNING."""
        from mlflow.entities import ViewType

        exp = self.client.get_experiment_by_name(self.ws.params.mlflow.experiment)
        if exp is None:
            return []
        return self.client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'",
                                       run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)

    def log_model(self, run_id: str, model: nn.Module, classes: dict[int, str], memory: ExemplarMemory,
                  image_size: int, native_size: tuple[int, int] | None) -> str:
        """Log the plain checkpoint (with the training size and the holdout images' (height, width), so
        that prediction scales images as training did), the memory, and the pyfunc (images in, label
        masks out)."""
        import torch

        import incseg
        from incseg.models import save_checkpoint
        from incseg.serving import CHECKPOINT_ARTIFACT

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = save_checkpoint(Path(tmp) / "model.pt", model.cpu().eval(), classes, image_size=image_size,
                                   native_size=list(native_size) if native_size else None)
            self.client.log_artifact(run_id, str(ckpt), "checkpoint")
            if memory.root is not None and memory.items:
                self.client.log_artifacts(run_id, str(memory.root), MEMORY)
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(  # models from code: the definition is a file, not a pickle
                    name="model", python_model=str(Path(incseg.__file__).parent / "pyfunc_model.py"),
                    artifacts={CHECKPOINT_ARTIFACT: str(ckpt)},
                    code_paths=[str(Path(incseg.__file__).parent)],
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                                      "torchvision", "numpy", "pandas", "pillow", "pyyaml", "pydantic"],
                )
        return info.model_uri

    # ---- versions ---------------------------------------------------------------------
    def register(self, run_id: str, model_uri: str, tags: dict[str, str]) -> ModelVersion:
        """A new version, tagged `status=pending`, carrying `challenger` while it is judged."""
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(self.name, description="incseg segmentation model")
        with events_at_log_level():
            mv = mlflow.register_model(model_uri, self.name, tags={**tags, "status": "pending", "run_id": run_id})
        self.client.set_registered_model_alias(self.name, CHALLENGER, str(mv.version))
        return mv

    def record_verdict(self, version: str, status: str, reason: str, tags: dict[str, str]) -> None:
        """Record the verdict on the version and take `challenger` off it."""
        for k, v in {**tags, "status": status, "reason": reason[:4900]}.items():
            self.client.set_model_version_tag(self.name, version, k, str(v))
        self.clear_challenger(version)

    def clear_challenger(self, version: str) -> None:
        try:
            if str(self.client.get_model_version_by_alias(self.name, CHALLENGER).version) == str(version):
                self.client.delete_registered_model_alias(self.name, CHALLENGER)
        except MlflowException:
            pass

    def champion(self) -> ModelVersion | None:
        try:
            return self.client.get_model_version_by_alias(self.name, CHAMPION)
        except MlflowException as err:
            if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code) or "not found" in str(err).lower():
                return None
            raise

    def require_champion(self) -> ModelVersion:
        mv = self.champion()
        if mv is None:
            raise RegistryError(f"model '{self.name}' has no champion in {self.uri}: run `incseg bootstrap` first")
        return mv

    def version(self, version: str | int) -> ModelVersion:
        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException as err:
            raise RegistryError(f"model '{self.name}' has no version {version}") from err

    def resolve(self, version: str | None = None, alias: str | None = None) -> ModelVersion:
        """The version asked for: by number, by alias, or the champion."""
        if version is not None:
            return self.version(version)
        if alias is None or alias == CHAMPION:
            return self.require_champion()
        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException as err:
            raise RegistryError(f"model '{self.name}' has no alias '{alias}' (aliases: {self.aliases()})") from err

    def set_champion(self, version: str | int, reason: str) -> str | None:
        """Move `champion` to `version`; the version remembers the one it replaced."""
        mv = self.version(version)
        if mv.tags.get("status") in ("pending", "diverged", "failed"):
            raise RegistryError(f"version {version} is {mv.tags['status']}; it cannot serve")
        if mv.tags.get("status") == AWAITING:  # moved by hand, its waiting update would later reject it as champion
            raise RegistryError(f"version {version} awaits approval: `incseg approve {version}` serves it and "
                                "closes the update waiting for the decision")
        before = self.champion()
        previous = str(before.version) if before else None
        if previous == str(mv.version):
            return previous
        tags = {"previous_champion": previous or "", "champion_set_by": who(), "champion_set_reason": reason}
        for k, v in tags.items():
            self.client.set_model_version_tag(self.name, mv.version, k, v)
        self.client.set_registered_model_alias(self.name, CHAMPION, str(mv.version))
        return previous

    def rollback(self, reason: str) -> tuple[str, str]:
        """Move `champion` back to the version it pointed to before; returns (from, to)."""
        current = self.require_champion()
        target = current.tags.get("previous_champion")
        if not target:
            raise RegistryError(f"version {current.version} has no previous champion to roll back to")
        self.version(target)
        self.client.set_registered_model_alias(self.name, CHAMPION, target)
        for k, v in {"rolled_back_by": who(), "rolled_back_reason": reason, "rolled_back_to": target}.items():
            self.client.set_model_version_tag(self.name, current.version, k, v)
        return str(current.version), target

    def versions(self) -> list[ModelVersion]:
        try:
            found = self.client.search_model_versions(f"name='{self.name}'")
        except MlflowException:
            return []
        return sorted(found, key=lambda mv: int(mv.version))

    def aliases(self) -> dict[str, str]:
        try:
            return {k: str(v) for k, v in self.client.get_registered_model(self.name).aliases.items()}
        except MlflowException:
            return {}

    def load(self, mv: ModelVersion, scratch: Path) -> LoadedModel:
        """The version's model (from the plain checkpoint) and its exemplar memory."""
        from incseg.continual.memory import ExemplarMemory
        from incseg.models import load_checkpoint, trained_scale

        run_id = mv.tags.get("run_id") or mv.run_id
        dst = scratch / f"v{mv.version}"
        dst.mkdir(parents=True, exist_ok=True)
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT, dst_path=str(dst),
                                                   tracking_uri=self.uri)
        model, classes, ckpt = load_checkpoint(Path(path))
        try:
            mem = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=MEMORY, dst_path=str(dst),
                                                      tracking_uri=self.uri)
            memory = ExemplarMemory.load(Path(mem))
        except (MlflowException, OSError):
            memory = ExemplarMemory.empty()
        return LoadedModel(str(mv.version), model, classes, memory, run_id, *trained_scale(ckpt))

    def log_onnx(self, loaded: LoadedModel, path: Path, check) -> None:
        """An ONNX export that agreed with PyTorch (`export.OnnxCheck`): logged to the version's run
        under `onnx/` and named in the version's tags."""
        from incseg.export import check_record

        for f in (path, path.with_name("classes.json")):
            self.client.log_artifact(loaded.run_id, str(f), "onnx")
        self.client.log_dict(loaded.run_id, check_record(check), "onnx/check.json")
        for k, v in {"onnx": f"onnx/{path.name}", "onnx_argmax_agreement": f"{check.agreement:.6f}",
                     "onnx_max_abs_diff": f"{check.max_abs_diff:.3g}"}.items():
            self.client.set_model_version_tag(self.name, loaded.version, k, v)

    def champion_metrics(self) -> dict:
        """The serving version and its holdout IoU, as recorded on its run (for metrics.json)."""
        mv = self.champion()
        if mv is None:
            return {"champion_version": None}
        metrics = self.client.get_run(mv.tags.get("run_id") or mv.run_id).data.metrics
        return {"champion_version": str(mv.version), "batch_id": mv.tags.get("batch_id"),
                **{k[len("candidate."):]: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith("candidate.")}}
