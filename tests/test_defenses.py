"""Defences: exact hybrid schedule/alpha, parameter validation, crafting purity, AWP, and robustness gains."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from robustlab.attacks import pgd
from robustlab.config import build_config
from robustlab.defenses import (
    DEFENSES,
    HybridObjective,
    TrainState,
    adaptive_alpha,
    build_objective,
    craft_adversarial,
    eps_schedule,
)
from robustlab.defenses.adversarial import AttackPlan, awp_forward
from robustlab.errors import ConfigError
from robustlab.metrics import robust_accuracy
from robustlab.models import build_model
from robustlab.training import train

EPS = 0.1


def _config(defense: str, epochs: int = 6, **params) -> dict:
    return {
        "data": {"dataset": "digits", "val_size": 200},
        "model": {"name": "lenet5"},
        "train": {"epochs": epochs, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0,
                  "select": "last"},
        "threat": {"eps": EPS},
        "defense": {"name": defense, **params},
    }


# --- the hybrid's pure functions, exactly -------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        ("linear", 0, 0.03), ("linear", 50, 0.165), ("linear", 100, 0.3), ("linear", 250, 0.3),
        ("cosine", 0, 0.03), ("cosine", 50, 0.165), ("cosine", 25, 0.03 + 0.27 * (1 - math.cos(math.pi / 4)) / 2),
        ("exponential", 0, 0.03), ("exponential", 50, 0.03 * 10**0.5), ("exponential", 100, 0.3),
        ("step", 0, 0.03), ("step", 24, 0.03), ("step", 25, 0.03 + 0.27 / 4), ("step", 99, 0.03 + 0.27 * 3 / 4),
        ("step", 100, 0.3),
    ],
)
def test_eps_schedule_exact(schedule, step, expected):
    assert eps_schedule(step, 100, 0.3, 0.1, schedule) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_eps_schedule_edges():
    assert eps_schedule(0, 0, 0.3, 0.1) == 0.3  # no ramp
    assert eps_schedule(10, 100, 0.0, 0.1, "exponential") == 0.0
    assert eps_schedule(10, 100, 0.3, 0.0, "linear") == pytest.approx(0.03)


def test_adaptive_alpha_exact():
    assert adaptive_alpha(0.99, 0.9) == pytest.approx(0.9 / 1.89, rel=1e-12)
    assert adaptive_alpha(0.0, 0.0) == 0.5
    assert adaptive_alpha(1.0, 0.0) == 0.0
    assert adaptive_alpha(0.8, 0.2, previous=0.5, ema=0.9) == pytest.approx(0.9 * 0.5 + 0.1 * 0.2, rel=1e-12)
    assert adaptive_alpha(0.8, 0.2, previous=0.5, ema=0.0) == pytest.approx(0.2)
    assert adaptive_alpha(0.5, 0.5, alpha_min=0.1, alpha_max=0.3) == 0.3
    assert adaptive_alpha(1.0, 0.0, alpha_min=0.1) == 0.1


def test_hybrid_uses_schedule_alpha_and_guard():
    objective = build_objective("hybrid", {"start_fraction": 0.1, "ramp_epochs": 2, "alpha_ema": 0.0})
    state = TrainState(epoch=0, epochs=5, step=0, steps_per_epoch=10, eps=0.3)
    assert objective.on_epoch_start(state) == {"alpha": 0.5}  # the first epoch's alpha
    plan = objective.attack_plan(state)
    assert plan == AttackPlan("fgsm", pytest.approx(0.03), 1, pytest.approx(1.25 * 0.03))
    state.step = 10
    assert objective.attack_plan(state).eps == pytest.approx(0.03 + 0.27 / 2)
    row = objective.on_epoch_end(state, {"val_clean_acc": 0.7, "val_robust_clean_acc": 0.9, "val_robust_acc": 0.6,
                                         "train_adv_acc": 0.0, "train_eps_t": 0.1})
    # clean accuracy of the images PGD saw (the subset), not of the whole validation split
    assert objective.alpha == pytest.approx(0.6 / 1.5) and row["alpha_next"] == objective.alpha
    # robust accuracy collapses while the training FGSM accuracy is high: switch to pgd-2 and log it
    row = objective.on_epoch_end(state, {"val_robust_clean_acc": 0.95, "val_robust_acc": 0.05, "train_adv_acc": 0.9,
                                         "train_eps_t": 0.1})
    assert row["attack"] == "pgd-2" and any("catastrophic" in line for line in state.log)
    plan = objective.attack_plan(state)
    assert (plan.method, plan.steps, plan.step_size) == ("pgd", 2, pytest.approx(2.5 * plan.eps / 2))
    restored = HybridObjective(objective.params)
    restored.load_state_dict(objective.state_dict())
    assert restored.state_dict() == objective.state_dict()


@pytest.mark.parametrize("defense", ["pgd_at", "fast_at", "trades", "mart"])
def test_eps_warmup_grows_the_training_budget_linearly_from_zero(defense):
    objective = build_objective(defense, {"eps_warmup": 2})
    state = TrainState(epoch=0, epochs=5, step=0, steps_per_epoch=10, eps=0.3)
    budgets = []
    for step in (0, 5, 10, 20, 35):
        state.step = step
        plan = objective.attack_plan(state)
        budgets.append(plan.eps)
        assert plan.step_size == pytest.approx(plan.eps * (1.25 if defense == "fast_at" else 2.5 / plan.steps))
    assert budgets == pytest.approx([0.0, 0.075, 0.15, 0.3, 0.3])
    assert objective.on_epoch_end(state, {}) == {"eps_t": 0.3}
    plain = build_objective(defense, {})
    assert plain.attack_plan(TrainState(step=0, steps_per_epoch=10, eps=0.3)).eps == 0.3
    assert plain.on_epoch_end(state, {}) == {}


def test_pgd_at_warmup_is_logged_per_epoch(digits, tmp_path):
    result = train(_config("pgd_at", epochs=2, steps=2, eps_warmup=2), tmp_path / "w", progress=False, data=digits)
    assert [row["eps_t"] for row in result.history] == pytest.approx([EPS / 2, EPS])


# --- parameters ---------------------------------------------------------------------------------------


def test_hybrid_guard_catches_fgsm_that_never_became_pgd_robust():
    objective = build_objective("hybrid", {"ramp_epochs": 1})
    state = TrainState(epoch=0, epochs=3, step=10, steps_per_epoch=10, eps=0.3)
    # train FGSM acc 0.7 over an epoch wholly at eps
    train = {"val_robust_clean_acc": 0.96, "train_adv_acc": 0.7, "train_eps_t": 0.3}
    assert objective.on_epoch_end(state, {**train, "val_robust_acc": 0.5})["attack"] == "fgsm"
    assert objective.on_epoch_end(state, {**train, "val_robust_acc": 0.07})["attack"] == "pgd-2"
    # the epoch that finished the ramp trained FGSM below eps (mean eps_t 0.165): no verdict yet
    ramping = build_objective("hybrid", {"ramp_epochs": 1})
    assert ramping.on_epoch_end(state, {**train, "train_eps_t": 0.165, "val_robust_acc": 0.07})["attack"] == "fgsm"


def test_hybrid_guard_reads_the_epoch_training_stats_the_history_logs(digits, tmp_path, monkeypatch):
    """The guard's train FGSM accuracy is the Trainer's epoch mean (over every rank's batches under
    torchrun), the same number history.csv logs, not a tally the objective keeps of its own batches."""
    seen = []
    original = HybridObjective.on_epoch_end
    monkeypatch.setattr(HybridObjective, "on_epoch_end",
                        lambda self, state, metrics: seen.append(dict(metrics)) or original(self, state, metrics))
    result = train(_config("hybrid", epochs=1), tmp_path / "h", progress=False, data=digits)
    (row,) = result.history
    assert seen[0]["train_adv_acc"] == row["train_adv_acc"] and 0.0 < row["train_adv_acc"] <= 1.0
    assert seen[0]["val_robust_acc"] == row["val_robust_acc"]


def test_hybrid_guard_ignores_a_drop_at_the_noise_floor():
    """Early in a ramp to eps 0.3 val PGD at the target eps is ~0: 1% -> 0% is not catastrophic overfitting."""
    objective = build_objective("hybrid", {})
    state = TrainState(epoch=0, epochs=50, step=10, steps_per_epoch=10, eps=0.3)  # eps_t still ramping
    train = {"train_adv_acc": 0.95, "train_eps_t": 0.05}  # train FGSM acc 0.95 at the small eps_t
    for clean, robust in ((0.97, 0.01), (0.98, 0.0)):
        row = objective.on_epoch_end(state, {**train, "val_robust_clean_acc": clean, "val_robust_acc": robust})
        assert row["attack"] == "fgsm"
    assert not state.log
    collapsing = build_objective("hybrid", {})
    collapsing.on_epoch_end(state, {**train, "val_robust_clean_acc": 0.97, "val_robust_acc": 0.4})
    row = collapsing.on_epoch_end(state, {**train, "val_robust_clean_acc": 0.98, "val_robust_acc": 0.05})
    assert row["attack"] == "pgd-2"


def test_every_defence_registered():
    expected = {"standard", "pgd_at", "trades", "mart", "fast_at", "lipschitz", "hybrid", "feature_squeezing",
                "noise_injection", "autoencoder"}
    assert expected <= set(DEFENSES)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"name": "pgd_at", "stepz": 3}, "stepz"),
        ({"name": "trades", "beta": -1}, "beta"),
        ({"name": "hybrid", "schedule": "quadratic"}, "schedule"),
        ({"name": "hybrid", "alpha_min": 0.9, "alpha_max": 0.1}, "alpha_min"),
        ({"name": "pgd_at", "awp_gamma": 5}, "awp_gamma"),
        ({"name": "pgd_at", "preprocess": {"name": "jpeg"}}, "jpeg"),
        ({"name": "pgd_at", "preprocess": {"name": "feature_squeezing", "bitz": 2}}, "bitz"),
        ({"name": "feature_squeezing", "bits": 0}, "bits"),
    ],
)
def test_bad_defence_params_name_the_field(params, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config({"defense": params})


# --- crafting and AWP ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["pgd", "fgsm", "kl"])
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_craft_stays_in_ball_and_restores_model(method, bn_mode):
    model = build_model("resnet18", 10, 1, 8)  # has batch norm
    model.train()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_adv = craft_adversarial(model, x, y, AttackPlan(method, 0.1, 3, 0.04), bn_mode=bn_mode)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv != x).any()
    assert model.training and all(p.requires_grad for p in model.parameters())
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [] if bn_mode == "eval" else all("running" in k or "num_batches" in k for k in changed)


@pytest.mark.parametrize("defense", ["pgd_at", "trades", "hybrid"])
def test_awp_updates_batchnorm_statistics_once_per_batch_as_without_it(defense):
    """AWP's ascent step is a forward pass on the train-mode model: it must not move the running
    statistics a second time. The loss's own forward pass moves them once, with or without AWP (with
    it, at the perturbed weights, as in Wu et al.'s reference, so only the count is the same)."""
    torch.manual_seed(0)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))

    def running_after_one_batch(**params):
        torch.manual_seed(1)
        model = build_model("resnet18", 10, 3, 32, width=4).train()
        objective = build_objective(defense, {"steps": 1, **params} if defense != "hybrid" else params)
        state = TrainState(epoch=0, epochs=1, step=0, steps_per_epoch=1, eps=0.03, generator=torch.Generator())
        objective.loss(model, x, y, state)
        return {k: int(v) for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}

    plain, awp = running_after_one_batch(), running_after_one_batch(awp_gamma=0.005)
    assert set(plain.values()) == {1} and awp == plain, "AWP's ascent step updated the running statistics"


