"""No host read of a device tensor inside a training step or an attack iteration.

Every ``.item()`` / ``float(t)`` / ``bool(t)`` / ``.cpu()`` / ``.tolist()`` in a step makes a CUDA host
wait for the GPU. These tests count such reads (``sync_support.count_host_reads``) while N and 4N steps
(or attack iterations) run: the training step must make none at all, an attack only a fixed number per
call. The same paths run on CUDA under ``torch.cuda.set_sync_debug_mode`` in ``test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab import training
from robustlab.attacks import apgd, autoattack, carlini_wagner_l2, fab_t, pgd, square
from robustlab.attacks.registry import make_attack
from robustlab.defenses import TrainState
from robustlab.errors import RobustlabError
from robustlab.evaluation import evaluate_model
from robustlab.metrics import accuracy, iterate, robust_accuracy
from robustlab.training import RunningStats, Trainer
from tests.sync_support import count_host_reads

DEFENSES = [
    ("standard", {}),
    ("pgd_at", {"steps": 3}),
    ("pgd_at", {"steps": 2, "awp_gamma": 0.005}),
    ("fast_at", {}),
    ("trades", {"steps": 2}),
    ("mart", {"steps": 2}),
    ("lipschitz", {"parseval": 0.01}),
    ("hybrid", {}),
    ("hybrid", {"attack": "pgd"}),
    ("feature_squeezing", {}),
    ("noise_injection", {}),
    ("autoencoder", {}),
]


def _config(defense: str, params: dict, **train) -> dict:
    return {
        "data": {"dataset": "digits", "val_size": 100, "augment": "crop_flip"},
        "model": {"name": "lenet5"},
        "train": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 0.01, "val_robust_size": 50,
                  "val_attack_steps": 2, **train},
        "threat": {"eps": 0.1},
        "defense": {"name": defense, **params},
    }


def _steps(trainer: Trainer, n: int) -> RunningStats:
    """``n`` training steps as the loop runs them: batches from the loader, then ``train_step``."""
    state = TrainState(epochs=1, steps_per_epoch=len(trainer.loader), eps=0.1, generator=trainer.generator)
    running = RunningStats()
    for _, (x, y) in zip(range(n), trainer.loader, strict=False):
        trainer.train_step(x, y, state, running)
    return running


@pytest.mark.parametrize(("defense", "params"), DEFENSES, ids=lambda v: v if isinstance(v, str) else "")
def test_training_step_reads_nothing_on_the_host(tmp_path, digits, defense, params):
    trainer = Trainer(training.build_config(_config(defense, params)), tmp_path / "run", progress=False, data=digits)
    _steps(trainer, 1)  # first-call work (lazy initialisation) is not the step's
    with count_host_reads() as reads:
        running = _steps(trainer, 6)
    assert running.steps == 6
    assert not reads, f"{defense}: host reads inside the training step: {dict(reads)}"


def test_amp_and_channels_last_steps_read_nothing_either(tmp_path, digits):
    config = training.build_config(_config("pgd_at", {"steps": 2}, amp=True, channels_last=True))
    trainer = Trainer(config, tmp_path / "run", progress=False, data=digits)
    _steps(trainer, 1)
    with count_host_reads() as reads:
        _steps(trainer, 4)
    assert not reads, dict(reads)


def test_running_stats_are_the_sums_of_the_steps():
    running = RunningStats()
    losses, accs = [0.5, 1.25, 2.0], [0.25, 0.5, 1.0]
    for loss, acc in zip(losses, accs, strict=True):
        running.add(torch.tensor(loss), {"loss": torch.tensor(loss), "acc": torch.tensor(acc), "eps_t": 0.1})
    running.add(torch.tensor(1.0), {"loss": torch.tensor(1.0), "kl": torch.tensor(3.0)})  # other keys: kept apart
    with count_host_reads() as reads:
        total, sums = running.read()
    assert reads == {"tolist": 2}  # one read per distinct set of stat names, not per step
    assert total == pytest.approx(sum(losses) + 1.0)
    assert sums == pytest.approx({"loss": sum(losses) + 1.0, "acc": sum(accs), "eps_t": 0.3, "kl": 3.0})


def test_non_finite_loss_stops_the_run_within_stats_every_steps(tmp_path, digits, monkeypatch):
    monkeypatch.setattr(training, "STATS_EVERY", 4)
    real_step = Trainer.train_step
    done = []

    def step(self, x, y, state, running):
        real_step(self, x, y, state, running)
        done.append(1)
        if len(done) == 6:  # the 6th step's loss is nan
            running.add(torch.tensor(float("nan")), {})

    monkeypatch.setattr(Trainer, "train_step", step)
    config = training.build_config(_config("standard", {}))
    with pytest.raises(RobustlabError) as info:
        Trainer(config, tmp_path / "run", progress=False, data=digits).fit()
    assert str(info.value) == "training diverged at epoch 1 (loss is nan); lower train.lr"
    assert 6 <= len(done) <= 6 + 4 - 1, len(done)
    assert not (tmp_path / "run" / "resume.pt").exists()  # nothing of the diverged epoch was saved


# ------------------------------------------------------------------------------------------ attacks
def _victim() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small conv net and labels equal to its own predictions: every sample starts correct."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    x = torch.rand(24, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


ATTACKS = [
    ("pgd", lambda m, x, y, k: pgd(m, x, y, eps=0.02, steps=k, generator=torch.Generator().manual_seed(0))),
    ("pgd-early-stop", lambda m, x, y, k: pgd(m, x, y, eps=0.05, steps=k, early_stop=True,
                                              generator=torch.Generator().manual_seed(0))),
    ("pgd-restarts", lambda m, x, y, k: pgd(m, x, y, eps=0.02, steps=k, restarts=2,
                                            generator=torch.Generator().manual_seed(0))),
    ("apgd-ce", lambda m, x, y, k: apgd(m, x, y, eps=0.03, steps=k, generator=torch.Generator().manual_seed(0))),
    ("apgd-t", lambda m, x, y, k: apgd(m, x, y, eps=0.03, steps=k, targeted=True, n_target_classes=2,
                                       generator=torch.Generator().manual_seed(0))),
    ("square-linf", lambda m, x, y, k: square(m, x, y, eps=0.03, queries=4 * k,
                                              generator=torch.Generator().manual_seed(0))),
    ("square-l2", lambda m, x, y, k: square(m, x, y, eps=0.3, norm="l2", queries=4 * k,
                                            generator=torch.Generator().manual_seed(0))),
    ("fab-t", lambda m, x, y, k: fab_t(m, x, y, eps=0.03, steps=k, n_target_classes=2,
                                       generator=torch.Generator().manual_seed(0))),
    ("cw-l2", lambda m, x, y, k: carlini_wagner_l2(m, x, y, steps=k, binary_search_steps=2, abort_early=False).x_adv),
    ("autoattack", lambda m, x, y, k: autoattack(m, x, y, eps=0.03, steps=k, queries=4 * k,
                                                 generator=torch.Generator().manual_seed(0)).x_adv),
]


@pytest.mark.parametrize(("name", "run"), ATTACKS, ids=[name for name, _ in ATTACKS])
def test_attack_iterations_read_nothing_on_the_host(name, run):
    """An attack may read a few values per call (label checks, stage accuracies), never per iteration."""
    model, x, y = _victim()
    with count_host_reads() as few:
        run(model, x, y, 3)
    with count_host_reads() as many:
        run(model, x, y, 12)
    assert many == few, f"{name}: host reads grow with the iterations: {dict(few)} -> {dict(many)}"


def test_evaluation_loops_read_per_attack_not_per_batch(trained_digits):
    """More batches add only the reads each attack call makes to check its input (labels, pixel range)."""
    model, test = trained_digits.model, trained_digits.data.test.head(48)
    attacks = [make_attack("fgsm", eps=0.1), make_attack("pgd-3", eps=0.1, early_stop=True)]
    attacks.append(lambda m, x, y: pgd(m, x, y, eps=0.1, steps=2))

    def reads(batch_size: int) -> int:
        with count_host_reads() as counted:
            evaluate_model(model, test, eps=0.1, attacks=["fgsm", "pgd-3"], batch_size=batch_size, n_boot=10,
                           suite="quick")
            accuracy(model, test, batch_size=batch_size)
            robust_accuracy(model, test, attacks[2], batch_size=batch_size)
        return sum(counted.values())

    x, y = next(iterate(test, 4, torch.device("cpu")))
    with count_host_reads() as per_call:
        for attack in attacks:
            attack(model, x, y)
    assert reads(4) == reads(48) + 11 * sum(per_call.values())  # 12 batches instead of 1


def test_bf16_attack_precision_is_recorded_and_validated(trained_digits):
    model, test = trained_digits.model, trained_digits.data.test.head(32)
    result = evaluate_model(model, test, eps=0.1, attacks=["fgsm"], n_boot=10, attack_precision="bf16", suite="quick")
    assert result.model_info["attack_precision"] == "bf16"
    with pytest.raises(RobustlabError, match="attack_precision"):
        evaluate_model(model, test, eps=0.1, attacks=["fgsm"], attack_precision="fp16")
