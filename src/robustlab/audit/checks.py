"""The seven checks of the gradient-masking checklist, each a function of the shared :class:`_Auditor`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustlab.attacks import fgsm, make_attack
from robustlab.attacks.losses import ce_loss, cw_margin
from robustlab.attacks.transfer import transfer_attack
from robustlab.attacks.wrappers import EOT_SAMPLES
from robustlab.audit.auditor import _acc, _adapted, _Auditor, _declares
from robustlab.audit.report import (
    EXPLODING_CHANGE,
    FAIL_FRACTION,
    VANISHING_NORM,
    WARN_FRACTION,
    AuditCheck,
    Z,
    _pct,
    binomial_se,
    noise_tolerance,
)


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
        elif only / a.n > tol:  # as accurate overall, yet breaking other images: the white-box attack missed them
            beaten.append(f"{name} breaks {only} images ({_pct(only / a.n)}) the white-box attacks could not, at "
                          f"a similar accuracy ({_pct(acc)} vs {_pct(white_acc)}; noise {_pct(tol)})")
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
        a.pgd_correct(a.eps, a.steps, stream=2, model=_adapted(a.classifier, a.bpda, EOT_SAMPLES), key="eot")
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
        with_bpda = _acc(a.pgd_correct(a.eps, a.steps, model=_adapted(a.classifier, True, a.eot), key="bpda"))
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

