"""Adversarial attacks in pixel space: a functional API and a registry of names.

>>> from robustlab.attacks import pgd
>>> x_adv = pgd(model, x, y, eps=0.3, steps=40)  # doctest: +SKIP
"""

from robustlab.attacks.core import fgsm, frozen, input_gradient, pgd, project
from robustlab.attacks.losses import ce_loss, cw_margin, dlr_loss
from robustlab.attacks.registry import ATTACKS, cw_linf, make_attack, mifgsm, parse_attack_spec, register_attack

__all__ = [
    "ATTACKS",
    "ce_loss",
    "cw_linf",
    "cw_margin",
    "dlr_loss",
    "fgsm",
    "frozen",
    "input_gradient",
    "make_attack",
    "mifgsm",
    "parse_attack_spec",
    "pgd",
    "project",
    "register_attack",
]
