import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from incseg.metrics import mean_iou
from incseg.models import add_classes, build_model
from incseg.pipeline import Batch, cap_note, holdout_matrix, judge
from incseg.training import (Budget, DivergenceError, EvalPoint, LearningRate, TrainResult, evaluate, make_loader,
                             split_validation, train)

LEARNED_MIOU = 0.5  # over background + the two base classes; the tiny base model reaches far more


def test_short_training_learns_the_base_classes(base_model):
    ws, model, result = base_model
    trained = mean_iou(holdout_matrix(ws, model), [0, 1, 2])
    torch.manual_seed(0)
    untrained = mean_iou(holdout_matrix(ws, build_model("unet", 3, 8)), [0, 1, 2])
    assert untrained < LEARNED_MIOU < trained
    assert result.evals[-1].loss < result.evals[0].loss / 2
    assert all(e.val_miou == e.val_miou for e in result.evals)  # the validation split was scored every time
    assert result.best_step in [e.step for e in result.evals]


class Constant(torch.nn.Module):
    """Calls every pixel `label`, out of `n` classes."""

    def __init__(self, n: int, label: int):
        super().__init__()
        self.n, self.label = n, label

    def forward(self, x):
        labels = torch.full((x.shape[0], *x.shape[2:]), self.label)
        return torch.nn.functional.one_hot(labels, self.n).permute(0, 3, 1, 2).float()


def test_pixels_of_classes_not_taught_yet_are_left_out_of_the_holdout_scores():
    # one image: 4 pixels of class 1, 4 of class 2 (a class the model does not know), 8 background
    mask = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 0, 0], [0, 0, 0, 0]])
    loader = make_loader(TensorDataset(torch.zeros(1, 3, 4, 4), mask[None], torch.ones(1, 3, dtype=torch.bool)),
                         1, shuffle=False)
    model = Constant(2, label=1)  # knows background and class 1, calls everything class 1
    everything = evaluate(model, loader, 3, torch.device("cpu"))
    taught = evaluate(model, loader, 3, torch.device("cpu"), taught=[0, 1])
    assert everything.iou()[1].item() == pytest.approx(4 / 16)  # charged for the 4 class-2 pixels too
    assert taught.iou()[1].item() == pytest.approx(4 / 12)
    assert taught.mat[2].sum().item() == 0 and taught.mat.sum().item() == 12


def test_the_holdout_is_scored_over_the_classes_the_model_knows(base_model):
    ws, model, _ = base_model  # knows background and the two base classes; the holdout has later ones
    default = holdout_matrix(ws, model)
    full = holdout_matrix(ws, model, taught=list(range(default.n)))
    assert full.mat[3:].sum() > 0  # later classes are in the holdout
    assert default.mat[3:].sum() == 0 and default.mat[:3].sum() > 0
    assert torch.equal(default.mat[:3, :3], full.mat[:3, :3])


def test_the_champion_is_judged_at_the_size_it_was_trained_at(base_model):
    """With `data.image_size` changed (by hand, or `auto` following a replaced holdout) the champion was
    judged at the new size: it looked worse than it serves, and a worse candidate could replace it."""
    from incseg.workspace import Workspace

    ws, champion, _ = base_model  # trained at 32 px
    params = ws.params.model_copy(deep=True)
    params.data.image_size = 48
    resized = Workspace(ws.root, params)
    verdict = judge(resized, copy.deepcopy(champion), champion, Batch.load(ws.registry_dir / "batch-00"),
                    champion_size=32)
    assert torch.equal(verdict.matrices["champion"].mat, holdout_matrix(ws, champion).mat)  # as at 32 px
    assert verdict.matrices["candidate"].mat.sum() > 2 * verdict.matrices["champion"].mat.sum()  # 48 px: (48/32)^2
    assert verdict.decision.reason.endswith("(the champion judged at the 32 px it was trained at, the candidate at "
                                            "48 px)")


