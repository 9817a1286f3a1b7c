"""Continual-learning pieces: distillation, the exemplar memory, and the quick benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from incseg.cli import app
from incseg.continual.distillation import pseudo_label, unbiased_cross_entropy, unbiased_distillation
from incseg.continual.memory import ExemplarMemory
from incseg.data.layout import IGNORE, BatchInfo, find_pairs


def test_distillation_is_zero_when_student_equals_teacher():
    teacher = torch.randn(2, 4, 8, 8)
    assert unbiased_distillation(teacher.clone(), teacher).abs().item() < 1e-6
    # a student grown by two classes that it never predicts still equals the teacher
    grown = torch.cat([teacher, torch.full((2, 2, 8, 8), -1e4)], dim=1)
    assert unbiased_distillation(grown, teacher).abs().item() < 1e-6
    assert unbiased_distillation(torch.randn(2, 4, 8, 8), teacher).item() > 0.01


def test_distillation_lets_new_classes_take_background():
    """MiB: a student moving background mass to a new class is not punished."""
    teacher = torch.tensor([5.0, 0.0, 0.0]).view(1, 3, 1, 1)  # old model: surely background
    moved = torch.tensor([0.0, 0.0, 0.0, 5.0]).view(1, 4, 1, 1)  # student: the new class 3
    kept_old = torch.tensor([0.0, 5.0, 0.0, 0.0]).view(1, 4, 1, 1)  # student: old class 1
    assert unbiased_distillation(moved, teacher) < 0.05 < unbiased_distillation(kept_old, teacher)


def test_distillation_treats_a_row_never_taught_as_new():
    """Class 3 arrives after class 4: the old model has a row for it but was never taught it, so a
    student giving it background's pixels is not punished (it would be, were row 3 an old class)."""
    teacher = torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0]).view(1, 5, 1, 1)  # surely background
    moved = torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0]).view(1, 5, 1, 1)  # student: class 3
    taught = [0, 1, 2, 4]
    assert unbiased_distillation(moved, teacher, taught) < 0.05 < unbiased_distillation(moved, teacher)
    assert unbiased_distillation(teacher.clone(), teacher, taught).abs().item() < 1e-6
    kept_old = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0]).view(1, 5, 1, 1)  # student: old class 4
    assert unbiased_distillation(kept_old, teacher, taught) > 1
    labels, annotated = pseudo_label(torch.zeros(1, 1, 1, dtype=torch.long), torch.tensor([[True, False, False, True,
                                     False]]), torch.tensor([0.0, 0.0, 0.0, 9.0, 0.0]).view(1, 5, 1, 1), 0.9, taught)
    assert labels.item() == IGNORE  # the old model's untaught row is never a pseudo-label
    assert annotated.tolist() == [[True, True, True, True, True]]


def test_unbiased_ce_lets_background_hide_unannotated_classes():
    logits = torch.tensor([0.0, 8.0, 0.0]).view(1, 3, 1, 1)  # predicts class 1 on a "background" pixel
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    labelled_everything = torch.ones(1, 3, dtype=torch.bool)
    class_1_unlabelled = torch.tensor([[True, False, True]])
    assert unbiased_cross_entropy(logits, target, class_1_unlabelled) < 0.01
    assert unbiased_cross_entropy(logits, target, labelled_everything) > 5


def test_pseudo_labels_trust_the_old_model_where_it_is_confident_and_ignore_the_rest():
    # pixels: confident class 1, unsure, confident background, a labelled new-class pixel
    teacher = torch.tensor([[0.0, 9.0], [0.0, 0.1], [9.0, 0.0], [0.0, 9.0]]).T.reshape(1, 2, 1, 4)
    target = torch.tensor([[[0, 0, 0, 2]]])
    labels, annotated = pseudo_label(target, torch.tensor([[True, False, True]]), teacher, 0.9)
    assert labels.tolist() == [[[1, IGNORE, 0, 2]]]
    assert annotated.tolist() == [[True, True, True]]  # the old model's classes are now labelled
    trusted = torch.tensor([[[True, False, False, False]]])  # mistaken_objects: the old model is wrong there
    labels, _ = pseudo_label(target, torch.tensor([[True, False, True]]), teacher, 0.9, trusted=trusted)
    assert labels.tolist() == [[[0, IGNORE, 0, 2]]]  # the trusted pixel stays background


