"""The ``robustlab`` command line: train, evaluate, demo (attack, audit, experiment, report build on it).

Every user mistake is a :class:`~robustlab.errors.RobustlabError`; ``main`` prints it as one line on
stderr and exits with status 2, so no traceback ever reaches the user for a bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from robustlab.errors import RobustlabError

try:  # typer >= 0.25 vendors click as typer._click; older versions use click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors


def example(*commands: str) -> str:
    """The epilog of a command's ``--help``: its example, printed verbatim (click's ``\\b`` stops rewrapping)."""
    return "\b\nExample:\n" + "\n".join(f"  {command}" for command in commands)


app = typer.Typer(
    name="robustlab",
    help="Train, attack and evaluate adversarially robust image classifiers.\n\n"
    "Images are always [0, 1] pixels and eps is in pixel units (0.3, or 8/255). Every command reads "
    "and writes run directories (config.yaml, model.safetensors, metrics.json, ...); a mistake is one "
    "'error:' line with exit status 2. Run 'robustlab COMMAND --help' for each command's options and "
    "an example; the documentation site (docs/, 'mkdocs serve') has the full guide.",
    epilog="\b\nGetting started (no download: digits is embedded):\n"
    "  robustlab demo\n"
    "  robustlab train --dataset digits --defense hybrid --eps 0.1 --set train.optimizer=adam --lr 0.003 "
    "--set data.val_size=200 --epochs 10 --out runs/hybrid\n"
    "  robustlab evaluate runs/hybrid\n"
    "  robustlab audit runs/hybrid",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
# soft_wrap: a message or log line stays one line (greppable in a log file); tables still fit the width
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

ConfigArg = Annotated[Path | None, typer.Argument(help="YAML config file (optional; flags and --set override it)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config field: section.key=value")]


def _flag_overrides(**flags: Any) -> list[str]:
    mapping = {
        "dataset": "data.dataset", "data_dir": "data.data_dir", "model": "model.name", "defense": "defense.name",
        "epochs": "train.epochs", "lr": "train.lr", "batch_size": "train.batch_size", "eps": "threat.eps",
        "seed": "seed", "device": "train.device", "deterministic": "train.deterministic",
    }
    return [f"{mapping[k]}={str(v).lower() if isinstance(v, bool) else v}" for k, v in flags.items() if v is not None]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


DatasetOpt = Annotated[
    str | None, typer.Option(help="digits, mnist, cifar10, imagenet-subset, folder:PATH, npz:PATH")
]
ModelOpt = Annotated[
    str | None, typer.Option(help="lenet5, small_cnn, resnet18, preact_resnet18, wide_resnet, efficientnet_b0")
]
DataDirOpt = Annotated[
    str | None, typer.Option(help="dataset root (default $ROBUSTLAB_DATA or ~/.cache/robustlab/data)")
]


@app.command(
    short_help="Train a model with a defence into a run directory (resumes if interrupted).",
    epilog=example("robustlab train configs/digits_lenet5.yaml --defense hybrid --eps 0.1 --out runs/digits-hybrid"),
)
def train(
    config: ConfigArg = None,
    dataset: DatasetOpt = None,
    model: ModelOpt = None,
    defense: Annotated[str | None, typer.Option(help="training objective: standard, pgd_at, trades, hybrid...")] = None,
    epochs: Annotated[int | None, typer.Option(help="number of epochs")] = None,
    eps: Annotated[str | None, typer.Option(help="perturbation budget in pixels, e.g. 0.3 or 8/255")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate")] = None,
    batch_size: Annotated[int | None, typer.Option(help="batch size")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    deterministic: Annotated[bool | None, typer.Option(
        "--deterministic/--no-deterministic", help="torch's deterministic algorithms (train.deterministic)"
    )] = None,
    data_dir: DataDirOpt = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/DATASET-MODEL-DEFENSE-sSEED)")] = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="replace a finished run in --out")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Train a model with a defence; writes a run directory (resumes it if interrupted).

    Settings come from an optional YAML CONFIG, then the flags, then --set section.key=value
    overrides. A finished run in --out is never overwritten without --overwrite; an unfinished one
    resumes from its last finished epoch. Under torchrun it trains data-parallel.
    """
    from robustlab.config import load_config
    from robustlab.distributed import from_environment
    from robustlab.metrics import chance_warning
    from robustlab.training import train as run_training

    overrides = _flag_overrides(
        dataset=dataset, model=model, defense=defense, epochs=epochs, eps=eps, lr=lr, batch_size=batch_size,
        seed=seed, deterministic=deterministic, data_dir=data_dir, device=device,
    ) + list(set_ or [])
    cfg = load_config(config, overrides)
    dataset_tag = cfg.data.dataset.replace(":", "_").replace("/", "_")
    out = out or Path("runs") / f"{dataset_tag}-{cfg.model.name}-{cfg.defense.name}-s{cfg.seed}"
    result = run_training(cfg, out, overwrite=overwrite, progress=progress)
    if not from_environment().is_main:  # under torchrun: rank 0 speaks for the run
        return
    console.print(
        f"finished {cfg.defense.name} on {cfg.data.dataset}: clean test accuracy "
        f"{_percent(result.metrics['clean_accuracy'])}% in {result.metrics['cost']['train_seconds']:.1f}s -> {out}"
    )
    warning = chance_warning(result.metrics["clean_accuracy"], result.data.num_classes)
    if warning:
        console.print(warning, markup=False, highlight=False)


