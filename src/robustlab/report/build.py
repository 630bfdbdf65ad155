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
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robustlab.report import figures
from robustlab.report.data import (
    ATTACK_COLUMNS,
    HYBRID,
    STANDARD,
    Results,
    Stat,
    audit_sweep,
    grouped,
    history,
    load_claims,
    load_results,
    seed_stats,
)
from robustlab.rundir import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from robustlab.stats import McNemarResult

# --- document model -----------------------------------------------------------------------------


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    name: str
    png: bytes
    caption: str


@dataclass
class Document:
    title: str
    blocks: list[Any] = field(default_factory=list)

    def add(self, *blocks: Any) -> None:
        self.blocks.extend(b for b in blocks if b is not None)


# --- formatting -----------------------------------------------------------------------------------
def pct(stat: Stat | float | None) -> str:
    """Accuracy in percent; ``mean ± std (n seeds)`` when several seeds were run."""
    if stat is None:
        return "-"
    if isinstance(stat, float | int):
        return f"{100 * stat:.1f}"
    if stat.std is None:
        return f"{100 * stat.mean:.1f}"
    return f"{100 * stat.mean:.1f} ± {100 * stat.std:.1f}"


def _number(stat: Stat | None, fmt: str = "{:.1f}", unit: str = "") -> str:
    if stat is None:
        return "-"
    text = fmt.format(stat.mean)
    return (text if stat.std is None else f"{text} ± {fmt.format(stat.std)}") + unit


def _ratio(value: Stat | None, reference: Stat | None) -> str:
    if value is None or reference is None or reference.mean == 0:
        return "-"
    return f"{value.mean / reference.mean:.2f}x"


def _eps_text(eps: float) -> str:
    for denominator in (255,):
        numerator = eps * denominator
        if abs(numerator - round(numerator)) < 1e-6 and round(numerator) > 0:
            return f"{eps:.4g} ({round(numerator)}/{denominator})"
    return f"{eps:.4g}"


# --- sections -------------------------------------------------------------------------------------
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


def _not_measured(stats: dict[str, Any]) -> str:
    """``not measured (cell running: 22/50 epochs)``: a defence with no finished cell, and how far it got."""
    progress = f": {', '.join(stats['progress'])}" if stats.get("progress") else ""
    return f"not measured (cell {'/'.join(stats['statuses'])}{progress})"


def _claims_for(claims: dict[str, Any], table: str, dataset: str, model: str) -> list[dict[str, Any]]:
    return [r for r in claims[table]["rows"] if r["dataset"] == dataset and r["model"] == model]


def _is_paper_eps(claims: dict[str, Any], eps: float, norm: str) -> bool:
    setting = claims["setting"]
    return norm == setting["norm"] and abs(eps - float(setting["eps"])) < 1e-9


def table1(stats: dict[str, dict[str, Any]], claims: list[dict[str, Any]]) -> Table:
    """Table 1 of one group: claimed (paper) rows first, then one measured row per defence.

    An attack column appears when some row has a number in it (AutoAttack only when it was measured).
    """
    columns = [
        (key, heading)
        for key, heading, _ in ATTACK_COLUMNS
        if any(key in c for c in claims) or any(s.get(key) is not None for s in stats.values())
    ]
    header = [
        "defence",
        "source",
        "clean",
        *[h for _, h in columns],
        "worst case",
        "gap (clean - worst)",
        "gap (clean - CW)",
        "audit",
        "seeds",
    ]
    rows = []
    for claim in claims:
        rows.append(
            [
                f"{claim['label']} ({claim['defense']})",
                "claimed (paper)",
                f"{claim['clean']:.1f}",
                *[f"{claim[k]:.1f}" if k in claim else "-" for k, _ in columns],
                "-",
                "-",
                f"{claim['gap']:.1f}" + (" *" if claim.get("note") else ""),
                "-",
                "-",
            ]
        )
    for defense, s in stats.items():
        attacks = ", ".join(
            f"{h}={s['attack_labels'][k]}" for k, h, _ in ATTACK_COLUMNS if k in s["attack_labels"]
        )
        if not s["seeds"]:
            source = _not_measured(s)
        elif attacks:
            source = f"measured (robustlab, attack={attacks})"
        else:
            source = "measured (robustlab; no attack evaluated)"
        if "upper-bound" in s.get("strengths", []):
            source += "; UPPER BOUND on robustness: no full AutoAttack ran"
        if s["failed"]:
            source += f"; failed: {len(s['failed'])} cell(s)"
        rows.append(
            [
                defense,
                source,
                pct(s["clean"]),
                *[pct(s.get(k)) for k, _ in columns],
                pct(s["worst_case"]),
                pct(s["gap_worst_case"]),
                pct(s["gap_cw"]),
                "/".join(s["audit"]) or "-",
                str(s["seeds"]),
            ]
        )
    return Table(header, rows)


