"""Adversarial attacks in pixel space: a functional API and a registry of names.

>>> from robustlab.attacks import pgd
>>> x_adv = pgd(model, x, y, eps=0.3, steps=40)  # doctest: +SKIP
"""

from robustlab.attacks.apgd import apgd
from robustlab.attacks.autoattack import AutoAttackResult, autoattack
from robustlab.attacks.core import fgsm, frozen, input_gradient, pgd, project
from robustlab.attacks.cw import CWResult, carlini_wagner_l2, cw_l2
from robustlab.attacks.fab import fab_t
from robustlab.attacks.losses import ce_loss, cw_margin, dlr_loss
from robustlab.attacks.patch import apply_patch, patched_accuracy, universal_patch
from robustlab.attacks.registry import (
    ATTACKS,
    cw_linf,
    make_attack,
    mifgsm,
    parse_attack_spec,
    register_attack,
)
from robustlab.attacks.square import square
from robustlab.attacks.transfer import TransferResult, transfer_attack
from robustlab.attacks.wrappers import BPDA, EOT, adaptive_model

__all__ = [
    "ATTACKS",
    "BPDA",
    "CWResult",
    "EOT",
    "AutoAttackResult",
    "TransferResult",
    "adaptive_model",
    "apgd",
    "apply_patch",
    "autoattack",
    "carlini_wagner_l2",
    "cw_l2",
    "fab_t",
    "patched_accuracy",
    "square",
    "transfer_attack",
    "universal_patch",
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
