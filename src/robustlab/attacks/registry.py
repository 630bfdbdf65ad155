"""Attacks by name, so configs and the CLI can say ``"pgd-20"`` or ``{"name": "cw", "steps": 30}``.

``make_attack(spec, eps=..., norm=...)`` returns a callable ``attack(model, x, y) -> x_adv``. A trailing
``-N`` in a name sets ``steps``. Every registered attack takes ``eps`` and ``norm`` keyword arguments.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

import torch

from robustlab.attacks.apgd import apgd
from robustlab.attacks.autoattack import autoattack, autoattack_x
from robustlab.attacks.core import Model, fgsm, pgd
from robustlab.attacks.cw import cw_l2
from robustlab.attacks.fab import fab_t
from robustlab.attacks.losses import objective
from robustlab.attacks.square import square
from robustlab.errors import RobustlabError

Attack = Callable[..., torch.Tensor]

ATTACKS: dict[str, Attack] = {}
_STEPS_SUFFIX = re.compile(r"^(?P<name>[a-z0-9_]+?)-(?P<steps>\d+)$")


def register_attack(name: str, fn: Attack | None = None) -> Attack | Callable[[Attack], Attack]:
    """Register ``fn`` under ``name`` (usable as a decorator)."""
    if fn is None:
        return functools.partial(register_attack, name)
    ATTACKS[name] = fn
    return fn


def cw_linf(
    model: Model, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf", steps: int = 30,
    early_stop: bool = False, **kwargs: Any,
) -> torch.Tensor:
    """"CW" of robustness tables: PGD on the Carlini-Wagner margin loss under the same budget."""
    return pgd(model, x, y, eps=eps, norm=norm, loss="cw", steps=steps, early_stop=early_stop, **kwargs)


def mifgsm(
    model: Model, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf", **kwargs: Any
) -> torch.Tensor:
    """MI-FGSM (Dong et al. 2018): momentum PGD, no random start, step eps/steps, decay 1.0."""
    steps = kwargs.pop("steps", 10)
    kwargs.setdefault("momentum", 1.0)
    kwargs.setdefault("random_start", False)
    kwargs.setdefault("step_size", eps / steps)
    return pgd(model, x, y, eps=eps, norm=norm, steps=steps, **kwargs)


register_attack("fgsm", fgsm)
register_attack("pgd", pgd)
register_attack("cw_linf", cw_linf)
register_attack("mifgsm", mifgsm)
register_attack("cw_l2", cw_l2)
register_attack("apgd_ce", functools.partial(apgd, loss="ce"))
register_attack("apgd_dlr", functools.partial(apgd, loss="dlr"))
register_attack("apgd_t", functools.partial(apgd, targeted=True))
register_attack("fab_t", fab_t)
register_attack("square", square)
register_attack("autoattack", autoattack_x)

#: Registered attacks that pass their ``**kwargs`` on: the function that takes them, and the names the
#: wrapper fixes itself (cw_linf's loss), so their parameters are checked like any other attack's.
_FORWARDS: dict[str, tuple[Attack, frozenset[str]]] = {
    "cw_linf": (pgd, frozenset({"loss"})),
    "mifgsm": (pgd, frozenset()),
    "autoattack": (autoattack, frozenset()),
}


def parse_attack_spec(spec: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``"pgd-20"`` -> ("pgd", {"steps": 20}); ``{"name": "cw", "steps": 30}`` -> ("cw", {"steps": 30})."""
    if isinstance(spec, dict):
        params = dict(spec)
        name = str(params.pop("name", ""))
    else:
        name, params = str(spec).strip().lower(), {}
        match = _STEPS_SUFFIX.match(name)
        if match and match.group("name") in ATTACKS:
            name, params = match.group("name"), {"steps": int(match.group("steps"))}
    name = name.replace("-", "_") if name.replace("-", "_") in ATTACKS else name
    if name not in ATTACKS:
        raise RobustlabError(f"unknown attack '{name}'; valid: {', '.join(sorted(ATTACKS))}")
    return name, params


#: parameters that count iterations, restarts or queries: fewer than one would leave the images
#: unattacked and report clean accuracy as robust accuracy
_COUNTS = ("steps", "restarts", "queries", "n_target_classes", "binary_search_steps")


def make_attack(spec: str | dict[str, Any], *, eps: float, norm: str = "linf", **defaults: Any) -> Attack:
    """A ready-to-call ``attack(model, x, y)`` for ``spec`` at budget ``eps``.

    Unknown parameters for the chosen attack are rejected with the names it accepts; so are values of
    the wrong type (against the parameter's default), counts below one and a step size that is not
    positive, each in one line, before any image is attacked.
    """
    name, params = parse_attack_spec(spec)
    fn = ATTACKS[name]
    merged = {**defaults, **params}
    for key in ("eps", "norm"):
        if key in merged:
            raise RobustlabError(f"attack '{name}': {key} belongs to the threat model, not to the attack's "
                                 "parameters (give it as --eps / --norm, or as make_attack's own argument)")
    accepted = _parameters(name, fn)
    if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(merged) - set(accepted))
        if unknown:
            names = ", ".join(k for k in accepted if k not in ("model", "x", "y"))
            raise RobustlabError(f"attack '{name}' has no parameter {', '.join(unknown)}; accepted: {names}")
    for key, value in merged.items():
        _check_parameter(name, key, value, accepted.get(key))
    attack = functools.partial(fn, eps=eps, norm=norm, **merged)
    attack.__name__ = name  # type: ignore[attr-defined]
    return attack


def _parameters(name: str, fn: Attack) -> dict[str, inspect.Parameter]:
    """The keyword parameters ``name`` accepts, through to the function its ``**kwargs`` reach."""
    own = dict(inspect.signature(fn).parameters)
    if name not in _FORWARDS:
        return own
    target, fixed = _FORWARDS[name]
    passed_on = {k: p for k, p in inspect.signature(target).parameters.items() if k not in fixed}
    return {**passed_on, **{k: p for k, p in own.items() if p.kind is not p.VAR_KEYWORD}}


def _check_parameter(attack: str, key: str, value: Any, parameter: inspect.Parameter | None) -> None:
    """Raise RobustlabError for a value the attack would misread or that would leave it unattacked."""
    default = None if parameter is None else parameter.default
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
    expected = next((types for kind, types in kinds.items() if type(default) is kind), None)
    if expected is not None and (not isinstance(value, expected) or (bool not in expected and isinstance(value, bool))):
        kind = type(default).__name__
        raise RobustlabError(f"attack '{attack}': {key} must be {'an' if kind == 'int' else 'a'} {kind}, got {value!r}")
    if key in _COUNTS and isinstance(value, int) and value < 1:
        raise RobustlabError(f"attack '{attack}': {key} must be >= 1, got {value}")
    if key == "step_size" and value is not None and (
        not isinstance(value, int | float) or isinstance(value, bool) or not value > 0
    ):
        raise RobustlabError(f"attack '{attack}': step_size must be a number > 0, got {value!r}")
    if key == "loss" and isinstance(value, str):
        objective(value, targeted=False)  # an unknown loss fails here, naming the valid ones
