"""``robustlab experiment CONFIG``: run a grid of runs (resumable), evaluate them, then write the report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from robustlab.cli import SetOpt, app, console

ConfigPath = Annotated[Path, typer.Argument(help="experiment YAML: base config, grid axes, evaluation")]
ProfileOpt = Annotated[str | None, typer.Option(help="paper (the paper's settings) or quick (2 CPU cores)")]
OutOpt = Annotated[Path | None, typer.Option(help="results directory (default results/NAME[-PROFILE])")]


@app.command()
def experiment(
    config: ConfigPath,
    profile: ProfileOpt = None,
    out: OutOpt = None,
    data_dir: Annotated[str | None, typer.Option(help="dataset root for every cell")] = None,
    set_: SetOpt = None,
    report: Annotated[bool, typer.Option(help="write report.md / report.html when the grid is done")] = True,
    progress: Annotated[bool, typer.Option(help="show per-cell progress bars")] = False,
    isolate: Annotated[bool, typer.Option(help="train each cell in its own process")] = True,
) -> None:
    """Train, evaluate and audit every cell of a grid; finished cells are skipped, unfinished ones resume."""
    from robustlab.errors import RobustlabError
    from robustlab.experiments import load_experiment, run_experiment

    spec = load_experiment(config)
    out = out or Path("results") / (spec.name + (f"-{profile}" if profile else ""))
    result = run_experiment(
        spec,
        out,
        profile=profile,
        data_dir=data_dir,
        overrides=list(set_ or []),
        progress=progress,
        isolate=isolate,
        log=lambda line: console.print(line, markup=False, highlight=False),
    )
    console.print(
        f"{len(result.ran)} cell(s) run, {len(result.skipped)} already done, {len(result.failed)} failed "
        f"in {result.seconds:.0f}s -> {out / 'results.csv'}"
    )
    if report:
        from robustlab.report import write_report

        paths = write_report(out)
        console.print(f"report: {paths['markdown']} and {paths['html']}")
    if result.failed:
        first, message = next(iter(result.failed.items()))
        raise RobustlabError(f"{len(result.failed)} cell(s) failed; first: {first}: {message}")
