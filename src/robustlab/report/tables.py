"""The report's tables for one (dataset, model, eps) group: Table 1 (accuracy), Table 2 (cost), McNemar.

Claimed rows (the paper's) come first, labelled ``claimed (paper)``; each measured row names the attacks
behind its numbers, and says so when they are an upper bound (no full AutoAttack).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from robustlab.report.data import ATTACK_COLUMNS, HYBRID, STANDARD, Results, Stat, audit_flagged
from robustlab.report.document import Table

if TYPE_CHECKING:
    from robustlab.stats import McNemarResult

#: The seed column of a McNemar row that tests all seeds at once.
POOLED = "pooled"


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


def _cost_ratio(stats: dict[str, Any], reference: dict[str, Any] | None, key: str) -> str:
    """``key``'s ratio to the reference defence's, seed by seed, averaged over the training seeds both
    have: another seed of the reference may have run at another time, load or code path."""
    if reference is None:
        return "-"
    mine, theirs = stats["cost_by_seed"], reference["cost_by_seed"]
    ratios = [mine[seed][key] / theirs[seed][key] for seed in mine
              if seed in theirs and mine[seed][key] is not None and theirs[seed][key]]
    return f"{sum(ratios) / len(ratios):.2f}x" if ratios else "-"


def _not_measured(stats: dict[str, Any]) -> str:
    """``not measured (cell running: 22/50 epochs)``: a defence with no finished cell, and how far it got."""
    progress = f": {', '.join(stats['progress'])}" if stats.get("progress") else ""
    return f"not measured (cell {'/'.join(stats['statuses'])}{progress})"


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
        trained = s["trained"]  # a trained cell's cost is known before its evaluation is
        source = "measured (robustlab)" if trained else _not_measured(s)
        if trained > s["seeds"]:
            source += f"; {trained - s['seeds']} of its cells still evaluating"
        if s.get("shared_training"):  # eps-independent training, run once for the grid's first eps
            source += f"; training shared with {', '.join(s['shared_training'])}"
        rows.append(
            [
                defense,
                source,
                _number(s["train_seconds"], unit=" s"),
                _number(s["seconds_per_epoch"], "{:.2f}"),
                _number(s["peak_memory_mb"], "{:.0f}", " MB"),
                _cost_ratio(s, reference, "train_seconds"),
                _cost_ratio(s, reference, "peak_memory_mb"),
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
    defence change anything at all?). Where both were trained with several seeds, a pooled row tests all
    seeds at once, each test image a cluster of its seeds' pairs (:func:`robustlab.stats.clustered_mcnemar`);
    the pooled rows form their own Holm family per correctness.
    """
    from robustlab.errors import RobustlabError
    from robustlab.evaluation import read_samples
    from robustlab.stats import clustered_mcnemar, holm, mcnemar

    if reference not in by_defense:
        return f"No {reference} cell in this group: McNemar's test of {reference} vs the others is not applicable."
    tests: list[tuple[str, str, str, McNemarResult, str]] = []  # (other defence, seed, correctness, test, family)
    paired: dict[tuple[str, str], list[tuple[str, Any, Any]]] = {}  # (defence, correctness) -> per seed
    images: dict[tuple[str, str], list[Any]] = {}  # the test images (indices) behind each seed's pair
    finished = [r for r in by_defense[reference] if r.get("status") == "finished"]
    unfinished = sorted({str(r.get("status")) for r in by_defense[reference]} - {"finished"})
    for reference_row in finished:
        try:
            mine = read_samples(results.path / reference_row["run_dir"], reference_row["eps"], reference_row["norm"])
        except RobustlabError as error:
            return f"McNemar's test not available: {error}"
        for defense, others in by_defense.items():
            other = next((r for r in others if r["seed"] == reference_row["seed"] and r.get("status") == "finished"),
                         None)
            if defense == reference or other is None:  # unfinished: its samples on disk may be being replaced
                continue
            try:
                theirs = read_samples(results.path / other["run_dir"], other["eps"], other["norm"])
            except RobustlabError:
                continue
            if not all(key in mine and key in theirs and mine[key].shape == theirs[key].shape
                       and (mine[key] == theirs[key]).all() for key in ("labels", "indices") if key in mine):
                continue  # not the same test images
            for what in ("clean", "worst_case"):
                key = f"correct:{what}"
                if what == "worst_case" and reference_row.get("strength") != other.get("strength"):
                    continue  # an upper bound against an AutoAttack-grade worst case compares the attacks
                if key in mine and key in theirs:
                    seed = str(reference_row["seed"])
                    tests.append((defense, seed, what, mcnemar(mine[key][0], theirs[key][0]), seed))
                    paired.setdefault((defense, what), []).append((seed, mine[key][0], theirs[key][0]))
                    images.setdefault((defense, what), []).append(mine.get("indices", mine["labels"]))
    for (defense, what), seeds in paired.items():
        first, *others = images[(defense, what)]
        same_images = all(o.shape == first.shape and (o == first).all() for o in others)
        if len(seeds) > 1 and same_images:  # a cluster is one test image across the seeds
            pooled = clustered_mcnemar([m for _, m, _ in seeds], [t for _, _, t in seeds])
            label = f"{POOLED} ({', '.join(seed for seed, _, _ in seeds)})"
            tests.append((defense, label, what, pooled, POOLED))
    if not tests and unfinished:
        return f"McNemar's test not available yet: the {reference} cell is {'/'.join(unfinished)}."
    if not tests:
        return f"McNemar's test not available: no other defence evaluated on the same test samples as {reference}."
    families: dict[tuple[str, str], list[int]] = {}
    for index, (_, _, what, _, family) in enumerate(tests):
        families.setdefault((family, what), []).append(index)
    adjusted: dict[int, float] = {}
    for members in families.values():
        adjusted.update(zip(members, holm([tests[i][3].p_value for i in members]), strict=True))
    rows = [
        [
            f"{audit_flagged(reference, by_defense[reference])} vs {audit_flagged(defense, by_defense[defense])}",
            seed,
            what.replace("_", " "),
            str(test.b),
            str(test.c),
            f"{test.statistic:.2f}",
            f"{test.p_value:.3g}",
            f"{adjusted[index]:.3g}",
            test.method,
        ]
        for index, (defense, seed, what, test, _) in enumerate(tests)
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
        caption="McNemar (1947) on paired per-sample correctness (first pass of a random defence); worst cases "
        "only between evaluations of the same strength (AutoAttack-grade or upper bound). "
        "p (Holm): adjusted for the comparisons of one seed and correctness (Holm 1979); a difference is "
        "significant at 5% across the family only where it is below 0.05. Pooled rows test every seed "
        "together, each test image one cluster of its seeds' pairs (Durkalski et al. 2003; b and c are "
        "summed over the seeds; with fewer than 25 discordant pairs the exact sign-flip test of those "
        "clusters, method clustered-exact), and are adjusted as one family per correctness.",
    )
