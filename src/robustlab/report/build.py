"""``robustlab report RESULTS_DIR``: the paper's tables and figures, claimed beside measured.

The report is built once as a list of blocks (headings, paragraphs, tables, figures) and rendered twice:
``report.md`` (figures written to ``figures/*.png`` and linked) and ``report.html`` (one self-contained
file: CSS inline, figures inlined as base64 PNG, no script, no external resource).

Contents, per (dataset, model, eps) group of the grid:

* Table 1: clean / FGSM / PGD / CW / AutoAttack accuracy, worst case over all attacks, robustness gap
  (clean - worst case, and the paper's clean - CW), audit verdict; seed mean +- std. The paper's
  claimed rows (``paper_claims.json``, its Table 1) sit beside the measured ones at the paper's eps,
  labelled ``claimed (paper)``; measured rows are labelled ``measured (robustlab, attack=...)``.
* Table 2: training time, seconds per epoch, peak memory and their ratios to standard training, with
  the paper's Table 2 (hours, GB) and its hybrid / baseline ratios beside them.
* McNemar's test (:func:`robustlab.stats.mcnemar`) of the hybrid defence against every other defence, and
  of standard training against every defence, on the same test samples, for clean and worst-case
  correctness, with Holm-adjusted p-values (:func:`robustlab.stats.holm`).
* Figure 1 (confidence on the worst-case adversarials), Figure 2 (clean and worst-case accuracy per
  defence), accuracy vs eps (worst case), training curves. Figures plot the per-sample worst case, which
  is AutoAttack-grade when the grid evaluated with the default suite, and name eps and the attacks in
  their titles; an evaluation without a full AutoAttack is labelled an upper bound in Table 1's source
  column and in every figure title.

Modules: :mod:`~robustlab.report.document` (the blocks), :mod:`~robustlab.report.tables` (Tables 1, 2 and
McNemar), :mod:`~robustlab.report.figures`, :mod:`~robustlab.report.render` (Markdown and HTML); this module
assembles the sections and writes the files.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustlab.report import figures
from robustlab.report.data import (
    HYBRID,
    STANDARD,
    Results,
    audit_flagged,
    audit_sweep,
    grouped,
    history,
    load_claims,
    load_results,
    seed_stats,
)
from robustlab.report.document import Document, Figure, Heading, Paragraph, Table
from robustlab.report.render import render_html, render_markdown
from robustlab.report.tables import mcnemar_table, table1, table2
from robustlab.report.tables import pct as pct
from robustlab.rundir import atomic_write_bytes, atomic_write_text


def _eps_text(eps: float) -> str:
    for denominator in (255,):
        numerator = eps * denominator
        if abs(numerator - round(numerator)) < 1e-6 and round(numerator) > 0:
            return f"{eps:.4g} ({round(numerator)}/{denominator})"
    return f"{eps:.4g}"


def _dotted(settings: dict[str, Any], prefix: str = "") -> list[str]:
    """``{defense: {eps_warmup: 5}}`` -> ``["defense.eps_warmup=5"]``."""
    out = []
    for key, value in settings.items():
        if isinstance(value, dict):
            out += _dotted(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={value}")
    return out


def rule_text(rule: dict[str, Any]) -> str:
    """One sentence for an experiment's ``where`` rule: which cells got which settings."""
    match = " and ".join(
        f"{key} in {{{', '.join(map(str, value))}}}" if isinstance(value, list) else f"{key}={value}"
        for key, value in rule["match"].items()
    )
    cells = rule.get("cells") or []
    return (
        f"Settings for some cells only ({rule['source']}): {', '.join(_dotted(rule['set']))} "
        f"where {match} ({len(cells)} cell(s): {', '.join(cells)})."
    )


def _claims_for(claims: dict[str, Any], table: str, dataset: str, model: str) -> list[dict[str, Any]]:
    return [r for r in claims[table]["rows"] if r["dataset"] == dataset and r["model"] == model]


def _is_paper_eps(claims: dict[str, Any], eps: float, norm: str) -> bool:
    setting = claims["setting"]
    return norm == setting["norm"] and abs(eps - float(setting["eps"])) < 1e-9


def _worst_case_text(stats: dict[str, dict[str, Any]]) -> str:
    """"worst case over fgsm, pgd-20, autoattack", and "UPPER BOUND" when any evaluation lacks AutoAttack."""
    over = list(dict.fromkeys(label for s in stats.values() for label in s.get("worst_case_over", [])))
    text = "worst case over " + (", ".join(over) or "the attacks run")
    if any("upper-bound" in s.get("strengths", []) for s in stats.values()):
        text += " (UPPER BOUND: no full AutoAttack)"
    return text


