import torch

from incseg.losses import dice_loss, segmentation_loss


def onehot_logits(target, n, scale=50.0):
    return torch.nn.functional.one_hot(target, n).permute(0, 3, 1, 2).float() * scale


def test_dice_zero_for_perfect_prediction_and_larger_for_worse():
    target = torch.randint(0, 3, (2, 8, 8))
    perfect = dice_loss(onehot_logits(target, 3), target)
    wrong = dice_loss(onehot_logits((target + 1) % 3, 3), target)
    uniform = dice_loss(torch.zeros(2, 3, 8, 8), target)
    assert perfect.item() < 1e-4
    assert perfect < uniform < wrong


def test_dice_ignores_255():
    target = torch.randint(0, 3, (1, 8, 8))
    logits = onehot_logits(target, 3)
    corrupted = target.clone()
    corrupted[0, :4] = 255
    wrong_there = logits.clone()
    wrong_there[0, :, :4] = onehot_logits((target + 1) % 3, 3)[0, :, :4]
    assert dice_loss(wrong_there, corrupted).item() < 1e-4


def test_losses_have_gradients():
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    segmentation_loss(logits, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
