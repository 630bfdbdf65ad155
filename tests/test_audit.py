"""The gradient-masking audit flags deliberately masked models and passes honest ones (digits, seconds each).

Masked models (Athalye et al. 2018): a quantising input layer (feature squeezing to 2 bits, i.e.
round(3x)/3) attacked without BPDA, logits scaled by 1e4 so float32 cross-entropy gradients vanish, and
Gaussian input noise (sigma 0.2) attacked without EOT.
Honest models: the standard LeNet-5 of ``trained_digits`` and a PGD-trained LeNet-5.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from robustlab.attacks import pgd
from robustlab.audit import (
    CHECK_NAMES,
    AuditCheck,
    AuditReport,
    audit_model,
    audit_run,
    binomial_se,
    noise_tolerance,
    train_surrogate,
)
from robustlab.cli import main
from robustlab.defenses.preprocessing import Defended, FeatureSqueezing, GaussianNoise
from robustlab.errors import InputError, RobustlabError
from robustlab.models import build_model

EPS = 0.1
FAST = {"n": 100, "steps": 5, "square_queries": 100}


def quantiser() -> FeatureSqueezing:
    return FeatureSqueezing(bits=2, median=1)


def noise() -> GaussianNoise:
    return GaussianNoise(sigma=0.2)


class ScaledLogits(nn.Module):
    """A saturating softmax temperature: logits * 1e4 make float32 cross-entropy gradients exactly zero."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * 1e4


@pytest.fixture(scope="module")
def base(trained_digits):
    return trained_digits.model.eval()


@pytest.fixture(scope="module")
def surrogate(digits):
    """An independently trained standard LeNet-5 (other seed), the source of transfer attacks."""
    return train_surrogate(digits, epochs=4, seed=7)


