"""The gate's checks and their intervals over resamples of the holdout's images (paired bootstrap)."""

import torch

from incseg.config import GateParams
from incseg.gate import decide
from incseg.metrics import ConfusionMatrix, bootstrap_weights, iou_report, resampled_iou

NAMES = {0: "background", 1: "square", 2: "triangle"}


def holdout(new_class_tp: list[int]) -> ConfusionMatrix:
    """Per-image matrices: 100 background and 100 square pixels, all right; 100 triangle pixels of
    which the image's entry in `new_class_tp` are found, the rest called background."""
    cm = ConfusionMatrix(3, per_image=True)
    for tp in new_class_tp:
        target = torch.tensor([0] * 100 + [1] * 100 + [2] * 100)
        pred = target.clone()
        pred[200 + tp:] = 0
        cm.update(target[None], pred[None])
    return cm


def judged(champion: ConfusionMatrix, candidate: ConfusionMatrix, resamples: int = 1000):
    reports = [iou_report(cm, [0, 1], [2], NAMES) for cm in (candidate, champion)]
    w = bootstrap_weights(len(candidate.images), resamples)
    resampled = (resampled_iou(candidate.images, w), resampled_iou(champion.images, w))
    gate = GateParams()
    return decide(*reports, [0, 1], [2], NAMES, gate, resampled), decide(*reports, [0, 1], [2], NAMES, gate)


def test_a_new_class_just_under_its_limit_on_a_few_uneven_images_is_a_close_call():
    champion = holdout([0] * 12)  # the champion does not know triangle
    candidate = holdout([95, 90, 5, 0, 0, 0, 2, 0, 85, 0, 0, 3])  # found on 3 images of 12: IoU 0.233
    with_intervals, without = judged(champion, candidate)
    new = next(c for c in with_intervals.checks if c.name == "new_class:triangle")
    assert not new.passed and new.close_call
    lo, hi = new.interval
    assert lo < 0.2 and hi > 0.35 and lo < new.observed < hi  # three lucky images make or break it
    assert with_intervals.promote is without.promote is False  # intervals never change the verdict
    assert "close call" in with_intervals.reason and "new_class:triangle 0.233 in [" in with_intervals.reason
    assert with_intervals.to_dict()["close_calls"] == ["new_class:triangle"]
    assert all(c.interval is None and not c.close_call for c in without.checks) and "close call" not in without.reason


def test_a_clear_verdict_has_no_close_call():
    champion = holdout([0] * 40)
    candidate = holdout([80 + i % 10 for i in range(40)])  # triangle 0.845, steady over images
    decision, _ = judged(champion, candidate)
    assert decision.promote and not decision.close_calls and "close call" not in decision.reason
    # over how many classes: a champion listed at 0.9 over its 2 reads as worse than 0.85 over 3 otherwise
    assert decision.reason.startswith("all 4 gates passed: mIoU over 3 classes ")
    assert decision.reason.endswith("; new class IoU: triangle 0.845")  # what the update was for, in the verdict
    new = next(c for c in decision.checks if c.name == "new_class:triangle")
    assert 0.8 < new.interval[0] <= new.observed <= new.interval[1] < 0.9
    drop = next(c for c in decision.checks if c.name == "class_drop:square")
    assert drop.interval == (0.0, 0.0)  # paired: the same images for both models, and square is unchanged


def test_a_tie_is_not_a_close_call():
    """The same predictions: gain and drops are 0 on every resample, which passes (gain >= 0, drop <= 0.05)."""
    same = holdout([50 + i for i in range(20)])
    decision, _ = judged(same, same)
    assert decision.promote and not decision.close_calls
    assert all(c.interval == (0.0, 0.0) for c in decision.checks if not c.name.startswith("new_class"))


def test_who_decides_under_each_approval_mode():
    from incseg.gate import Check, Decision, needs_approval

    def decision(passed: bool, close: bool) -> Decision:
        return Decision(passed, "", [Check("new_class:triangle", passed, 0.31, 0.3, "", (0.25, 0.37), close)])

    table = {(mode, passed, close): needs_approval(decision(passed, close), mode)
             for mode in ("auto", "manual", "close_calls") for passed in (True, False) for close in (True, False)}
    assert [k for k, held in table.items() if held] == [
        ("manual", True, True), ("manual", True, False), ("close_calls", True, True)]  # a failed check never waits


def test_the_verdict_card_keeps_a_class_named_with_a_bar_in_its_row():
    """A class named `a|b` split its row of the verdict card's markdown tables into one cell too many."""
    from incseg.gate import Check, Decision
    from incseg.pipeline import Judgement

    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1, 2, 2]]), torch.tensor([[0, 1, 2, 1]]))
    names = {0: "background", 1: "cat|dog", 2: "x"}
    report = iou_report(cm, [0, 1], [2], names)
    check = Check("class_drop:cat|dog", True, 0.0, 0.05, "'cat|dog' IoU 0.500 -> 0.500")
    card = Judgement(Decision(True, "passed", [check]), report, report, {"candidate": cm}).card("promoted")
    rows = [line for line in card.splitlines() if line.startswith("|") and "cat" in line]
    assert len(rows) == 2, card
    for row in rows:  # the check table has 6 columns, the IoU table 4: their unescaped bars
        bars = row.replace("\\|", "").count("|")
        assert bars == (7 if row.startswith("| class_drop") else 5), row
