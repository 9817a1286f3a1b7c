"""The typed `params.yaml`: one object, loaded once, passed down.

Every knob of the product lives here with its default. Paths are relative to the
workspace directory (the folder holding `params.yaml`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = "params.yaml"
Style = Literal["shapes", "blobs"]  # the synthetic generator's looks
STYLES: tuple[str, ...] = get_args(Style)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataParams(Section):
    root: str = "data"
    image_size: Annotated[int, Field(ge=16)] | Literal["auto"] = Field(
        "auto", description="side of the square images are resized to for training and evaluation; auto: "
                            "the holdout images' own shorter side in steps of 16, at least 64 and at most 96 "
                            "(`incseg.workspace.auto_image_size`)")
    pull: bool = Field(True, description="before each watch, bring the registry up to date from the workspace's "
                                         "git upstream and DVC remote (`git pull --ff-only`, `dvc pull`)")

    @model_validator(mode="before")
    @classmethod
    def _fixed_ignore_label(cls, values):
        """`ignore_index` was a setting; 255 is the only ignore label (VOC's and Cityscapes' too)."""
        if isinstance(values, dict) and "ignore_index" in values:
            values = dict(values)
            if values.pop("ignore_index") != 255:
                raise ValueError("ignore_index is no longer a setting: masks mark ignored pixels with 255")
        return values


class SynthParams(Section):
    style: Style = Field("shapes", description="the look: geometric shapes or lobed blobs")
    seed: int = 0
    size: int = Field(64, ge=16)
    holdout_per_class: int = Field(16, ge=1)
    base_images: int = Field(192, ge=1)
    step_images: int = Field(96, ge=1)
    base_classes: int = Field(2, ge=1, description="foreground classes in the base batch")
    new_classes: int = Field(2, ge=0, description="later batches, each bringing one class")
    domain_shift: bool = True
    old_classes: Literal["background", "keep", "absent"] = "background"


class ModelParams(Section):
    name: str = "incseg-segmenter"
    arch: Literal["unet", "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"] = "unet"
    width: int = Field(16, ge=4, description="U-Net base channel count")
    depth: int = Field(3, ge=1, le=6, description="U-Net down-sampling stages")


class DistributedParams(Section):
    nproc: int = Field(1, ge=1, description="processes per node; > 1 runs training under torchrun (DDP)")
    torchrun_args: list[str] = Field(default_factory=list,
                                     description="extra torchrun flags, e.g. ['--nnodes=2', '--rdzv-endpoint=host:29400']")


# An update that stops by the bootstrap's rule (its eval_every, patience and lr_decays): what the
# short-budget configurations use (the demo, the quick bench, the tests' tiny params)
UPDATE_RULE_SHARED: dict[str, None] = {"update_eval_every": None, "update_lr_decays": None, "update_patience": None}

# What a run's evaluations judge and what it keeps: the latest weights (off), an exponential moving
# average over about eval_every steps (ema), or the uniform average of every step's weights from half
# the first evaluation on (swa). A params file's `true` / `false` (the older boolean) read as ema / off.
def _weight_average(value: object) -> object:
    return ("ema" if value else "off") if isinstance(value, bool) else value


WeightAverage = Annotated[Literal["off", "ema", "swa"], BeforeValidator(_weight_average)]


class TrainParams(Section):
    device: str = "auto"
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-2, gt=0, description="peak learning rate from scratch (bootstrap)")
    update_lr: float = Field(1e-2, gt=0, description="peak learning rate when continuing the champion")
    weight_decay: float = Field(0.01, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    dice_weight: float = Field(0.5, ge=0)
    bootstrap_max_steps: int = Field(16000, ge=1, description="most optimizer steps of a model trained from scratch")
    bootstrap_min_steps: int = Field(800, ge=0, description="no early stop before this many steps (from scratch)")
    bootstrap_judge_from: int = Field(0, ge=0, description="from scratch, evaluations before this step are logged, not "
                                      "judged: no weights kept, no plateau counted (0: every evaluation)")
    update_max_steps: int = Field(1600, ge=1, description="most optimizer steps of an update")
    update_min_steps: int = Field(400, ge=0, description="no early stop before this many steps (update)")
    eval_every: int = Field(200, ge=1, description="steps between evaluations of the validation split")
    patience: int = Field(12, ge=1, description="evaluations without gain before the LR drops (or training stops)")
    lr_decays: int = Field(2, ge=0, description="plateaus that lower the LR (x0.2, from the best weights) before stopping")
    update_eval_every: int | None = Field(100, ge=1, description="eval_every of an update; null: eval_every")
    update_lr_decays: int | None = Field(1, ge=0, description="lr_decays of an update; null: lr_decays")
    update_patience: int | None = Field(3, ge=1, description="patience of an update; null: patience")
    score_smoothing: float = Field(0.5, gt=0, le=1, description="weight of the newest validation score in the moving "
                                   "average that plateaus are counted on (1: the raw score; the best raw score's "
                                   "weights are kept either way)")
    anneal_fraction: float = Field(0.25, ge=0, le=1, description="the last share of max_steps lowers the LR linearly to 0")
    average_weights: WeightAverage = Field("off", description="what a run judges and keeps: the latest weights (off), "
                                           "their EMA over ~eval_every steps (ema), their uniform average (swa)")
    update_average_weights: WeightAverage | None = Field(
        "swa", description="average_weights of an update; null: average_weights (update-recipe.md section 12)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of a batch held out for early stopping")
    augment: bool = Field(True, description="random flips, and random resized crops for crop_probability of the samples")
    crop_probability: float = Field(0.5, ge=0, le=1, description="share of training samples cropped (the rest are "
                                    "resized whole, as evaluated); recipe.md, the crop on half the samples")
    color_jitter: float = Field(0.0, ge=0, le=1, description="brightness, contrast and saturation vary by a random "
                                "factor in [1 - s, 1 + s], hue by up to s / 4, on training images (0: off)")
    num_workers: int = Field(0, ge=0)
    distributed: DistributedParams = DistributedParams()


class ContinualParams(Section):
    strategy: Literal["naive", "replay", "distill", "replay+distill"] = "replay+distill"
    memory_size: int = Field(128, ge=0, description="exemplar images kept for replay (stored with each version, "
                             "scaled down to max(256, 2 x image_size) px on the shorter side)")
    replay_fraction: float = Field(0.5, ge=0, lt=1, description="share of each epoch drawn from memory")
    memory_val_fraction: float = Field(0.0, ge=0, lt=1, description="share of each class's exemplars not replayed "
                                       "but scored with the batch's validation split, so an update's early stop "
                                       "sees old classes too (0: the batch's split alone; update-recipe.md section 7)")
    replay_toward_confused: float = Field(0.0, ge=0, le=1, description="share of the replay drawn toward the old "
                                          "classes the champion takes the batch's new-class pixels for, in proportion "
                                          "(0: every exemplar equally; update-recipe.md section 16)")
    distill_weight: float = Field(1.0, ge=0)
    distill_new_class_pixels: bool = Field(True, description="distil the old model on pixels labelled with a new "
                                           "class too (MiB); false: only elsewhere (the label wins there)")
    mistaken_object_share: float = Field(0.4, ge=0, le=1, description="> 0: where at least this share of a region "
                                         "the champion gives one old class is labelled with a new class, its pixels "
                                         "labelled background are background (no 'or an old class', no distillation; "
                                         "update-recipe.md section 18); 0: MiB's rule everywhere")
    pseudo_label_threshold: float = Field(0.0, ge=0, le=1, description="0 disables PLOP pseudo-labels")
    head_lr_scale: float = Field(10.0, gt=0, description="learning-rate factor of the classifier during an update")
    head_init: Literal["background", "random"] = Field(
        "background", description="new-class classifier rows: copied from background (MiB) or random")
    feature_distill_weight: float = Field(0.0, ge=0, description="PLOP's pooled feature distillation (with a "
                                                                 "distill strategy); 0 disables")
    freeze_stem: bool = Field(False, description="keep the earliest encoder stage as the champion has it")
    fuse_old_weight: float = Field(0.0, ge=0, lt=1, description="after an update, weights = this x champion's + "
                                                               "the rest x candidate's (EWF); 0 disables")


class EvalParams(Section):
    batch_size: int = Field(32, ge=1)
    preview_images: int = Field(8, ge=0)


class ValidationParams(Section):
    min_size: int = Field(16, ge=1, description="smallest allowed image side")
    max_size: int = Field(4096, ge=1, description="largest allowed image side")
    min_images: int = Field(1, ge=1)
    max_images: int = Field(100_000, ge=1)
    max_ignore_fraction: float = Field(0.5, ge=0, le=1)
    min_foreground_fraction: float = Field(1e-6, ge=0, le=1, description="mask must not be all background/ignore "
                                           "(the share of labelled foreground below which it counts as such)")
    min_valid_fraction: float = Field(0.8, ge=0, le=1, description="share of files that must pass for the batch to proceed")
    max_resent_fraction: float = Field(0.5, ge=0, le=1, description="more images already in the registry = a re-send")
    drift_max_class_distance: float = Field(0.25, ge=0, le=1, description="total-variation distance of class pixel shares")
    drift_max_brightness_shift: float = Field(2.0, ge=0, description="|mean brightness shift| in reference std units")
    drift_blocks: bool = Field(False, description="drift rejects the batch instead of warning")
    task_runner: Literal["thread", "dask", "ray"] = Field("thread", description="Prefect task runner of the per-file extraction")
    workers: int = Field(4, ge=1, description="threads or local Dask/Ray workers")
    runner_address: str | None = Field(None, description="an existing Dask scheduler or Ray cluster instead of a local one")
    shard_size: int = Field(256, ge=1, description="files per mapped extraction task")


class GateParams(Section):
    min_miou_gain: float = Field(0.0, description="candidate mIoU minus champion mIoU must reach this")
    max_class_drop: float = Field(0.05, ge=0, description="largest allowed IoU drop of any old class")
    min_new_class_iou: float = Field(0.3, ge=0, le=1)
    interval_resamples: int = Field(1000, ge=0, description="bootstrap resamples of the holdout's images behind each "
                                    "check's interval; a check that passes at one end of it and fails at the other is a "
                                    "close call, named in the verdict, which it never changes (0: off)")
    interval_level: float = Field(0.9, gt=0, lt=1, description="coverage of each check's interval")
    approval: Literal["auto", "manual", "close_calls"] = Field(
        "auto", description="manual: an update that passes every check waits for `incseg approve` / `incseg reject` "
                            "(or a decision in the Prefect UI) before `champion` moves; close_calls: only one that "
                            "passes with a close call waits, a clear pass is promoted")
    approval_timeout_s: int = Field(3600, ge=1, description="with a Prefect server, how long an update waits for the "
                                                            "decision (later updates queue behind it) before it "
                                                            "rejects the candidate")


class ScheduleParams(Section):
    interval_seconds: int | None = Field(600, ge=1, description="`incseg serve` runs the watcher this often")
    cron: str | None = Field(None, description="a cron string instead of the interval, e.g. '0 * * * *'")


class MlflowParams(Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "incseg"


class Params(Section):
    data: DataParams = DataParams()
    synth: SynthParams = SynthParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    continual: ContinualParams = ContinualParams()
    eval: EvalParams = EvalParams()
    validation: ValidationParams = ValidationParams()
    gate: GateParams = GateParams()
    schedule: ScheduleParams = ScheduleParams()
    mlflow: MlflowParams = MlflowParams()

    def flat(self) -> dict[str, object]:
        """`section.key -> value`, for logging as MLflow params."""
        return {f"{s}.{k}": v for s, sec in self.model_dump().items() for k, v in sec.items()}


class ConfigError(ValueError):
    """A bad `params.yaml`: the message names the key and the problem."""


def load_params(path: Path) -> Params:
    """Read `params.yaml`; a missing file gives the defaults."""
    if not path.exists():
        return Params()
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{path}: not readable YAML: {first}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, train, ...), got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {key}: {first['msg']} (got {first.get('input')!r})") from err
