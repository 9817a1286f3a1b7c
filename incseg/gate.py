"""The promotion gate: compare candidate and champion on the holdout, decide, explain."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from incseg.config import GateParams

if TYPE_CHECKING:  # torch only where intervals are computed: the registry imports this module and stays light
    import torch


@dataclass
class Check:
    name: str
    passed: bool
    observed: float
    threshold: float
    detail: str
    interval: tuple[float, float] | None = None  # over resamples of the holdout's images (`gate.interval_level`)
    close_call: bool = False  # one end of the interval passes the check and the other fails it


@dataclass
class Decision:
    promote: bool
    reason: str
    checks: list[Check] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "promoted" if self.promote else "rejected"

    @property
    def close_calls(self) -> list[Check]:
        return [c for c in self.checks if c.close_call]

    def to_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "close_calls": [c.name for c in self.close_calls],
                "checks": [asdict(c) for c in self.checks]}


def needs_approval(decision: Decision, approval: str) -> bool:
    """Whether a person decides (`gate.approval`): never on a failed check; on every pass (`manual`),
    or on a pass with a close call (`close_calls`)."""
    return decision.promote and (approval == "manual" or (approval == "close_calls" and bool(decision.close_calls)))


Figure = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]  # (candidate, champion) R x C IoU -> R values


def _iou(report: dict, name: str) -> float:
    v = report["per_class"].get(name)
    return 0.0 if v is None else float(v)


def decide(candidate: dict, champion: dict, old: list[int], new: list[int], names: dict[int, str],
           gate: GateParams, resampled: tuple[torch.Tensor, torch.Tensor] | None = None) -> Decision:
    """Promote only if mIoU gains enough, no old class drops too far and every new class is learned.

    Both reports must be computed over the same scope (old + new classes) by the same code.
    Classes absent from the holdout ground truth are not gated on. `resampled` (candidate, champion):
    per-class IoU (R x C) of both models on the same R resamples of the holdout's images
    (`metrics.resampled_iou`); each check then carries its `gate.interval_level` interval, and a
    check that one end of it passes and the other fails is named a close call in the reason. Intervals never change
    the verdict.
    """
    checks: list[Check] = []

    def check(name: str, value: float, limit: float, ok: Callable[[float], bool], detail: str, figure: Figure) -> None:
        interval, close = None, False
        if resampled is not None:
            import torch

            tail = (1 - gate.interval_level) / 2
            lo, hi = (torch.nanquantile(figure(*resampled), q).item() for q in (tail, 1 - tail))
            if lo == lo:  # not NaN: the class is in some resample's ground truth
                interval, close = (round(lo, 4), round(hi, 4)), ok(lo) != ok(hi)
        checks.append(Check(name, ok(value), round(value, 4), limit, detail, interval, close))

    scope = old + new
    gain = candidate["miou"] - champion["miou"]
    check("miou_gain", gain, gate.min_miou_gain, lambda v: v >= gate.min_miou_gain,
          f"mIoU over {len(scope)} classes {champion['miou']:.3f} -> {candidate['miou']:.3f} ({gain:+.3f})",
          lambda cand, champ: cand[:, scope].nanmean(1) - champ[:, scope].nanmean(1))
    for c in old:
        name = names[c]
        if champion["per_class"].get(name) is None:
            continue
        check(f"class_drop:{name}", _iou(champion, name) - _iou(candidate, name), gate.max_class_drop,
              lambda v: v <= gate.max_class_drop, f"'{name}' IoU {_iou(champion, name):.3f} -> {_iou(candidate, name):.3f}",
              lambda cand, champ, c=c: champ[:, c] - cand[:, c])
    for c in new:
        name = names[c]
        if candidate["per_class"].get(name) is None:
            continue
        check(f"new_class:{name}", _iou(candidate, name), gate.min_new_class_iou,
              lambda v: v >= gate.min_new_class_iou, f"new class '{name}' IoU {_iou(candidate, name):.3f}",
              lambda cand, champ, c=c: cand[:, c])
    failed = [c for c in checks if not c.passed]
    if failed:
        reason = "; ".join(f"{c.name} failed: {c.detail} (limit {c.threshold})" for c in failed)
    else:
        learned = [f"{c.name.split(':', 1)[1]} {c.observed:.3f}" for c in checks if c.name.startswith("new_class:")]
        reason = f"all {len(checks)} gates passed: {checks[0].detail}" + (
            f"; new class IoU: {', '.join(learned)}" if learned else "")  # what the update was for
    close = [c for c in checks if c.close_call]
    if close:
        reason += (f"; close call (the check passes at one end of its {round(100 * gate.interval_level)} % interval over "
                   "the holdout's images and fails at the other: other holdout images could decide otherwise): "
                   + ", ".join(f"{c.name} {c.observed:.3f} in [{c.interval[0]:.3f}, {c.interval[1]:.3f}]" for c in close))
    return Decision(not failed, reason, checks)
