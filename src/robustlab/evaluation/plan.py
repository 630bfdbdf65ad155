"""The attacks an evaluation runs: default attacks, suites, and the record of what each attack runs."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from robustlab.attacks.registry import ATTACKS, make_attack, parse_attack_spec
from robustlab.errors import ConfigError, RobustlabError
from robustlab.memory import split_on_oom
from robustlab.stages import stage_params

AttackSpec = str | dict[str, Any]

#: FGSM, PGD-20 with a random start and CW-Linf (PGD on the CW margin): the paper's Table 1 attacks.
DEFAULT_ATTACKS: tuple[str, ...] = ("fgsm", "pgd-20", "cw_linf")
#: (label, spec) a suite adds: ``standard`` = AutoAttack (Croce & Hein 2020: APGD-CE, APGD-T, FAB-T,
#: Square); ``rand`` = its version for random defences (APGD-CE, APGD-DLR). The evaluation's adaptive
#: wrapper already applies EOT to a random model, so the ``rand`` suite does not average a second time
#: (``eot_samples=1`` inside AutoAttack; the record's ``adaptive`` field names the EOT actually used).
#: ``quick`` adds nothing: only the attacks asked for run, and the result is labelled an upper bound.
SUITES: dict[str, tuple[tuple[str, AttackSpec], ...]] = {
    "standard": (("autoattack", "autoattack"),),
    "rand": (("autoattack-rand", {"name": "autoattack", "version": "rand", "eot_samples": 1}),),
    "quick": (),
}
#: The default: AutoAttack-grade (``rand`` for a random model), the only default that cannot overstate.
DEFAULT_SUITE = "standard"
#: Arguments the evaluation itself supplies or that would change what is measured; not "parameters".
_INTERNAL_ARGS = {"model", "x", "y", "eps", "norm", "targeted", "target", "generator", "validate"}


def resolve_attacks(attacks: Sequence[AttackSpec], suite: str | None) -> list[tuple[str, AttackSpec]]:
    """(label, spec) for every attack to run; unknown attacks or suites fail here, before any work.

    ``suite=None`` is ``quick``: the attacks given and nothing else.
    """
    suite = suite or "quick"
    if suite not in SUITES:
        raise ConfigError(f"unknown suite '{suite}'; valid: {', '.join(SUITES)}")
    if SUITES[suite] and "autoattack" not in ATTACKS:
        raise RobustlabError(
            f"--suite {suite} needs the 'autoattack' attack, which is not registered in this installation"
        )
    if isinstance(attacks, str):
        attacks = [a for a in attacks.split(",") if a.strip()]
    labelled = [(_label(spec), spec) for spec in attacks]
    resolved, seen = [], set()
    for label, spec in [*labelled, *SUITES[suite]]:
        parse_attack_spec(spec)  # raises RobustlabError naming the valid attacks
        if label in seen:
            raise ConfigError(f"attack '{label}' is listed twice")
        seen.add(label)
        resolved.append((label, spec))
    if not resolved:
        raise ConfigError("no attack to run: give at least one, e.g. --attacks fgsm,pgd-20,cw_linf")
    return resolved



def _label(spec: AttackSpec) -> str:
    if isinstance(spec, str):
        return spec.strip().lower()
    params = ",".join(f"{k}={v}" for k, v in sorted(spec.items()) if k != "name")
    return f"{spec.get('name', '')}({params})" if params else str(spec.get("name", ""))


def _attack_record(
    label: str, spec: AttackSpec, eps: float, norm: str, adaptive: str, random: bool = False
) -> tuple[Any, dict]:
    """Build the attack callable and the record of exactly what it runs (defaults included).

    Attacks stop early on samples already misclassified (the answer is the same, faster), except on a
    random model: there an example that just fools the EOT average is often classified correctly again
    under fresh noise (the MNIST noise-injection cell at eps 0.3: PGD-20 23.7% with early stopping,
    0.0% in the audit's full 20 steps), so every step is taken.
    """
    name, params = parse_attack_spec(spec)
    fn = ATTACKS[name]
    signature = inspect.signature(fn).parameters
    extra = {"early_stop": not random} if "early_stop" in signature else {}
    attack = split_on_oom(make_attack(spec, eps=eps, norm=norm, **extra))
    defaults = {
        k: p.default for k, p in signature.items()
        if k not in _INTERNAL_ARGS and p.default is not inspect.Parameter.empty
        and p.kind is not p.VAR_KEYWORD
    }
    if name == "autoattack":  # its registry form takes **kwargs: record the stages' actual budgets
        defaults = stage_params(params)
    record = {
        "name": name, "label": label, "spec": spec, "params": {**defaults, **extra, **params},
        "eps": eps, "norm": norm, "adaptive": adaptive,
    }
    return attack, record