def table2(stats: dict[str, dict[str, Any]], claims: list[dict[str, Any]]) -> Table:
    """Table 2 of one group: cost and ratio to standard training, claimed beside measured."""
    header = [
        "defence",
        "source",
        "training time",
        "s / epoch",
        "peak memory",
        "time ratio",
        "memory ratio",
        "device",
    ]
    rows = []
    baseline = next((c for c in claims if c["defense"] == "baseline"), None)
    for claim in claims:
        time_ratio = f"{claim['train_hours'] / baseline['train_hours']:.2f}x vs baseline" if baseline else "-"
        memory_ratio = f"{claim['memory_gb'] / baseline['memory_gb']:.2f}x vs baseline" if baseline else "-"
        rows.append(
            [
                f"{claim['label']} ({claim['defense']})",
                "claimed (paper)",
                f"{claim['train_hours']:.1f} h",
                "-",
                f"{claim['memory_gb']:.1f} GB",
                time_ratio,
                memory_ratio,
                "A100 (paper)",
            ]
        )
    reference = stats.get(STANDARD)
    for defense, s in stats.items():
        source = "measured (robustlab)" if s["seeds"] else _not_measured(s)
        if s.get("shared_training"):  # eps-independent training, run once for the grid's first eps
            source += f"; training shared with {', '.join(s['shared_training'])}"
        rows.append(
            [
                defense,
                source,
                _number(s["train_seconds"], unit=" s"),
                _number(s["seconds_per_epoch"], "{:.2f}"),
                _number(s["peak_memory_mb"], "{:.0f}", " MB"),
                _ratio(s["train_seconds"], reference and reference["train_seconds"]),
                _ratio(s["peak_memory_mb"], reference and reference["peak_memory_mb"]),
                ", ".join(s["devices"]) or "-",
            ]
        )
    return Table(header, rows)


def mcnemar_table(
    results: Results, by_defense: dict[str, list[dict[str, Any]]], reference: str = HYBRID
) -> Table | str:
    """McNemar's test of ``reference`` vs each other defence on the same test samples (clean and worst
    case), with Holm-adjusted p-values over the comparisons of one seed and correctness.

    ``reference`` is the hybrid (the paper's claim: better than each baseline) or standard training (does a
    defence change anything at all?).
    """
    from robustlab.errors import RobustlabError
    from robustlab.evaluation import read_samples
    from robustlab.stats import holm, mcnemar

    if reference not in by_defense:
        return f"No {reference} cell in this group: McNemar's test of {reference} vs the others is not applicable."
    tests: list[tuple[str, str, str, McNemarResult]] = []  # (other defence, seed, correctness, test)
    finished = [r for r in by_defense[reference] if r.get("status") == "finished"]
    unfinished = sorted({str(r.get("status")) for r in by_defense[reference]} - {"finished"})
    for reference_row in finished:
        try:
            mine = read_samples(results.path / reference_row["run_dir"], reference_row["eps"], reference_row["norm"])
        except RobustlabError as error:
            return f"McNemar's test not available: {error}"
        for defense, others in by_defense.items():
            other = next((r for r in others if r["seed"] == reference_row["seed"]), None)
            if defense == reference or other is None:
                continue
            try:
                theirs = read_samples(results.path / other["run_dir"], other["eps"], other["norm"])
            except RobustlabError:
                continue
            if not (
                mine["labels"].shape == theirs["labels"].shape and (mine["labels"] == theirs["labels"]).all()
            ):
                continue
            for what in ("clean", "worst_case"):
                key = f"correct:{what}"
                if key in mine and key in theirs:
                    tests.append((defense, str(reference_row["seed"]), what, mcnemar(mine[key][0], theirs[key][0])))
    if not tests and unfinished:
        return f"McNemar's test not available yet: the {reference} cell is {'/'.join(unfinished)}."
    if not tests:
        return f"McNemar's test not available: no other defence evaluated on the same test samples as {reference}."
    families: dict[tuple[str, str], list[int]] = {}
    for index, (_, seed, what, _) in enumerate(tests):
        families.setdefault((seed, what), []).append(index)
    adjusted: dict[int, float] = {}
    for members in families.values():
        adjusted.update(zip(members, holm([tests[i][3].p_value for i in members]), strict=True))
    rows = [
        [
            f"{reference} vs {defense}",
            seed,
            what.replace("_", " "),
            str(test.b),
            str(test.c),
            f"{test.statistic:.2f}",
            f"{test.p_value:.3g}",
            f"{adjusted[index]:.3g}",
            test.method,
        ]
        for index, (defense, seed, what, test) in enumerate(tests)
    ]
    return Table(
        [
            "comparison",
            "seed",
            "correctness",
            f"only {reference} right (b)",
            "only the other right (c)",
            "statistic",
            "p-value",
            "p (Holm)",
            "method",
        ],
        rows,
        caption="McNemar (1947) on paired per-sample correctness (first pass of a random defence). "
        "p (Holm): adjusted for the comparisons of one seed and correctness (Holm 1979); a difference is "
        "significant at 5% across the family only where it is below 0.05.",
    )