def test_the_gate_judges_champion_and_candidate_on_the_pixels_of_the_candidates_classes(base_model):
    ws, champion, _ = base_model  # 3 classes; the holdout also has class 3 (the batch's) and class 4 (later)
    candidate = add_classes(copy.deepcopy(champion), [0, 3])
    verdict = judge(ws, candidate, champion, Batch.load(ws.registry_dir / "batch-01"))
    for cm in verdict.matrices.values():
        assert cm.mat[3].sum() > 0  # the batch's class is scored, for the champion too (it calls it something else)
        assert cm.mat[4:].sum() == 0  # a class no batch has taught yet is not
    assert torch.equal(verdict.matrices["champion"].mat.sum(1), verdict.matrices["candidate"].mat.sum(1))


def test_classes_that_arrive_out_of_order_are_each_judged_as_new_when_they_arrive(base_model):
    """A batch bringing class 4 before class 3: the head grows by two, but class 3 stays untaught:
    left out of the holdout scores, not distilled as an old class. When class 3 arrives it is new:
    a fresh row, and the gate checks it as it checks every new class."""
    from incseg.continual.memory import ExemplarMemory
    from incseg.data.layout import read_classes
    from incseg.models import taught_classes
    from incseg.pipeline import train_candidate

    ws, champion, _ = base_model  # taught 0, 1, 2
    names = read_classes(ws.classes_file)
    params = ws.params.model_copy(deep=True)
    params.train.update_max_steps, params.train.update_min_steps, params.train.eval_every = 6, 6, 3
    fourth, third = Batch.load(ws.registry_dir / "batch-02"), Batch.load(ws.registry_dir / "batch-01")
    assert (third.info.new_classes, fourth.info.new_classes) == ([3], [4])
    assert taught_classes(champion) == [0, 1, 2]

    early, _ = train_candidate(params, champion, fourth, ExemplarMemory.empty(), progress=False)
    assert early.head.out_channels == 5 and taught_classes(early) == [0, 1, 2, 4]
    assert early.head.weight[3].abs().max().item() == 0 and early.head.bias[3].item() < -9000  # silent, untrained
    verdict = judge(ws, early, champion, fourth)
    for cm in verdict.matrices.values():
        assert cm.mat[3].sum() == 0 and cm.mat[4].sum() > 0  # class 3's pixels are not scored yet
    assert verdict.candidate["in_scope"] == [0, 1, 2, 4] and verdict.candidate["per_class"][names[3]] is None
    assert [c.name for c in verdict.decision.checks if c.name.startswith("new_class")] == [f"new_class:{names[4]}"]

    later, _ = train_candidate(params, early, third, ExemplarMemory.empty(), progress=False)
    assert later.head.out_channels == 5 and taught_classes(later) == [0, 1, 2, 3, 4]
    verdict = judge(ws, later, early, third)
    assert sorted(verdict.champion["in_scope"]) == [0, 1, 2, 3, 4]
    assert verdict.candidate["miou_new"] == pytest.approx(verdict.candidate["per_class"][names[3]], abs=1e-4)
    assert [c.name for c in verdict.decision.checks if c.name.startswith("new_class")] == [f"new_class:{names[3]}"]
    assert f"class_drop:{names[4]}" in [c.name for c in verdict.decision.checks]  # now an old class


def toy_loader(n: int = 32):
    images = torch.randn(n, 3, 8, 8)
    masks = (images[:, 0] > 0).long()
    return make_loader(TensorDataset(images, masks, torch.ones(n, 2, dtype=torch.bool)), 8, shuffle=True)


def toy_objective(logits, images, target, annotated):
    return torch.nn.functional.cross_entropy(logits, target)


def train_on_scores(scores: list[float], budget: Budget):
    """Train a toy model whose validation scores are given; (model, result, weights at each evaluation)."""
    torch.manual_seed(0)
    model, marks, snapshots = build_model("unet", 2, 4), iter(scores), {}

    def on_eval(point, m):
        snapshots[point.step] = {k: v.clone() for k, v in m.state_dict().items()}

    result = train(model, toy_loader(), toy_objective, budget, lr=1e-2, validate=lambda m: next(marks),
                   on_eval=on_eval, progress=False)
    return model, result, snapshots


