"""The report's figures as PNG bytes (matplotlib, Agg backend only: no display, works on any server).

Figure 1 of the paper is the confidence of predictions on PGD inputs; Figure 2 compares defences on
CIFAR-10 under PGD. Here both are drawn for every (dataset, model, eps) group of the grid, from
*measured* numbers only; accuracy-vs-eps curves and per-epoch training curves (eps_t, alpha,
validation clean / adversarial accuracy) complete them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from robustlab.report.data import Stat  # noqa: E402

DPI = 100


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def confidence_figure(histograms: dict[str, dict[str, Any]], attack: str, title: str) -> bytes:
    """Figure 1: distribution of max-softmax confidence on adversarial inputs, one line per defence.

    ``histograms`` maps a defence to the evaluation's confidence record under ``attack``
    (``{histogram: {edges, correct, wrong}, mean_correct, mean_wrong}``).
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(histograms)
    for name in names:
        hist = histograms[name]["histogram"]
        edges = hist["edges"]
        counts = [c + w for c, w in zip(hist["correct"], hist["wrong"], strict=True)]
        total = max(1, sum(counts))
        centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
        left.plot(centres, [c / total for c in counts], marker=".", label=name)
    left.set(xlabel=f"max-softmax confidence under {attack}", ylabel="fraction of test images", title=title)
    left.legend(fontsize=7)
    positions = range(len(names))
    width = 0.4
    correct = [histograms[n].get("mean_correct") or 0.0 for n in names]
    wrong = [histograms[n].get("mean_wrong") or 0.0 for n in names]
    right.bar([p - width / 2 for p in positions], correct, width, label="still correct")
    right.bar([p + width / 2 for p in positions], wrong, width, label="fooled")
    right.set_xticks(list(positions), names, rotation=40, ha="right", fontsize=8)
    right.set(ylabel="mean confidence", ylim=(0, 1), title="mean confidence, split by outcome")
    right.legend(fontsize=7)
    return _png(fig)


def defenses_figure(
    clean: dict[str, Stat | None], robust: dict[str, Stat | None], attack: str, title: str
) -> bytes:
    """Figure 2: clean and PGD accuracy per defence (bars; error bars = std over seeds)."""
    names = list(clean)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(names) + 2), 3.6))
    width = 0.4
    for offset, label, stats in ((-width / 2, "clean", clean), (width / 2, f"{attack}", robust)):
        values = [100 * s.mean if s else 0.0 for s in (stats[n] for n in names)]
        errors = [100 * s.std if s and s.std is not None else 0.0 for s in (stats[n] for n in names)]
        ax.bar([i + offset for i in range(len(names))], values, width, yerr=errors if any(errors) else None,
               capsize=3, label=label)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax.set(ylabel="test accuracy (%)", ylim=(0, 100), title=title)
    ax.legend(fontsize=8)
    return _png(fig)


def eps_curves_figure(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]], attack: str, title: str, norm: str = "linf"
) -> bytes:
    """Accuracy under ``attack`` as a function of the ``norm`` budget, one line per defence."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, (eps, acc) in curves.items():
        ax.plot(list(eps), [100 * a for a in acc], marker="o", label=name)
    axis = {"linf": "Linf", "l2": "L2"}.get(norm, norm)
    ax.set(xlabel=f"eps ({axis}, pixels)", ylabel=f"accuracy under {attack} (%)", ylim=(0, 100), title=title)
    ax.legend(fontsize=7)
    return _png(fig)


#: (history column(s), axis label): the first present column of each panel is drawn.
CURVE_PANELS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("eps_t", "train_eps_t"), "eps_t (training budget)"),
    (("alpha",), "alpha (clean-loss weight)"),
    (("val_clean_acc",), "validation clean accuracy"),
    (("val_robust_acc",), "validation PGD accuracy"),
)


def training_curves_figure(histories: dict[str, list[dict[str, Any]]], title: str) -> bytes | None:
    """Per-epoch eps_t, alpha and validation clean / adversarial accuracy; None when nothing to draw."""
    panels = [
        p
        for p in CURVE_PANELS
        if any(any(h.get(c) is not None for h in rows for c in p[0]) for rows in histories.values())
    ]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), squeeze=False)
    colours = {name: f"C{i % 10}" for i, name in enumerate(histories)}
    for ax, (columns, label) in zip(axes[0], panels, strict=True):
        for name, rows in histories.items():
            column = next((c for c in columns if any(r.get(c) is not None for r in rows)), None)
            if column is None:
                continue
            points = [(r["epoch"], r[column]) for r in rows if isinstance(r.get(column), int | float)]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", color=colours[name], label=name)
        ax.set(xlabel="epoch", title=label)
        ax.title.set_fontsize(9)
    handles = [plt.Line2D([], [], color=colour, marker=".", label=name) for name, colour in colours.items()]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.suptitle(title, fontsize=10, y=1.04)
    return _png(fig)
