"""Model registry: every architecture takes [0, 1] pixels through its own Normalize layer."""

from __future__ import annotations

import pytest
import torch

from robustlab.errors import ConfigError
from robustlab.models import MODELS, Normalize, build_model

SMALL = {"lenet5": (1, 28), "small_cnn": (1, 28), "resnet18": (3, 32), "preact_resnet18": (3, 32),
         "efficientnet_b0": (3, 32)}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_shapes(name):
    channels, size = SMALL[name]
    model = build_model(name, num_classes=7, in_channels=channels, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.rand(2, channels, size, size)).shape == (2, 7)
    assert isinstance(model[0], Normalize)


def test_wide_resnet_depth_and_width():
    model = build_model("wide_resnet", 10, 3, 32, depth=10, width=1).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        build_model("wide_resnet", 10, 3, 32, depth=12, width=1)


def test_lenet5_is_the_classic_architecture():
    net = build_model("lenet5", 10, 1, 28).net
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [c.out_channels for c in convs] == [6, 16]
    assert [lin.out_features for lin in linears] == [120, 84, 10]
    assert linears[0].in_features == 16 * 5 * 5


def test_lenet5_adapts_to_8x8_digits():
    model = build_model("lenet5", 10, 1, 8)
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_normalize_is_inside_the_model():
    model = build_model("lenet5", 10, 1, 28, mean=[0.5], std=[0.25])
    x = torch.full((1, 1, 28, 28), 0.5)
    assert torch.allclose(model.normalize(x), torch.zeros_like(x))
    assert "normalize.mean" in model.state_dict()


def test_unknown_model_lists_the_registry():
    with pytest.raises(ConfigError, match="valid: " + ", ".join(MODELS)):
        build_model("vgg")


def test_efficientnet_width_scales_every_stage_and_32_is_b0_itself():
    from torchvision.models import efficientnet_b0 as torchvision_b0

    b0 = build_model("efficientnet_b0", 10, 3, 224, width=32).net
    reference = torchvision_b0(weights=None, num_classes=10)
    assert [(k, v.shape) for k, v in b0.state_dict().items()] == \
        [(k, v.shape) for k, v in reference.state_dict().items()]
    half = build_model("efficientnet_b0", 10, 3, 64, width=16).net
    convs = [m for m in half.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == 16 and convs[0].stride == (1, 1)
    assert len(convs) == len([m for m in b0.modules() if isinstance(m, torch.nn.Conv2d)])  # same depth
    assert half.classifier[1].in_features == 640  # 4 x the last stage's 160 channels, as 4 x 320 in B0
    assert half(torch.rand(2, 3, 64, 64)).shape == (2, 10)