def _worst_case_text(stats: dict[str, dict[str, Any]]) -> str:
    """"worst case over fgsm, pgd-20, autoattack", and "UPPER BOUND" when any evaluation lacks AutoAttack."""
    over = list(dict.fromkeys(label for s in stats.values() for label in s.get("worst_case_over", [])))
    text = "worst case over " + (", ".join(over) or "the attacks run")
    if any("upper-bound" in s.get("strengths", []) for s in stats.values()):
        text += " (UPPER BOUND: no full AutoAttack)"
    return text


def group_section(
    results: Results,
    doc: Document,
    key: tuple[str, str, float, str],
    by_defense: dict[str, list[dict[str, Any]]],
    claims: dict[str, Any],
    index: int,
) -> None:
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
        note + " Worst case: a sample counts as robust only if every attack failed on it. "
        "Gap (clean - CW) is the paper's definition. * marks a claimed gap inconsistent with the "
        "claimed clean and CW numbers."
    )
    doc.add(table)
    doc.add(Heading("Table 2: training cost", 3))
    cost = table2(stats, claimed2)
    cost.caption = (
        "Ratios are to standard training measured in the same run of the grid (wall-clock time, so they "
        "carry the machine's load at the time). On CPU, peak memory is "
        "the training process's peak resident set size (cells train in separate processes)."
    )
    doc.add(cost)
    for reference, title in ((HYBRID, "hybrid vs each baseline"), (STANDARD, "each defence vs standard training")):
        doc.add(Heading(f"McNemar's test: {title}", 3))
        test = mcnemar_table(results, by_defense, reference)
        doc.add(test if isinstance(test, Table) else Paragraph(test))

    worst = _worst_case_text(stats)
    where = f"{norm} eps = {_eps_text(eps)}"
    confidences = {}
    for defense, rows in by_defense.items():
        entry = (rows[0].get("evaluation") or {}).get("worst_case")
        if entry and (entry.get("confidence") or {}).get("histogram"):
            confidences[defense] = entry["confidence"]
    if confidences:
        doc.add(
            Figure(
                f"{slug}-fig1-confidence",
                figures.confidence_figure(confidences, "the worst case", f"{dataset}/{model}, {where}: {worst}"),
                f"Figure 1: max-softmax confidence on the per-sample worst-case adversarial test images "
                f"({worst}; measured, first seed), {where}.",
            )
        )
    clean = {d: s["clean"] for d, s in stats.items()}
    robust = {d: s.get("worst_case") for d, s in stats.items()}
    if any(robust.values()):
        doc.add(
            Figure(
                f"{slug}-fig2-defenses",
                figures.defenses_figure(clean, robust, "worst case", f"{dataset}/{model}, {where}: {worst}"),
                f"Figure 2: clean and per-sample worst-case accuracy per defence ({worst}; measured; error bars: "
                "std over seeds).",
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
    by_model: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        by_model.setdefault((row["dataset"], row["model"]), []).append(row)
    for (dataset, model), members in by_model.items():
        curves: dict[str, tuple[list[float], list[float]]] = {}
        attack = None
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
                    curves[defense] = ([p[0] for p in points], [p[1] for p in points])
            attack = _worst_case_text(seen) if seen else None
            source = "one point per eps of the grid (each model trained at that eps), seed mean"
        else:
            for row in members:
                sweep = audit_sweep(results, row)
                if sweep:
                    curves[row["defense"]] = (sweep[0], sweep[1])
                    attack = attack or sweep[2]
            source = "the gradient-masking audit's sweep of one trained model over eps"
        if curves:
            doc.add(
                Figure(
                    f"{index:02d}-{dataset}-{model}-eps-curves",
                    figures.eps_curves_figure(curves, "the worst case" if len(grid_eps) > 1 else attack or "PGD",
                                              f"{dataset}/{model}: accuracy vs eps, {attack or 'PGD'}"),
                    f"Accuracy vs eps under {attack or 'PGD'} ({source}).",
                )
            )


def samples_text(rows: list[dict[str, Any]]) -> str:
    """Which test images the measured numbers are on, e.g. clean on all 10000, attacks on the first 1000."""
    from robustlab.evaluation import subset_text

    kinds = {(r.get("clean_n"), r.get("test_n"), r.get("test_of"), r.get("test_subset"))
             for r in rows if r.get("test_n")}
    parts = []
    for clean_n, n, of, name in sorted(kinds, key=str):
        attacked = subset_text({"n": n, "of": of, "subset": name}) + (f" ({name})" if name and name != "all" else "")
        if n != of and clean_n == of:
            parts.append(f"clean accuracy on all {of} test images; attacks, worst case and gaps on {attacked}")
        else:
            parts.append(f"every number on {attacked}")
    return ("Samples: " + "; ".join(parts) + ".") if parts else ""


def build_document(results_dir: str | Path) -> Document:
    """Assemble the whole report for a results directory."""
    results = load_results(results_dir)
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


# --- rendering ------------------------------------------------------------------------------------
def _md(text: str) -> str:
    """Text for markdown: raw HTML escaped, since viewers that render HTML in markdown would run it.

    Names and labels come from the experiment file (an experiment called ``<script>...</script>``);
    ``&lt;`` displays as ``<`` in every viewer.
    """
    return html.escape(text, quote=False)


def _md_cell(text: str) -> str:
    return _md(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: Document, figure_dir: str = "figures") -> str:
    lines = [f"# {_md(doc.title)}", ""]
    for block in doc.blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + _md(block.text), ""]
        elif isinstance(block, Paragraph):
            lines += [_md(block.text), ""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(map(_md_cell, block.header)) + " |")
            lines.append("|" + "---|" * len(block.header))
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
            lines += ["", *([f"_{_md(block.caption)}_", ""] if block.caption else [])]
        elif isinstance(block, Figure):
            caption = _md(block.caption)
            alt = caption.replace("[", "\\[").replace("]", "\\]")
            lines += [f"![{alt}]({figure_dir}/{block.name}.png)", "", f"_{caption}_", ""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0}td:first-child,td:nth-child(2){text-align:left}
tr.claimed{background:#fff6e0}figure{margin:1em 0}figcaption,.caption{font-size:12px;color:#555}
img{max-width:100%}
"""


def render_html(doc: Document) -> str:
    """One self-contained page: inline CSS, figures as base64 PNG data URIs, no script, no external URL."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(doc.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(doc.title)}</h1>",
    ]
    for block in doc.blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Table):
            parts.append(
                "<table><thead><tr>"
                + "".join(f"<th>{esc(h)}</th>" for h in block.header)
                + "</tr></thead><tbody>"
            )
            for row in block.rows:
                css = ' class="claimed"' if len(row) > 1 and row[1] == "claimed (paper)" else ""
                parts.append(f"<tr{css}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
            parts.append("</tbody></table>")
            if block.caption:
                parts.append(f'<p class="caption">{esc(block.caption)}</p>')
        elif isinstance(block, Figure):
            data = base64.b64encode(block.png).decode("ascii")
            parts.append(
                f'<figure><img alt="{esc(block.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(results_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md`` (+ ``figures/*.png``) and the self-contained ``report.html`` in ``results_dir``."""
    path = Path(results_dir)
    doc = build_document(path)
    for block in doc.blocks:
        if isinstance(block, Figure):
            atomic_write_bytes(path / "figures" / f"{block.name}.png", block.png)
    atomic_write_text(path / "report.md", render_markdown(doc))
    atomic_write_text(path / "report.html", render_html(doc))
    return {"markdown": path / "report.md", "html": path / "report.html", "figures": path / "figures"}