def same_weights(model, snapshot) -> bool:
    kept = model.state_dict()
    return all(torch.equal(kept[k], snapshot[k]) for k in kept)


def test_training_stops_when_validation_stops_improving_and_keeps_the_best_weights():
    # best at the 2nd evaluation, then two without gain
    model, result, snapshots = train_on_scores([0.5, 0.7, 0.6, 0.65, 0.9, 0.95],
                                               Budget(max_steps=100, min_steps=0, eval_every=5, patience=2, decays=0))
    assert [e.step for e in result.evals] == [5, 10, 15, 20]
    assert result.stopped == "converged" and result.best_step == 10
    assert same_weights(model, snapshots[10]) and not same_weights(model, snapshots[20])


def test_a_plateau_lowers_the_learning_rate_from_the_best_weights_before_stopping():
    model, result, snapshots = train_on_scores([0.5, 0.4, 0.3, 0.2], Budget(
        max_steps=100, eval_every=5, patience=1, decays=1, decay_factor=0.1))
    assert result.lr_decays == 1 and result.stopped == "converged"
    assert [e.step for e in result.evals] == [5, 10, 15] and result.best_step == 5
    assert same_weights(model, snapshots[5])


def test_min_steps_hold_off_the_early_stop_and_max_steps_end_it():
    model = build_model("unet", 2, 4)
    result = train(model, toy_loader(), toy_objective,
                   Budget(max_steps=30, min_steps=25, eval_every=5, patience=1, decays=0),
                   lr=1e-2, validate=lambda m: 0.5, progress=False)
    assert result.stopped == "converged" and result.steps == 25  # no gain since step 5, but not before 25
    assert result.best_step == 5  # an update's early weights (closest to the champion) may be kept
    result = train(build_model("unet", 2, 4), toy_loader(), toy_objective, Budget(max_steps=12, eval_every=5),
                   lr=1e-2, progress=False)
    assert result.stopped == "max_steps" and [e.step for e in result.evals] == [5, 10, 12]


def test_a_lucky_score_before_judge_from_is_neither_kept_nor_restarted_from():
    """A small validation split can score an early, half-trained model highest by chance; before
    `judge_from` no weights are kept and no plateau is counted, so the LR drops restart from later weights."""
    model, result, snapshots = train_on_scores([0.9, 0.5, 0.6, 0.7, 0.65, 0.6, 0.55, 0.5], Budget(
        max_steps=100, min_steps=15, judge_from=15, eval_every=5, patience=1, decays=1, decay_factor=0.1))
    assert [e.step for e in result.evals] == [5, 10, 15, 20, 25, 30]
    assert result.best_step == 20 and result.lr_decays == 1 and result.stopped == "converged"
    assert same_weights(model, snapshots[20])


def test_a_smoothed_score_waits_out_a_lucky_spike_but_the_best_raw_weights_are_kept():
    """One spike (0.9) among scores still climbing: on the raw score it starts the wait that stops the
    run; on a moving average (the newest score's weight 0.5) the trend keeps rising past it."""
    scores = [0.5, 0.9, 0.7, 0.8, 0.85, 0.86, 0.87, 0.88]
    raw = train_on_scores(scores, Budget(max_steps=40, eval_every=5, patience=2, decays=0))[1]
    assert raw.stopped == "converged" and raw.steps == 20 and raw.best_step == 10
    model, result, snapshots = train_on_scores(scores, Budget(max_steps=40, eval_every=5, patience=2, decays=0,
                                                              smoothing=0.5))
    assert result.stopped == "max_steps" and result.steps == 40 and result.best_step == 10
    assert same_weights(model, snapshots[10])


