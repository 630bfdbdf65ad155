"""The fused attack copy: the same function as the model, the model untouched, the same evaluation verdicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from robustlab.defenses.preprocessing import Defended, FeatureSqueezing
from robustlab.evaluation import evaluate_model
from robustlab.evaluation.measure import FUSED_LABEL
from robustlab.models import build_model
from robustlab.models.fused import fused_copy

ARCHITECTURES = [
    ("lenet5", 1, 28, {}),
    ("resnet18", 3, 32, {"width": 4}),
    ("preact_resnet18", 3, 32, {"width": 4}),
    ("efficientnet_b0", 3, 32, {}),
]


def _eval_model_with_statistics(name: str, channels: int, size: int, options: dict) -> nn.Module:
    """An eval-mode model whose BatchNorm layers have non-trivial running statistics and affine weights."""
    torch.manual_seed(0)
    model = build_model(name, 10, channels, size, **options)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize(("name", "channels", "size", "options"), ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_fused_copy_computes_the_same_logits_and_input_gradients(name, channels, size, options):
    model = _eval_model_with_statistics(name, channels, size, options)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    fast = fused_copy(model)
    x = torch.rand(6, channels, size, size)
    y = torch.arange(6) % 10

    def logits_and_gradient(net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = x.clone().requires_grad_(True)
        logits = net(inputs)
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y), inputs)
        return logits.detach(), grad

    logits, grad = logits_and_gradient(model)
    fast_logits, fast_grad = logits_and_gradient(fast)
    assert fast_grad.shape == grad.shape
    torch.testing.assert_close(fast_logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_grad, grad, rtol=1e-3, atol=1e-6 * float(grad.abs().max()))
    # the model itself is untouched: weights, buffers, mode and requires_grad flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and [p.requires_grad for p in model.parameters()] == flags


def test_fused_copy_folds_every_conv_batchnorm_pair_of_resnet18():
    model = _eval_model_with_statistics("resnet18", 3, 32, {"width": 4})
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused_copy(model).modules())


def test_fused_copy_refuses_a_train_mode_model():
    with pytest.raises(ValueError, match="eval-mode"):
        fused_copy(build_model("resnet18", 10, 3, 32, width=4).train())


class _DataDependent(nn.Module):
    """A model torch.fx cannot trace: Python control flow on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        return out.flatten(1) if bool(out.sum() > -1e9) else -out.flatten(1)


def test_an_untraceable_model_is_copied_unfused_with_the_same_function():
    model = _DataDependent().eval()
    x = torch.rand(3, 1, 8, 8)
    fast = fused_copy(model)
    torch.testing.assert_close(fast(x), model(x))
    assert any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())


@pytest.fixture(scope="module")
def trained_resnet(digits, tmp_path_factory):
    """A width-4 ResNet-18 (BatchNorm throughout) trained on digits for a few seconds."""
    from robustlab.training import train

    config = {
        "data": {"dataset": "digits", "val_size": 200},
        "model": {"name": "resnet18", "width": 4},
        "train": {"epochs": 4, "batch_size": 64, "optimizer": "adam", "lr": 0.01, "weight_decay": 0.0,
                  "select": "last"},
        "threat": {"eps": 0.1},
    }
    return train(config, tmp_path_factory.mktemp("runs") / "resnet", progress=False, data=digits).model.eval()


def test_evaluation_through_the_fused_copy_gives_the_same_per_sample_verdicts(trained_resnet, digits):
    """AutoAttack (shortened), PGD and CW through the fused copy and through the model agree per sample."""
    options = {"eps": 0.05, "n": 120, "subset": "first", "n_boot": 10, "suite": "quick",
               "attacks": ["pgd-10", "cw_linf-10", {"name": "autoattack", "steps": 15, "queries": 150}]}
    fast = evaluate_model(trained_resnet, digits.test, **options)
    exact = evaluate_model(trained_resnet, digits.test, fuse=False, **options)
    assert fast.model_info["attack_model"] == FUSED_LABEL
    assert exact.model_info["attack_model"] == "the model itself"
    from robustlab.evaluation.text import summary_lines

    assert f"attacks differentiate: {FUSED_LABEL}" in "\n".join(summary_lines(fast)), "the printout says so"
    assert "attacks differentiate: the model itself" in "\n".join(summary_lines(exact))
    assert 0.1 < exact.worst_case.accuracy < exact.clean.accuracy - 0.1  # many points robust, many broken
    for label, measured in exact.attacks.items():
        differ = int(np.sum(measured.correct != fast.attacks[label].correct))
        assert differ <= 2, f"{label}: {differ} of 120 verdicts differ"
    np.testing.assert_array_equal(fast.clean.correct, exact.clean.correct)


def test_a_defended_model_is_attacked_through_its_fused_classifier(trained_resnet, digits):
    defended = Defended(trained_resnet, FeatureSqueezing(bits=3, median=1)).eval()
    result = evaluate_model(defended, digits.test, eps=0.1, n=32, attacks=["pgd-5"], suite="quick", n_boot=10)
    assert result.model_info["attack_model"] == FUSED_LABEL
    assert result.model_info["adaptive"] == "BPDA"
    assert any(isinstance(m, nn.BatchNorm2d) for m in trained_resnet.modules())  # the classifier itself kept


def test_the_audit_through_the_fused_copy_reaches_the_same_verdicts(trained_resnet, digits):
    from robustlab.audit import audit_model

    options = {"eps": 0.1, "n": 64, "steps": 5, "square_queries": 50}
    fast = audit_model(trained_resnet, digits.test, **options)
    exact = audit_model(trained_resnet, digits.test, fuse=False, **options)
    assert fast.settings["fused"] and not exact.settings["fused"]
    assert [(c.name, c.status) for c in fast.checks] == [(c.name, c.status) for c in exact.checks]
    assert not trained_resnet.training
