"""What one evaluation measured: :class:`Measurement`, :class:`EvaluationResult` and its ``strength``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robustlab.attacks.autoattack import FULL_QUERIES, FULL_STEPS
from robustlab.stats import calibration_error

#: ``strength`` of an evaluation whose worst case includes a full-budget AutoAttack.
AUTOATTACK_GRADE = "autoattack-grade"
#: ``strength`` of any weaker evaluation: its robust accuracy is an upper bound, not a robustness claim.
UPPER_BOUND = "upper-bound"
UPPER_BOUND_NOTE = (
    "upper bound on robustness, not a robustness claim: no full AutoAttack ran "
    "(drop --suite quick, or set evaluation.suite: standard)"
)
ECE_BINS = 15
HISTOGRAM_BINS = 20


def threat_key(norm: str, eps: float) -> str:
    """The key of an evaluation in ``metrics.json``: ``"linf-0.3"``, ``"linf-0.0313725"``."""
    return f"{norm}-{eps:.6g}"


@dataclass
class Measurement:
    """One accuracy on the evaluated samples, with what produced it and its per-sample data.

    ``correct`` and ``confidence`` have shape (passes, n): one row per forward pass (one for
    deterministic models), one column per test sample.
    """

    label: str
    attack: dict[str, Any] | None
    correct: np.ndarray
    confidence: np.ndarray
    seconds: float = 0.0
    ci95: tuple[float, float] = (math.nan, math.nan)
    stages: dict[str, dict[str, float]] | None = None  # AutoAttack: robust accuracy after each stage

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def per_sample(self) -> np.ndarray:
        """Per-sample correctness averaged over passes (0/1 for a deterministic model)."""
        return self.correct.mean(axis=0)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "accuracy": self.accuracy,
            "ci95": [self.ci95[0], self.ci95[1]],
            "attack": self.attack,
            "confidence": confidence_summary(self.confidence, self.correct),
            "ece": calibration_error(self.confidence.ravel(), self.correct.ravel(), ECE_BINS),
            "seconds": round(self.seconds, 3),
        }
        if self.correct.shape[0] > 1:
            out["accuracy_per_draw"] = [float(row.mean()) for row in self.correct]
        if self.stages is not None:
            out["stages"] = self.stages
        return out


@dataclass
class EvaluationResult:
    """Everything :func:`evaluate_model` measured; ``to_dict`` is the ``metrics.json`` entry."""

    threat: dict[str, Any]
    labels: np.ndarray
    indices: np.ndarray
    clean: Measurement
    attacks: dict[str, Measurement]
    worst_case: Measurement
    worst_case_attack: np.ndarray
    model_info: dict[str, Any]
    samples: dict[str, Any]
    seed: int
    n_boot: int
    seconds: float
    strength: str = UPPER_BOUND
    cost: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return threat_key(self.threat["norm"], self.threat["eps"])

    @property
    def robust_accuracy(self) -> float:
        """The worst case over every attack run: the only number to call "robust accuracy"."""
        return self.worst_case.accuracy

    @property
    def gap(self) -> float:
        """Robustness gap, clean - worst-case accuracy (docs/evaluation.md)."""
        return self.clean.accuracy - self.worst_case.accuracy

    @property
    def cw_label(self) -> str | None:
        return next((k for k, m in self.attacks.items() if m.attack and m.attack["name"] == "cw_linf"), None)

    @property
    def paper_gap(self) -> float | None:
        """The paper's gap, clean - CW accuracy (paper Table 1), when CW-Linf was run."""
        label = self.cw_label
        return None if label is None else self.clean.accuracy - self.attacks[label].accuracy

    def to_dict(self) -> dict[str, Any]:
        return {
            "threat": self.threat,
            "samples": self.samples,
            "model": self.model_info,
            "clean": self.clean.summary(),
            "attacks": {label: m.summary() for label, m in self.attacks.items()},
            "worst_case": self.worst_case.summary(),
            "gap": {
                "clean_minus_worst_case": self.gap,
                "clean_minus_cw": self.paper_gap,
                "cw_attack": self.cw_label,
            },
            "strength": self.strength,
            "cost": self.cost,
            "seed": self.seed,
            "n_boot": self.n_boot,
            "seconds": round(self.seconds, 3),
            **self.extra,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-sample arrays saved next to ``metrics.json`` (see the module docstring)."""
        out: dict[str, np.ndarray] = {
            "labels": self.labels,
            "indices": self.indices,
            "attack_labels": np.array(list(self.attacks), dtype=str),
            "worst_case_attack": self.worst_case_attack,
        }
        for m in (self.clean, *self.attacks.values(), self.worst_case):
            out[f"correct:{m.label}"] = m.correct
            out[f"confidence:{m.label}"] = m.confidence
        return out


def confidence_summary(confidence: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    """Mean max-softmax overall and split by correct / wrong, and histogram counts over [0, 1]."""
    conf, hit = confidence.ravel().astype(np.float64), correct.ravel().astype(bool)
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)

    def mean(values: np.ndarray) -> float | None:
        return float(values.mean()) if values.size else None

    return {
        "mean": mean(conf),
        "mean_correct": mean(conf[hit]),
        "mean_wrong": mean(conf[~hit]),
        "n_correct": int(hit.sum()),
        "n_wrong": int((~hit).sum()),
        "histogram": {
            "edges": [round(float(e), 6) for e in edges],
            "correct": np.histogram(conf[hit], bins=edges)[0].tolist(),
            "wrong": np.histogram(conf[~hit], bins=edges)[0].tolist(),
        },
    }


def is_full_autoattack(record: dict[str, Any] | None) -> bool:
    """Whether an attack record is AutoAttack at its full budget (100 steps; Square's 5,000 queries)."""
    if not record or record.get("name") != "autoattack":
        return False
    params = record.get("params") or {}
    queries = int(params.get("queries", FULL_QUERIES))
    full_queries = params.get("version", "standard") == "rand" or queries >= FULL_QUERIES
    return int(params.get("steps", FULL_STEPS)) >= FULL_STEPS and full_queries


def strength(entry: dict[str, Any]) -> str:
    """``autoattack-grade`` or ``upper-bound`` of a ``metrics.json`` evaluation entry.

    Read from the entry's ``strength`` field; entries written before that field existed are classified
    from the attacks that ran (a full AutoAttack among them makes the worst case AutoAttack-grade).
    """
    if entry.get("strength"):
        return str(entry["strength"])
    records = [m.get("attack") for m in (entry.get("attacks") or {}).values()]
    return AUTOATTACK_GRADE if any(is_full_autoattack(r) for r in records) else UPPER_BOUND

