"""Mixed precision, memory layout and compilation of training (``train.amp``, ``channels_last``,
``compile``), and bfloat16 evaluation attacks (``attack_precision="bf16"``), all checked on the CPU.

bfloat16 autocast and the channels-last layout run on a CPU as on a GPU, so what they change (which
forward passes run in bf16, the crafting attack's included; the layout the model sees) is tested here;
``test_gpu.py`` repeats the training on CUDA.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from robustlab import training
from robustlab.audit import noise_tolerance
from robustlab.data import Split
from robustlab.evaluation import evaluate_model
from robustlab.runs import load_run
from robustlab.training import Trainer, train


def _config(defense: dict, **train_options) -> dict:
    return {
        "data": {"dataset": "digits", "val_size": 100},
        "model": {"name": "lenet5"},
        "train": {"epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0,
                  "val_robust_size": 50, "val_attack_steps": 2, **train_options},
        "threat": {"eps": 0.1},
        "defense": defense,
    }


def _record_forwards(model: torch.nn.Module, seen: list[tuple[bool, bool, bool]]) -> None:
    """Record (train mode, bf16 autocast on, channels-last input) of every forward pass of ``model``."""

    def hook(module, args):
        x = args[0]
        seen.append((module.training, torch.is_autocast_enabled("cpu") and
                     torch.get_autocast_dtype("cpu") == torch.bfloat16,
                     x.dim() == 4 and x.stride(1) == 1))  # channels last (also for one channel)

    model.register_forward_pre_hook(hook)


@pytest.fixture(scope="module")
def colour_digits(digits):
    """Digits as three-channel images: with one channel the channels-last layout cannot be told apart."""
    def colour(split: Split) -> Split:
        return Split(split.images.repeat(1, 3, 1, 1), split.labels)

    return replace(digits, train=colour(digits.train), val=colour(digits.val), test=colour(digits.test),
                   mean=digits.mean * 3, std=digits.std * 3)


@pytest.mark.parametrize("defense", [{"name": "pgd_at", "steps": 2}, {"name": "trades", "steps": 2},
                                     {"name": "hybrid"}])
def test_amp_and_channels_last_reach_the_crafting_attack(tmp_path, colour_digits, defense):
    trainer = Trainer(training.build_config(_config(defense, amp=True, channels_last=True)), tmp_path / "run",
                      progress=False, data=colour_digits)
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen: list[tuple[bool, bool, bool]] = []
    _record_forwards(trainer.model, seen)
    state = training.TrainState(epochs=1, steps_per_epoch=len(trainer.loader), eps=0.1, generator=trainer.generator)
    x, y = next(iter(trainer.loader))
    trainer.train_step(x, y, state, training.RunningStats())
    crafting = [s for s in seen if not s[0]]  # the attack runs in eval mode (attack_bn="eval")
    assert crafting and len(crafting) < len(seen)
    assert all(autocast and layout for _, autocast, layout in seen), seen  # the attack's passes included


def test_without_amp_training_stays_float32(tmp_path, colour_digits):
    trainer = Trainer(training.build_config(_config({"name": "pgd_at", "steps": 2})), tmp_path / "run",
                      progress=False, data=colour_digits)
    seen: list[tuple[bool, bool, bool]] = []
    _record_forwards(trainer.model, seen)
    state = training.TrainState(epochs=1, steps_per_epoch=len(trainer.loader), eps=0.1, generator=trainer.generator)
    x, y = next(iter(trainer.loader))
    trainer.train_step(x, y, state, training.RunningStats())
    assert seen and not any(autocast or layout for _, autocast, layout in seen)


def test_amp_channels_last_training_learns_as_float32_does(tmp_path, colour_digits):
    def accuracy(**options) -> float:
        config = _config({"name": "standard"}, epochs=4, **options)
        return train(config, tmp_path / str(options), progress=False, data=colour_digits).metrics["clean_accuracy"]

    fp32, bf16 = accuracy(), accuracy(amp=True, channels_last=True)
    assert fp32 > 0.8  # chance is 0.1
    assert bf16 >= fp32 - 0.05, (fp32, bf16)


def test_compiled_training_runs_resumes_and_saves_plain_weights(tmp_path, digits, monkeypatch):
    """``train.compile`` compiles the model in place: the same state dict keys, the objectives' checks
    (``isinstance``, mode switches, AWP's ``functional_call``) still work. The eager backend stands in for
    the default inductor, whose C++ code generation takes minutes on a small CPU."""
    monkeypatch.setattr(training, "COMPILE_OPTIONS", {"backend": "eager"})
    config = _config({"name": "pgd_at", "steps": 2, "awp_gamma": 0.005}, compile=True)
    trainer = Trainer(training.build_config(config), tmp_path / "run", progress=False, data=digits)
    assert trainer.model._compiled_call_impl is not None
    result = trainer.fit()
    assert len(result.history) == 2
    loaded = load_run(tmp_path / "run", torch.device("cpu"))
    assert set(loaded.model.state_dict()) == set(result.model.state_dict())
    assert not any("_orig_mod" in key for key in result.model.state_dict())


def test_bf16_attacks_agree_with_fp32_within_noise(trained_digits):
    """Crafting in bfloat16 changes the attacks' numerics, not their strength: on a trained model the
    worst-case accuracy of fgsm + pgd-20 + cw_linf + APGD-CE is within two standard errors of the
    float32 one, and the per-sample verdicts agree on at least 90% of the samples."""
    model, test = trained_digits.model, trained_digits.data.test
    attacks = ["fgsm", "pgd-20", "cw_linf", {"name": "apgd_ce", "steps": 20}]

    def run(precision: str):
        return evaluate_model(model, test, eps=0.05, attacks=attacks, n_boot=10, attack_precision=precision,
                              suite="quick")

    fp32, bf16 = run("fp32"), run("bf16")
    a, b = fp32.robust_accuracy, bf16.robust_accuracy
    assert 0.1 < a < 0.9, a  # a model neither broken nor untouched at this eps: agreement means something
    assert abs(a - b) <= noise_tolerance(a, b, len(test)), (a, b)
    agreement = (fp32.worst_case.correct == bf16.worst_case.correct).mean()
    assert agreement >= 0.9, agreement


class _BoundaryTie(torch.nn.Module):
    """Class 1 leads class 0 by 0.01 on a black image: float32 classifies it correctly, bfloat16 (spacing
    1/32 at 4) sees a tie that argmax resolves to class 0. Lightening any pixel by 0.01 crosses over."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 4)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[0] = 1.0
            self.linear.bias.copy_(torch.tensor([4.0, 4.01, 3.0, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("spec", [
    "apgd_ce", "apgd_dlr", "apgd_t", {"name": "autoattack", "steps": 5, "queries": 20},
    {"name": "pgd", "steps": 5, "random_start": False, "early_stop": True},
    {"name": "pgd", "steps": 5, "random_start": False, "early_stop": True, "restarts": 2},
], ids=str)
def test_attacks_under_bf16_take_the_float32_models_decisions(spec):
    """A success seen only in bfloat16 (here: on the clean image) must not stop an attack: the evaluation's
    float32 verdict would count the untouched image as robust."""
    from robustlab.attacks import make_attack
    from robustlab.devices import bf16_autocast

    model, x, y = _BoundaryTie().eval(), torch.zeros(4, 1, 4, 4), torch.ones(4, dtype=torch.long)
    with torch.no_grad(), bf16_autocast("cpu"):
        assert (model(x).argmax(1) != y).all()  # the premise: bf16 alone calls the clean image fooled
    with bf16_autocast("cpu"):
        x_adv = make_attack(spec, eps=0.1)(model, x, y, generator=torch.Generator().manual_seed(0))
    assert (model(x_adv).argmax(1) != y).all()


@pytest.mark.parametrize("spec", [{"name": "fab_t", "steps": 10}, {"name": "square", "queries": 30}], ids=str)
def test_fab_and_square_run_in_float32_under_bf16_autocast(trained_digits, spec):
    """FAB linearises the boundary from a logit difference and Square accepts queries by the margin; both
    decide next to the boundary, where bfloat16 rounds, so autocast must not change a single pixel."""
    from robustlab.attacks import make_attack
    from robustlab.devices import bf16_autocast

    model, test = trained_digits.model.eval(), trained_digits.data.test
    x, y = test.float_images()[:64], test.labels[:64]
    attack = make_attack(spec, eps=0.1)
    fp32 = attack(model, x, y, generator=torch.Generator().manual_seed(0))
    with bf16_autocast("cpu"):
        bf16 = attack(model, x, y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fp32, bf16)
