"""``robustlab report RESULTS_DIR``: report.md and a self-contained report.html of an experiment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from robustlab.cli import app, console, example


@app.command(
    short_help="Write report.md and report.html of a results directory (claimed beside measured).",
    epilog=example(
        "robustlab report results/paper-mnist-quick",
        "robustlab report benchmarks/paper-cifar10-cpu --with benchmarks/paper-cifar10-cpu-seeds",
    ),
)
def report(
    results_dir: Annotated[Path, typer.Argument(help="a results directory written by robustlab experiment")],
    also: Annotated[
        list[Path] | None,
        typer.Option(
            "--with",
            help="another results directory of the same profile whose cells join the report (e.g. extra "
            "training seeds run as their own grid); repeatable. The report is written in RESULTS_DIR.",
        ),
    ] = None,
) -> None:
    """Write report.md and report.html: Tables 1-2 (claimed beside measured), figures, McNemar tests."""
    from robustlab.report import write_report

    paths = write_report(results_dir, also or ())
    console.print(f"report: {paths['markdown']} and {paths['html']} (figures in {paths['figures']})")