@app.command(
    short_help="Clean, per-attack and worst-case robust accuracy of a run (or a checkpoint).",
    epilog=example("robustlab evaluate runs/digits-hybrid --attacks fgsm,pgd-40,cw_linf --suite standard --n 1000"),
)
def evaluate(
    run_dir: Annotated[Path | None, typer.Argument(help="a run directory written by robustlab train")] = None,
    attacks: Annotated[str | None, typer.Option(help="attack specs, default fgsm,pgd-20,cw_linf")] = None,
    suite: Annotated[str, typer.Option(
        help="standard (default): the other attacks + AutoAttack (its rand version for a random defence); "
        "rand: AutoAttack's EOT version; quick: the other attacks only (an upper bound, not a robustness claim)"
    )] = "standard",
    eps: Annotated[str | None, typer.Option(help="pixel budget(s): 0.3 or 8/255,16/255 (default: run's)")] = None,
    norm: Annotated[str | None, typer.Option(help="linf or l2 (default: the run's)")] = None,
    n: Annotated[int | None, typer.Option("--n", "--samples", help="attack N test samples (see --subset; clean "
                                          "accuracy also on all); under torchrun write --samples")] = None,
    subset: Annotated[str, typer.Option(help="which N: random (fixed seed) or first (RobustBench's CIFAR-10 "
                                        "convention)")] = "random",
    batch_size: Annotated[int, typer.Option(help="attack batch size")] = 256,
    seed: Annotated[int, typer.Option(help="seed of the attacks' random starts and of the bootstrap")] = 0,
    eot_samples: Annotated[int, typer.Option(help="EOT gradient samples per step for random defences")] = 20,
    random_passes: Annotated[int, typer.Option(help="forward passes per input for random defences")] = 5,
    n_boot: Annotated[int, typer.Option(help="bootstrap resamples for the 95% intervals")] = 1000,
    model: Annotated[str | None, typer.Option(help="with --checkpoint: an architecture, e.g. lenet5")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="own weights: .safetensors / .pt")] = None,
    dataset: Annotated[str | None, typer.Option(help="with --checkpoint: the dataset to test on")] = None,
    data_dir: Annotated[str | None, typer.Option(help="dataset root for --dataset")] = None,
    out: Annotated[Path | None, typer.Option(help="with --checkpoint: where metrics.json goes")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
    attack_precision: Annotated[str, typer.Option(help="fp32, or bf16: gradient passes under bfloat16 "
                                                  "autocast (decisions and verdicts stay fp32; AutoAttack, "
                                                  "FAB and Square run in fp32)")] = "fp32",
    fuse: Annotated[bool, typer.Option(help="attacks differentiate a fused copy of the model (BatchNorm folded, "
                                       "channels_last; same function, faster); verdicts stay the model's")] = True,
    overwrite: Annotated[bool, typer.Option(help="replace an evaluation already recorded at this threat")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Clean, per-attack and worst-case robust accuracy with 95% CIs; writes metrics.json.

    A sample counts as robust only if it is classified correctly and every attack failed on it. By default
    AutoAttack runs beside the other attacks and the worst case is AutoAttack-grade (--suite quick: an
    upper bound); an interrupted AutoAttack resumes after its last finished stage. Preprocessing defences
    are attacked adaptively (BPDA/EOT) automatically. Results merge into RUN_DIR/metrics.json, per-sample
    correctness into RUN_DIR/evaluation/; an evaluation already recorded at the same threat is only
    replaced with --overwrite.
    """
    from robustlab.config import parse_number
    from robustlab.distributed import from_environment
    from robustlab.errors import ConfigError
    from robustlab.evaluation import DEFAULT_ATTACKS, evaluate_checkpoint, evaluate_run, format_table, summary_lines
    from robustlab.evaluation.result import threat_key
    from robustlab.evaluation.run import threat_keys_of
    from robustlab.evaluation.store import refuse_to_replace
    from robustlab.validation import check_eps

    specs = list(DEFAULT_ATTACKS) if attacks is None else [a.strip() for a in attacks.split(",") if a.strip()]
    options = {
        "attacks": specs, "suite": suite, "n": n, "subset": subset, "batch_size": batch_size, "seed": seed,
        "n_boot": n_boot,
        "eot_samples": eot_samples, "random_passes": random_passes, "progress": progress,
        "attack_precision": attack_precision, "fuse": fuse, "overwrite": overwrite,
    }
    budgets = [None] if eps is None else [check_eps(parse_number(e), norm or "l2", "--eps") for e in eps.split(",")]
    budgets = list(dict.fromkeys(budgets))  # 0.1 and 0.10 are one budget
    if checkpoint is not None:
        if run_dir is not None:
            raise ConfigError("give either RUN_DIR or --checkpoint, not both")
        needed = (("--model", model), ("--dataset", dataset), ("--eps", eps))
        missing = [flag for flag, value in needed if value is None]
        if missing:
            raise ConfigError(f"--checkpoint also needs {', '.join(missing)}")
        out = out or Path("runs") / f"eval-{checkpoint.stem}"
    elif run_dir is None:
        raise ConfigError("give a RUN_DIR, or --checkpoint FILE --model NAME --dataset D --eps E")
    if not overwrite:  # every budget of a curve is checked before the first is attacked
        where = out if checkpoint is not None else run_dir
        keys = [threat_key(norm or "linf", b) for b in budgets] if checkpoint is not None else \
            threat_keys_of(run_dir, budgets, norm)
        refuse_to_replace(where, keys)
    main = from_environment().is_main  # under torchrun each rank attacks its share; rank 0 writes
    for budget in budgets:  # several budgets give the points of an accuracy-vs-eps curve
        if checkpoint is not None:
            result = evaluate_checkpoint(
                model, checkpoint, dataset, eps=budget, norm=norm or "linf", data_dir=data_dir, device=device,
                out_dir=out, **options,
            )
        else:
            result = evaluate_run(run_dir, eps=budget, norm=norm, device=device, **options)
        if not main:
            continue
        console.print(format_table(result))
        for line in summary_lines(result):
            console.print(line, markup=False, highlight=False)
        where = out if checkpoint is not None else run_dir
        console.print(f"wrote {where / 'metrics.json'} (evaluations.{result.key})", markup=False, highlight=False)


@app.command(
    short_help="Standard, PGD-AT and hybrid training on embedded digits, compared (no download).",
    epilog=example("robustlab demo --epochs 5 --out runs/demo"),
)
def demo(
    out: Annotated[Path, typer.Option(help="where the demo's runs go")] = Path("runs/demo"),
    epochs: Annotated[int, typer.Option(min=1, max=200, help="epochs per defence")] = 15,
    eps: Annotated[str, typer.Option(help="Linf budget in pixels")] = "0.1",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    overwrite: Annotated[bool, typer.Option(help="train again (and replace) runs already in --out; without it a "
                                            "finished demo run is reused")] = False,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Train defences on the embedded digits data and compare clean / FGSM / PGD accuracy (no download)."""
    from robustlab.config import parse_number
    from robustlab.demo import run_demo
    from robustlab.validation import check_eps

    budget = check_eps(parse_number(eps), "linf", "--eps")
    rows = run_demo(out, epochs=epochs, eps=budget, seed=seed, overwrite=overwrite, progress=progress)
    table = Table(title=f"digits, LeNet-5, Linf eps={budget:g}: test accuracy (%)")
    for column in ("defense", "clean", "FGSM", "PGD-20", "train s"):
        table.add_column(column, justify="left" if column == "defense" else "right")
    for row in rows:
        table.add_row(row["defense"], _percent(row["clean"]), _percent(row["fgsm"]), _percent(row["pgd-20"]),
                      f"{row['seconds']:.1f}")
    console.print(table)
    console.print("FGSM and PGD-20 accuracies are upper bounds on robustness, not robustness claims (no AutoAttack); "
                  f"robustlab evaluate {out}/pgd_at (for example) gives an AutoAttack-grade number",
                  markup=False, highlight=False)
    console.print(f"runs written to {out}/")


def _error(message: str, status: int) -> NoReturn:
    err_console.print(f"error: {' '.join(message.split())}", markup=False, highlight=False)
    sys.exit(status)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning user errors into one line and exit status 2.

    Click runs outside its standalone mode, so a usage mistake (``--epochs abc``, ``--workers 0``) reaches
    this function as an exception and is printed as one ``error:`` line too, instead of click's
    three-line usage block. Ctrl-C exits with status 130 (typer's convention); ``robustlab train`` first
    prints how to resume.
    """
    from robustlab.commands import load_commands

    load_commands()
    try:
        status = app(args=argv, prog_name="robustlab", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as shown:  # plain ``robustlab``: the help text, as always
        shown.show()
        sys.exit(shown.exit_code)
    except click_errors.ClickException as usage:
        context = getattr(usage, "ctx", None)
        hint = f" (see: {context.command_path} --help)" if context is not None else ""
        _error(usage.format_message() + hint, 2)
    except typer.Abort:
        _error("aborted", 1)
    except RobustlabError as error:
        _error(str(error), 2)
    except OSError as error:  # the environment, not the input: a full disk, a read-only or missing folder
        where = f": {error.filename}" if error.filename else ""
        _error(f"{error.strerror or error}{where}", 1)
    status = status if isinstance(status, int) else 0
    joined = sys.modules.get("robustlab.distributed")  # loaded only by a command that may have joined a group
    if joined is not None and status == 0:
        joined.leave()
    sys.exit(status)


if __name__ == "__main__":
    # Run through the importable module, so sub-commands (which register on robustlab.cli.app) are seen.
    from robustlab.cli import main as package_main

    package_main()