def test_a_run_the_rule_stops_lasts_at_least_its_first_evaluation_and_one_patience_per_plateau():
    """The shortest run the rule allows: the first evaluation, then `patience` evaluations at each
    of the `decays` plateaus and at the last. The README's images bound rests on it: at the
    defaults each of joint's retrainings lasts at least 7400 steps, an update at most 1600."""
    from incseg.bench.continual import joint_params
    from incseg.config import Params
    from incseg.pipeline import budget

    model, result, _ = train_on_scores([0.5] * 20, Budget(max_steps=100, eval_every=5, patience=2, decays=2,
                                                          smoothing=0.5))
    assert result.stopped == "converged" and result.lr_decays == 2 and result.steps == 5 * (1 + 2 * 3) == 35
    boot = budget(joint_params(Params(), 1.0).train, from_scratch=True)
    update = budget(Params().train, from_scratch=False)
    shortest = boot.eval_every * (1 + boot.patience * (boot.decays + 1))
    assert shortest == 7400 and update.max_steps <= 0.25 * shortest


def test_max_steps_end_training_even_on_a_plateau_step():
    """A plateau found at the last step must not buy an extra step with a lower LR."""
    model, result, _ = train_on_scores([0.5, 0.4], Budget(max_steps=10, eval_every=5, patience=1, decays=2))
    assert result.stopped == "max_steps" and result.steps == 10 and [e.step for e in result.evals] == [5, 10]
    assert result.lr_decays == 0


def test_an_update_evaluates_and_drops_its_lr_on_its_own_cadence_when_set():
    """`update_eval_every` / `update_lr_decays` / `update_patience` shape an update's stopping rule;
    null, it shares the bootstrap's, and the bootstrap never reads them."""
    from incseg.config import TrainParams
    from incseg.pipeline import budget

    own = TrainParams(eval_every=200, lr_decays=2, patience=6, update_max_steps=1600, update_min_steps=400,
                      update_eval_every=100, update_lr_decays=1, update_patience=3)
    update, boot = budget(own, from_scratch=False), budget(own, from_scratch=True)
    assert (update.eval_every, update.decays, update.patience, update.max_steps, update.min_steps) == (100, 1, 3, 1600, 400)
    assert update.judge_from == 0  # from trained weights every evaluation counts (the earliest: closest to the champion)
    assert (boot.eval_every, boot.decays, boot.patience, boot.judge_from) == (200, 2, 6, 0)
    assert budget(own.model_copy(update={"bootstrap_judge_from": 800}), from_scratch=True).judge_from == 800
    shared = budget(own.model_copy(update={"update_eval_every": None, "update_lr_decays": None, "update_patience": None}),
                    from_scratch=False)
    assert (shared.eval_every, shared.decays, shared.patience) == (200, 2, 6)
    assert (update.average, boot.average) == ("swa", "off")  # updates average their weights, bootstraps do not
    assert budget(own.model_copy(update={"update_average_weights": None}), from_scratch=False).average == "off"
    assert (update.smoothing, boot.smoothing) == (0.5, 0.5)  # plateaus counted on a moving average of the scores
    assert budget(own.model_copy(update={"score_smoothing": 1.0}), from_scratch=True).smoothing == 1.0
    # the older boolean knob still reads: true was the EMA
    assert (TrainParams(average_weights=True).average_weights, TrainParams(average_weights=False).average_weights) == (
        "ema", "off")
    # at the defaults an update can stop before its cap: it waits at most patience evaluations at each
    # of decays + 1 rates past its best weights (at the bootstrap's rule: 1800 steps > 1600, never)
    default = budget(TrainParams(), from_scratch=False)
    assert default.patience * (default.decays + 1) * default.eval_every < default.max_steps - default.min_steps


def test_a_run_that_reaches_the_last_quarter_of_its_budget_anneals_to_zero():
    rate = LearningRate(total=400, cosine=False, warmup=40, anneal=0.25)
    assert rate(0) == pytest.approx(1 / 40) and rate(39) == 1.0  # warm-up
    assert rate(200) == rate(299) == 1.0  # constant until the last quarter
    assert rate(300) == 1.0 and rate(350) == pytest.approx(0.5) and rate(399) == pytest.approx(1 / 100)
    rate.scale = 0.2  # after a plateau's drop the anneal scales that lower rate
    assert rate(250) == pytest.approx(0.2) and rate(350) == pytest.approx(0.1)
    assert LearningRate(total=400, cosine=False, warmup=40)(399) == 1.0  # anneal 0: off


