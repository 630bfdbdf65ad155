"""``robustlab audit RUN_DIR``: the gradient-masking checklist of :mod:`robustlab.audit` as a table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from robustlab.cli import app, console, example

_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red"}


@app.command(
    short_help="Gradient-masking checklist of a run: pass / warn / fail with the evidence.",
    epilog=example("robustlab audit runs/digits-hybrid --n 200 --strict"),
)
def audit(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by robustlab train")],
    strict: Annotated[bool, typer.Option(help="exit with status 1 when any check fails")] = False,
    n: Annotated[int, typer.Option("--n", "--samples", min=1, help="test images audited")] = 500,
    eps: Annotated[str | None, typer.Option(help="budget in pixels, e.g. 0.3 (default: the run's)")] = None,
    steps: Annotated[int, typer.Option(min=1, help="PGD steps of the reference white-box attack")] = 20,
    queries: Annotated[int, typer.Option(min=1, help="Square attack queries per image")] = 1000,
    surrogate: Annotated[bool, typer.Option(help="train a standard model for the transfer attack")] = True,
    seed: Annotated[int, typer.Option(help="seed of every random start and of the surrogate")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="images attacked at once")] = 256,
    overwrite: Annotated[bool, typer.Option(help="audit again and replace an existing audit.json")] = False,
) -> None:
    """Check that the run's robustness is not an artefact of gradient masking; writes RUN_DIR/audit.json.

    An existing audit.json is only replaced with --overwrite; an interrupted audit resumes.

    Under ``torchrun`` each rank attacks its share of the batches and rank 0 prints and writes
    (``--samples`` is ``--n``, which torchrun would read as one of its own options).
    """
    from robustlab.audit import audit_run
    from robustlab.config import parse_number
    from robustlab.distributed import from_environment
    from robustlab.validation import check_eps

    budget = None if eps is None else check_eps(parse_number(eps), "l2", "--eps")
    report = audit_run(
        run_dir, n=n, eps=budget, steps=steps, square_queries=queries, surrogate=surrogate, seed=seed, device=device,
        batch_size=batch_size, progress=True, overwrite=overwrite,
    )
    if from_environment().is_main:  # under torchrun rank 0 speaks for every rank
        settings = report.settings
        table = Table(title=f"audit of {run_dir}: {settings['norm']} eps={settings['eps']:g}, n={settings['n']}")
        table.add_column("check")
        table.add_column("status")
        table.add_column("evidence", overflow="fold")
        for check in report.checks:
            table.add_row(check.name, Text(check.status, style=_STYLE[check.status]), Text(check.message))
        console.print(table)
        console.print(f"verdict: [{_STYLE[report.verdict]}]{report.verdict}[/] -> {Path(run_dir) / 'audit.json'}")
    if strict and report.verdict == "fail":
        raise SystemExit(1)
