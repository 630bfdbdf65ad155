"""Gradient-masking audit: is a robustness number measured with attacks that can be trusted?

Modules: :mod:`~robustlab.audit.report` (the report and its noise tolerance), :mod:`~robustlab.audit.auditor`
(the model as attacked, shared by the checks), :mod:`~robustlab.audit.checks` (the seven checks) and
:mod:`~robustlab.audit.run` (:func:`audit_model`, :func:`audit_run`, :func:`train_surrogate`). Every name
is importable from here.

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

# Every name the module had before it became a package is importable from here, private ones too (tests
# import the checks): hence F401 is off for this file.
# ruff: noqa: F401
from robustlab.audit.auditor import _acc, _adapted, _Auditor, _declares, _dual_norm
from robustlab.audit.checks import (
    _check_accuracy_vs_eps,
    _check_blackbox,
    _check_bpda,
    _check_fgsm,
    _check_gradients,
    _check_more_steps,
    _check_randomness,
)
from robustlab.audit.report import (
    _SEVERITY,
    CHECK_NAMES,
    EXPLODING_CHANGE,
    FAIL_FRACTION,
    VANISHING_NORM,
    WARN_FRACTION,
    AuditCheck,
    AuditReport,
    Status,
    Z,
    _pct,
    binomial_se,
    noise_tolerance,
)
from robustlab.audit.run import audit_model, audit_run, train_surrogate