def _gap_note(by_defense: dict[str, list[dict[str, Any]]]) -> str:
    """Table 1's note when its clean column covers more test images than the attacks: the gaps are taken
    on the attacked images, so they are not the difference of the printed columns."""
    sizes = {(r.get("clean_n"), r.get("test_n")) for rows in by_defense.values() for r in rows if r.get("test_n")}
    wider = sorted({clean for clean, attacked in sizes if clean and clean != attacked})
    if not wider:
        return ""
    return (f" The clean column covers all {'/'.join(map(str, wider))} test images; both gaps are taken on the "
            "attacked images, from their own clean accuracy.")


def execution_note(by_defense: dict[str, list[dict[str, Any]]]) -> str:
    """Table 2's warning when the group's finished cells trained with different execution settings.

    A grid keeps a finished cell across a change of ``train.channels_last`` (it trains the same model),
    but the cell's wall-clock time then belongs to another code path, and a time ratio mixes the two.
    Returns "" when every cell ran alike, else which defences ran how (seeds that differ joined by " / ").
    """
    ran = {d: [r["execution"] for r in rows if r.get("execution")] for d, rows in by_defense.items()}
    every = [execution for runs in ran.values() for execution in runs]
    varying = [key for key in (every[0] if every else {}) if len({str(e.get(key)) for e in every}) > 1]
    if not varying:
        return ""
    how: dict[str, list[str]] = {}
    for defense, runs in ran.items():
        seen = sorted({", ".join(f"{key.split('.')[-1]}={e.get(key)}" for key in varying) for e in runs})
        if seen:
            how.setdefault(" / ".join(seen), []).append(defense)
    listed = "; ".join(f"{setting}: {', '.join(defenses)}" for setting, defenses in how.items())
    return f" The cells trained with different execution settings, so a time ratio also compares code paths ({listed})."


def group_section(
    results: Results,
    doc: Document,
    key: tuple[str, str, float, str],
    by_defense: dict[str, list[dict[str, Any]]],
    claims: dict[str, Any],
    index: int,
) -> None:
    """One (dataset, model, eps) group of the grid: Tables 1 and 2, McNemar's tests and the figures."""
    dataset, model, eps, norm = key
    slug = f"{index:02d}-{dataset}-{model}-{norm}-{eps:.4g}".replace("/", "_").replace(":", "_")
    doc.add(Heading(f"{dataset} / {model} / {norm} eps = {_eps_text(eps)}", 2))
    stats = {defense: seed_stats(rows) for defense, rows in by_defense.items()}
    paper_eps = _is_paper_eps(claims, eps, norm)
    claimed1 = _claims_for(claims, "table1", dataset, model) if paper_eps else []
    claimed2 = _claims_for(claims, "table2", dataset, model) if paper_eps else []
    note = (
        "Claimed rows: the paper's numbers at its eps 0.03; the paper does not say how its baseline row was "
        "trained, nor the attacks' steps."
        if claimed1
        else "The paper reports no numbers for this setting; only measured rows are shown."
    )
    doc.add(Heading("Table 1: accuracy under attack (%)", 3))
    table = table1(stats, claimed1)
    table.caption = (
        note + " Worst case: a sample counts as robust only if it is classified correctly and every attack "
        "failed on it. "
        "Gap (clean - CW) is the paper's definition. * marks a claimed gap inconsistent with the "
        "claimed clean and CW numbers." + _gap_note(by_defense)
    )
    doc.add(table)
    doc.add(Heading("Table 2: training cost", 3))
    cost = table2(stats, claimed2)
    cost.caption = (
        "Ratios are to standard training of the same training seed, averaged over the seeds both have "
        "(wall-clock time, so they carry the machine's load at the time). On CPU, peak memory is "
        "the training process's peak resident set size (cells train in separate processes)."
        + execution_note(by_defense)
    )
    doc.add(cost)
    for reference, title in ((HYBRID, "hybrid vs each baseline"), (STANDARD, "each defence vs standard training")):
        doc.add(Heading(f"McNemar's test: {title}", 3))
        test = mcnemar_table(results, by_defense, reference)
        doc.add(test if isinstance(test, Table) else Paragraph(test))
    _group_figures(results, doc, key, by_defense, stats, slug)


