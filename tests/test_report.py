"""``robustlab report``: tables claimed beside measured, figures, McNemar, self-contained HTML (in a real browser)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from robustlab.defenses import DEFENSES
from robustlab.errors import CheckpointError
from robustlab.experiments import load_experiment, run_experiment
from robustlab.report import load_claims, write_report
from robustlab.report.build import table1
from robustlab.report.data import Stat

DEFENCES = [d for d in ("standard", "hybrid") if d in DEFENSES]


def _digits_grid(name: str, seeds: list[int]) -> dict:
    return {
        "name": name,
        "base": {
            "data": {"dataset": "digits", "val_size": 100, "train_subset": 400, "test_subset": 60},
            "train": {"epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0,
                      "val_robust_size": 50, "val_attack_steps": 2},
            "threat": {"eps": 0.1},
        },
        "grid": {"defenses": DEFENCES, "eps": [0.1], "seeds": seeds},
        "evaluation": {"attacks": ["fgsm", "pgd-3", "cw_linf-3"], "suite": "quick", "audit": False},
    }


def _by_defense(results) -> dict[str, list]:
    """The rows of the digits grid's one (dataset, model, eps) group, by defence, as the report groups them."""
    from robustlab.report.data import grouped

    (by_defense,) = grouped(results.rows).values()
    return by_defense


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    """A finished 2-seed digits grid (standard, and hybrid when registered), evaluated with 3 attacks."""
    out = tmp_path_factory.mktemp("experiment") / "results"
    spec = _digits_grid("report-test", [0, 1])
    result = run_experiment(load_experiment(spec), out, log=lambda line: None, isolate=False)
    assert not result.failed
    write_report(out)
    return out


def test_report_tables_name_their_attacks_and_average_seeds(results_dir):
    text = (results_dir / "report.md").read_text()
    assert "Table 1: accuracy under attack" in text and "Table 2: training cost" in text
    measured = [line for line in text.splitlines() if "measured (robustlab, attack=" in line]
    assert len(measured) == len(DEFENCES)
    for line in measured:
        assert "FGSM=fgsm" in line and "PGD=pgd-3" in line and "CW=cw_linf-3" in line
        assert " ± " in line, "two seeds must be shown as mean ± std"
        assert line.rstrip(" |").endswith("| 2"), "seed count column"
        assert "UPPER BOUND on robustness: no full AutoAttack ran" in line, "the quick suite says what it is"
    assert "| claimed (paper) |" not in text, "digits is not in the paper: no claimed rows may be invented"
    rows = json.loads((results_dir / "results.json").read_text())["rows"]
    clean = [r["clean"] for r in rows if r["defense"] == DEFENCES[0]]
    assert f"{100 * sum(clean) / 2:.1f} ± " in text


def test_report_adds_up_what_the_finished_cells_cost(results_dir):
    from robustlab.report.build import compute_text

    rows = json.loads((results_dir / "results.json").read_text())["rows"]
    assert all(r["evaluation_seconds"] > 0 for r in rows)
    hours = sum(r["train_seconds"] + r["evaluation_seconds"] for r in rows) / 3600
    assert f"Compute: the {len(rows)} finished cell(s) took {hours:.1f} h" in (results_dir / "report.md").read_text()
    timed = [{"train_seconds": 3600, "evaluation": {"seconds": 7200}, "audit_verdict": "pass", "audit_seconds": 1800},
             {"train_seconds": 3600, "evaluation": {"seconds": 3600}, "audit_verdict": "warn", "audit_seconds": None},
             {"train_seconds": 3600, "training_shared_with": "the first", "evaluation": {"seconds": 0}}]
    assert compute_text(timed) == (
        "Compute: the 3 finished cell(s) took 5.5 h of wall time summed over cells (training 2.0 h, evaluation "
        "3.0 h, audit 0.5 h; core-hours when each cell ran one thread), not counting 1 audit time(s) not recorded."
    )


