import math

import pytest
import torch

from incseg.models import (UNTAUGHT_LOGIT, add_classes, build_model, expand_classes, label_map, load_checkpoint,
                           num_classes, save_checkpoint, taught_classes)


@pytest.mark.parametrize("arch", ["unet", "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_expand_classes_keeps_old_logits(arch):
    torch.manual_seed(0)
    model = build_model(arch, 3, width=8).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        expand_classes(model, 2)
        after = model(x)
    assert num_classes(model) == 5
    assert after.shape == (2, 5, 64, 64)
    assert torch.allclose(after[:, :3], before, atol=1e-5)
    # new classes start from background but below it: predictions do not change
    assert torch.equal(after.argmax(1), before.argmax(1))


def test_label_map_is_argmax_ties_to_the_lowest_id():
    tied = torch.tensor([[[[1.0]], [[3.0]], [[3.0]]], [[[2.0]], [[2.0]], [[0.0]]]])  # (2, 3, 1, 1)
    assert label_map(tied).flatten().tolist() == [1, 0]
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 17, 23).round(decimals=1)  # rounded: ties in many pixels
    for x in (logits, logits.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(label_map(x), x.argmax(1))
    assert torch.equal(label_map(logits[0], dim=0), logits[0].argmax(0))


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_unet_handles_sizes_not_divisible_by_its_stride(depth):
    model = build_model("unet", 4, width=4, depth=depth).eval()
    assert len(model.enc) == depth and model.bottleneck[0].out_channels == 4 * 2**depth
    assert model(torch.randn(1, 3, 37, 50)).shape == (1, 4, 37, 50)


def test_checkpoints_keep_the_depth_and_older_ones_read_as_three(tmp_path):
    deep = build_model("unet", 3, width=4, depth=4).eval()
    loaded, _, _ = load_checkpoint(save_checkpoint(tmp_path / "deep.pt", deep, {0: "bg", 1: "a", 2: "b"}))
    x = torch.randn(1, 3, 32, 32)
    assert loaded.depth == 4 and torch.equal(loaded.eval()(x), deep(x))
    old = build_model("unet", 3, width=4).eval()
    path = save_checkpoint(tmp_path / "old.pt", old, {0: "bg", 1: "a", 2: "b"})
    ckpt = torch.load(path, weights_only=True)
    del ckpt["depth"]  # a checkpoint from before the depth was a knob
    torch.save(ckpt, path)
    loaded, _, _ = load_checkpoint(path)
    assert loaded.depth == 3 and torch.equal(loaded.eval()(x), old(x))


def test_checkpoint_round_trip(tmp_path):
    model = build_model("unet", 3, width=4).eval()
    expand_classes(model, 1)
    path = save_checkpoint(tmp_path / "m.pt", model, {0: "bg", 1: "a", 2: "b", 3: "c"}, note="x")
    loaded, classes, ckpt = load_checkpoint(path)
    x = torch.randn(1, 3, 16, 16)
    assert classes == {0: "bg", 1: "a", 2: "b", 3: "c"} and ckpt["note"] == "x"
    assert torch.equal(loaded.eval()(x), model(x))


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model.arch 'resnet'"):
        build_model("resnet", 3)


def test_random_head_init_leaves_new_rows_unlike_background():
    torch.manual_seed(0)
    model = expand_classes(build_model("unet", 3, width=4), 2, init="random")
    assert not torch.equal(model.head.weight[3], model.head.weight[0])
    with pytest.raises(ValueError, match="unknown head init"):
        expand_classes(build_model("unet", 3, width=4), 1, init="zeros")


def test_weight_fusion_mixes_what_both_models_have_and_keeps_new_rows():
    import copy

    from incseg.models import fuse_weights

    torch.manual_seed(0)
    old = build_model("unet", 3, width=4)
    new = expand_classes(copy.deepcopy(old), 1)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)
        new.enc[0][1].running_mean.add_(2.0)
    expected = {k: v.clone() for k, v in new.state_dict().items()}
    fused = fuse_weights(new, old, 0.25).state_dict()
    stem = "enc.0.0.weight"
    assert torch.allclose(fused[stem], 0.25 * old.state_dict()[stem] + 0.75 * expected[stem])
    bn = "enc.0.1.running_mean"
    assert torch.allclose(fused[bn], 0.25 * old.state_dict()[bn] + 0.75 * expected[bn])
    assert torch.allclose(fused["head.weight"][:3], 0.25 * old.head.weight + 0.75 * expected["head.weight"][:3])
    assert torch.equal(fused["head.weight"][3], expected["head.weight"][3])  # the new class is the new model's
    assert torch.equal(fused["enc.0.1.num_batches_tracked"], expected["enc.0.1.num_batches_tracked"])


def test_a_class_that_arrives_after_a_later_id_gets_a_fresh_row_then():
    torch.manual_seed(0)
    model = build_model("unet", 3, width=4).eval()
    x = torch.randn(1, 3, 16, 16)
    before = model(x)
    add_classes(model, [0, 4])  # class 4 before class 3
    assert num_classes(model) == 5 and taught_classes(model) == [0, 1, 2, 4]
    assert torch.allclose(model(x)[:, :3], before, atol=1e-6)
    silent = model(x)[:, 3]  # the untaught row: never predicted, and with probability 0 never trained
    assert torch.all(silent == UNTAUGHT_LOGIT) and model(x).softmax(1)[:, 3].max().item() == 0.0
    with torch.no_grad():
        model.head.weight[3].add_(1.0)  # were it moved anyway
    add_classes(model, [0, 3], init="background")
    assert taught_classes(model) == [0, 1, 2, 3, 4]
    assert torch.equal(model.head.weight[3], model.head.weight[0])  # reset as a new class's row
    assert model.head.bias[3].item() == pytest.approx(model.head.bias[0].item() - math.log(2))
    assert add_classes(model, [0, 1]).head.out_channels == 5  # taught classes: nothing changes


def test_checkpoints_keep_what_was_taught_and_older_ones_read_as_every_row(tmp_path):
    model = add_classes(build_model("unet", 3, width=4), [0, 4])
    loaded, _, ckpt = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model, {}))
    assert taught_classes(loaded) == [0, 1, 2, 4] and ckpt["taught"] == [0, 1, 2, 4]
    del ckpt["taught"]
    torch.save(ckpt, tmp_path / "old.pt")
    assert taught_classes(load_checkpoint(tmp_path / "old.pt")[0]) == [0, 1, 2, 3, 4]
