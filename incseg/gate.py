"""The promotion gate: compare candidate and champion on the holdout, decide, explain."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from incseg.config import GateParams


@dataclass
class Check:
    name: str
    passed: bool
    observed: float
    threshold: float
    detail: str


@dataclass
class Decision:
    promote: bool
    reason: str
    checks: list[Check] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "promoted" if self.promote else "rejected"

    def to_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "checks": [asdict(c) for c in self.checks]}


def _iou(report: dict, name: str) -> float:
    v = report["per_class"].get(name)
    return 0.0 if v is None else float(v)


def decide(candidate: dict, champion: dict, old: list[int], new: list[int], names: dict[int, str],
           gate: GateParams) -> Decision:
    """Promote only if mIoU gains enough, no old class drops too far and every new class is learned.

    Both reports must be computed over the same scope (old + new classes) by the same code.
    Classes absent from the holdout ground truth are not gated on.
    """
    checks = []
    gain = candidate["miou"] - champion["miou"]
    checks.append(Check("miou_gain", gain >= gate.min_miou_gain, round(gain, 4), gate.min_miou_gain,
                        f"mIoU {champion['miou']:.3f} -> {candidate['miou']:.3f} ({gain:+.3f})"))
    for c in old:
        name = names[c]
        if champion["per_class"].get(name) is None:
            continue
        drop = _iou(champion, name) - _iou(candidate, name)
        checks.append(Check(f"class_drop:{name}", drop <= gate.max_class_drop, round(drop, 4), gate.max_class_drop,
                            f"'{name}' IoU {_iou(champion, name):.3f} -> {_iou(candidate, name):.3f}"))
    for c in new:
        name = names[c]
        if candidate["per_class"].get(name) is None:
            continue
        iou = _iou(candidate, name)
        checks.append(Check(f"new_class:{name}", iou >= gate.min_new_class_iou, round(iou, 4),
                            gate.min_new_class_iou, f"new class '{name}' IoU {iou:.3f}"))
    failed = [c for c in checks if not c.passed]
    if failed:
        reason = "; ".join(f"{c.name} failed: {c.detail} (limit {c.threshold})" for c in failed)
        return Decision(False, reason, checks)
    return Decision(True, f"all {len(checks)} gates passed: {checks[0].detail}", checks)