def _group_figures(
    results: Results,
    doc: Document,
    key: tuple[str, str, float, str],
    by_defense: dict[str, list[dict[str, Any]]],
    stats: dict[str, dict[str, Any]],
    slug: str,
) -> None:
    """Figures 1 and 2 and the training curves of one group; each figure names eps and the attacks."""
    dataset, model, eps, norm = key
    worst = _worst_case_text(stats)
    where = f"{norm} eps = {_eps_text(eps)}"
    confidences = {}
    for defense, rows in by_defense.items():
        finished = [r for r in rows if r.get("status") == "finished"]
        entry = (finished[0].get("evaluation") or {}).get("worst_case") if finished else None
        if entry and (entry.get("confidence") or {}).get("histogram"):
            confidences[audit_flagged(defense, rows)] = entry["confidence"]
    if confidences:
        doc.add(
            Figure(
                f"{slug}-fig1-confidence",
                figures.confidence_figure(confidences, "the worst case", f"{dataset}/{model}, {where}: {worst}"),
                f"Figure 1: max-softmax confidence on the per-sample worst-case adversarial test images "
                f"({worst}; measured, first seed), {where}.",
            )
        )
    measured = [d for d, s in stats.items() if s.get("worst_case")]  # an unmeasured defence is no 0% bar
    clean = {audit_flagged(d, by_defense[d]): stats[d]["clean"] for d in measured}
    robust = {audit_flagged(d, by_defense[d]): stats[d]["worst_case"] for d in measured}
    if measured:
        left_out = [d for d in stats if d not in measured]
        doc.add(
            Figure(
                f"{slug}-fig2-defenses",
                figures.defenses_figure(clean, robust, "worst case", f"{dataset}/{model}, {where}: {worst}"),
                f"Figure 2: clean and per-sample worst-case accuracy per defence ({worst}; measured; error bars: "
                "std over seeds)." + (f" Not measured yet, so not drawn: {', '.join(left_out)}." if left_out else ""),
            )
        )
    curves = {
        d: history(results, rows[0]) for d, rows in by_defense.items() if rows[0].get("status") == "finished"
    }
    png = figures.training_curves_figure(curves, f"{dataset}/{model}, eps = {eps:.4g}")
    if png:
        doc.add(
            Figure(
                f"{slug}-curves",
                png,
                "Training curves (first seed): eps_t, alpha, validation clean "
                "and PGD accuracy per epoch, from each run's history.csv.",
            )
        )


def eps_section(results: Results, doc: Document, rows: list[dict[str, Any]], index: int) -> None:
    """Accuracy vs eps: across the grid's eps axis when it has several values, else the audit's sweep."""
    by_model: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        by_model.setdefault((row["dataset"], row["model"], row["norm"]), []).append(row)
    for (dataset, model, norm), members in by_model.items():
        curves: dict[str, tuple[list[float], list[float]]] = {}
        grid_eps = sorted({float(r["eps"]) for r in members})
        if len(grid_eps) > 1:
            seen: dict[str, dict[str, Any]] = {}
            for defense in dict.fromkeys(r["defense"] for r in members):
                points = []
                for eps in grid_eps:
                    stat = seed_stats(
                        [r for r in members if r["defense"] == defense and float(r["eps"]) == eps]
                    )
                    if stat.get("worst_case"):
                        points.append((eps, stat["worst_case"].mean))
                        seen[f"{defense}@{eps}"] = stat
                if points:
                    label = audit_flagged(defense, [r for r in members if r["defense"] == defense])
                    curves[label] = ([p[0] for p in points], [p[1] for p in points])
            attack = _worst_case_text(seen) if seen else None
            source = "one point per eps of the grid (each model trained at that eps), seed mean"
            axis = "the worst case"
        else:
            attacks, seeds = [], []
            for row in sorted(members, key=lambda r: r["seed"]):
                sweep = audit_sweep(results, row)
                label = audit_flagged(row["defense"], [r for r in members if r["defense"] == row["defense"]])
                if sweep and label not in curves:  # one trained model per defence: its first seed audited
                    curves[label] = (sweep[0], sweep[1])
                    attacks.append(sweep[2])
                    seeds.append(row["seed"])
            attack = f"{'/'.join(dict.fromkeys(attacks))} (UPPER BOUND: the audit's PGD only, not AutoAttack)"
            source = (f"the gradient-masking audit's sweep of one trained model per defence over eps, seed "
                      f"{'/'.join(map(str, dict.fromkeys(seeds)))}")
            axis = "PGD (upper bound)"
        if curves:
            doc.add(
                Figure(
                    f"{index:02d}-{dataset}-{model}-{norm}-eps-curves",
                    figures.eps_curves_figure(curves, axis, f"{dataset}/{model}: accuracy vs eps, {attack}", norm),
                    f"Accuracy vs eps ({norm}) under {attack} ({source}).",
                )
            )


