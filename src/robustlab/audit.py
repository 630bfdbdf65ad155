"""Gradient-masking audit: is a robustness number measured with attacks that can be trusted?

Defences that only obfuscate gradients look robust to gradient attacks while staying breakable
(Athalye, Carlini & Wagner 2018, "Obfuscated Gradients Give a False Sense of Security"). Carlini et
al. (2019, "On Evaluating Adversarial Robustness", §5 and the checklist of their appendix) list the
symptoms; :func:`audit_model` runs seven of them on ``n`` images and reports pass / warn / fail with
the numbers behind each verdict:

1. ``accuracy_vs_eps``: accuracy under PGD never rises with the budget, and an unbounded budget
   (Linf eps = 1, or the L2 diameter of the pixel box) drives it to ~0%;
2. ``more_steps_restarts``: a 5x longer PGD with restarts never raises accuracy;
3. ``fgsm_vs_pgd``: single-step FGSM is not stronger than multi-step PGD;
4. ``blackbox_transfer``: black-box (Square) and transfer attacks are not stronger than white-box ones;
5. ``gradient_health``: input gradients of the attack loss are not zero, exploding or NaN;
6. ``randomness``: outputs are deterministic, or else the evaluation attacks through EOT
   (Expectation over Transformation, Athalye et al. 2018 §4.2);
7. ``bpda``: non-differentiable preprocessing is attacked through BPDA (Backward Pass Differentiable
   Approximation, Athalye et al. 2018 §4.1).

The attacks are run *as the evaluation runs them*: through BPDA when the model is a
:class:`~robustlab.defenses.preprocessing.Defended` whose transform declares ``differentiable=False``,
with EOT when it declares ``random=True`` (``bpda=`` / ``eot=`` override this). The audit therefore
checks both that the declarations are truthful (an undeclared random or non-differentiable layer fails
checks 6/7) and that the adaptive attacks chosen from them work (checks 1-5).

"Beyond noise" always means beyond ``Z`` = 2 binomial standard errors of the difference of two
accuracies measured on the same ``n`` images, with the Agresti-Coull estimate
``p~ = (k + 2) / (n + 4)`` so that an accuracy of 0% or 100% still carries an honest error bar.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from robustlab import distributed
from robustlab.attacks import fgsm, frozen, input_gradient, make_attack, pgd
from robustlab.attacks.losses import ce_loss, cw_margin
from robustlab.attacks.transfer import transfer_attack
from robustlab.attacks.wrappers import BPDA, EOT, EOT_SAMPLES
from robustlab.config import build_config
from robustlab.data import DatasetSplits, Split
from robustlab.errors import InputError
from robustlab.validation import check_batch, check_eps

Status = Literal["pass", "warn", "fail"]
_SEVERITY = {"pass": 0, "warn": 1, "fail": 2}

#: number of binomial standard errors that separates a real difference from noise
Z = 2.0
#: a gradient is "vanishing" below this L1 norm: float32 underflow, the attack's step direction is 0
VANISHING_NORM = 1e-30
#: a gradient is "exploding" when its first-order loss change inside the eps-ball exceeds this many nats
EXPLODING_CHANGE = 1e4
#: fractions of unhealthy gradients / non-differentiable points that warn and fail
WARN_FRACTION = 0.02
FAIL_FRACTION = 0.10
#: the checks of every report, in order
CHECK_NAMES = ("accuracy_vs_eps", "more_steps_restarts", "fgsm_vs_pgd", "blackbox_transfer", "gradient_health",
               "randomness", "bpda")


@dataclass
class AuditCheck:
    """One item of the checklist: its verdict, the numbers behind it and a one-line explanation."""

    name: str
    status: Status
    evidence: dict[str, Any]
    message: str


@dataclass
class AuditReport:
    """The outcome of :func:`audit_model`; ``verdict`` is the worst status of all checks."""

    checks: list[AuditCheck]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> Status:
        return max((c.status for c in self.checks), key=_SEVERITY.__getitem__, default="pass")

    def check(self, name: str) -> AuditCheck:
        """The check called ``name`` (KeyError if the audit did not run it)."""
        for item in self.checks:
            if item.name == name:
                return item
        raise KeyError(name)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.status == "fail"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"verdict", "checks": [{name, status, evidence, message}], "settings"}``."""
        return {
            "verdict": self.verdict,
            "checks": [asdict(c) for c in self.checks],
            "settings": self.settings,
        }


