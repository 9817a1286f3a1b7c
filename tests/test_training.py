import torch

from incseg.metrics import mean_iou
from incseg.models import build_model
from incseg.pipeline import holdout_matrix

LEARNED_MIOU = 0.5  # over background + the two base classes


def test_short_training_learns_the_base_classes(base_model):
    ws, model, result = base_model
    trained = mean_iou(holdout_matrix(ws, model), [0, 1, 2])
    torch.manual_seed(0)
    untrained = mean_iou(holdout_matrix(ws, build_model("unet", 3, 8)), [0, 1, 2])
    assert untrained < LEARNED_MIOU < trained
    assert result.epochs[-1].loss < result.epochs[0].loss / 2


def test_training_resumes_from_its_checkpoint(base_model, tmp_path):
    import pytest

    from incseg.pipeline import Batch, train_base

    ws, _, _ = base_model
    params = ws.params.model_copy(deep=True)
    params.train.bootstrap_epochs = 3
    ws = type(ws)(ws.root, params)
    batch = Batch.load(ws.registry_dir / "batch-00")
    ckpt = tmp_path / "state.pt"

    def crash_after_two(stats, model):
        if stats.epoch == 2:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train_base(ws, batch, progress=False, checkpoint_path=ckpt, on_epoch=crash_after_two)
    _, resumed = train_base(ws, batch, progress=False, checkpoint_path=ckpt)
    assert resumed.resumed_from == 2
    assert [e.epoch for e in resumed.epochs] == [1, 2, 3]
