import pytest
import torch

from incseg.models import build_model, expand_classes, load_checkpoint, num_classes, save_checkpoint


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


def test_unet_handles_sizes_not_divisible_by_8():
    model = build_model("unet", 4, width=4).eval()
    assert model(torch.randn(1, 3, 37, 50)).shape == (1, 4, 37, 50)


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