def test_report_names_no_path_of_the_machine_that_wrote_it(results_dir):
    """A committed report must read the same on every machine: no absolute path, not even the paper file's."""
    for name in ("report.md", "report.html"):
        text = (results_dir / name).read_text()
        assert str(results_dir) not in text and str(Path.home()) not in text
        assert not re.search(r"(?<![\w.])/(work|home|tmp|root|Users)/", text), name
    assert not re.search(r"/[a-z]+/", load_claims()["source"])


def test_report_figures_and_mcnemar(results_dir):
    text = (results_dir / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", text)
    assert any("fig1-confidence" in f for f in figures) and any("fig2-defenses" in f for f in figures)
    assert any("curves" in f for f in figures)
    captions = [line for line in text.splitlines() if line.startswith("_Figure 2")]
    assert captions and all("worst case over fgsm, pgd-3, cw_linf-3 (UPPER BOUND" in c for c in captions)
    for figure in figures:
        assert (results_dir / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if "hybrid" in DEFENCES:
        assert "| hybrid vs standard | 0 | clean |" in text and "| hybrid vs standard | 1 | worst case |" in text
        assert "| standard vs hybrid | 0 | clean |" in text, "each defence is also tested against standard training"


@pytest.mark.skipif("hybrid" not in DEFENCES, reason="hybrid is not registered")
def test_mcnemar_holm_adjusts_within_one_seed_and_correctness(results_dir):
    """Two copies of the hybrid against standard: each (seed, correctness) family, and each pooled one,
    holds two equal tests, so Holm doubles their p-value (capped at 1); a family spanning seeds or
    correctness would not."""
    from robustlab.report.build import mcnemar_table
    from robustlab.report.data import load_results

    results = load_results(results_dir)
    by_defense = _by_defense(results)
    by_defense["hybrid copy"] = by_defense["hybrid"]
    table = mcnemar_table(results, by_defense, reference="standard")
    p_raw, p_holm = table.header.index("p-value"), table.header.index("p (Holm)")
    assert len(table.rows) == 2 * 3 * 2, "2 others x (2 seeds + pooled) x clean/worst case"
    assert any(float(row[p_raw]) < 0.5 for row in table.rows), "every p-value is too large to show the doubling"
    for row in table.rows:
        assert float(row[p_holm]) == pytest.approx(min(1.0, 2 * float(row[p_raw])), rel=1e-2)


@pytest.mark.skipif("hybrid" not in DEFENCES, reason="hybrid is not registered")
def test_mcnemar_skips_an_unfinished_hybrid_cell_and_says_so_when_none_is_finished(results_dir):
    from robustlab.report.build import mcnemar_table
    from robustlab.report.data import load_results

    results = load_results(results_dir)
    by_defense = _by_defense(results)
    by_defense["hybrid"][1] = {**by_defense["hybrid"][1], "status": "running"}
    rows = mcnemar_table(results, by_defense).rows
    assert {r[1] for r in rows} == {"0"}, "the finished seed's test was dropped, or the running one's kept"
    by_defense["hybrid"][0] = {**by_defense["hybrid"][0], "status": "pending"}
    assert mcnemar_table(results, by_defense) == "McNemar's test not available yet: the hybrid cell is pending/running."


def test_mcnemar_pairs_only_finished_cells_on_the_same_test_images(results_dir, tmp_path):
    """A cell being evaluated again still has its previous samples on disk: it is not compared until it is
    done. Nor is a cell evaluated on other test images, even with the same labels."""
    from robustlab.report.build import mcnemar_table
    from robustlab.report.data import load_results

    out = tmp_path / "pairs"
    shutil.copytree(results_dir, out)
    results = load_results(out)
    by_defense = _by_defense(results)
    reference = "hybrid" if "hybrid" in by_defense else "standard"
    other = next(d for d in by_defense if d != reference)
    by_defense[other][1] = {**by_defense[other][1], "status": "evaluating"}
    assert {r[1] for r in mcnemar_table(results, by_defense, reference).rows} == {"0"}
    pooled = [r for r in mcnemar_table(results, {**by_defense, other: [by_defense[other][0], {
        **by_defense[other][1], "status": "finished"}]}, reference).rows if r[1].startswith("pooled")]
    assert pooled, "both seeds on the same images: pooled"

    def shift_images(row):  # the same labels, other test images
        samples = next((out / row["run_dir"] / "evaluation").glob("*.npz"))
        arrays = dict(np.load(samples))
        arrays["indices"] = arrays["indices"] + 1
        np.savez(samples, **arrays)

    for defense in (reference, other):  # seed 1 of both on other images: each seed pairs, the seeds do not pool
        shift_images(by_defense[defense][1])
    by_defense[other][1] = {**by_defense[other][1], "status": "finished"}
    rows = mcnemar_table(results, by_defense, reference).rows
    assert {r[1] for r in rows} == {"0", "1"}, "no pooled row over seeds evaluated on different images"
    shift_images(by_defense[other][0])
    assert {r[1] for r in mcnemar_table(results, by_defense, reference).rows} == {"1"}


def test_mcnemar_compares_worst_cases_only_of_evaluations_of_the_same_strength(results_dir):
    from robustlab.report.build import mcnemar_table
    from robustlab.report.data import load_results

    results = load_results(results_dir)
    by_defense = _by_defense(results)
    reference = "hybrid" if "hybrid" in by_defense else "standard"
    other = next(d for d in by_defense if d != reference)
    by_defense[other][0] = {**by_defense[other][0], "strength": "autoattack-grade"}  # the reference: upper bound
    rows = mcnemar_table(results, by_defense, reference).rows
    seed0 = {r[2] for r in rows if r[1] == "0"}
    assert seed0 == {"clean"}, "an upper bound against an AutoAttack-grade worst case is not a paired test"
    assert {r[2] for r in rows if r[1] == "1"} == {"clean", "worst case"}


@pytest.mark.skipif("hybrid" not in DEFENCES, reason="hybrid is not registered")
def test_table2_says_when_cells_trained_with_different_execution_settings(results_dir, tmp_path):
    """channels_last does not change what a cell trains, so a grid keeps cells trained without it; their
    wall-clock times then compare different code paths, and Table 2 must say which cells ran how."""
    assert "execution settings" not in (results_dir / "report.md").read_text(), "every cell ran alike"
    out = tmp_path / "results"
    shutil.copytree(results_dir, out)
    for config in (out / "runs").glob(f"*-{DEFENCES[0]}-*/config.yaml"):
        config.write_text(config.read_text().replace("channels_last: false", "channels_last: true"))
    write_report(out)
    text = (out / "report.md").read_text()
    assert f"compares code paths (channels_last=True: {DEFENCES[0]}" in text


def test_report_with_a_seeds_grid_averages_every_seed_and_pools_mcnemar(results_dir, tmp_path, capsys):
    """Seed 2 run as a grid of its own joins seeds 0 and 1: the tables average three seeds, and a pooled
    (clustered) McNemar row sums the per-seed discordant counts."""
    main = tmp_path / "main"
    shutil.copytree(results_dir, main)
    seeds = tmp_path / "seeds"
    result = run_experiment(load_experiment(_digits_grid("report-seeds", [2])), seeds, log=lambda line: None,
                            isolate=False)
    assert not result.failed
    from robustlab.cli import main as robustlab

    def report(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            robustlab(["report", *argv])
        except SystemExit as exit_:
            return int(exit_.code or 0), capsys.readouterr().err
        return 0, capsys.readouterr().err

    assert report(str(main), "--with", str(seeds)) == (0, "")
    text = (main / "report.md").read_text()
    assert "report-test + report-seeds" in text
    measured = [line for line in text.splitlines() if "measured (robustlab, attack=" in line]
    assert measured and all(line.rstrip(" |").endswith("| 3") for line in measured), "three seeds per defence"
    for what in ("clean", "worst case"):
        rows = [line.split("|")[1:-1] for line in text.splitlines()
                if line.startswith("| hybrid vs standard |") and f"| {what} |" in line]
        per_seed = [r for r in rows if r[1].strip() in ("0", "1", "2")]
        pooled = [r for r in rows if r[1].strip() == "pooled (0, 1, 2)"]
        assert len(per_seed) == 3 and len(pooled) == 1, rows
        assert int(pooled[0][3]) == sum(int(r[3]) for r in per_seed)
        assert int(pooled[0][4]) == sum(int(r[4]) for r in per_seed)
        assert pooled[0][-1].strip() in ("clustered", "clustered-exact"), "exact below 25 discordant pairs"
    assert str(tmp_path) not in text, "the other directory is named relative to the report's"

    status, error = report(str(main), "--with", str(main))
    assert status == 2 and "is in both" in error and error.count("\n") == 1
    summary = json.loads((seeds / "results.json").read_text())
    (seeds / "results.json").write_text(json.dumps({**summary, "profile": "quick"}))
    status, error = report(str(main), "--with", str(seeds))
    assert status == 2 and "cannot mix profiles" in error


def test_html_is_self_contained(results_dir):
    page = (results_dir / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"(href|src)=\"(https?:|//|file:)", page) and "<script" not in page
    assert page.count("<img") == (results_dir / "report.md").read_text().count("![")


def test_claimed_rows_are_labelled_and_taken_from_the_paper():
    claims = load_claims()
    mnist = [r for r in claims["table1"]["rows"] if r["dataset"] == "mnist"]
    stat = Stat(0.5, None, 1)
    stats = {"hybrid": {"clean": stat, "pgd": stat, "worst_case": stat, "gap_worst_case": stat, "gap_cw": None,
                        "attack_labels": {"pgd": "pgd-20"}, "audit": [], "seeds": 1, "failed": [],
                        "statuses": ["finished"]}}
    table = table1(stats, mnist)
    sources = [r[1] for r in table.rows]
    assert sources == ["claimed (paper)", "claimed (paper)", "measured (robustlab, attack=PGD=pgd-20)"]
    assert table.rows[1][:3] == ["LeNet-5 + Hybrid (hybrid)", "claimed (paper)", "99.1"]


def test_unmeasured_rows_say_how_far_their_cells_got():
    empty = {"seeds": 0, "failed": [], "attack_labels": {}, "audit": [], "statuses": ["running"],
             "progress": ["22/50 epochs"]}
    empty.update({k: None for k in ("clean", "pgd", "worst_case", "gap_worst_case", "gap_cw")})
    assert table1({"pgd_at": empty}, []).rows[0][1] == "not measured (cell running: 22/50 epochs)"


def test_table2_shows_the_cost_of_a_cell_trained_but_still_evaluating():
    from robustlab.report.data import seed_stats
    from robustlab.report.tables import table2

    rows = {"standard": [{"status": "finished", "seed": 0, "train_seconds": 100.0, "peak_memory_mb": 1000.0,
                          "device": "cpu"}],
            "hybrid": [{"status": "evaluating", "seed": 0, "train_seconds": 300.0, "peak_memory_mb": 1200.0,
                        "device": "cpu"}],
            "pgd_at": [{"status": "running", "seed": 0, "epochs_done": 3, "epochs": 20}]}
    table = table2({d: seed_stats(r) for d, r in rows.items()}, [])
    hybrid, pgd_at = table.rows[1], table.rows[2]
    assert hybrid[1] == "measured (robustlab); 1 of its cells still evaluating"
    assert hybrid[2] == "300.0 s" and hybrid[5] == "3.00x" and hybrid[6] == "1.20x"
    assert pgd_at[1] == "not measured (cell running: 3/20 epochs)" and pgd_at[2] == "-"
    assert table1({d: seed_stats(r) for d, r in rows.items()}, []).rows[1][1] == "not measured (cell evaluating)"


def test_table2_ratios_pair_each_seed_with_standard_training_of_the_same_seed():
    """Standard training's seeds 1 and 2 ran elsewhere (faster): a defence trained with seed 0 only is
    compared with standard's seed 0, not with the mean of all three."""
    from robustlab.report.data import seed_stats
    from robustlab.report.tables import table2

    def cell(seed, seconds, memory):
        return {"status": "finished", "seed": seed, "train_seconds": seconds, "peak_memory_mb": memory,
                "device": "cpu"}

    rows = {"standard": [cell(0, 1000.0, 100.0), cell(1, 500.0, 100.0), cell(2, 500.0, 100.0)],
            "trades": [cell(0, 2000.0, 150.0)],
            "hybrid": [cell(0, 3000.0, 200.0), cell(1, 1000.0, 100.0)],
            "mart": [cell(5, 2000.0, 100.0)]}
    table = {row[0]: row for row in table2({d: seed_stats(r) for d, r in rows.items()}, []).rows}
    assert (table["trades"][5], table["trades"][6]) == ("2.00x", "1.50x")  # not 2000 / 667 = 3.00x
    assert (table["hybrid"][5], table["hybrid"][6]) == ("2.50x", "1.50x")  # (3 + 2) / 2 and (2 + 1) / 2
    assert table["mart"][5] == "-", "no seed in common: no ratio"


def test_table1_says_which_audits_are_still_to_come():
    from robustlab.report.data import seed_stats

    row = {"status": "finished", "clean": 0.9, "worst_case": 0.1}
    audited = seed_stats([{**row, "audit_verdict": "pass"}, {**row, "audit_pending": True}])
    assert audited["audit"] == ["pass", "pending"]
    assert table1({"standard": audited}, []).rows[0][-2] == "pass/pending"


def test_paper_claims_transcription_is_internally_consistent():
    """Paper Table 1 defines gap = clean - CW; every row satisfies it except the one the JSON flags."""
    claims = load_claims()
    for row in claims["table1"]["rows"]:
        consistent = abs(row["clean"] - row["cw"] - row["gap"]) < 0.05
        assert consistent != bool(row.get("note")), row["label"]
        assert row["clean"] >= row["fgsm"] >= row["pgd"] >= row["cw"]
    assert len(claims["table1"]["rows"]) == len(claims["table2"]["rows"]) == 6


def test_report_of_a_missing_results_dir_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no results.json"):
        write_report(tmp_path)


# --- the HTML page in a real headless browser -----------------------------------------------------
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

#: Injected first into a copy of the page: records errors and console.error calls, then on load writes
#: the number of images and the broken ones into the DOM that --dump-dom prints.
PROBE = """<script>
window.__rl = [];
window.addEventListener('error', e => __rl.push('error: ' + (e.message || (e.target && e.target.src) || e)), true);
const __ce = console.error; console.error = (...a) => { __rl.push('console.error: ' + a.join(' ')); __ce(...a); };
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const out = {n: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
               widths: imgs.map(i => i.naturalWidth), errors: __rl};
  const pre = document.createElement('pre'); pre.id = 'rl-probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium): "
                    "headless-browser check of report.html skipped")
def test_html_report_renders_in_headless_chromium(results_dir, tmp_path):
    page = (results_dir / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    match = re.search(r'<pre id="rl-probe">(.*?)</pre>', done.stdout, re.S)
    assert match, f"the page did not finish loading; stderr: {done.stderr[-2000:]}"
    result = json.loads(html.unescape(match.group(1)))
    assert result["n"] == page.count("<img") > 0
    assert result["broken"] == [] and min(result["widths"]) > 0, result
    assert result["errors"] == [], result["errors"]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Failed to load resource" in line]
    assert console == [], console


# --- hostile names and damaged files -------------------------------------------------------------
def test_report_markdown_escapes_raw_html(tmp_path):
    """An experiment named ``<script>alert(1)</script>`` and a defence labelled ``<img src=x onerror=...>``
    appeared verbatim in report.md (report.html was already escaped)."""
    out = tmp_path / "results"
    spec = {
        "name": "<script>alert(1)</script>",
        "base": {"data": {"dataset": "digits", "val_size": 50, "train_subset": 128, "test_subset": 30},
                 "train": {"epochs": 1, "batch_size": 64}, "threat": {"eps": 0.1}},
        "grid": {"defenses": [{"name": "standard", "label": "<img src=x onerror=alert(4)>"}]},
        "evaluation": {"attacks": ["fgsm"], "audit": False},
    }
    run_experiment(load_experiment(spec), out, log=lambda line: None, isolate=False)
    markdown = write_report(out)["markdown"].read_text()
    assert "<script" not in markdown and "<img" not in markdown
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in markdown and "&lt;img src=x onerror=alert(4)&gt;" in markdown
    page = (out / "report.html").read_text()
    assert "<script" not in page and "<img src=x" not in page


@pytest.mark.parametrize(
    ("name", "content", "field"),
    [("metrics.json", "[]", "(top level)"),
     ("metrics.json", '{"evaluations": {"linf-0.1": "x"}}', "evaluations.linf-0.1"),
     ("audit.json", '{"checks": "x"}', "checks")],
)
def test_report_on_a_damaged_cell_file_names_it(results_dir, tmp_path, name, content, field):
    """Each was a traceback (AttributeError / TypeError) while building the report."""
    copy = tmp_path / "results"
    shutil.copytree(results_dir, copy)
    target = next((copy / "runs").iterdir()) / name
    target.write_text(content)
    try:
        write_report(copy)
    except CheckpointError as error:
        message = str(error)
    else:  # the report is written, and says which file it could not use
        message = (copy / "report.md").read_text()
    assert f"corrupt {target}: {field}" in message


def test_figures_and_comparisons_flag_an_audit_failure_and_draw_no_unmeasured_defence(results_dir, tmp_path):
    """A defence whose audit failed is named so in Figure 2 and in McNemar's rows; a defence without a
    measured worst case gets no bar (a 0% bar would read as measured) and the caption says so."""
    out = tmp_path / "flagged"
    shutil.copytree(results_dir, out)
    summary = json.loads((out / "results.json").read_text())
    for row in summary["rows"]:
        if row["defense"] == "standard":
            row["audit_verdict"] = "fail"
    summary["rows"].append({**summary["rows"][0], "defense": "pgd_at", "cell": "pgd_at-cell", "status": "pending",
                            "clean": None, "worst_case": None, "evaluation": None, "audit_verdict": None})
    (out / "results.json").write_text(json.dumps(summary))
    write_report(out)
    text = (out / "report.md").read_text()
    assert "Not measured yet, so not drawn: pgd_at." in text
    comparisons = [line.split("|")[1].strip() for line in text.splitlines()
                   if line.startswith("| ") and " vs " in line.split("|")[1]]
    assert comparisons and all("standard [audit fail]" in c for c in comparisons if "standard" in c)


def test_samples_paragraph_of_rows_that_do_not_record_the_test_size():
    from robustlab.report.build import samples_text

    rows = [{"test_n": 1000, "test_of": None, "clean_n": None, "test_subset": None}]
    assert samples_text(rows) == "Samples: every number on 1000 test images."


def test_table1_says_when_its_gaps_are_not_the_difference_of_its_columns():
    from robustlab.report.build import _gap_note

    attacked_subset = {"hybrid": [{"clean_n": 10000, "test_n": 1000}], "standard": [{"clean_n": 10000, "test_n": 1000}]}
    assert "covers all 10000 test images; both gaps are taken on the attacked images" in _gap_note(attacked_subset)
    assert _gap_note({"hybrid": [{"clean_n": 1000, "test_n": 1000}]}) == ""
    assert _gap_note({"hybrid": [{"clean_n": None, "test_n": 1000}]}) == "", "an older row says nothing of it"
