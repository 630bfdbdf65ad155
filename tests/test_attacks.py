"""Properties every attack must satisfy (budget, box, purity, determinism, clear errors), plus unit checks
of the pieces of APGD, FAB, Square, CW and the BPDA/EOT wrappers. Fast: digits and tiny models only."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robustlab.attacks import (
    ATTACKS,
    BPDA,
    EOT,
    adaptive_model,
    apgd,
    apply_patch,
    autoattack,
    carlini_wagner_l2,
    fab_t,
    make_attack,
    patched_accuracy,
    square,
    transfer_attack,
    universal_patch,
)
from robustlab.attacks.apgd import checkpoints
from robustlab.attacks.core import lp_norm
from robustlab.attacks.fab import project_to_hyperplane
from robustlab.attacks.square import _linf_proposal, _other_colours, pseudo_gaussian_tile, square_size_fraction
from robustlab.defenses.preprocessing import Defended, InputTransform
from robustlab.errors import RobustlabError

# Small budgets so that every registered attack runs in well under a second on digits.
SMALL: dict[str, dict] = {
    "pgd": {"steps": 3},
    "cw_linf": {"steps": 3},
    "mifgsm": {"steps": 3},
    "cw_l2": {"steps": 10, "binary_search_steps": 2},
    "apgd_ce": {"steps": 5},
    "apgd_dlr": {"steps": 5},
    "apgd_t": {"steps": 3, "n_target_classes": 2},
    "fab_t": {"steps": 3, "n_target_classes": 2},
    "square": {"queries": 20},
    "autoattack": {"steps": 3, "queries": 10},
}
SEEDED = {"pgd", "cw_linf", "apgd_ce", "apgd_dlr", "apgd_t", "fab_t", "square", "autoattack"}


@pytest.fixture(scope="module")
def batch(trained_digits):
    data = trained_digits.data
    x = data.test.images[:24].float() / 255
    return trained_digits.model.eval(), x, data.test.labels[:24]


def _state(model: nn.Module):
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    )


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_stays_in_ball_and_box_and_leaves_model_untouched(batch, name, norm, eps):
    model, x, y = batch
    model.train()  # attacks must not switch modes (nor flags) behind the caller's back
    first = next(model.parameters())
    first.requires_grad_(False)
    before = _state(model)
    try:
        kwargs = dict(SMALL.get(name, {}))
        if name in SEEDED:
            kwargs["generator"] = torch.Generator().manual_seed(0)
        x_adv = make_attack(name, eps=eps, norm=norm, **kwargs)(model, x, y)
        after = _state(model)
    finally:
        first.requires_grad_(True)
        model.eval()
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert float(lp_norm(x_adv - x, norm).max()) <= eps * (1 + 1e-5) + 1e-6
    assert before[0] == after[0] and before[1] == after[1]
    assert all(torch.equal(a, b) for a, b in zip(before[2], after[2], strict=True))
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(before[3], after[3], strict=True))


@pytest.fixture(scope="module")
def bn_model() -> nn.Module:
    """A ResNet-18 (BatchNorm throughout) on 8x8 RGB images whose running statistics are already non-trivial."""
    from robustlab.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", 10, 3, 8).train()
    with torch.no_grad():
        model(torch.rand(16, 3, 8, 8))
    return model


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_leave_batchnorm_statistics_of_a_train_mode_model_exactly_as_found(bn_model, name):
    """Every buffer (running_mean, running_var, num_batches_tracked) is bitwise the same after the attack.

    Before, ``pgd(resnet18.train(), x, y, steps=3)`` moved ``num_batches_tracked`` 0 -> 3 and the running means.
    """
    model = bn_model.train()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = dict(SMALL.get(name, {}))
    if name in SEEDED:
        kwargs["generator"] = torch.Generator().manual_seed(0)
    make_attack(name, eps=0.03, **kwargs)(model, x, y)
    after = model.state_dict()
    assert all(m.training for m in model.modules())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed
    assert any("running_mean" in k for k in before)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("method", ["pgd", "fgsm", "kl"])
def test_crafting_inside_training_leaves_batchnorm_statistics_alone(bn_model, bn_mode, method):
    """``defense.attack_bn``: crafting sees running (eval) or batch (train) statistics, and updates neither."""
    from robustlab.defenses.adversarial import AttackPlan, craft_adversarial

    model = bn_model.train()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = AttackPlan(method, 0.03, 3, 0.01)
    craft_adversarial(model, x, y, plan, bn_mode=bn_mode, generator=torch.Generator().manual_seed(0))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model(x)  # the loss's own forward pass in train mode still updates them, as training needs
    key = "net.stem_bn.num_batches_tracked"
    assert not torch.equal(before[key], model.state_dict()[key])


@pytest.mark.parametrize("name", ["fgsm", "pgd", "apgd_ce", "cw_l2", "fab_t", "square", "autoattack"])
def test_bad_inputs_give_one_clear_error(batch, name):
    model, x, y = batch
    attack = make_attack(name, eps=0.1, **SMALL.get(name, {}))
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    cases = {
        "NaN": (nan, y, "NaN"),
        "[0,255]": (x * 255, y, "255"),
        "labels": (x, torch.full_like(y, 10), "labels must be < 10"),
        "negative labels": (x, y - 20, "labels must be >= 0"),
    }
    for images, labels, phrase in cases.values():
        with pytest.raises(RobustlabError, match=phrase) as info:
            attack(model, images, labels)
        assert "\n" not in str(info.value)
    with pytest.raises(RobustlabError, match="eps"):
        make_attack(name, eps=-0.1)(model, x, y)


def test_unknown_attack_name_lists_valid_names():
    with pytest.raises(RobustlabError, match="unknown attack 'nope'.*apgd_ce"):
        make_attack("nope", eps=0.1)


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_attacks_are_deterministic_under_a_seed(batch, name):
    model, x, y = batch
    runs = [
        make_attack(name, eps=0.1, generator=torch.Generator().manual_seed(7), **SMALL.get(name, {}))(model, x, y)
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


@settings(max_examples=15, deadline=None)
@given(
    eps=st.floats(0.0, 0.5),
    norm=st.sampled_from(["linf", "l2"]),
    name=st.sampled_from(["pgd", "apgd_ce", "apgd_t", "square", "fab_t"]),
    seed=st.integers(0, 2**16),
)
def test_budget_property_on_random_models_and_images(eps, norm, name, seed):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 5 * 5, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.rand((6, 2, 5, 5), generator=g)
    x[0] = 0.0
    x[1] = 1.0  # saturated images stress the box
    y = torch.randint(0, 4, (6,), generator=g)
    kwargs = {"queries": 15} if name == "square" else {"steps": 4}
    x_adv = make_attack(name, eps=eps, norm=norm, generator=g, **kwargs)(model, x, y)
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert float(lp_norm(x_adv - x, norm).max()) <= eps * (1 + 1e-5) + 1e-6


def test_apgd_checkpoints_follow_the_paper():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_apgd_breaks_more_than_fgsm_and_targeted_variant_works(batch):
    model, x, y = batch
    g = torch.Generator().manual_seed(0)

    def acc(x_adv):
        return float((model(x_adv).argmax(1) == y).float().mean())

    base = acc(make_attack("fgsm", eps=0.15)(model, x, y))
    assert acc(apgd(model, x, y, eps=0.15, steps=20, generator=g)) <= base
    assert acc(apgd(model, x, y, eps=0.15, steps=20, targeted=True, n_target_classes=3, generator=g)) <= base


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_hyperplane_projection_reaches_plane_inside_box(norm):
    g = torch.Generator().manual_seed(0)
    z = torch.rand((50, 30), generator=g)
    w = torch.randn((50, 30), generator=g)
    b = -(w * torch.rand((50, 30), generator=g)).sum(1)  # a plane through a point of the box: reachable
    d = project_to_hyperplane(z, w, b, norm)
    assert torch.allclose(((z + d) * w).sum(1) + b, torch.zeros(50), atol=1e-4)
    assert float((z + d).min()) >= -1e-6 and float((z + d).max()) <= 1 + 1e-6
    # minimality: no shorter step along the unconstrained optimum direction reaches the plane
    value = (z * w).sum(1) + b
    lower = value.abs() / (w.abs().sum(1) if norm == "linf" else w.norm(dim=1))
    assert torch.all(lp_norm(d, norm) >= lower - 1e-5)


def test_hyperplane_projection_without_active_box_is_closed_form():
    z = torch.full((1, 4), 0.5)
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0]])
    b = torch.tensor([-(w * z).sum() + 0.1])
    d = project_to_hyperplane(z, w, b, "l2")
    assert torch.allclose(d, -0.1 * w / w.pow(2).sum(), atol=1e-6)
    d = project_to_hyperplane(z, w, b, "linf")
    assert torch.allclose(d, -0.1 / w.abs().sum() * w.sign(), atol=1e-6)


def test_square_schedule_and_tile():
    from robustlab.attacks.autoattack import autoattack_stages

    assert square_size_fraction(0, 10000, 0.8) == 0.8
    assert square_size_fraction(11, 10000, 0.8) == 0.4
    assert square_size_fraction(9000, 10000, 0.8) == pytest.approx(0.8 / 512)
    assert square_size_fraction(50, 1000, 0.8) == pytest.approx(0.8 / 8)  # rescaled to the budget
    # AutoAttack's Square (5,000 queries, resc_schedule=False) counts iterations as they are: at query
    # 4,999 it has halved p seven times, where the stretched schedule has halved it nine times
    assert square_size_fraction(4999, 5000, 0.8, rescale=False) == pytest.approx(0.8 / 128)
    assert square_size_fraction(4999, 5000, 0.8) == pytest.approx(0.8 / 512)
    square_stage = dict((name, kwargs) for name, _, kwargs in autoattack_stages("standard"))["square"]
    assert square_stage == {"queries": 5000, "rescale_schedule": False}
    tile = pseudo_gaussian_tile(7, torch.Generator().manual_seed(0))
    assert tile.shape == (7, 7) and float(tile.norm()) == pytest.approx(1.0)
    assert bool((tile > 0).any()) and bool((tile < 0).any())  # two halves of opposite sign


def test_square_replacement_colour_is_uniform_over_the_other_colours():
    g = torch.Generator().manual_seed(0)
    grey = torch.ones(4000, 1, 1, 1)
    assert torch.equal(_other_colours(grey, g), -grey), "one channel: the only other colour"
    rgb = torch.ones(7000, 3, 1, 1)
    codes = (_other_colours(rgb, g).flatten(1) < 0).long() @ torch.tensor([1, 2, 4])
    counts = torch.bincount(codes, minlength=8)
    assert counts[0] == 0, "the rejected colour is never drawn again"
    assert counts[1:].min() > 850 and counts[1:].max() < 1150  # 1000 expected for each of the 7


def test_square_linf_proposal_always_changes_the_image():
    g = torch.Generator().manual_seed(0)
    xs = torch.zeros(64, 1, 8, 8)  # black images: -eps clips away, only +eps changes a pixel
    cur = xs.clone()
    candidate = _linf_proposal(xs, cur, 0.3, 0.1, g)
    assert bool(((candidate - cur).abs().flatten(1).amax(1) > 0).all())
    assert float(candidate.max()) == pytest.approx(0.3) and float(candidate.min()) == 0.0


def test_square_breaks_a_linear_model_without_gradients():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand((10, 1, 4, 4), generator=g)
    y = model(x).argmax(1).detach()
    x_adv = square(model, x, y, eps=0.5, queries=200, generator=g)
    assert float((model(x_adv).argmax(1) == y).float().mean()) < 0.5


def test_cw_l2_reports_success_and_distance(batch):
    model, x, y = batch
    result = carlini_wagner_l2(model, x, y, steps=30, binary_search_steps=3, lr=0.05)
    assert result.success.any()
    assert torch.all(model(result.x_adv[result.success]).argmax(1) != y[result.success])
    assert torch.allclose(result.l2, lp_norm(result.x_adv - x, "l2"), atol=1e-5)
    assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1


def test_cw_l2_registry_form_keeps_only_examples_inside_eps(batch):
    model, x, y = batch
    full = carlini_wagner_l2(model, x, y, steps=30, binary_search_steps=2, lr=0.05)
    eps = full.median_l2()
    x_adv = make_attack("cw_l2", eps=eps, norm="l2", steps=30, binary_search_steps=2, lr=0.05)(model, x, y)
    assert torch.equal(lp_norm(x_adv - x, "l2") > 0, full.success & (full.l2 <= eps * (1 + 1e-6)))


def test_autoattack_records_every_stage(batch):
    model, x, y = batch
    result = autoattack(model, x, y, eps=0.15, steps=5, queries=20, generator=torch.Generator().manual_seed(0))
    assert list(result.accuracy) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    values = list(result.accuracy.values())
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # each stage only removes points
    measured = float((model(result.x_adv).argmax(1) == y).float().mean())
    assert measured == pytest.approx(result.robust_accuracy) == pytest.approx(values[-1])
    rand = autoattack(model, x, y, eps=0.15, version="rand", steps=3, eot_samples=2)
    assert list(rand.accuracy) == ["clean", "apgd-ce", "apgd-dlr"]
    with pytest.raises(RobustlabError, match="version"):
        autoattack(model, x, y, eps=0.1, version="plus")


class _Quantize(InputTransform):
    differentiable = False

    def forward(self, x):
        return torch.round(x * 4) / 4


class _Noise(InputTransform):
    random = True

    def forward(self, x):
        return (x + 0.05 * torch.randn_like(x)).clamp(0, 1)


def test_autoattack_rand_keeps_the_attack_point_of_every_sample_and_averages_draws_once(batch):
    """On a random model a point that survived a stage on one draw may fall on the next: the result must
    hold the attack's point for every sample (not the clean image of the survivors), APGD must take all
    its steps, and a model that already averages draws (an evaluation's EOT model) is not averaged again."""
    from robustlab.attacks.autoattack import attacked_model, autoattack_stages
    from robustlab.attacks.wrappers import EOT

    model, x, y = batch
    noisy = Defended(model, _Noise()).eval()
    result = autoattack(noisy, x, y, eps=0.1, version="rand", steps=5, eot_samples=2,
                        generator=torch.Generator().manual_seed(0))
    attacked = noisy(x).argmax(1) == y  # (one draw; the attack ran on the points its own clean draw got right)
    moved = (result.x_adv - x).flatten(1).abs().amax(1) > 0
    assert moved[attacked & result.robust].float().mean() > 0.9
    assert all(kw["early_stop"] is False for _, _, kw in autoattack_stages("rand"))
    eot = EOT(noisy, 4)
    assert attacked_model(eot, "rand", 20) is eot
    assert isinstance(attacked_model(noisy, "rand", 20), EOT) and attacked_model(model, "standard") is model


def test_bpda_forward_is_exact_and_gradient_flows(batch):
    model, x, y = batch
    defended = Defended(model, _Quantize())
    wrapped = BPDA(defended)
    assert torch.equal(wrapped(x), defended(x))
    x_req = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(defended(x_req), y).backward()
    assert float(x_req.grad.abs().sum()) == 0  # rounding masks the gradient ...
    x_req = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(wrapped(x_req), y).backward()
    assert float(x_req.grad.abs().sum()) > 0  # ... BPDA restores a useful one
    masked = make_attack("pgd-10", eps=0.2)(defended, x, y)
    adaptive = make_attack("pgd-10", eps=0.2)(wrapped, x, y)

    def acc(x_adv):
        return float((defended(x_adv).argmax(1) == y).float().mean())

    assert acc(adaptive) < acc(masked)


def test_eot_averages_logits_over_draws(batch):
    model, x, y = batch
    noisy = Defended(model, _Noise())
    torch.manual_seed(0)
    eot = EOT(noisy, samples=4)(x)
    torch.manual_seed(0)
    draws = noisy(x.repeat(4, 1, 1, 1)).view(4, *eot.shape).mean(0)
    assert torch.allclose(eot, draws, atol=1e-6)
    assert torch.equal(EOT(model, samples=3)(x).argmax(1), model(x).argmax(1))


def test_adaptive_model_picks_bpda_and_eot(batch):
    model = batch[0]

    class _Both(_Quantize):
        random = True

    assert adaptive_model(model) == (model, "none")
    attacked, label = adaptive_model(Defended(model, _Quantize()))
    assert isinstance(attacked, BPDA) and label == "BPDA"
    attacked, label = adaptive_model(Defended(model, _Noise()), eot_samples=5)
    assert isinstance(attacked, EOT) and attacked.samples == 5 and label == "EOT(5)"
    attacked, label = adaptive_model(Defended(model, _Both()), eot_samples=20)
    assert isinstance(attacked, EOT) and isinstance(attacked.model, BPDA) and label == "BPDA+EOT(20)"


def test_transfer_attack_scores_both_models(batch, trained_digits):
    model, x, y = batch
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    result = transfer_attack(model, other, x, y, attack="pgd-5", eps=0.2)
    assert result.attack == "pgd"
    assert result.surrogate_accuracy == pytest.approx(float((model(result.x_adv).argmax(1) == y).float().mean()))
    assert 0 <= result.target_accuracy <= 1


def test_universal_patch_lowers_patched_accuracy(trained_digits):
    model = trained_digits.model.eval()
    data = trained_digits.data
    x_train, y_train = data.train.images[:256].float() / 255, data.train.labels[:256]
    x_test, y_test = data.test.images[:128].float() / 255, data.test.labels[:128]
    g = torch.Generator().manual_seed(0)
    patch = universal_patch(model, x_train, y_train, area=0.15, steps=30, batch_size=64, generator=g)
    assert patch.shape == (1, 3, 3) and float(patch.min()) >= 0 and float(patch.max()) <= 1
    random_patch = torch.rand(patch.shape, generator=g)
    optimised = patched_accuracy(model, x_test, y_test, patch, torch.Generator().manual_seed(1))
    baseline = patched_accuracy(model, x_test, y_test, random_patch, torch.Generator().manual_seed(1))
    assert optimised < baseline
    pasted = apply_patch(x_test[:2], patch, torch.Generator().manual_seed(0))
    assert int((pasted != x_test[:2]).flatten(1).any(1).sum()) <= 2


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_finds_the_minimal_distortion_of_a_linear_model(norm):
    """For a linear two-class model away from the box, the closest boundary point has a closed form."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    x = 0.5 + 0.05 * torch.rand((5, 3, 2, 2), generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
        w = model[1].weight
        margin = (model(x).gather(1, y[:, None]) - model(x).gather(1, 1 - y[:, None])).squeeze(1)
        direction = (w[y] - w[1 - y]).flatten(1)
        exact = margin / (direction.abs().sum(1) if norm == "linf" else direction.norm(dim=1))
    assert float(exact.max()) < 0.4  # the box is not active: the closed form applies
    x_adv = fab_t(model, x, y, eps=0.45, norm=norm, steps=30, n_target_classes=1, restarts=2, early_stop=False,
                  generator=g)
    assert torch.all(model(x_adv).argmax(1) != y)
    found = lp_norm(x_adv - x, norm)
    assert torch.all(found >= exact - 1e-5) and torch.all(found <= exact * 1.1 + 1e-5)


@pytest.mark.parametrize("early_stop", [True, False])
def test_pgd_restarts_only_retry_robust_points(batch, early_stop):
    model, x, y = batch
    g = torch.Generator().manual_seed(0)
    x_adv = make_attack("pgd-3", eps=0.1, restarts=3, early_stop=early_stop, generator=g)(model, x, y)
    assert float(lp_norm(x_adv - x, "linf").max()) <= 0.1 + 1e-6
    single = make_attack("pgd-3", eps=0.1, generator=torch.Generator().manual_seed(0))(model, x, y)
    fooled_single = model(single).argmax(1) != y
    fooled_multi = model(x_adv).argmax(1) != y
    assert torch.all(fooled_multi[fooled_single])  # the first restart is the single run; kept where it won