def test_weight_averaging_evaluates_and_keeps_the_moving_average():
    seen = {}

    def run(average: str):
        torch.manual_seed(0)
        model = build_model("unet", 2, 4)
        on_eval = (lambda point, judged: seen.update({point.step: {k: v.clone() for k, v in judged.state_dict().items()},
                                                      "judged": judged, "raw": model})) if average else None
        train(model, toy_loader(), toy_objective, Budget(max_steps=20, eval_every=10, average=average), lr=1e-2,
              validate=lambda m: 0.5, on_eval=on_eval, progress=False)
        return model

    plain, averaged = run("off"), run("ema")
    assert seen["judged"] is not seen["raw"]  # the evaluations judge the average, not the latest step
    kept = averaged.state_dict()
    assert all(torch.isfinite(v.float()).all() for v in kept.values())
    assert not all(torch.equal(kept[k], v) for k, v in plain.state_dict().items())  # same run, other weights kept
    assert all(torch.equal(kept[k], v) for k, v in seen[10].items())  # the best: step 10's average
    assert not all(torch.equal(kept[k], v) for k, v in seen[20].items())


def test_swa_keeps_the_uniform_average_of_every_steps_weights_from_half_the_first_evaluation():
    """Averaging never changes the steps taken; "swa" keeps the mean of the weights after steps
    6..20 of a 20-step run evaluated every 10 (from half the first evaluation on)."""
    images = torch.randn(32, 3, 8, 8)
    data = TensorDataset(images, (images[:, 0] > 0).long(), torch.ones(32, 2, dtype=torch.bool))

    def run(average: str):
        torch.manual_seed(0)
        model, trajectory = build_model("unet", 2, 4), []

        def objective(logits, *rest):  # called once per step, before it: the weights after the steps so far
            trajectory.append({k: v.detach().clone() for k, v in model.named_parameters()})
            return toy_objective(logits, *rest)

        train(model, make_loader(data, 8, shuffle=False), objective, Budget(max_steps=20, eval_every=10, average=average),
              lr=1e-2, progress=False)
        return dict(model.named_parameters()), trajectory

    (last, steps), (kept, same_steps) = run("off"), run("swa")
    assert len(steps) == 20 and all(torch.equal(a[k], b[k]) for a, b in zip(steps, same_steps) for k in a)
    after = steps[6:] + [last]  # the weights after steps 6, 7, ..., 20
    for name, value in kept.items():
        expected = torch.stack([w[name] for w in after]).mean(0)
        assert torch.allclose(value, expected, atol=1e-6), name
    assert not torch.allclose(kept["head.weight"], last["head.weight"])  # not the latest weights


def test_a_log_gets_a_line_per_evaluation(capsys):
    """Output that is not a terminal (a pipe, a file, a CI log) cannot show a live bar: each
    evaluation prints one line with the step, loss and validation score instead."""
    train(build_model("unet", 2, 4), toy_loader(), toy_objective, Budget(max_steps=20, eval_every=10), lr=1e-2,
          validate=lambda m: 0.5, progress=True, description="bootstrap")
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("bootstrap: step")]
    assert [line.split()[2] for line in lines] == ["10/20", "20/20"]
    # and only those: a bar's final frame, cut to a log's width, would wrap into fragments below them
    assert out.splitlines() == lines
    # one process: no "on 1 ranks"
    assert all("val mIoU 0.500" in line and line.endswith("images/s)") for line in lines)


def test_a_nan_loss_stops_training():
    with pytest.raises(DivergenceError, match="loss became"):
        train(build_model("unet", 2, 4), toy_loader(), lambda *a: torch.tensor(float("nan"), requires_grad=True),
              Budget(max_steps=10, eval_every=5), lr=1e-2, progress=False)


def test_validation_split_is_seeded_disjoint_and_skipped_for_tiny_batches():
    pairs = list(range(50))
    fit, held = split_validation(pairs, 0.1, seed=3)
    assert len(held) == 5 and not set(fit) & set(held) and sorted(fit + held) == pairs
    assert split_validation(pairs, 0.1, seed=3) == (fit, held)
    assert split_validation(list(range(9)), 0.5, seed=0) == (list(range(9)), [])
    assert split_validation(pairs, 0.0, seed=0) == (pairs, [])


