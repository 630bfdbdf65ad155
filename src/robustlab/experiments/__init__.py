"""The experiment grid runner: one YAML -> many run directories -> one results table (resumable).

An experiment file holds a *base* run config (the sections of :class:`robustlab.config.RunConfig`),
*grid* axes (datasets x models x defences x eps x seeds), *evaluation* settings handed to
:func:`robustlab.evaluation.evaluate_run`, and optional per-profile overrides::

    name: paper-mnist
    base: {data: {dataset: mnist}, model: {name: lenet5}, train: {epochs: 50}}
    grid:
      defenses: [standard, pgd_at, {name: trades, beta: 6.0}, hybrid]
      eps: [0.03, 0.3]
      seeds: [0]
    evaluation: {attacks: [fgsm, pgd-20, cw_linf-30]}
    where:                       # settings for some cells only
      - {match: {eps: 0.3, defense: pgd_at}, set: {defense: {eps_warmup: 5}}}
    profiles:
      quick: {base: {data: {train_subset: 5000}}, evaluation: {attacks: [fgsm, pgd-10]}}

Two profiles are built in (paper section 4.5, and one that fits a 2-core machine): ``paper`` sets the
paper's hyper-parameters (SGD, lr 0.01, batch 128, 50 epochs; momentum 0.9 and weight decay 5e-4, the
field's defaults, because the paper does not state its optimiser) and ``quick`` trains few epochs on
data subsets and evaluates with cheap attacks. The file's own ``profiles`` section is merged on top.
``where`` rules (top level, or in a profile) merge settings into the cells they match, e.g. an eps
warm-up only where the eps is large; ``experiment.json`` lists each rule with the cells it changed.

Every cell is validated (names, eps range, data present) before any training starts. Each cell is a
run directory ``RESULTS_DIR/runs/<cell-id>`` trained in its own process (so CPU peak memory is per
cell): a finished one is skipped, an unfinished one resumes through the Trainer's resume (the runner's
own progress is kept in ``runs/<cell-id>/experiment.json``), and a per-cell file lock lets several
processes share one results directory without running a cell twice. A cell whose training ignores eps
(standard training and the preprocessing defences, unless validation PGD runs) is not trained again
for every eps: it shares the training of the first cell that differs from it only in eps, copied into
its own run directory (``metadata.json`` names it: ``training_shared_with``). After training each cell is
evaluated, audited when ``robustlab.audit`` is available, and ``RESULTS_DIR/results.csv`` /
``results.json`` are rewritten (after every cell, so a partly done grid can already be reported).

Modules: :mod:`~robustlab.experiments.config` (the file's schema, profiles, ``where`` rules),
:mod:`~robustlab.experiments.plan` (grid -> validated cells), :mod:`~robustlab.experiments.run` (training,
evaluation and audit of each cell), :mod:`~robustlab.experiments.locks` (sharing a results directory) and
:mod:`~robustlab.experiments.collect` (the results table).
"""

from __future__ import annotations

from robustlab.experiments.collect import cell_row, collect_results
from robustlab.experiments.config import (
    BUILTIN_PROFILES,
    CellRule,
    EvaluationSettings,
    ExperimentConfig,
    GridAxes,
    Profile,
    check_evaluation,
    load_experiment,
)
from robustlab.experiments.config import MATCH_AXES as MATCH_AXES
from robustlab.experiments.config import _evaluation_kwargs as _evaluation_kwargs
from robustlab.experiments.plan import Cell, ExperimentPlan, plan_experiment
from robustlab.experiments.plan import parse_cell_filter as parse_cell_filter
from robustlab.experiments.plan import select_cells as select_cells
from robustlab.experiments.plan import slug as slug
from robustlab.experiments.run import ExperimentResult, run_cell, run_experiment
from robustlab.experiments.run import load_cell_data as load_cell_data
from robustlab.experiments.run import train_child_main as train_child_main
from robustlab.experiments.run import worker_environments as worker_environments

__all__ = [
    "BUILTIN_PROFILES",
    "Cell",
    "CellRule",
    "EvaluationSettings",
    "ExperimentConfig",
    "ExperimentPlan",
    "ExperimentResult",
    "GridAxes",
    "Profile",
    "cell_row",
    "check_evaluation",
    "collect_results",
    "load_experiment",
    "plan_experiment",
    "run_cell",
    "run_experiment",
]
