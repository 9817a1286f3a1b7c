import math

import torch

from incseg.metrics import (ConfusionMatrix, bootstrap_weights, harmonic_mean, iou_report, mean_iou, report_metrics,
                            resampled_iou)


def cm_of(target, pred, n=3):
    cm = ConfusionMatrix(n)
    cm.update(torch.tensor(target), torch.tensor(pred))
    return cm


def test_perfect_prediction_has_iou_one():
    cm = cm_of([0, 1, 2, 2], [0, 1, 2, 2])
    assert cm.iou().tolist() == [1.0, 1.0, 1.0]
    assert mean_iou(cm) == 1.0


def test_disjoint_prediction_has_iou_zero():
    cm = cm_of([1, 1, 2, 2], [2, 2, 1, 1])
    assert cm.iou()[1].item() == 0.0 and cm.iou()[2].item() == 0.0


def test_hand_computed_iou():
    # class 1: tp=2, fp=1, fn=1 -> 2/4 ; class 0: tp=1, fp=1, fn=1 -> 1/3
    cm = cm_of([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], n=2)
    assert torch.allclose(cm.iou(), torch.tensor([1 / 3, 0.5], dtype=torch.float64))
    assert math.isclose(mean_iou(cm), (1 / 3 + 0.5) / 2)


def test_ignore_pixels_are_excluded():
    with_ignore = cm_of([0, 1, 255, 255], [0, 1, 2, 0])
    assert with_ignore.mat.sum().item() == 2
    assert with_ignore.iou()[:2].tolist() == [1.0, 1.0]


def test_class_absent_from_ground_truth_is_excluded_from_mean():
    # class 2 never in ground truth but predicted once: IoU 0, yet not in the mean
    cm = cm_of([0, 0, 1, 1], [0, 2, 1, 1])
    assert cm.iou()[2].item() == 0.0
    assert cm.present() == [0, 1]
    assert math.isclose(mean_iou(cm), (0.5 + 1.0) / 2)


def test_old_new_and_harmonic_iou():
    cm = cm_of([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 0])
    r = iou_report(cm, old=[0, 1], new=[2], names={0: "bg", 1: "a", 2: "b"})
    assert math.isclose(r["miou_old"], (2 / 3 + 1.0) / 2)
    assert math.isclose(r["miou_new"], 0.5)
    assert math.isclose(r["hiou"], 2 * r["miou_old"] * 0.5 / (r["miou_old"] + 0.5))
    assert r["per_class"]["b"] == 0.5


def test_harmonic_mean_of_one_empty_group_is_the_other():
    assert harmonic_mean(0.6, float("nan")) == 0.6
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_per_image_matrices_add_up_and_resample():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (10, 8, 8))
    target[:, 0, 0] = 255  # ignored pixels stay out of every matrix
    pred = torch.where(torch.rand(10, 8, 8) < 0.8, target.clamp(max=2), torch.randint(0, 3, (10, 8, 8)))
    cm = ConfusionMatrix(3, per_image=True)
    cm.update(target[:4], pred[:4])
    cm.update(target[4:], pred[4:])
    assert len(cm.images) == 10 and torch.equal(sum(cm.images), cm.mat) and cm.mat.sum() == 10 * 63
    assert torch.allclose(resampled_iou(cm.images, torch.ones(1, 10))[0], cm.iou())  # every image once: the matrix
    only_first = torch.zeros(1, 10)
    only_first[0, 0] = 3  # one image drawn three times: that image's IoU
    single = ConfusionMatrix(3)
    single.update(target[0], pred[0])
    assert torch.allclose(resampled_iou(cm.images, only_first)[0], single.iou(), equal_nan=True)
    w = bootstrap_weights(10, 500, seed=1)
    assert w.shape == (500, 10) and (w.sum(1) == 10).all() and torch.equal(w, bootstrap_weights(10, 500, seed=1))
    assert 0.3 < (w == 0).float().mean() < 0.4  # ~ (1 - 1/n)^n of the images are left out of a draw


def test_a_class_missing_from_a_resample_is_nan_there():
    cm = ConfusionMatrix(3, per_image=True)
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))  # image 0: background and class 1
    cm.update(torch.tensor([[0, 2]]), torch.tensor([[0, 2]]))  # image 1: background and class 2
    iou = resampled_iou(cm.images, torch.tensor([[2.0, 0.0]]))[0]
    assert iou[0] == 1 and iou[1] == 1 and iou[2] != iou[2]


def test_class_names_become_metric_names_mlflow_takes(tmp_path):
    """A class named `person (walking)` crashed the bootstrap when its IoU was logged (MLflow refuses
    `(` in a metric name); letters of any script and spaces are kept, and no two classes share a name."""
    from mlflow.tracking import MlflowClient

    names = {0: "background", 1: "person (walking)", 2: "café", 3: "a:b", 4: "x/y", 5: "x_y", 6: "#", 7: "road sign"}
    cm = ConfusionMatrix(len(names))
    cm.update(torch.arange(len(names)), torch.arange(len(names)))
    metrics = report_metrics("candidate", iou_report(cm, range(len(names)), [], names))
    assert [k.removeprefix("candidate.iou.") for k in metrics if ".iou." in k] == [
        "background", "person _walking_", "café", "a:b", "x_y", "x_y-5", "_", "road sign"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("names")).info.run_id
    for key, value in metrics.items():
        client.log_metric(run, key, value)
    assert client.get_run(run).data.metrics == metrics