def test_training_resumes_from_its_checkpoint(base_model, tmp_path):
    from incseg.pipeline import Batch, train_base

    ws, _, _ = base_model
    params = ws.params.model_copy(deep=True)
    params.train.bootstrap_max_steps, params.train.bootstrap_min_steps, params.train.eval_every = 30, 30, 10
    ws = type(ws)(ws.root, params)
    batch = Batch.load(ws.registry_dir / "batch-00")
    ckpt = tmp_path / "state.pt"

    def crash_after_two(point, model):
        if point.step == 20:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train_base(ws, batch, progress=False, checkpoint_path=ckpt, on_eval=crash_after_two)
    _, resumed = train_base(ws, batch, progress=False, checkpoint_path=ckpt)
    assert resumed.resumed_from == 20
    assert [e.step for e in resumed.evals] == [10, 20, 30]


def test_an_update_with_a_frozen_stem_and_fusion_keeps_and_mixes_the_champion(base_model):
    """`continual.freeze_stem` keeps the earliest stage as the champion has it; with
    `continual.fuse_old_weight` the rest is a mix, and the returned model trains again."""
    from incseg.continual.memory import ExemplarMemory
    from incseg.models import stem_parameters
    from incseg.pipeline import Batch, train_candidate

    ws, champion, _ = base_model
    params = ws.params.model_copy(deep=True)
    params.train.update_max_steps, params.train.update_min_steps, params.train.eval_every = 6, 6, 3
    params.continual.freeze_stem, params.continual.fuse_old_weight = True, 0.5
    batch = Batch.load(ws.registry_dir / "batch-01")
    student, _ = train_candidate(params, champion, batch, ExemplarMemory.empty(), progress=False)
    for a, b in zip(stem_parameters(student), stem_parameters(champion)):
        assert torch.equal(a, b)
    assert all(p.requires_grad for p in student.parameters())
    moved = [not torch.equal(a, b) for (k, a), b in zip(student.state_dict().items(), champion.state_dict().values())
             if k.startswith("bottleneck") and a.is_floating_point()]
    assert any(moved)


def test_a_run_from_scratch_that_its_cap_ended_says_so_and_one_its_rule_stopped_does_not():
    """`cap_note`: the bootstrap's verdict tells the user when the step cap, not a levelled-off
    validation score, ended training (a larger budget may still gain), naming the knob."""
    evals = [EvalPoint(step, 0.5, score, 16) for step, score in ((200, 0.6), (400, 0.7), (600, 0.72))]
    capped = cap_note(TrainResult(evals, best_step=600, stopped="max_steps"))
    assert "600-step cap" in capped and "step 600" in capped and "train.bootstrap_max_steps" in capped
    assert "train.patience" in capped  # a cap raised alone lost: the note names both knobs
    assert cap_note(TrainResult(evals, best_step=400, stopped="converged")) == ""
    unjudged = [EvalPoint(e.step, e.loss, float("nan"), e.images) for e in evals]  # no validation split
    assert cap_note(TrainResult(unjudged, best_step=600, stopped="max_steps")) == ""


def test_the_bar_shows_elapsed_time_and_the_time_left_to_the_cap_as_a_bound():
    """The time left is to the step cap, which the rule usually stops well before: it reads 'at most'."""
    from rich.progress import Progress

    from incseg.training import CapTimeColumn, progress_bar

    now = [0.0]
    bar = Progress(*progress_bar().columns, get_time=lambda: now[0], disable=True)
    task = bar.add_task("bootstrap", total=16000, completed=0, info="")
    column = next(c for c in bar.columns if isinstance(c, CapTimeColumn))
    assert column.render(bar.tasks[0]).plain == "-:--:--"  # no estimate yet
    for second in (1.0, 2.0):
        now[0] = second
        bar.update(task, completed=int(second * 10))
    assert column.render(bar.tasks[0]).plain == "at most 0:26:38 left"  # (16000 - 20) steps at 10 per second
