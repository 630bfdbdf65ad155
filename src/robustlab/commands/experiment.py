"""``robustlab experiment CONFIG``: run a grid of runs (resumable), evaluate them, then write the report."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Annotated

import typer

from robustlab.cli import SetOpt, app, console, example

ConfigPath = Annotated[Path, typer.Argument(help="experiment YAML: base config, grid axes, evaluation")]
ProfileOpt = Annotated[
    str | None,
    typer.Option(help="a profile of the config: paper (the paper's settings), quick (a smoke run), cpu (2 CPU cores)"),
]
OutOpt = Annotated[Path | None, typer.Option(help="results directory (default results/NAME[-PROFILE])")]
WorkersOpt = Annotated[
    int, typer.Option(min=1, help="processes sharing the grid (each with its own GPU when several are visible)")
]
WaitOpt = Annotated[
    bool,
    typer.Option(help="at the end, wait for cells other processes are running and take over any they leave "
                 "(--no-wait: leave them to their owners and stop)"),
]
ReevaluateOpt = Annotated[
    str | None,
    typer.Option(help="evaluate again the cells evaluated before this moment: an ISO 8601 time (UTC unless it "
                 "says otherwise) or a git commit (its commit time), e.g. the fix of an attack; training and "
                 "audit are kept, and a rerun skips the cells already evaluated again"),
]
OnlyOpt = Annotated[
    list[str] | None,
    typer.Option(help="run only the cells matching AXIS=VALUE[,VALUE...] (repeatable; e.g. eps=0.3)"),
]


@app.command(
    short_help="Run a grid of runs (train, evaluate, audit; resumable), then write its report.",
    epilog=example("robustlab experiment configs/paper/mnist.yaml --profile quick --data-dir ../shared/data"),
)
def experiment(
    config: ConfigPath,
    profile: ProfileOpt = None,
    out: OutOpt = None,
    data_dir: Annotated[str | None, typer.Option(help="dataset root for every cell")] = None,
    set_: SetOpt = None,
    report: Annotated[bool, typer.Option(help="write report.md / report.html when the grid is done")] = True,
    progress: Annotated[
        bool,
        typer.Option(help="report each cell's epochs, attacks and audit as they go (bars on a terminal, lines in a "
                     "log; several workers print lines, each prefixed with its worker)"),
    ] = True,
    isolate: Annotated[bool, typer.Option(help="train each cell in its own process")] = True,
    workers: WorkersOpt = 1,
    only: OnlyOpt = None,
    wait: WaitOpt = True,
    reevaluate_before: ReevaluateOpt = None,
) -> None:
    """Train, evaluate and audit every cell of a grid; finished cells are skipped, unfinished ones resume.

    CONFIG holds a base run config, grid axes (datasets, models, defenses, eps, seeds), evaluation
    settings and optional profiles. Each cell is a run directory under OUT/runs/; the table goes to
    OUT/results.csv and the report to OUT/report.md and OUT/report.html.
    """
    from robustlab.errors import RobustlabError
    from robustlab.experiments import load_experiment, plan_experiment, run_experiment, select_cells, slug

    spec = load_experiment(config)
    moment = None if reevaluate_before is None else _moment(reevaluate_before)
    out = out or Path("results") / slug(spec.name + (f"-{profile}" if profile else ""), keep="-")
    overrides = list(set_ or [])
    if workers > 1:
        plan = plan_experiment(spec, out, profile=profile, data_dir=data_dir, overrides=overrides)
        select_cells(plan, only)  # a bad config or filter fails once, early
        forwarded = [*(["--profile", profile] if profile else []), *(["--data-dir", data_dir] if data_dir else [])]
        forwarded += [arg for value in overrides for arg in ("--set", value)]
        forwarded += [arg for value in only or [] for arg in ("--only", value)]
        forwarded += ["--progress" if progress else "--no-progress", "--isolate" if isolate else "--no-isolate"]
        forwarded += ["--wait" if wait else "--no-wait"]
        forwarded += ["--reevaluate-before", reevaluate_before] if reevaluate_before is not None else []
        failed = _run_workers(config, out, workers, forwarded)
        error = f"{failed} of {workers} worker(s) failed; their errors are printed above" if failed else None
    else:
        result = run_experiment(
            spec,
            out,
            profile=profile,
            data_dir=data_dir,
            overrides=overrides,
            progress=progress,
            isolate=isolate,
            only=only,
            wait_for_locked=wait,
            reevaluate_before=moment,
            log=lambda line: console.print(line, markup=False, highlight=False),
        )
        console.print(
            f"{len(result.ran)} cell(s) run, {len(result.skipped)} already done, {len(result.failed)} failed"
            + (f", {len(result.left)} left to other processes" if result.left else "")
            + f" in {result.seconds:.0f}s -> {out / 'results.csv'}"
        )
        first = next(iter(result.failed.items()), None)
        error = f"{len(result.failed)} cell(s) failed; first: {first[0]}: {first[1]}" if first else None
    if report:  # also for a partly failed grid: the finished cells are worth reading
        from robustlab.report import write_report

        paths = write_report(out)
        console.print(f"report: {paths['markdown']} and {paths['html']}")
    if error:
        raise RobustlabError(error)


def _moment(value: str) -> float:
    """The Unix time of an ISO 8601 date / time (UTC unless it names a zone) or of a git commit."""
    import subprocess
    from datetime import datetime, timezone

    from robustlab.errors import ConfigError

    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        try:
            done = subprocess.run(["git", "show", "-s", "--format=%ct", value], capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.SubprocessError):
            done = None
        if done is None or done.returncode != 0 or not done.stdout.strip().isdigit():
            raise ConfigError(f"--reevaluate-before: '{value}' is neither an ISO 8601 time (2026-12-04T17:00) "
                              "nor a git commit of this repository") from None
        return float(done.stdout.strip())
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _run_workers(config: Path, out: Path, workers: int, forwarded: list[str]) -> int:
    """Start ``workers`` copies of this command on one results directory; return how many failed.

    They share the grid through the per-cell file locks (each cell is trained and evaluated once);
    ``worker_environments`` gives each its share of the CPU threads and, where there are several GPUs,
    its own device. The report is written once, by the caller, after all of them have finished.

    Every line a worker prints reaches this process's stdout / stderr prefixed with ``wN |``, so the
    interleaved progress of several workers in one log says which worker (and so which cell) it is
    about; a worker's output is a pipe, so it prints lines, never bars. A SIGTERM to this process
    (``kill``, a batch scheduler) is passed on to the workers, which would otherwise run on without
    anyone reading their output.
    """
    import os
    import signal
    import subprocess
    import sys
    import threading

    from robustlab.experiments import worker_environments

    command = [sys.executable, "-m", "robustlab", "experiment", str(config), "--out", str(out), "--no-report"]
    environments = worker_environments(workers)
    for index, env in enumerate(environments):
        console.print(f"worker {index}: " + " ".join(f"{k}={v}" for k, v in env.items()), markup=False)
    children = [
        subprocess.Popen([*command, *forwarded], env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
        for env in environments
    ]
    relays = [
        threading.Thread(target=_relay, args=(stream, target, f"w{index} | "), daemon=True)
        for index, child in enumerate(children)
        for stream, target in ((child.stdout, sys.stdout), (child.stderr, sys.stderr))
    ]
    for relay in relays:
        relay.start()

    def stop_workers(signum: int, frame: object) -> None:
        for child in children:
            child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, stop_workers)
    try:
        codes = [child.wait() for child in children]
    except KeyboardInterrupt:  # the workers got the same Ctrl-C: let them save their state first
        for child in children:
            child.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        for relay in relays:
            relay.join(timeout=10)
    return sum(code != 0 for code in codes)


def _relay(source: IO[str], target: IO[str], prefix: str) -> None:
    """Copy ``source`` to ``target`` line by line, each line prefixed, until ``source`` closes."""
    for line in source:
        target.write(prefix + line)
        target.flush()