def samples_text(rows: list[dict[str, Any]]) -> str:
    """Which test images the measured numbers are on, e.g. clean on all 10000, attacks on the first 1000."""
    from robustlab.evaluation import subset_text

    kinds = {(r.get("clean_n"), r.get("test_n"), r.get("test_of"), r.get("test_subset"))
             for r in rows if r.get("test_n")}
    parts = []
    for clean_n, n, of, name in sorted(kinds, key=str):
        if of is None:  # a row that does not record the test split's size, nor so which images
            parts.append(f"every number on {n} test images")
            continue
        attacked = subset_text({"n": n, "of": of, "subset": name}) + (f" ({name})" if name and name != "all" else "")
        if n != of and clean_n == of:
            parts.append(f"clean accuracy on all {of} test images; attacks, worst case and gaps on {attacked}")
        else:
            parts.append(f"every number on {attacked}")
    return ("Samples: " + "; ".join(parts) + ".") if parts else ""


def compute_text(rows: list[dict[str, Any]]) -> str:
    """What the finished cells cost in wall time, summed over cells (core-hours when each ran one thread)."""
    parts = {
        "training": [r.get("train_seconds") for r in rows if not r.get("training_shared_with")],  # trained once
        "evaluation": [(r.get("evaluation") or {}).get("seconds") for r in rows],  # also in rows that predate it
        "audit": [r.get("audit_seconds") for r in rows if r.get("audit_verdict")],
    }
    hours = {name: sum(float(v) for v in values if v is not None) / 3600 for name, values in parts.items()}
    missing = {name: sum(v is None for v in values) for name, values in parts.items()}
    if not rows or not any(hours.values()):
        return ""
    text = (
        f"Compute: the {len(rows)} finished cell(s) took {sum(hours.values()):.1f} h of wall time summed over "
        "cells (" + ", ".join(f"{name} {value:.1f} h" for name, value in hours.items()) + "; core-hours when "
        "each cell ran one thread)"
    )
    unrecorded = [f"{count} {name} time(s)" for name, count in missing.items() if count]
    return text + (f", not counting {', '.join(unrecorded)} not recorded." if unrecorded else ".")


def build_document(results_dir: str | Path, also: Sequence[str | Path] = ()) -> Document:
    """Assemble the whole report for a results directory (and the cells of ``also``, see ``load_results``)."""
    results = load_results(results_dir, also)
    claims = load_claims()
    doc = Document(
        f"robustlab report: {results.experiment}"
        + (f" ({results.profile} profile)" if results.profile else "")
    )
    finished = [r for r in results.rows if r.get("status") == "finished"]
    doc.add(
        Paragraph(
            f"{len(results.rows)} cell(s), {len(finished)} finished; generated "
            f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC} from results.json beside this report. "
            "Numbers labelled 'claimed (paper)' are transcribed from the preprint's Tables 1 and 2 "
            f"({claims['source']}); everything else was measured by robustlab, and every robust accuracy "
            "names "
            "the attack that produced it."
        )
    )
    if results.profile == "quick":
        doc.add(
            Paragraph(
                "Quick profile: few epochs on data subsets with cheap attacks, so measured numbers are "
                "NOT comparable to the paper's 50-epoch claims; they test the pipeline end to end."
            )
        )
    evaluation = results.settings.get("evaluation") or {}
    if evaluation:
        doc.add(
            Paragraph("Evaluation settings: " + ", ".join(f"{k}={v}" for k, v in evaluation.items() if v))
        )
    samples = samples_text(finished)
    if samples:
        doc.add(Paragraph(samples))
    compute = compute_text(finished)
    if compute:
        doc.add(Paragraph(compute))
    for rule in results.settings.get("where") or []:
        doc.add(Paragraph(rule_text(rule)))
    failed = [r for r in results.rows if r.get("status") == "failed"]
    if failed:
        doc.add(Paragraph("Failed cells: " + "; ".join(f"{r['cell']}: {r.get('error', '')}" for r in failed)))
    for index, (key, by_defense) in enumerate(grouped(results.rows).items(), 1):
        group_section(results, doc, key, by_defense, claims, index)
    doc.add(Heading("Accuracy vs eps", 2))
    eps_section(results, doc, finished, 0)
    return doc


def write_report(results_dir: str | Path, also: Sequence[str | Path] = ()) -> dict[str, Path]:
    """Write ``report.md`` (+ ``figures/*.png``) and the self-contained ``report.html`` in ``results_dir``.

    ``also``: further results directories whose cells join the report (extra seeds run as their own grid).
    """
    path = Path(results_dir)
    doc = build_document(path, also)
    for block in doc.blocks:
        if isinstance(block, Figure):
            atomic_write_bytes(path / "figures" / f"{block.name}.png", block.png)
    atomic_write_text(path / "report.md", render_markdown(doc))
    atomic_write_text(path / "report.html", render_html(doc))
    return {"markdown": path / "report.md", "html": path / "report.html", "figures": path / "figures"}
