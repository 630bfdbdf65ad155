"""Input-preprocessing defences: transforms, training through the loop, load_run wrapping, BPDA/EOT."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from robustlab.attacks import pgd
from robustlab.defenses import Defended, DenoisingAutoencoder, FeatureSqueezing, GaussianNoise, build_transform
from robustlab.metrics import robust_accuracy
from robustlab.runs import load_run
from robustlab.training import train


def _config(defense: dict, epochs: int = 6, eps: float = 0.1) -> dict:
    return {
        "data": {"dataset": "digits", "val_size": 200},
        "model": {"name": "lenet5"},
        "train": {"epochs": epochs, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0,
                  "select": "last"},
        "threat": {"eps": eps},
        "defense": defense,
    }


def test_feature_squeezing_quantises_and_smooths():
    x = torch.rand(3, 1, 8, 8)
    out = FeatureSqueezing(bits=2, median=1)(x)
    assert torch.allclose(out * 3, (out * 3).round()) and out.shape == x.shape
    squeezed = FeatureSqueezing(bits=8, median=3)(torch.zeros(1, 1, 5, 5).index_put_((torch.tensor([0]),) * 2 + (
        torch.tensor([2]), torch.tensor([2])), torch.tensor(1.0)))
    assert squeezed.abs().max() == 0  # an isolated bright pixel is removed by the median
    assert FeatureSqueezing.differentiable is False and FeatureSqueezing.random is False


def test_noise_is_random_and_in_range():
    noise = GaussianNoise(0.3)
    x = torch.rand(2, 1, 8, 8)
    a, b = noise(x), noise(x)
    assert not torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and GaussianNoise.random


def test_autoencoder_learns_to_denoise(digits):
    torch.manual_seed(0)
    ae = DenoisingAutoencoder(1, 8, 0.1)
    x = digits.train.float_images()[:64]
    optimizer = torch.optim.Adam(ae.parameters(), 1e-2)
    first = ae.training_loss(x).item()
    for _ in range(100):
        optimizer.zero_grad()
        ae.training_loss(x).backward()
        optimizer.step()
    assert ae.training_loss(x).item() < 0.5 * first
    assert ae(x).shape == x.shape and ae.differentiable and not ae.random


def test_build_transform_names():
    assert isinstance(build_transform({"name": "noise_injection", "sigma": 0.1}), GaussianNoise)
    with pytest.raises(ValueError, match="sigma"):
        build_transform({"name": "noise_injection", "sigma": 2})


def test_one_bit_squeezing_of_colour_images_warns_and_of_grey_images_does_not(recwarn):
    """1 bit is Xu et al.'s MNIST squeezer; on colour images it leaves 8 colours, a defence nobody meant."""
    build_transform({"name": "feature_squeezing", "bits": 1}, channels=1)
    build_transform({"name": "feature_squeezing", "bits": 5}, channels=3)
    assert not recwarn.list
    with pytest.warns(UserWarning, match="bits: 5"):
        build_transform({"name": "feature_squeezing"}, channels=3)


def test_pooled_autoencoder_on_colour_images_warns_and_keeps_the_image_size(recwarn):
    """A pooled bottleneck is MagNet's MNIST reformer; on CIFAR-10 it blurs what the classifier reads."""
    grey = build_transform({"name": "autoencoder"}, channels=1)
    colour = build_transform({"name": "autoencoder", "pool": 1}, channels=3)
    assert not recwarn.list
    assert not any(isinstance(m, torch.nn.AvgPool2d) for m in colour.modules())
    assert any(isinstance(m, torch.nn.AvgPool2d) for m in grey.modules())
    for transform, x in ((grey, torch.rand(2, 1, 28, 28)), (colour, torch.rand(2, 3, 32, 32))):
        out = transform(x)
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    with pytest.warns(UserWarning, match="pool: 1"):
        build_transform({"name": "autoencoder"}, channels=3)


@pytest.mark.parametrize(
    ("defense", "differentiable", "random"),
    [
        ({"name": "feature_squeezing", "bits": 1}, False, False),
        ({"name": "noise_injection", "sigma": 0.2}, True, True),
        ({"name": "autoencoder", "width": 8}, True, False),
        ({"name": "fast_at", "preprocess": {"name": "feature_squeezing", "bits": 2}}, False, False),
    ],
)
def test_transform_runs_train_and_load_defended(defense, differentiable, random, digits, tmp_path):
    run = tmp_path / defense["name"]
    result = train(_config(defense, epochs=2), run, progress=False, data=digits)
    assert isinstance(result.model, Defended)
    loaded = load_run(run).model
    assert isinstance(loaded, Defended)
    assert (loaded.differentiable, loaded.random) == (differentiable, random)
    x = digits.test.float_images()[:16]
    if not random:
        torch.testing.assert_close(loaded(x), result.model.eval()(x))
    if defense["name"] == "autoencoder":
        keys = load_file(run / "model.safetensors").keys()
        assert any(k.startswith("transform.encoder") for k in keys)
        assert "train_transform_loss" in result.history[0]


def test_bpda_breaks_feature_squeezing_that_plain_pgd_cannot(digits, tmp_path):
    """Plain PGD sees the zero gradient of rounding; BPDA (identity backward) does not."""
    wrappers = pytest.importorskip("robustlab.attacks.wrappers")
    eps = 0.3
    result = train(_config({"name": "feature_squeezing", "bits": 1, "median": 1}, eps=eps), tmp_path / "fs",
                   progress=False, data=digits)
    model = result.model.eval()
    attack = partial(pgd, eps=eps, steps=20, generator=torch.Generator().manual_seed(0))
    plain = robust_accuracy(model, digits.test, attack)
    adaptive, label = wrappers.adaptive_model(model)
    assert label == "BPDA"
    bpda = robust_accuracy(model, digits.test, lambda m, x, y: attack(adaptive, x, y))
    assert bpda < plain - 0.2, f"plain PGD {plain:.3f}, BPDA PGD {bpda:.3f}"
