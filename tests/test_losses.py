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


def test_loss_gradient_raises_the_true_class_and_lowers_the_others():
    """Gradient descent on the loss must move each pixel's logits toward its label."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, 0, 0] = 255  # ignored: no gradient at all there
    segmentation_loss(logits, target).backward()
    grad = logits.grad
    valid = target != 255
    onehot = torch.nn.functional.one_hot(target.clamp(0, 2), 3).permute(0, 3, 1, 2).bool()
    true_grad = grad.masked_select(onehot & valid[:, None])
    other_grad = grad.masked_select(~onehot & valid[:, None])
    assert (true_grad < 0).all()  # -grad raises the labelled class's logit at every valid pixel
    assert (other_grad > 0).float().mean() > 0.95  # and lowers (nearly) every other logit
    assert grad[0, :, 0, 0].abs().max() < 1e-6  # an ignored pixel gets no gradient from CE; Dice ignores it
    before = segmentation_loss(logits.detach(), target)
    after = segmentation_loss(logits.detach() - 0.5 * grad, target)
    assert after < before


def test_dice_of_a_partially_labelled_sample_counts_the_new_class_on_its_background():
    """A batch that labels only class 2 calls old classes background: predicting an old class
    (1) on its background is not wrong, predicting the labelled class 2 there is."""
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2, :2] = 2  # the labelled new class; the rest is background (may hide class 1)
    annotated = torch.tensor([[True, False, True]])
    right = onehot_logits(target, 3)
    old_on_background = right.clone()
    old_on_background[0, :, 2:, 2:] = onehot_logits(torch.ones(1, 2, 2, dtype=torch.long), 3)[0]
    new_on_background = right.clone()
    new_on_background[0, :, 2:, 2:] = onehot_logits(torch.full((1, 2, 2), 2), 3)[0]
    assert dice_loss(right, target, annotated=annotated).item() < 1e-4
    assert dice_loss(old_on_background, target, annotated=annotated).item() < 1e-4
    assert dice_loss(new_on_background, target, annotated=annotated) > 0.05
    # fully labelled: every background pixel is background
    assert dice_loss(old_on_background, target, annotated=torch.ones(1, 3, dtype=torch.bool)) > 0.05
