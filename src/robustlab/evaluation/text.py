"""Readable output of an evaluation: the table, the summary lines under it, AutoAttack stages, evidence."""

from __future__ import annotations

from typing import Any

import numpy as np

from robustlab.attacks.registry import parse_attack_spec
from robustlab.evaluation.result import AUTOATTACK_GRADE, ECE_BINS, UPPER_BOUND_NOTE, EvaluationResult
from robustlab.evaluation.samples import subset_text
from robustlab.metrics import chance_warning
from robustlab.stats import calibration_error


def _attack_text(record: dict[str, Any] | None) -> str:
    if record is None:
        return "-"
    if record["name"] == "worst_case":
        return "min over " + ", ".join(record["over"])
    given = parse_attack_spec(record["spec"])[1]
    shown = {**{k: v for k, v in record["params"].items() if k == "steps"}, **given}
    params = [f"{k}={v}" for k, v in shown.items() if v is not None]
    if record["params"].get("random_start"):
        params.append("random start")
    if not record["adaptive"].startswith("none"):
        params.append(f"via {record['adaptive']}")
    return " ".join([record["name"], *params, f"eps={record['eps']:.4g}"])


def format_table(result: EvaluationResult) -> Any:
    """A rich table of every measurement: accuracy with its 95% CI and the attack that produced it."""
    from rich.table import Table

    norm, eps = result.threat["norm"], result.threat["eps"]
    bound = "" if result.strength == AUTOATTACK_GRADE else " (quick suite: robust numbers are upper bounds)"
    table = Table(title=f"{subset_text(result.samples)}, {norm} eps={eps:.4g}: accuracy (%){bound}")
    for column in ("measure", "attack", "accuracy [95% CI]", "conf.", "ECE", "s"):
        table.add_column(column, justify="left" if column in ("measure", "attack") else "right")
    for m in (result.clean, *result.attacks.values(), result.worst_case):
        conf = float(m.confidence.mean())
        style = "bold" if m is result.worst_case else None
        table.add_row(
            m.label, _attack_text(m.attack),
            f"{100 * m.accuracy:.2f} [{100 * m.ci95[0]:.1f}, {100 * m.ci95[1]:.1f}]", f"{conf:.3f}",
            f"{calibration_error(m.confidence.ravel(), m.correct.ravel(), ECE_BINS):.3f}", f"{m.seconds:.1f}",
            style=style,
        )
    return table


def summary_lines(result: EvaluationResult) -> list[str]:
    """Plain-text lines under the table: robust accuracy and its strength, evidence, gaps, adaptive mode, cost."""
    w = result.worst_case
    graded = result.strength == AUTOATTACK_GRADE
    lines = []
    clean_all = result.extra.get("clean_all")
    if clean_all:
        lines.append(f"clean accuracy on all {clean_all['n']} test images: {100 * clean_all['accuracy']:.2f}% "
                     f"[{100 * clean_all['ci95'][0]:.1f}, {100 * clean_all['ci95'][1]:.1f}]; "
                     f"attacks on {subset_text(result.samples)} ({result.samples['subset']})")
    lines += [
        f"robust accuracy{'' if graded else ' UPPER BOUND'} (per-sample worst case, {_attack_text(w.attack)}): "
        f"{100 * w.accuracy:.2f}% [{100 * w.ci95[0]:.1f}, {100 * w.ci95[1]:.1f}]"
        + ("; AutoAttack-grade" if graded else f"; {UPPER_BOUND_NOTE}"),
        *stage_lines(result),
        evidence_line(result),
        f"robustness gap clean - worst case: {100 * result.gap:.2f} points"
        + (f"; paper's gap clean - CW ({result.cw_label}): {100 * result.paper_gap:.2f} points"
           if result.paper_gap is not None else "; paper's gap clean - CW: not measured (add cw_linf)"),
        f"adaptive attack: {result.model_info['adaptive']}; attacks differentiate: "
        f"{result.model_info.get('attack_model', 'the model itself')}"
        + (f"; random model, accuracy = mean over {result.model_info['random_passes']} forward passes"
           if result.model_info["random"] else ""),
    ]
    num_classes = result.model_info.get("num_classes")
    warning = chance_warning(result.clean.accuracy, num_classes) if num_classes else None
    if warning:
        lines.append(warning)
    if result.extra.get("run_config", {}).get("finished") is False:
        lines.append("warning: this run has not finished training; these are the weights selected so far")
    if result.cost:
        c = result.cost
        lines.append(f"training cost: {c.get('train_seconds')} s, {c.get('seconds_per_epoch')} s/epoch, "
                     f"peak memory {c.get('peak_memory_mb')} MB on {c.get('device')}")
    return lines


def stage_lines(result: EvaluationResult) -> list[str]:
    """One line per AutoAttack run: the robust accuracy left after each of its stages."""
    lines = []
    for label, m in result.attacks.items():
        if m.stages:
            steps = " -> ".join(f"{stage} {100 * s['accuracy']:.2f}%" for stage, s in m.stages.items())
            lines.append(f"{label} stages (robust after each): {steps}")
    return lines


def evidence_line(result: EvaluationResult) -> str:
    """The strongest evidence behind the worst case, and how a preprocessing / random defence was attacked.

    Counts, per attack, the test points classified correctly when clean that it broke (for a random
    model: correct in most passes, wrong in most passes).
    """
    clean = result.clean.per_sample >= 0.5
    broke = {label: clean & (m.per_sample < 0.5) for label, m in result.attacks.items()}
    best = max(broke, key=lambda label: int(broke[label].sum()))
    others = np.zeros_like(clean)
    for label, mask in broke.items():
        if label != best:
            others |= mask
    extra = int((others & ~broke[best]).sum())
    text = f"strongest evidence: {best} broke {int(broke[best].sum())} of {int(clean.sum())} correctly classified"
    stages = result.attacks[best].stages
    if stages:  # which AutoAttack stage did most of it
        names, accuracies = list(stages), [s["accuracy"] for s in stages.values()]
        drops = {names[i]: accuracies[i - 1] - accuracies[i] for i in range(1, len(names))}
        top = max(drops, key=drops.__getitem__)
        text += f" points (most in its {top} stage: {round(drops[top] * result.samples['n'])})"
    else:
        text += " points"
    text += f"; the other attacks broke {extra} more" if extra else "; no other attack broke a point it missed"
    info = result.model_info
    how = []
    if info.get("differentiable") is False:
        how.append("BPDA (straight-through gradients past the non-differentiable preprocessing)")
    if info.get("random"):
        how.append(f"EOT over {info.get('eot_samples')} random draws per gradient, accuracy over "
                   f"{info.get('random_passes')} passes")
    if how:
        text += "; the defence was attacked through " + " and ".join(how)
    return text