def test_with_pseudo_labels_an_old_class_on_confident_background_is_penalised():
    """MiB's unbiased CE lets a background pixel of a new batch turn into any old class; once the
    old model has labelled it background (PLOP), predicting an old class there costs."""
    from incseg.config import ContinualParams, TrainParams
    from incseg.continual.strategies import make_objective

    teacher = nn.Conv2d(3, 2, 1)  # an old model with classes {0, 1} that calls everything background
    nn.init.zeros_(teacher.weight)
    teacher.bias.data = torch.tensor([9.0, 0.0])
    images = torch.zeros(1, 3, 2, 2)
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    annotated = torch.tensor([[True, False, True]])  # the batch labels class 2 only
    old_class_everywhere = torch.tensor([0.0, 8.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    train = TrainParams(dice_weight=0.0)
    mib = make_objective("distill", train, ContinualParams(distill_weight=0.0), teacher)
    plop = make_objective("distill", train, ContinualParams(distill_weight=0.0, pseudo_label_threshold=0.7), teacher)
    assert mib(old_class_everywhere, images, target, annotated) < 0.01
    assert plop(old_class_everywhere, images, target, annotated) > 5


def test_without_distillation_on_new_class_pixels_the_label_wins_where_the_old_model_is_wrong():
    """The old model calls a labelled new-class pixel old class 1 (the new class resembles it): MiB
    distils that answer (a student that follows the label pays), `distill_new_class_pixels: false`
    does not there, and still distils every other pixel exactly as before."""
    from incseg.config import ContinualParams, TrainParams
    from incseg.continual.distillation import new_class_pixels
    from incseg.continual.strategies import make_objective

    teacher = nn.Conv2d(3, 2, 1)  # classes {0, 1}; calls everything class 1
    nn.init.zeros_(teacher.weight)
    teacher.bias.data = torch.tensor([0.0, 9.0])
    images = torch.zeros(1, 3, 1, 2)
    target = torch.tensor([[[2, 0]]])  # pixel 0: labelled new class 2; pixel 1: background
    annotated = torch.tensor([[True, False, True]])
    assert new_class_pixels(target, 2).tolist() == [[[True, False]]]
    assert new_class_pixels(torch.tensor([[[1, 3, IGNORE]]]), 4, [0, 1, 2]).tolist() == [[[False, True, False]]]
    follows = torch.tensor([[0.0, 0.0], [0.0, 9.0], [9.0, 0.0]]).view(1, 3, 1, 2)  # pixel 0: class 2, 1: class 1
    train = TrainParams(ce_weight=0.0, dice_weight=0.0)  # the distillation term alone
    alone = {"mistaken_object_share": 0.0}  # the old model's one region is half new class: that rule off here
    mib = make_objective("distill", train, ContinualParams(**alone), teacher)
    label_wins = make_objective("distill", train, ContinualParams(distill_new_class_pixels=False, **alone), teacher)
    assert mib(follows, images, target, annotated) > 4 > 0.01 > label_wins(follows, images, target, annotated)
    elsewhere = follows.clone()
    elsewhere[0, :, 0, 1] = torch.tensor([9.0, 0.0, 0.0])  # pixel 1 (not new) leaves class 1: both pay alike
    pixel_1 = mib(elsewhere, images, target, annotated) - mib(follows, images, target, annotated)
    assert pixel_1 > 4 and torch.isclose(label_wins(elsewhere, images, target, annotated), pixel_1, atol=1e-3)


def test_an_old_object_the_new_label_mostly_claims_leaves_its_background_trusted():
    """The old model calls a whole disc class 1 where the batch labels a crescent (new class 2) and its
    bite background, and calls a separate blob class 1 too (an old object left unlabelled). MiB lets
    both stay class 1; with `mistaken_object_share` (default 0.4) the bite is background (the region is
    mostly the new class), undistilled, while the separate blob keeps MiB's "background or an old class"."""
    from incseg.config import ContinualParams, TrainParams
    from incseg.continual.distillation import mistaken_objects
    from incseg.continual.strategies import make_objective

    old = torch.full((1, 2, 8, 8), 0.0)
    old[0, 0] = 9.0
    old[0, 1, 0:4, 0:4] = 18.0  # the disc: 16 pixels
    old[0, 1, 6:8, 6:8] = 18.0  # a separate blob, labelled background
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 0:4, 0:3] = 2  # the crescent: 12 of the disc's 16 pixels; its bite: column 3
    bite = torch.zeros(1, 8, 8, dtype=torch.bool)
    bite[0, 0:4, 3] = True
    assert mistaken_objects(old, target, 0.5).equal(bite)
    assert not mistaken_objects(old, target, 0.8).any()  # 12 / 16 of the disc is new: below 0.8
    assert mistaken_objects(old, target, 0.5, taught=[0]).sum() == 0  # class 1 never taught: no old object

    class Teacher(nn.Module):
        def forward(self, images):
            return old

    images = torch.zeros(1, 3, 8, 8)
    annotated = torch.tensor([[True, False, True]])
    student = torch.zeros(1, 3, 8, 8)
    student[0, 1] = 9.0  # calls every pixel class 1 ...
    student[0, 2, target[0] == 2] = 18.0  # ... but the crescent, which it gets right
    train = TrainParams(dice_weight=0.0)
    mib = make_objective("distill", train, ContinualParams(mistaken_object_share=0.0), Teacher())
    trusting = make_objective("distill", train, ContinualParams(), Teacher())
    # mean over 64 pixels: the bite's 4 now cost ~9 each in the CE (class 1 where background is the label)
    assert trusting(student, images, target, annotated) - mib(student, images, target, annotated) > 4 * 8 / 64
    fixed = student.clone()
    fixed[0, 0, bite[0]] = 18.0  # the bite turned background: cheaper with the rule, dearer for MiB (distilled)
    assert trusting(fixed, images, target, annotated) < trusting(student, images, target, annotated)
    assert mib(fixed, images, target, annotated) > mib(student, images, target, annotated)
    # with PLOP's pseudo-labels too, the bite is not pseudo-labelled class 1 (where the old model is sure)
    with_plop = make_objective("distill", train, ContinualParams(pseudo_label_threshold=0.7), Teacher())
    assert with_plop(student, images, target, annotated) - with_plop(fixed, images, target, annotated) > 4 * 8 / 64


def test_feature_distillation_is_zero_for_equal_features_and_grows_as_they_move():
    from incseg.continual.distillation import pod_distillation

    torch.manual_seed(0)
    feats = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
    assert pod_distillation([f.clone() for f in feats], feats).item() < 1e-6
    near = pod_distillation([f + 0.1 * torch.randn_like(f) for f in feats], feats)
    far = pod_distillation([torch.randn_like(f) for f in feats], feats)
    assert 0 < near < far


def test_feature_taps_feed_the_objective_and_leave_no_hooks():
    """With `feature_distill_weight`, a student whose features moved pays more than the plain
    distillation objective; the hooks are gone after the block."""
    import copy

    from incseg.config import ContinualParams, TrainParams
    from incseg.continual.strategies import feature_taps, make_objective
    from incseg.models import build_model, expand_classes, feature_modules

    torch.manual_seed(0)
    teacher = build_model("unet", 3, width=4).eval()
    student = expand_classes(copy.deepcopy(teacher), 1)
    with torch.no_grad():
        student.enc[0][0].weight.add_(0.5 * torch.randn_like(student.enc[0][0].weight))
    images, target = torch.randn(2, 3, 16, 16), torch.zeros(2, 16, 16, dtype=torch.long)
    annotated = torch.ones(2, 4, dtype=torch.bool)
    cont = ContinualParams(feature_distill_weight=1.0)
    plain = make_objective("distill", TrainParams(), cont, teacher)(student(images), images, target, annotated)
    with feature_taps(student, teacher) as features:
        tapped = make_objective("distill", TrainParams(), cont, teacher, features)(student(images), images, target,
                                                                                   annotated)
        assert len(features[0]) == len(features[1]) == len(feature_modules(student))
    assert tapped > plain + 1e-4
    assert all(not m._forward_hooks for m in feature_modules(student) + feature_modules(teacher))


def test_memory_stays_bounded_and_class_balanced(stream_dir, tmp_path):
    memory = ExemplarMemory.empty()
    for i, batch in enumerate(("batch-00", "batch-01", "batch-02")):
        root = stream_dir / "registry" / batch
        info = BatchInfo.read(root)
        memory = memory.refreshed(find_pairs(root), batch, info.classes, 12, tmp_path / f"m{i}")
        assert len(memory.items) <= 12
        assert len(list((tmp_path / f"m{i}" / "images").iterdir())) == len(memory.items)
    counts = memory.per_class()
    assert set(counts) == {1, 2, 3, 4}
    assert max(counts.values()) - min(counts.values()) <= 1
    reloaded = ExemplarMemory.load(tmp_path / "m2")
    assert reloaded.items == memory.items
    # exemplars keep the label set of their own batch (triangle batch annotated only class 3)
    assert {it.annotated for it in memory.items if it.batch_id == "batch-01"} == {(3,)}


def test_large_exemplars_are_stored_scaled_to_twice_the_training_size(stream_dir, tmp_path):
    """Exemplars were full-size copies stored with every version: 128 camera frames of 2048 x 1024 cost
    hundreds of MB per version. One larger than max(256, 2 x the training size) on its shorter side is
    kept scaled down to it (aspect kept, label ids kept); a small one stays byte for byte."""
    from PIL import Image

    from incseg.data.dataset import kept_side

    small = find_pairs(stream_dir / "registry" / "batch-00")[:2]
    big = tmp_path / "big"
    for sub in ("images", "masks"):
        (big / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    mask = np.zeros((400, 800), np.uint8)
    mask[100:300, 200:400], mask[:, 700:] = 2, IGNORE
    Image.fromarray(rng.integers(0, 255, (400, 800, 3), np.uint8)).save(big / "images" / "frame.jpg")
    Image.fromarray(mask).save(big / "masks" / "frame.png")
    memory = ExemplarMemory.empty().refreshed(small + find_pairs(big), "b", [0, 1, 2], 8, tmp_path / "m",
                                              image_size=48)
    assert kept_side(48) == 256 and kept_side(200) == 400
    frame = memory.pair(next(it for it in memory.items if it.stem == "b__frame"))
    with Image.open(frame.image) as im, Image.open(frame.mask) as m:
        assert im.size == m.size == (512, 256)
        kept = np.array(m)
    assert set(np.unique(kept)) == {0, 2, IGNORE}
    assert abs((kept == 2).mean() - (mask == 2).mean()) < 0.01
    for p in small:
        copy = memory.pair(next(it for it in memory.items if it.stem == f"b__{p.stem}"))
        assert copy.image.read_bytes() == p.image.read_bytes() and copy.mask.read_bytes() == p.mask.read_bytes()
    again = ExemplarMemory.load(tmp_path / "m").refreshed([], "c", [0], 8, tmp_path / "m2", image_size=48)
    assert again.pair(next(it for it in again.items if it.stem == "b__frame")).image.stat().st_size == \
        frame.image.stat().st_size  # kept as it was: not scaled twice


def test_held_back_exemplars_are_a_seeded_share_of_every_class_and_never_replayed(stream_dir, tmp_path):
    memory = ExemplarMemory.empty()
    for i, batch in enumerate(("batch-00", "batch-01")):
        root = stream_dir / "registry" / batch
        memory = memory.refreshed(find_pairs(root), batch, BatchInfo.read(root).classes, 24, tmp_path / f"m{i}")
    replayed, held = memory.held_back(0.25, seed=0)
    assert {it.stem for it in replayed.items} | {it.stem for it in held.items} == {it.stem for it in memory.items}
    assert not {it.stem for it in replayed.items} & {it.stem for it in held.items}
    assert held.per_class() == {c: n // 4 for c, n in memory.per_class().items()}  # each class, rounded down
    assert memory.held_back(0.25, seed=0) == (replayed, held)
    assert memory.held_back(0.0, seed=0)[1].items == []
    assert [held.pair(it).image.exists() for it in held.items] == [True] * len(held.items)


class Constant(nn.Module):
    """A 'model' that calls every pixel class `k`."""

    def __init__(self, k: int, n: int):
        super().__init__()
        self.k, self.n, self.dummy = k, n, nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.n, *x.shape[2:])
        out[:, self.k] = 1.0
        return out


def test_early_stopping_pools_each_class_over_the_groups_that_label_it(stream_dir):
    """An update's validation score: the new class from the batch's split, old classes from held-back
    exemplars of their own batches; background where no group labels every class is left out."""
    from helpers import tiny_params
    from incseg.data.dataset import SegmentationFolder, eval_transforms
    from incseg.pipeline import validation_score

    params, n, cpu = tiny_params(), 5, torch.device("cpu")
    base, new = find_pairs(stream_dir / "registry" / "batch-00"), find_pairs(stream_dir / "registry" / "batch-01")

    def share(pairs, c) -> float:  # the IoU of a model calling everything c: c's share of the labelled pixels
        masks = torch.stack([m for _, m, _ in SegmentationFolder(pairs, eval_transforms(32), n)])
        return float((masks == c).sum() / (masks < n).sum())

    only_new = validation_score([(new[:8], [0, 3])], params, n, cpu)
    pooled = validation_score([(new[:8], [0, 3]), (base[:12], [0, 1, 2])], params, n, cpu)
    assert only_new(Constant(3, n)) == pytest.approx(share(new[:8], 3))  # the batch alone: its new class
    assert pooled(Constant(3, n)) == pytest.approx(share(new[:8], 3) / 3)  # + squares and circles forgotten: 0
    assert pooled(Constant(1, n)) == pytest.approx(share(base[:12], 1) / 3)
    halves = validation_score([(new[:8], [0, 3]), (base[:6], [0, 1, 2]), (base[6:12], [0, 1, 2])], params, n, cpu)
    assert halves(Constant(1, n)) == pytest.approx(pooled(Constant(1, n)))  # pooled pixels, not a mean of groups
    assert validation_score([([], [0, 3]), (base[:12], [0, 1, 2])], params, n, cpu) is None  # no split of the batch


def test_an_update_scores_held_back_exemplars_only_when_asked_and_never_replays_them(stream_dir, tmp_path):
    from helpers import tiny_params
    from incseg.pipeline import Batch, update_sets

    base = stream_dir / "registry" / "batch-00"
    memory = ExemplarMemory.empty().refreshed(find_pairs(base), "batch-00", [0, 1, 2], 24, tmp_path / "m")
    batch = Batch.load(stream_dir / "registry" / "batch-01")

    def stems(dataset) -> set[str]:
        return {pair.stem for part in getattr(dataset, "datasets", [dataset]) for pair in part.pairs}

    data, _, groups = update_sets(tiny_params(), batch, memory, 5)  # the default: the batch's split alone
    assert len(groups) == 1 and groups[0][1] == batch.classes and groups[0][0]
    assert stems(data) >= {it.stem for it in memory.items}  # every exemplar is replayed
    data, _, groups = update_sets(tiny_params(continual={"memory_val_fraction": 0.5}), batch, memory, 5)
    assert [annotated for _, annotated in groups] == [batch.classes, [0, 1, 2]]
    held = {pair.stem for pair in groups[1][0]}
    assert len(held) == 12 and not held & stems(data)  # half of each class scored, none of them replayed
    assert stems(data) >= {it.stem for it in memory.items} - held
    assert not {pair.stem for pair in groups[0][0]} & stems(data)  # nor the batch's own split


def test_replay_leans_toward_the_old_class_the_champion_takes_the_new_class_for(stream_dir, tmp_path):
    """`continual.replay_toward_confused`: a champion calling every pixel circle takes the batch's
    triangles for circles, so half the replay goes to circles on top of the even half."""
    from helpers import tiny_params
    from incseg.models import build_model
    from incseg.pipeline import Batch, confused_replay, update_sets

    base = stream_dir / "registry" / "batch-00"
    memory = ExemplarMemory.empty().refreshed(find_pairs(base), "batch-00", [0, 1, 2], 24, tmp_path / "m")
    batch, cpu = Batch.load(stream_dir / "registry" / "batch-01"), torch.device("cpu")

    def calls_everything(k: int) -> nn.Module:
        champion = build_model("unet", 3, width=4)
        with torch.no_grad():
            champion.head.weight.zero_()
            champion.head.bias.copy_(torch.eye(3)[k] * 10)
        return champion

    def class_weights(sampler) -> dict[int, float]:  # each class's share of the replay's draw
        weights = sampler.weights[-len(memory.items):]  # the batch's part comes first
        kept = [it for items in memory.by_label_set().values() for it in items]
        out = {c: float(sum(w for w, it in zip(weights, kept) if it.primary == c)) for c in (1, 2)}
        return {c: v / sum(out.values()) for c, v in out.items()}

    params = tiny_params(continual={"replay_toward_confused": 0.5})
    shares = confused_replay(params, calls_everything(2), batch, memory, 5, cpu)
    assert shares == pytest.approx({1: 0.25, 2: 0.75})
    _, sampler, _ = update_sets(params, batch, memory, 5, shares)
    assert class_weights(sampler) == pytest.approx({1: 0.25, 2: 0.75})
    assert float(sampler.weights[:-len(memory.items)].sum()) == pytest.approx(0.5)  # the batch keeps its half
    # background is no old class to lean toward: even shares, as when the knob is off (None: every exemplar alike)
    assert confused_replay(params, calls_everything(0), batch, memory, 5, cpu) == pytest.approx({1: 0.5, 2: 0.5})
    assert confused_replay(tiny_params(), calls_everything(2), batch, memory, 5, cpu) is None
    _, sampler, _ = update_sets(tiny_params(), batch, memory, 5)
    assert len(set(sampler.weights[-len(memory.items):].tolist())) == 1


@pytest.mark.slow
@pytest.mark.cost(110)
def test_benchmark_replay_distill_forgets_less_than_naive(tmp_path):
    """The benchmark's scenario at test size (tiny budgets; `incseg bench --quick` is the larger
    smoke run): naive forgets visibly, replay+distill far less (both looks: 25-30 vs <0 points)."""
    from helpers import tiny_params
    from incseg.bench import continual as b

    params = tiny_params(synth={"new_classes": 1, "domain_shift": False}, train={  # base, then one new class
        "bootstrap_max_steps": 240, "bootstrap_min_steps": 120, "update_max_steps": 120, "update_min_steps": 60})
    finished = []  # what was measured each time a strategy finished (the CLI writes its tables then)
    scenario = b.run_scenario(params, ("naive", "replay+distill"), ceiling_check=False,
                              on_done=lambda s, pending: finished.append((list(s.runs), pending)))
    assert finished == [(["naive"], ("replay+distill",)), (["naive", "replay+distill"], ())]
    _, partial = b.write(scenario, params, tmp_path / "partial", quick=True, pending=("joint",))
    assert partial.startswith("**Partial result: still running joint.**")
    path, text = b.write(scenario, params, tmp_path / "results", quick=True)
    assert 'Made by `incseg bench --quick --style shapes --strategies "naive,replay+distill"`' in text
    summary = json.loads(path.with_suffix(".json").read_text())
    naive, ours = summary["naive"], summary["replay+distill"]
    assert naive["forgetting_points"] > 10  # naive visibly forgets
    assert ours["forgetting_points"] < naive["forgetting_points"] - 10
    assert ours["miou_all"] > naive["miou_all"]
    # the product's gate judges each update against the model before it (the stream goes on regardless)
    assert [v["batch"] for v in naive["gate"]] == [v["batch"] for v in ours["gate"]] == ["batch-01"]
    assert naive["gate"][0]["status"] == "rejected" and "class_drop:" in naive["gate"][0]["reason"]
    assert ours["gate"][0]["status"] in ("promoted", "rejected") and "## What the gate would do" in text
    assert all(set(v["close_calls"]) <= {"miou_gain", "class_drop:background", "class_drop:square", "class_drop:circle",
                                         "new_class:triangle"} for v in naive["gate"] + ours["gate"])
    assert path.with_suffix(".png").stat().st_size > 1000
    assert "Accuracy matrix: replay+distill" in text and path.with_suffix(".md").read_text().startswith(text)


@pytest.mark.slow
@pytest.mark.cost(10)
def test_joint_once_trains_on_the_fully_labelled_stream_and_scores_every_class(tmp_path, capsys):
    """The ceiling check's (and `benchmarks/joint_final.py`'s) joint: one run on every batch with
    full labels, reported with its cost, curve and an IoU for every class of the stream; with
    `progress`, a log gets a line per evaluation (a 50-minute run is not silent)."""
    from helpers import tiny_params
    from incseg.bench import continual as b

    params = tiny_params(synth={"new_classes": 1, "domain_shift": False},
                         train={"bootstrap_max_steps": 60, "bootstrap_min_steps": 30})
    ws, infos, batches, full = b.stream(params, tmp_path)
    assert [x.batch_id for x in full] == [x.batch_id for x in batches] and len(infos) == 2
    assert set(full[1].classes) > set(batches[1].classes)  # old objects labelled in the full copy
    classes = sorted({c for x in full for c in x.classes})
    res = b.joint_once(ws, full, classes, budget_scale=0.5, progress=True)
    assert res["steps"] == 30 and res["images"] >= 30 * 15 and res["curve"][-1][0] == 30
    lines = [x for x in capsys.readouterr().out.splitlines() if ": step " in x]
    assert len(lines) == len(res["curve"]) and ": step 30/30 " in lines[-1]
    assert set(res["iou"]) == set(classes) and 0 <= res["miou_all"] <= 1


def test_a_longer_joint_budget_waits_longer_for_a_gain_too():
    """Twice the budget with the patience unchanged lets the rule stop as early as before (it did,
    at 4200 of 8000 steps); the ceiling check doubles both. A shorter budget keeps the patience."""
    from incseg.bench.continual import joint_params
    from incseg.config import Params

    base = Params()
    longer = joint_params(base, 2.0).train
    assert (longer.bootstrap_min_steps, longer.bootstrap_max_steps, longer.patience) == (
        2 * base.train.bootstrap_min_steps, 2 * base.train.bootstrap_max_steps, 2 * base.train.patience)
    shorter = joint_params(base, 0.5).train
    assert shorter.bootstrap_max_steps == base.train.bootstrap_max_steps // 2 and shorter.patience == base.train.patience
    assert base.train.patience == Params().train.patience  # the caller's params are not changed


def test_bench_names_an_unknown_strategy(tmp_path):
    result = CliRunner().invoke(app, ["-C", str(tmp_path), "bench", "--quick", "--strategies", "naive,magic"])
    assert result.exit_code == 1 and "unknown strategies ['magic']" in result.output


def test_each_ablation_variant_changes_one_knob_of_the_default():
    from incseg.bench import continual as b
    from incseg.bench.recipe import with_changes
    from incseg.config import Params

    default = Params().model_dump()
    for name, changes in b.ABLATION.items():
        varied = with_changes(Params(), changes).model_dump()
        differs = {f"{section}.{k}" for section, values in default.items() if isinstance(values, dict)
                   for k, v in values.items() if varied[section][k] != v}
        assert len(changes) == 1 and differs == set(changes), name
        assert varied["continual"]["strategy"] == default["continual"]["strategy"], name


def test_a_report_without_the_default_strategy_has_no_targets_section():
    from incseg.bench import continual as b

    s = b.Scenario({0: "background", 1: "square", 2: "triangle"}, {0: 0, 1: 0, 2: 1})
    s.runs["naive"] = [b.Step("batch-00", [0.9, 0.8, float("nan")], 10, 1.0),
                       b.Step("batch-01", [0.9, 0.5, 0.6], 10, 1.0)]
    text = b.markdown(s, b.summary(s), "replay+distill", "incseg bench --strategies naive")
    assert "| naive |" in text and "## Targets" not in text


def test_the_images_target_counts_the_updates_against_joints_retrainings_and_names_both_ratios():
    """The issue's words: images of all updates together against joint's retrainings, the shared base
    on neither side; the ratio with the base on both sides is shown beside it."""
    from incseg.bench import continual as b

    s = b.Scenario({0: "background", 1: "square", 2: "triangle", 3: "ring"}, {0: 0, 1: 0, 2: 1, 3: 2})
    nan = float("nan")
    for name, per_step in (("replay+distill", 100), ("joint", 500)):
        s.runs[name] = [b.Step("batch-00", [0.9, 0.8, nan, nan], 1000, 1.0),
                        b.Step("batch-01", [0.9, 0.8, 0.7, nan], per_step, 1.0),
                        b.Step("batch-02", [0.9, 0.8, 0.7, 0.7], per_step, 1.0)]
    summ = b.summary(s)
    assert (summ["replay+distill"]["update_images"], summ["joint"]["update_images"]) == (200, 1000)
    target = next(t for t in b.targets(summ, "replay+distill") if t[0].startswith("images processed"))
    assert target[1] is True  # 200 / 1000 = 0.20; with the base on both sides it would be 1200 / 2000 = 0.60
    assert target[2] == "200 vs 250 (0.20 x); with the base on both sides 1200 vs 2000 (0.60 x)"
    s.runs["replay+distill"][2].images = 400
    assert next(t for t in b.targets(b.summary(s), "replay+distill") if t[0].startswith("images"))[1] is False


def test_the_report_shows_each_updates_gate_verdict_and_counts_the_promotions():
    from incseg.bench import continual as b

    s = b.Scenario({0: "background", 1: "square", 2: "triangle", 3: "ring"}, {0: 0, 1: 0, 2: 1, 3: 2})
    nan = float("nan")
    s.runs["replay+distill"] = [
        b.Step("batch-00", [0.9, 0.8, nan, nan], 10, 1.0),
        b.Step("batch-01", [0.9, 0.8, 0.6, nan], 10, 1.0, gate={"status": "promoted", "reason": "all 3 gates passed"}),
        b.Step("batch-02", [0.9, 0.6, 0.6, 0.5], 10, 1.0,
               gate={"status": "rejected", "reason": "class_drop:square failed: 'square' IoU 0.800 -> 0.600"})]
    summ = b.summary(s)
    assert [v["status"] for v in summ["replay+distill"]["gate"]] == ["promoted", "rejected"]
    text = b.markdown(s, summ, "replay+distill", "incseg bench")
    row = next(line for line in text.splitlines() if line.startswith("| replay+distill | promoted"))
    assert row == ("| replay+distill | promoted | **rejected**: class_drop:square failed: 'square' IoU 0.800 -> 0.600 "
                   "| 1 of 2 |")


@pytest.mark.slow
@pytest.mark.cost(10)
def test_a_scenario_runs_named_variants_for_the_first_updates_and_traces_the_holdout():
    """`run_scenario`'s variants (as `benchmarks/update_rule.py` uses them): each named set of param
    changes runs the default strategy from the same base, only the first `updates` batches, and a
    traced variant scores the holdout at every evaluation."""
    from helpers import tiny_params
    from incseg.bench import continual as b

    params = tiny_params(synth={"new_classes": 2, "domain_shift": False}, train={
        "bootstrap_max_steps": 24, "bootstrap_min_steps": 24, "update_max_steps": 12, "update_min_steps": 12,
        "eval_every": 6})
    variants = {"short": {"train.update_max_steps": 6, "train.update_min_steps": 6, "continual.memory_size": 2},
                "as is": {}}
    s = b.run_scenario(params, ("short", "as is"), ceiling_check=False, variants=variants, updates=1, trace=("short",))
    short, as_is = s.runs["short"], s.runs["as is"]
    # a variant's memory size is the memory it replays and keeps (before, every run kept the params' own)
    assert (short[1].memory, as_is[1].memory) == (2, params.continual.memory_size)
    assert short[0] is as_is[0] and short[0].steps == 24  # one base model, shared
    assert [st.batch_id for st in short] == [st.batch_id for st in as_is] == ["batch-00", "batch-01"]
    assert (short[1].steps, as_is[1].steps) == (6, 12) and short[1].stopped == as_is[1].stopped == "max_steps"
    assert [t["step"] for t in short[1].trace] == [6] and as_is[1].trace == []
    assert len(short[1].trace[0]["holdout_iou"]) == len(s.classes) and short[1].best_step == 6


def test_the_benchmark_trains_at_the_size_auto_picks_for_its_own_stream():
    """`data.image_size: auto` (the default) read raw from params.yaml, as `benchmarks/update_rule.py`
    passes it: the base model and the update both train at the size the stream's holdout resolves to
    (before, the update got the string 'auto' and crashed after the base model's hours)."""
    from helpers import tiny_params
    from incseg.bench import continual as b

    params = tiny_params(data={"image_size": "auto"}, synth={"new_classes": 1, "domain_shift": False,
                                                               "base_images": 24, "step_images": 16},
                         train={"bootstrap_max_steps": 4, "bootstrap_min_steps": 4, "update_max_steps": 4,
                                "update_min_steps": 4, "eval_every": 2, "update_eval_every": 2, "batch_size": 4})
    scenario = b.run_scenario(params, ("replay+distill",), ceiling_check=False)
    base, update = scenario.runs["replay+distill"]
    assert (base.steps, update.steps) == (4, 4) and update.batch_id == "batch-01"