@pytest.fixture(scope="module")
def pgd_trained(digits):
    """Madry PGD adversarial training, minimal loop: 8 epochs of PGD-3 at eps on digits (a few seconds)."""
    torch.manual_seed(3)
    model = build_model("lenet5", digits.num_classes, digits.channels, digits.image_size, digits.mean, digits.std)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_all, y_all = digits.train.float_images(), digits.train.labels
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        order = torch.randperm(len(y_all), generator=generator)
        for batch in order.split(64):
            x, y = x_all[batch], y_all[batch]
            model.eval()
            x_adv = pgd(model, x, y, eps=EPS, steps=3, generator=generator)
            model.train()
            loss = nn.functional.cross_entropy(model(x_adv), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _statuses(report: AuditReport) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def _show(report: AuditReport) -> str:
    return "\n".join(f"{c.name}: {c.status}: {c.message}" for c in report.checks)


# ---------------------------------------------------------------------------------- honest models pass


def test_standard_model_has_no_false_fail(base, surrogate, digits):
    report = audit_model(base, digits.test, eps=EPS, surrogate=surrogate, **FAST)
    assert [c.name for c in report.checks] == list(CHECK_NAMES)
    assert report.verdict != "fail", _show(report)
    # the masking-specific checks are clean, not merely "not failed"
    for name in ("gradient_health", "randomness", "bpda", "fgsm_vs_pgd", "accuracy_vs_eps"):
        assert report.check(name).status == "pass", _show(report)
    assert report.check("accuracy_vs_eps").evidence["huge_accuracy"] == 0.0


def test_pgd_trained_model_has_no_false_fail(pgd_trained, surrogate, digits):
    report = audit_model(pgd_trained, digits.test, eps=EPS, surrogate=surrogate, **FAST)
    assert report.verdict != "fail", _show(report)
    evidence = report.check("blackbox_transfer").evidence
    assert "square-100" in evidence and "transfer pgd-5" in evidence  # both gradient-free attacks ran
    # the minimal PGD training worked: a genuinely robust model is audited, not a trivially broken one
    assert report.check("fgsm_vs_pgd").evidence["pgd_accuracy"] > 0.5, _show(report)


# ---------------------------------------------------------------------------------- masked models fail


def test_quantising_layer_without_bpda_fails(base, digits):
    report = audit_model(nn.Sequential(quantiser(), base), digits.test, eps=EPS, **FAST)
    statuses = _statuses(report)
    assert report.verdict == "fail"
    assert statuses["gradient_health"] == "fail" and statuses["bpda"] == "fail", _show(report)
    assert report.check("gradient_health").evidence["vanishing_fraction"] > 0.9
    assert statuses["accuracy_vs_eps"] == "fail"  # eps = 1 cannot break it: the attack is blind


def test_declared_quantiser_fails_without_bpda_and_passes_with_it(base, digits):
    defended = Defended(base, quantiser())
    blind = audit_model(defended, digits.test, eps=EPS, bpda=False, **FAST)
    assert blind.check("bpda").status == "fail", _show(blind)
    evidence = blind.check("bpda").evidence
    assert evidence["pgd_accuracy_with_bpda"] < evidence["pgd_accuracy_without_bpda"]
    adaptive = audit_model(defended, digits.test, eps=EPS, **FAST)  # BPDA chosen from the declaration
    assert adaptive.settings["bpda"] is True
    for name in ("bpda", "gradient_health", "accuracy_vs_eps"):
        assert adaptive.check(name).status == "pass", _show(adaptive)


def test_saturated_softmax_fails(base, surrogate, digits):
    report = audit_model(ScaledLogits(base), digits.test, eps=EPS, surrogate=surrogate, **FAST)
    statuses = _statuses(report)
    assert report.verdict == "fail"
    assert statuses["gradient_health"] == "fail", _show(report)
    assert statuses["blackbox_transfer"] == "fail", _show(report)
    # the margin gradient is alive, so this is not mistaken for a non-differentiable layer
    assert statuses["bpda"] == "pass"


def test_random_transform_without_eot_fails(base, digits):
    undeclared = audit_model(nn.Sequential(noise(), base), digits.test, eps=EPS, **FAST)
    assert undeclared.check("randomness").status == "fail", _show(undeclared)
    assert undeclared.check("randomness").evidence["prediction_flip_fraction"] > 0
    declared_but_unused = audit_model(Defended(base, noise()), digits.test, eps=EPS, eot=1, n=40, steps=3,
                                      square_queries=30)
    assert declared_but_unused.check("randomness").status == "fail"


def test_random_transform_with_eot_passes_randomness(base, digits):
    report = audit_model(Defended(base, noise()), digits.test, eps=EPS, n=40, steps=3, square_queries=30)
    assert report.settings["eot_samples"] > 1
    assert report.check("randomness").status == "pass", _show(report)


# ---------------------------------------------------------------------------------- statistics and report


def test_binomial_tolerance_is_never_zero_and_shrinks_with_n():
    assert binomial_se(0.0, 100) > 0 and binomial_se(1.0, 100) > 0
    assert noise_tolerance(0.5, 0.5, 1000) < noise_tolerance(0.5, 0.5, 100)
    assert noise_tolerance(0.2, 0.4, 200) == pytest.approx(noise_tolerance(0.4, 0.2, 200))
    # Agresti-Coull: two successes and two failures added, p~ = (k + 2) / (n + 4); 0 of 96 -> p~ = 1/50
    assert binomial_se(0.0, 96) == pytest.approx(math.sqrt(0.02 * 0.98 / 100))
    assert binomial_se(0.5, 96) == pytest.approx(math.sqrt(0.25 / 100))


def test_verdict_is_the_worst_status_and_serialises():
    checks = [AuditCheck("a", "pass", {"x": 1.0}, "ok"), AuditCheck("b", "warn", {}, "hm")]
    assert AuditReport(checks).verdict == "warn"
    assert AuditReport([*checks, AuditCheck("c", "fail", {}, "no")]).verdict == "fail"
    assert AuditReport([]).verdict == "pass"
    data = json.loads(json.dumps(AuditReport(checks).to_dict()))
    assert data["verdict"] == "warn" and data["checks"][0] == {"name": "a", "status": "pass",
                                                               "evidence": {"x": 1.0}, "message": "ok"}


def test_audit_leaves_the_model_as_found(base, digits):
    base.train()
    flags = [p.requires_grad for p in base.parameters()]
    before = [p.detach().clone() for p in base.parameters()]
    try:
        audit_model(base, digits.test, eps=EPS, n=20, steps=2, square_queries=10)
        assert base.training
        assert [p.requires_grad for p in base.parameters()] == flags
        assert all(torch.equal(a, b) for a, b in zip(before, base.parameters(), strict=True))
    finally:
        base.eval()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"eps": 0.0}, "eps > 0"), ({"eps": 1.5}, "larger than the [0, 1] pixel range"), ({"eps": 0.1, "n": 0}, "n must")],
)
def test_user_errors_are_one_line(base, digits, kwargs, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        audit_model(base, digits.test, **kwargs)


def test_bad_images_and_bpda_without_transform_are_refused(base, digits):
    x, y = digits.test.float_images()[:8], digits.test.labels[:8]
    with pytest.raises(InputError, match="255"):
        audit_model(base, (x * 255, y), eps=EPS)
    with pytest.raises(InputError, match="Defended"):
        audit_model(base, (x, y), eps=EPS, bpda=True)


# ---------------------------------------------------------------------------------- run directories and CLI


def test_audit_run_writes_audit_json(trained_digits):
    report = audit_run(trained_digits.run_dir, n=60, steps=5, surrogate_epochs=2, square_queries=100, device="cpu")
    data = json.loads((trained_digits.run_dir / "audit.json").read_text())
    assert data["verdict"] == report.verdict in ("pass", "warn", "fail")
    assert [c["name"] for c in data["checks"]] == list(CHECK_NAMES)
    assert all(set(c) == {"name", "status", "evidence", "message"} for c in data["checks"])
    assert data["settings"]["eps"] == pytest.approx(0.1) and data["settings"]["n"] == 60
    assert "transfer pgd-5" in data["checks"][3]["evidence"]
    assert 0 < data["seconds"] == pytest.approx(report.seconds, abs=1e-3), "a grid's budget adds up audit times"
    assert not (trained_digits.run_dir / "audit.partial.npz").exists(), "the finished audit left its checkpoint"
    written = (trained_digits.run_dir / "audit.json").read_bytes()
    with pytest.raises(RobustlabError, match="pass --overwrite"):
        audit_run(trained_digits.run_dir, n=20, steps=2, surrogate=False, square_queries=10, device="cpu")
    assert (trained_digits.run_dir / "audit.json").read_bytes() == written, "an audit is never replaced silently"
    again = audit_run(trained_digits.run_dir, n=20, steps=2, surrogate=False, square_queries=10, device="cpu",
                      overwrite=True)
    assert json.loads((trained_digits.run_dir / "audit.json").read_text())["settings"]["n"] == again.settings["n"] == 20


def test_an_interrupted_audit_resumes_its_finished_measurements_exactly(base, surrogate, digits, tmp_path,
                                                                       monkeypatch, capsys):
    from robustlab.audit.auditor import _Auditor

    checkpoint = tmp_path / "audit.partial.npz"
    kwargs = {"eps": EPS, "surrogate": surrogate, **FAST, "n": 60}
    whole = audit_model(base, digits.test, **kwargs).to_dict()
    real_per_batch, calls = _Auditor.per_batch, []

    def interrupted_at_the_fourth(self, measure, stream):
        calls.append(stream)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_per_batch(self, measure, stream)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(_Auditor, "per_batch", interrupted_at_the_fourth)
        audit_model(base, digits.test, checkpoint=checkpoint, **kwargs)
    assert checkpoint.exists()
    assert f"interrupted: the audit's finished measurements are kept in {checkpoint}" in capsys.readouterr().err
    resumed = audit_model(base, digits.test, checkpoint=checkpoint, **kwargs)
    assert "audit: resuming with 3 finished measurement(s)" in capsys.readouterr().err
    assert resumed.to_dict() == whole, "the resumed audit differs from the uninterrupted one"
    assert resumed.resumed_seconds > 0, "the interrupted run's measurement time is lost from the audit's cost"
    other = audit_model(base, digits.test, checkpoint=checkpoint, **{**kwargs, "seed": 1})
    assert "resuming" not in capsys.readouterr().err, "another audit's measurements were reused"
    assert other.settings["seed"] == 1 and other.resumed_seconds == 0


def _exit_code(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code or 0)


def test_cli_strict_exits_1_on_a_masked_run(trained_digits, tmp_path, capsys):
    masked = tmp_path / "masked"
    shutil.copytree(trained_digits.run_dir, masked)
    weights = load_file(masked / "model.safetensors")
    for key in ("net.classifier.4.weight", "net.classifier.4.bias"):
        weights[key] = weights[key] * 1e4  # a saturating softmax temperature baked into the weights
    save_file(weights, masked / "model.safetensors")
    args = ["audit", str(masked), "--n", "40", "--steps", "3", "--queries", "30", "--no-surrogate", "--device", "cpu",
            "--overwrite"]
    assert _exit_code([*args, "--strict"]) == 1
    out = capsys.readouterr().out
    assert "gradient_health" in out and "verdict: fail" in out
    assert json.loads((masked / "audit.json").read_text())["verdict"] == "fail"
    assert _exit_code(args) == 0  # without --strict a failing audit still exits 0
    assert json.loads((masked / "audit.json").read_text())["verdict"] == "fail"


def test_cli_bad_eps_is_one_line_error(trained_digits, capsys):
    assert _exit_code(["audit", str(trained_digits.run_dir), "--eps", "2", "--no-surrogate", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: eps=2 is larger")


# ---------------------------------------------------------------------------------- decision rules, no model


class _Accuracies:
    """Stands in for the auditor: PGD accuracy as a function of (eps, steps, restarts), FGSM accuracy fixed."""

    n, eps, norm, steps, huge_eps = 200, 0.1, "linf", 10, 1.0

    def __init__(self, pgd_accuracy, fgsm_accuracy: float = 0.9, clean: float = 0.95, blackbox: float = 0.9,
                 blackbox_shift: int = 0) -> None:
        self.pgd_accuracy, self.clean = pgd_accuracy, clean
        self.accuracy_of = {"fgsm": fgsm_accuracy, "square": blackbox, "transfer": blackbox}
        self.shift = {"square": blackbox_shift, "transfer": blackbox_shift}  # robust on other images
        self.model = None

    def _mask(self, accuracy: float) -> torch.Tensor:
        return torch.arange(self.n) < round(accuracy * self.n)

    def correct(self) -> torch.Tensor:
        return self._mask(self.clean)

    def pgd_correct(self, eps, steps, restarts=1, stream=0, *, model=None, key=None) -> torch.Tensor:
        return self._mask(self.pgd_accuracy(eps, steps, restarts))

    def run(self, key, attack, stream=0) -> torch.Tensor:
        return self._mask(self.accuracy_of[key]).roll(self.shift.get(key, 0))


def _curve(points: dict[float, float], huge: float = 0.0):
    return lambda eps, steps, restarts: huge if eps == 1.0 else points[round(eps, 6)]


@pytest.mark.parametrize(
    ("points", "huge", "status"),
    [
        ({0.025: 0.7, 0.05: 0.5, 0.1: 0.3, 0.2: 0.1}, 0.0, "pass"),
        ({0.025: 0.7, 0.05: 0.5, 0.1: 0.33, 0.2: 0.3}, 0.0, "pass"),  # 3 points up from 0.05: noise
        ({0.025: 0.7, 0.05: 0.3, 0.1: 0.6, 0.2: 0.1}, 0.0, "fail"),  # accuracy rises by 30 points with eps
        ({0.025: 0.7, 0.05: 0.5, 0.1: 0.3, 0.2: 0.1}, 0.2, "fail"),  # eps = 1 leaves 20%
    ],
)
def test_accuracy_vs_eps_rule(points, huge, status):
    from robustlab.audit import _check_accuracy_vs_eps

    check = _check_accuracy_vs_eps(_Accuracies(_curve(points, huge)))
    assert check.status == status, check.message
    assert check.evidence["eps"] == pytest.approx([0.0, 0.025, 0.05, 0.1, 0.2])


@pytest.mark.parametrize(("strong", "status"), [(0.29, "pass"), (0.6, "fail"), (0.1, "warn")])
def test_more_steps_rule(strong, status):
    from robustlab.audit import _check_more_steps

    check = _check_more_steps(_Accuracies(lambda eps, steps, restarts: 0.3 if restarts == 1 else strong))
    assert check.status == status, check.message
    assert check.evidence["tolerance"] == pytest.approx(noise_tolerance(0.3, strong, 200))


@pytest.mark.parametrize(("fgsm_accuracy", "status"), [(0.5, "pass"), (0.35, "pass"), (0.1, "fail")])
def test_fgsm_rule(fgsm_accuracy, status):
    from robustlab.audit import _check_fgsm

    check = _check_fgsm(_Accuracies(lambda eps, steps, restarts: 0.4, fgsm_accuracy=fgsm_accuracy))
    assert check.status == status, check.message


def test_cli_missing_run_is_one_line_error(tmp_path, capsys):
    assert _exit_code(["audit", str(tmp_path / "missing"), "--no-surrogate"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: run directory not found")


def test_l2_threat_model_runs_every_check(base, digits):
    report = audit_model(base, digits.test, eps=1.0, norm="l2", n=40, steps=5, square_queries=30)
    assert [c.name for c in report.checks] == list(CHECK_NAMES)
    assert report.check("accuracy_vs_eps").evidence["huge_eps"] == pytest.approx(8.0)  # sqrt(1 * 8 * 8)
    assert report.check("accuracy_vs_eps").evidence["huge_accuracy"] == 0.0
    for name in ("gradient_health", "randomness", "bpda"):
        assert report.check(name).status == "pass", _show(report)


def test_audit_run_attacks_a_trained_preprocessing_defence_through_bpda(digits, tmp_path):
    from robustlab.training import train

    config = {
        "data": {"dataset": "digits", "val_size": 200}, "model": {"name": "lenet5"},
        "defense": {"name": "feature_squeezing", "bits": 2, "median": 1},
        "train": {"epochs": 2, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0, "select": "last"},
        "threat": {"eps": 0.1},
    }
    run = train(config, tmp_path / "squeeze", progress=False, data=digits)
    report = audit_run(run.run_dir, n=40, steps=3, square_queries=30, surrogate=False, device="cpu")
    assert report.settings["bpda"] is True and report.settings["eot_samples"] == 1
    assert report.check("bpda").status == "pass", _show(report)
    assert report.check("gradient_health").status == "pass", _show(report)


def test_surrogate_cache_reuses_the_trained_weights(digits, tmp_path):
    first = train_surrogate(digits, epochs=1, seed=3, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("surrogate-*.safetensors"))) == 1
    again = train_surrogate(digits, epochs=1, seed=3, cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(),
                                                 strict=True))
    train_surrogate(digits, epochs=1, seed=4, cache_dir=tmp_path)  # another recipe, another entry
    assert len(list(tmp_path.glob("surrogate-*.safetensors"))) == 2


def test_blackbox_rule_looks_at_the_images_a_blackbox_attack_breaks_not_only_at_its_accuracy():
    """White-box 40%, Square 45%, but on other images: Square breaks 40 of the 80 images PGD could not."""
    from robustlab.audit import _check_blackbox

    stub = _Accuracies(lambda eps, steps, restarts: 0.4, blackbox=0.45, blackbox_shift=40)
    check = _check_blackbox(stub, surrogate=nn.Identity(), queries=10)
    assert check.status == "fail", check.message
    assert check.evidence["square-10"]["broken_only_by_this_attack"] == 40
    assert "breaks 40 images" in check.message


@pytest.mark.parametrize(("blackbox", "status"), [(0.45, "pass"), (0.37, "pass"), (0.33, "warn"), (0.25, "fail")])
def test_blackbox_rule(blackbox, status):
    from robustlab.audit import _check_blackbox

    stub = _Accuracies(lambda eps, steps, restarts: 0.4, blackbox=blackbox)
    check = _check_blackbox(stub, surrogate=nn.Identity(), queries=10)
    assert check.status == status, check.message
    assert check.evidence["not_run"] == []