def binomial_se(accuracy: float, n: int) -> float:
    """Agresti-Coull standard error of an accuracy measured on ``n`` images (never 0, even at 0%/100%)."""
    p = (accuracy * n + 2) / (n + 4)
    return math.sqrt(p * (1 - p) / (n + 4))


def noise_tolerance(a: float, b: float, n: int, z: float = Z) -> float:
    """``z`` standard errors of the difference of two accuracies measured on the same ``n`` images."""
    return z * math.hypot(binomial_se(a, n), binomial_se(b, n))


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _declares(model: nn.Module) -> tuple[bool, bool]:
    """(non-differentiable, random) as declared by a ``Defended`` model: what evaluation adapts to."""
    return getattr(model, "differentiable", True) is False, getattr(model, "random", False) is True


def _adapted(model: nn.Module, bpda: bool, eot: int) -> nn.Module:
    """The model an attacker differentiates: BPDA through the transform, then EOT over ``eot`` draws."""
    attacked = model
    if bpda:
        try:
            attacked = BPDA(model)
        except TypeError:
            raise InputError("bpda=True needs a Defended(model, transform) to approximate") from None
    return EOT(attacked, eot) if eot > 1 else attacked


# ----------------------------------------------------------------------------------- the auditor


class _Auditor:
    """Holds the images, the model as attacked, and the accuracies shared between checks.

    Every measurement goes batch by batch through :meth:`per_batch`, whose random draws are seeded per
    (stream, batch): under ``torchrun`` each rank measures every N-th batch and the ranks' results are
    gathered, giving exactly the single-process audit.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        eps: float,
        norm: str,
        seed: int,
        steps: int,
        bpda: bool,
        eot: int,
        batch_size: int,
        group: distributed.Distributed,
    ) -> None:
        self.model, self.x, self.y = model, x, y
        self.n = int(y.shape[0])
        self.eps, self.norm, self.seed, self.steps = eps, norm, seed, steps
        self.bpda, self.eot, self.batch_size, self.group = bpda, eot, batch_size, group
        self.attacked = _adapted(model, bpda, eot)
        self._cache: dict[str, torch.Tensor] = {}

    def per_batch(
        self, measure: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, ...]], stream: int
    ) -> tuple[torch.Tensor, ...]:
        """``measure(x, y, generator)`` of every batch (per-image tensors), concatenated in image order.

        ``stream`` names the random draws: batch ``b`` gets a generator (and a global torch seed, for a
        random model's own draws) seeded from ``(seed, stream, b)``.
        """
        count = math.ceil(self.n / self.batch_size)
        mine: dict[int, tuple[torch.Tensor, ...]] = {}
        for batch in distributed.my_batches(count, self.group):
            rows = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
            seed = distributed.batch_seed(self.seed, stream, batch)
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            mine[batch] = tuple(t.detach().cpu() for t in measure(self.x[rows], self.y[rows], generator))
        if self.group.enabled:
            mine = {batch: part for rank in distributed.gather(mine) for batch, part in rank.items()}
        columns = zip(*(mine[batch] for batch in range(count)), strict=True)
        return tuple(torch.cat(column).to(self.x.device) for column in columns)

    def run(
        self, key: str, attack: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor], stream: int = 0
    ) -> torch.Tensor:
        """Per-image correctness of the *deployed* model (one stochastic pass for a random model) under
        ``attack(x, y, generator)`` (cached by ``key``)."""
        if key not in self._cache:

            def correct(xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor]:
                x_adv = attack(xb, yb, generator)
                with torch.no_grad():
                    return (self.model(x_adv).argmax(1) == yb,)

            self._cache[key] = self.per_batch(correct, stream)[0]
        return self._cache[key]

    def correct(self) -> torch.Tensor:
        """Per-image correctness on the clean images."""
        return self.run("clean", lambda xb, yb, generator: xb)

    def pgd_correct(
        self,
        eps: float,
        steps: int,
        restarts: int = 1,
        stream: int = 0,
        *,
        model: nn.Module | None = None,
        key: str | None = None,
    ) -> torch.Tensor:
        """Correctness under PGD crafted on ``model`` (default: the model as the evaluation attacks it)."""
        target = self.attacked if model is None else model

        def attack(xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            return pgd(target, xb, yb, eps=eps, steps=steps, norm=self.norm, restarts=restarts, generator=generator,
                       validate=False)

        return self.run(key or f"pgd-{steps}x{restarts}@{eps:g}", attack, stream)

    @property
    def huge_eps(self) -> float:
        """A budget that reaches every image: 1 in Linf, the box diagonal sqrt(C*H*W) in L2."""
        return 1.0 if self.norm == "linf" else math.sqrt(self.x[0].numel())

    def gradient_sizes(
        self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image at the clean images as attacked: (gradient of ``loss_fn`` all finite, its dual norm
        with NaNs read as 0, the loss)."""

        def sizes(xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
            grad, loss, _ = input_gradient(self.attacked, xb, yb, loss_fn)
            size = _dual_norm(torch.nan_to_num(grad, 0.0, 0.0, 0.0), self.norm)
            return torch.isfinite(grad.flatten(1)).all(1), size, loss

        finite, size, loss = self.per_batch(sizes, stream=0)
        return finite, size, loss


def _acc(correct: torch.Tensor) -> float:
    return float(correct.float().mean())


def _check_accuracy_vs_eps(a: _Auditor) -> AuditCheck:
    fractions = (0.25, 0.5, 1.0, 2.0)
    budgets = [0.0] + [f * a.eps for f in fractions if a.norm == "l2" or f * a.eps <= 1.0]
    accs = [_acc(a.correct())] + [_acc(a.pgd_correct(e, a.steps)) for e in budgets[1:]]
    # rise of each accuracy above the lowest one at a smaller budget, and its noise allowance
    rises = [(accs[i] - min(accs[:i]), noise_tolerance(accs[i], min(accs[:i]), a.n)) for i in range(1, len(accs))]
    worst = max(range(len(rises)), key=lambda i: rises[i][0] - rises[i][1])
    (worst_rise, tol_at), where = rises[worst], budgets[worst + 1]
    huge_steps = 5 * a.steps
    huge = _acc(a.pgd_correct(a.huge_eps, huge_steps, key="huge"))
    huge_tol = Z * binomial_se(0.0, a.n)
    evidence = {
        "attack": f"pgd-{a.steps} ({a.norm})",
        "eps": budgets,
        "accuracy": accs,
        "max_rise": worst_rise,
        "rise_at_eps": where,
        "tolerance": tol_at,
        "huge_eps": a.huge_eps,
        "huge_attack": f"pgd-{huge_steps}",
        "huge_accuracy": huge,
        "huge_tolerance": huge_tol,
        "noise": f"{Z:g} Agresti-Coull binomial SE, n={a.n}",
    }
    problems = []
    if worst_rise > tol_at:
        problems.append(f"accuracy rises by {_pct(worst_rise)} at eps={where:g} (noise {_pct(tol_at)})")
    if huge > huge_tol:
        problems.append(
            f"an unbounded budget eps={a.huge_eps:g} leaves {_pct(huge)} accuracy (expected ~0%, "
            f"noise {_pct(huge_tol)})"
        )
    if problems:
        return AuditCheck(
            "accuracy_vs_eps", "fail", evidence, "; ".join(problems) + ": the attack is blocked"
        )
    curve = ", ".join(f"{e:g}:{_pct(v)}" for e, v in zip(budgets, accs, strict=True))
    return AuditCheck(
        "accuracy_vs_eps",
        "pass",
        evidence,
        f"non-increasing ({curve}); eps={a.huge_eps:g} gives {_pct(huge)}",
    )


def _check_more_steps(a: _Auditor) -> AuditCheck:
    base = _acc(a.pgd_correct(a.eps, a.steps))
    strong_steps, restarts = 5 * a.steps, 3
    strong = _acc(a.pgd_correct(a.eps, strong_steps, restarts, stream=1))
    tol = noise_tolerance(base, strong, a.n)
    evidence = {
        "attack": f"pgd-{a.steps}",
        "accuracy": base,
        "strong_attack": f"pgd-{strong_steps} x{restarts} restarts",
        "strong_accuracy": strong,
        "tolerance": tol,
        "noise": f"{Z:g} Agresti-Coull binomial SE, n={a.n}",
    }
    text = f"pgd-{a.steps} {_pct(base)} vs {evidence['strong_attack']} {_pct(strong)} (noise {_pct(tol)})"
    if strong - base > tol:
        return AuditCheck(
            "more_steps_restarts",
            "fail",
            evidence,
            f"a stronger attack raises accuracy: {text}; the loss surface is not being ascended",
        )
    if base - strong > tol:
        return AuditCheck(
            "more_steps_restarts",
            "warn",
            evidence,
            f"pgd-{a.steps} has not converged: {text}; evaluate with more steps/restarts",
        )
    return AuditCheck("more_steps_restarts", "pass", evidence, text)


def _check_fgsm(a: _Auditor) -> AuditCheck:
    single = _acc(
        a.run("fgsm", lambda xb, yb, _: fgsm(a.attacked, xb, yb, eps=a.eps, norm=a.norm, validate=False))
    )
    multi = _acc(a.pgd_correct(a.eps, a.steps))
    tol = noise_tolerance(single, multi, a.n)
    evidence = {
        "fgsm_accuracy": single,
        "pgd_attack": f"pgd-{a.steps}",
        "pgd_accuracy": multi,
        "tolerance": tol,
        "noise": f"{Z:g} Agresti-Coull binomial SE, n={a.n}",
    }
    text = f"fgsm {_pct(single)} vs pgd-{a.steps} {_pct(multi)} (noise {_pct(tol)})"
    if multi - single > tol:
        return AuditCheck("fgsm_vs_pgd", "fail", evidence, f"single-step beats multi-step: {text}")
    return AuditCheck("fgsm_vs_pgd", "pass", evidence, text)


def _check_blackbox(a: _Auditor, surrogate: nn.Module | None, queries: int) -> AuditCheck:
    white = torch.logical_and(a.pgd_correct(a.eps, a.steps), a.pgd_correct(a.eps, 5 * a.steps, 3, stream=1))
    white_acc = _acc(white)
    evidence: dict[str, Any] = {
        "whitebox_attack": f"min(pgd-{a.steps}, pgd-{5 * a.steps} x3)",
        "whitebox_accuracy": white_acc,
        "noise": f"{Z:g} Agresti-Coull binomial SE, n={a.n}",
    }
    # black-box: Square sees only the deployed model's outputs, never its gradients
    def square(xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        attack = make_attack("square", eps=a.eps, norm=a.norm, queries=queries, generator=generator)
        return attack(a.model, xb, yb)

    candidates = {f"square-{queries}": lambda: a.run("square", square, stream=4)}
    missing = []
    if surrogate is not None:

        def transfer(xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            craft = {"name": "pgd", "steps": a.steps, "generator": generator}
            return transfer_attack(surrogate, a.model, xb, yb, attack=craft, eps=a.eps, norm=a.norm).x_adv

        candidates[f"transfer pgd-{a.steps}"] = lambda: a.run("transfer", transfer, stream=5)
    else:
        missing.append("transfer (no surrogate model given)")
    beaten, close, ran = [], [], []
    for name, measure in candidates.items():
        correct = measure()
        acc, tol = _acc(correct), noise_tolerance(_acc(correct), white_acc, a.n)
        only = int((white & ~correct).sum())
        evidence[name] = {"accuracy": acc, "tolerance": tol, "broken_only_by_this_attack": only}
        ran.append(f"{name} {_pct(acc)}")
        if white_acc - acc > tol:
            beaten.append(f"{name} {_pct(acc)} < white-box {_pct(white_acc)} (noise {_pct(tol)})")
        elif white_acc - acc > tol / 2:  # more than one standard error: suspicious, not yet conclusive
            close.append(f"{name} {_pct(acc)} is {_pct(white_acc - acc)} below white-box {_pct(white_acc)} "
                         f"(1 SE {_pct(tol / 2)}) and breaks {only} images it did not")
    evidence["not_run"] = missing
    if beaten:
        return AuditCheck(
            "blackbox_transfer",
            "fail",
            evidence,
            "gradient-free attacks beat white-box ones: " + "; ".join(beaten),
        )
    text = f"white-box {_pct(white_acc)}; " + ", ".join(ran)
    if close:
        return AuditCheck("blackbox_transfer", "warn", evidence, "; ".join(close) + ": gradients may be partly "
                          "masked, report the worst case over white- and black-box attacks")
    if missing:
        return AuditCheck("blackbox_transfer", "warn", evidence, f"{text}; not run: {'; '.join(missing)}")
    return AuditCheck("blackbox_transfer", "pass", evidence, text)


def _dual_norm(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The dual norm of the gradient: the first-order loss change per unit of ``norm`` budget."""
    return grad.flatten(1).abs().sum(1) if norm == "linf" else grad.flatten(1).norm(dim=1)


def _check_gradients(a: _Auditor) -> AuditCheck:
    grad_finite, size, loss = a.gradient_sizes(ce_loss)
    finite = grad_finite & torch.isfinite(loss)
    nan = float((~finite).float().mean())
    vanishing = float((finite & (size <= VANISHING_NORM)).float().mean())
    exploding = float((finite & (size * a.eps > EXPLODING_CHANGE)).float().mean())
    bad = nan + vanishing + exploding
    evidence = {
        "loss": "cross-entropy (as attacked)",
        "nan_fraction": nan,
        "vanishing_fraction": vanishing,
        "exploding_fraction": exploding,
        "vanishing_below": VANISHING_NORM,
        "exploding_above_nats": EXPLODING_CHANGE,
        "median_dual_norm": float(size[finite].median()) if finite.any() else None,
        "warn_fraction": WARN_FRACTION,
        "fail_fraction": FAIL_FRACTION,
    }
    text = (
        f"NaN {_pct(nan)}, vanishing {_pct(vanishing)}, exploding {_pct(exploding)} of {a.n} input gradients"
    )
    if bad > FAIL_FRACTION:
        return AuditCheck(
            "gradient_health",
            "fail",
            evidence,
            f"{text}: gradient attacks get no signal (try a margin loss, BPDA, or fix the logits scale)",
        )
    if bad > WARN_FRACTION:
        return AuditCheck("gradient_health", "warn", evidence, text)
    return AuditCheck("gradient_health", "pass", evidence, text)


def _check_randomness(a: _Auditor) -> AuditCheck:
    def three_passes(xb: torch.Tensor, yb: torch.Tensor, _: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Per image: the largest logit change between passes, the largest logit, whether a prediction flips."""
        with torch.no_grad():
            passes = torch.stack([a.model(xb) for _ in range(3)])
        return ((passes - passes[0]).abs().amax(dim=(0, 2)), passes[0].abs().amax(1),
                (passes.argmax(2) != passes[0].argmax(1)).any(0))

    change, largest, flipped = a.per_batch(three_passes, stream=6)
    spread = float(change.max())
    random = spread > 1e-4 * (1.0 + float(largest.max()))
    flips = float(flipped.float().mean())
    declared = _declares(a.model)[1]
    evidence = {
        "max_logit_change": spread,
        "prediction_flip_fraction": flips,
        "random": random,
        "declared_random": declared,
        "eot_samples": a.eot,
    }
    if not random:
        note = " (declared random, but 3 passes agreed)" if declared else ""
        return AuditCheck("randomness", "pass", evidence, f"deterministic outputs{note}")
    text = f"outputs are random (logits move by up to {spread:.3g}; {_pct(flips)} of predictions flip)"
    if a.eot > 1:
        return AuditCheck("randomness", "pass", evidence, f"{text}; attacked with EOT over {a.eot} samples")
    plain = _acc(a.pgd_correct(a.eps, a.steps))
    with_eot = _acc(
        a.pgd_correct(a.eps, a.steps, stream=2, model=_adapted(a.model, a.bpda, EOT_SAMPLES), key="eot")
    )
    evidence.update({"pgd_accuracy_without_eot": plain, f"pgd_accuracy_with_eot{EOT_SAMPLES}": with_eot})
    hint = "" if declared else "; declare the transform random=True so evaluation uses EOT"
    return AuditCheck(
        "randomness",
        "fail",
        evidence,
        f"{text} but evaluated without EOT: pgd-{a.steps} {_pct(plain)}, with EOT-{EOT_SAMPLES} "
        f"{_pct(with_eot)}{hint}",
    )


def _check_bpda(a: _Auditor) -> AuditCheck:
    declared = _declares(a.model)[0]
    # the CW margin is used (not CE) so that softmax saturation, which check 5 reports, is not mistaken for a
    # non-differentiable layer: the margin's gradient is zero only where the network itself is flat.
    grad_finite, size, margin = a.gradient_sizes(cw_margin)

    def margin_after_random_step(xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor]:
        step = a.eps * torch.randn(xb.shape, generator=generator).sign().to(xb.device)
        if a.norm == "l2":
            step = step / step.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * a.eps
        with torch.no_grad():
            return (cw_margin(a.attacked((xb + step).clamp(0, 1)), yb),)

    (margin_moved,) = a.per_batch(margin_after_random_step, stream=3)
    changes = (margin_moved - margin).abs() > 1e-4 * (1 + margin.abs())
    no_signal = ~grad_finite | (size <= VANISHING_NORM)
    fraction = float((changes & no_signal).float().mean())
    detected = fraction > WARN_FRACTION
    evidence = {
        "declared_non_differentiable": declared,
        "bpda_used": a.bpda,
        "zero_or_nan_gradient_where_margin_changes": fraction,
        "finite_difference": "random sign step of eps",
    }
    text = (
        f"{_pct(fraction)} of images have a zero/NaN margin gradient although the margin changes within eps"
    )
    if not (declared or detected):
        return AuditCheck("bpda", "pass", evidence, f"differentiable end to end ({text})")
    if a.bpda and not detected:
        return AuditCheck(
            "bpda", "pass", evidence, f"non-differentiable preprocessing attacked through BPDA ({text})"
        )
    if declared and not a.bpda:
        plain = _acc(a.pgd_correct(a.eps, a.steps))
        with_bpda = _acc(a.pgd_correct(a.eps, a.steps, model=_adapted(a.model, True, a.eot), key="bpda"))
        evidence.update({"pgd_accuracy_without_bpda": plain, "pgd_accuracy_with_bpda": with_bpda})
        return AuditCheck(
            "bpda",
            "fail",
            evidence,
            f"non-differentiable preprocessing evaluated without BPDA: "
            f"pgd-{a.steps} {_pct(plain)}, with BPDA {_pct(with_bpda)}",
        )
    where = "even through BPDA" if a.bpda else "without BPDA"
    return AuditCheck(
        "bpda",
        "fail",
        evidence,
        f"{text}, {where}: a non-differentiable layer is attacked blindly; "
        "wrap it as a Defended(model, transform) with differentiable=False",
    )


# ----------------------------------------------------------------------------------- public API


def audit_model(
    model: nn.Module,
    data: Split | tuple[torch.Tensor, torch.Tensor],
    *,
    eps: float,
    norm: str = "linf",
    n: int | None = 200,
    seed: int = 0,
    surrogate: nn.Module | None = None,
    steps: int = 20,
    bpda: bool | None = None,
    eot: int | None = None,
    square_queries: int = 1000,
    batch_size: int = 256,
) -> AuditReport:
    """Run the gradient-masking checklist on the first ``n`` images of ``data`` at budget ``eps``.

    Args:
        data: a uint8 :class:`~robustlab.data.Split` or float ``(x, y)`` in pixel space.
        surrogate: an independently trained model for the transfer attack (check 4); without one
            only Square runs there (see :func:`train_surrogate`).
        steps: PGD steps of the reference white-box attack; check 2 compares it with 5x the steps
            and 3 restarts.
        bpda: whether the audited evaluation attacks through BPDA. ``None`` follows robustlab's
            evaluation protocol (``attacks.wrappers.adaptive_model``): BPDA iff the model is a
            ``Defended`` whose transform declares ``differentiable=False``.
        eot: EOT passes per gradient. ``None`` follows the same protocol: ``EOT_SAMPLES`` passes iff
            the model declares ``random=True``. ``eot=1`` means no EOT.
    Returns:
        An :class:`AuditReport`; the model's mode and ``requires_grad`` flags are left as found.

    Under ``torchrun`` every rank calls this with the same arguments; each measures every N-th batch
    (on its own GPU) and every rank returns the whole report, equal to the single-process one.
    """
    x, y = (data.float_images(), data.labels) if isinstance(data, Split) else data
    if n is not None:
        if n < 1:
            raise InputError(f"n must be >= 1, got {n}")
        x, y = x[:n], y[:n]
    check_batch(x, y)
    if check_eps(eps, norm) == 0:
        raise InputError("the audit needs eps > 0")
    if norm not in ("linf", "l2"):
        raise InputError(f"norm must be 'linf' or 'l2', got {norm!r}")
    declared_bpda, declared_random = _declares(model)
    use_bpda = declared_bpda if bpda is None else bpda
    eot_samples = (EOT_SAMPLES if declared_random else 1) if eot is None else max(1, int(eot))
    device = next(model.parameters()).device
    group = distributed.setup(device.type)
    if group.enabled and device.type == "cuda":  # one GPU per rank, as in evaluation
        device = torch.device("cuda", group.local_rank)
        model.to(device)
    if surrogate is not None:
        surrogate.to(device)
    settings = {
        "eps": float(eps),
        "norm": norm,
        "n": int(y.shape[0]),
        "seed": seed,
        "steps": steps,
        "bpda": use_bpda,
        "eot_samples": eot_samples,
        "square_queries": square_queries,
        "surrogate": surrogate is not None,
        "noise": f"{Z:g} Agresti-Coull binomial standard errors",
    }
    modes = [m.training for m in model.modules()]
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with frozen(model), torch.random.fork_rng(devices=devices):  # draws are seeded per batch
            model.eval()
            if surrogate is not None:
                surrogate.eval()
            auditor = _Auditor(
                model,
                x.to(device),
                y.to(device),
                eps=float(eps),
                norm=norm,
                seed=seed,
                steps=steps,
                bpda=use_bpda,
                eot=eot_samples,
                batch_size=batch_size,
                group=group,
            )
            checks = [
                _check_accuracy_vs_eps(auditor),
                _check_more_steps(auditor),
                _check_fgsm(auditor),
                _check_blackbox(auditor, surrogate, square_queries),
                _check_gradients(auditor),
                _check_randomness(auditor),
                _check_bpda(auditor),
            ]
    finally:
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode
    return AuditReport(checks, settings)


def train_surrogate(
    data: DatasetSplits,
    *,
    model: str | dict[str, Any] = "lenet5",
    epochs: int = 3,
    seed: int = 1,
    train_subset: int | None = 20_000,
    cache_dir: str | Path | None = None,
) -> nn.Module:
    """A quickly trained *standard* model on ``data``'s training split, the source of transfer attacks.

    ``model`` is a model name or a config ``model`` section (``{"name": "wide_resnet", "depth": 28}``).
    Trained with robustlab's own training loop in a throw-away run directory (Adam, lr 1e-3). With
    ``cache_dir`` the weights are kept there as safetensors, keyed by the training images, model and
    recipe, so the audits of every run of one experiment share one surrogate.
    """
    from robustlab.rundir import load_weights, save_weights
    from robustlab.runs import prepare_model
    from robustlab.training import train

    if train_subset is not None and len(data.train) > train_subset:
        data = dataclasses.replace(data, train=data.train.head(train_subset))
    config = {
        "seed": seed,
        "data": {"dataset": data.name, "val_size": len(data.val)},
        "model": {"name": model} if isinstance(model, str) else model,
        "defense": {"name": "standard"},
        "train": {
            "epochs": epochs,
            "optimizer": "adam",
            "lr": 1e-3,
            "weight_decay": 0.0,
            "select": "last",
            "schedule": "constant",
        },
    }
    cached = None
    if cache_dir is not None:
        recipe = json.dumps([config, data.train.digest()], sort_keys=True).encode()
        cached = Path(cache_dir) / f"surrogate-{hashlib.sha256(recipe).hexdigest()[:16]}.safetensors"
        if cached.exists():
            surrogate = prepare_model(build_config(config), data)
            load_weights(cached, surrogate)
            return surrogate.eval()
    with tempfile.TemporaryDirectory(prefix="robustlab-surrogate-") as tmp:
        surrogate = train(config, Path(tmp) / "surrogate", progress=False, data=data).model.eval()
    if cached is not None and distributed.from_environment().is_main:
        save_weights(cached, surrogate)
    return surrogate


def audit_run(
    run_dir: str | Path,
    *,
    n: int = 500,
    eps: float | None = None,
    seed: int = 0,
    device: str = "auto",
    surrogate: bool = True,
    surrogate_epochs: int = 3,
    surrogate_cache: str | Path | None = None,
    **options: Any,
) -> AuditReport:
    """Audit a finished run on its test split and write ``RUN_DIR/audit.json`` atomically.

    ``eps`` and the norm default to the run's threat model. With ``surrogate=True`` a standard model of
    the run's architecture is trained for ``surrogate_epochs`` on the run's training split as the
    transfer-attack source (reused from ``surrogate_cache`` when one was trained there already). Other
    keyword options go to :func:`audit_model`. Under ``torchrun`` the ranks share the work (the surrogate's
    training too) and rank 0 writes.
    """
    from robustlab.rundir import RunDir, write_json
    from robustlab.runs import load_run, select_device

    loaded = load_run(run_dir, select_device(device))  # under torchrun, audit_model moves it to the rank's GPU
    budget = loaded.config.threat.eps if eps is None else eps
    source = None
    if surrogate:
        source = train_surrogate(
            loaded.data, model=loaded.config.model.model_dump(), epochs=surrogate_epochs, seed=seed + 1,
            cache_dir=surrogate_cache,
        )
        source.to(next(loaded.model.parameters()).device)
    report = audit_model(
        loaded.model,
        loaded.data.test,
        eps=budget,
        norm=loaded.config.threat.norm,
        n=n,
        seed=seed,
        surrogate=source,
        **options,
    )
    from robustlab.evaluation import subset_name

    report.settings.update(
        run_dir=str(loaded.path),
        split="test",
        subset=subset_name(int(report.settings["n"]), len(loaded.data.test), "first"),  # audit_model takes the first n
        surrogate=f"standard {loaded.config.model.name}, {surrogate_epochs} epochs" if surrogate else None,
    )
    if distributed.from_environment().is_main:
        write_json(RunDir(run_dir).path / "audit.json", report.to_dict())
    return report
