"""Benchmarks behind `incseg bench`: continual strategies, scale-out, inference latency."""

# The forgetting-control ablation (`incseg bench --ablation`): the default strategy with one knob
# changed each (name -> "section.key": value). Here, with nothing heavy imported: the CLI's help lists it.
ABLATION: dict[str, dict[str, object]] = {
    "+ pseudo-labels 0.7 (PLOP)": {"continual.pseudo_label_threshold": 0.7},
    "+ feature distillation 0.5 (PLOP POD)": {"continual.feature_distill_weight": 0.5},
    "+ weight fusion 0.3 (EWF)": {"continual.fuse_old_weight": 0.3},
    "+ frozen stem": {"continual.freeze_stem": True},
    "random new-head init": {"continual.head_init": "random"},
    "EMA instead of SWA": {"train.update_average_weights": "ema"},
    "no weight averaging": {"train.update_average_weights": "off"},
    "no distillation on new-class pixels": {"continual.distill_new_class_pixels": False},
    "+ replay toward confused 0.5": {"continual.replay_toward_confused": 0.5},
    "no mistaken objects (before 2026-12-06)": {"continual.mistaken_object_share": 0.0},
    "mistaken objects 0.5": {"continual.mistaken_object_share": 0.5},
    "memory 64 (before 2026-12-05)": {"continual.memory_size": 64},
}
