"""What an audit reports: :class:`AuditCheck`, :class:`AuditReport`, and the noise tolerance of a difference."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

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
    #: wall time of :func:`~robustlab.audit.audit_run` (a surrogate trained for it included), for a grid's budget;
    #: for a resumed audit it includes the interrupted runs' measurement time
    seconds: float | None = None
    #: seconds the measurements read back from a checkpoint took when they were made (0 for a fresh audit)
    resumed_seconds: float = 0.0

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
        """JSON-ready form: ``{"verdict", "checks": [{name, status, evidence, message}], "settings"}`` and
        ``seconds`` when the audit was timed."""
        out: dict[str, Any] = {
            "verdict": self.verdict,
            "checks": [asdict(c) for c in self.checks],
            "settings": self.settings,
        }
        if self.seconds is not None:
            out["seconds"] = round(self.seconds, 3)
        return out


def binomial_se(accuracy: float, n: int) -> float:
    """Agresti-Coull standard error of an accuracy measured on ``n`` images (never 0, even at 0%/100%)."""
    p = (accuracy * n + 2) / (n + 4)
    return math.sqrt(p * (1 - p) / (n + 4))


def noise_tolerance(a: float, b: float, n: int, z: float = Z) -> float:
    """``z`` standard errors of the difference of two accuracies measured on the same ``n`` images."""
    return z * math.hypot(binomial_se(a, n), binomial_se(b, n))


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"