def test_awp_gradient_is_taken_at_perturbed_weights():
    torch.manual_seed(0)
    model = build_model("lenet5", 10, 1, 8)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    forward = awp_forward(model, lambda f: F.cross_entropy(f(x), y), gamma=0.01)
    loss = F.cross_entropy(forward(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # w itself untouched
    # reference: apply v by hand and differentiate there
    matrices = [p for p in model.parameters() if p.dim() > 1]
    ref_grads = torch.autograd.grad(F.cross_entropy(model(x), y), matrices)
    with torch.no_grad():
        for p, g in zip(matrices, ref_grads, strict=True):
            p.add_(0.01 * p.norm() * g / g.norm())
    expected = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    perturbed_loss = F.cross_entropy(model(x), y)
    assert loss.item() == pytest.approx(perturbed_loss.item(), rel=1e-5)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# --- every adversarial objective beats standard training under PGD (digits, eps 0.1) ------------------


@pytest.fixture(scope="module")
def standard_pgd(digits, tmp_path_factory):
    result = train(_config("standard"), tmp_path_factory.mktemp("std") / "run", progress=False, data=digits)
    return _pgd_accuracy(result.model.eval(), digits)


def _pgd_accuracy(model, data) -> float:
    attack = partial(pgd, eps=EPS, steps=20, early_stop=True, generator=torch.Generator().manual_seed(0))
    return robust_accuracy(model, data.test, attack)


@pytest.mark.parametrize(
    ("defense", "params"),
    [
        ("pgd_at", {"steps": 3}),
        ("fast_at", {}),
        ("trades", {"steps": 3}),
        ("mart", {"steps": 3, "awp_gamma": 0.005}),
        ("hybrid", {}),
        # the gradient-norm penalty needs a little longer: at 6 epochs its margin is 7 points (PGD-20 48.5% vs
        # 41.5%), at 8 epochs 13 points (54.9%); measured after splits kept their seeded random order
        ("lipschitz", {"epochs": 8}),
    ],
)
def test_objective_beats_standard_under_pgd(defense, params, digits, standard_pgd, tmp_path):
    result = train(_config(defense, **params), tmp_path / defense, progress=False, data=digits)
    robust = _pgd_accuracy(result.model.eval(), digits)
    assert robust >= standard_pgd + 0.08, f"{defense}: PGD-20 {robust:.3f} vs standard {standard_pgd:.3f}"
    assert result.metrics["clean_accuracy"] >= 0.65  # robust training costs clean accuracy, not all of it


def test_hybrid_alpha_compares_clean_and_pgd_accuracy_of_the_same_validation_images(digits, tmp_path):
    config = _config("hybrid", epochs=2)
    config["train"]["val_robust_size"] = 50  # of 200 validation images
    rows = train(config, tmp_path / "h", progress=False, data=digits).history
    first = rows[0]
    assert first["val_robust_clean_acc"] * 50 == pytest.approx(round(first["val_robust_clean_acc"] * 50))
    assert rows[1]["alpha"] == pytest.approx(adaptive_alpha(first["val_robust_clean_acc"], first["val_robust_acc"]))


def test_hybrid_history_logs_eps_t_and_alpha(digits, tmp_path):
    result = train(_config("hybrid", epochs=2), tmp_path / "h", progress=False, data=digits)
    rows = result.history
    assert [r["alpha"] for r in rows][0] == 0.5
    assert rows[1]["alpha"] == pytest.approx(adaptive_alpha(rows[0]["val_robust_clean_acc"], rows[0]["val_robust_acc"]))
    assert rows[0]["eps_t"] == pytest.approx(eps_schedule(rows[0]["epoch"] * 1.0, 0.8, EPS, 0.1))
    header = (tmp_path / "h" / "history.csv").read_text().splitlines()[0].split(",")
    assert {"alpha", "eps_t", "train_eps_t", "val_robust_acc", "val_robust_clean_acc"} <= set(header)
