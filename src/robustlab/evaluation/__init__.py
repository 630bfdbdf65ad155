"""Honest, complete metrics of one model (the protocol of docs/evaluation.md).

Modules: :mod:`~robustlab.evaluation.plan` (the attacks and suites), :mod:`~robustlab.evaluation.samples`
(which test samples), :mod:`~robustlab.evaluation.measure` (:func:`evaluate_model`),
:mod:`~robustlab.evaluation.result` (what it measured), :mod:`~robustlab.evaluation.store` (``metrics.json``
and per-sample files), :mod:`~robustlab.evaluation.run` (run directories and checkpoints) and
:mod:`~robustlab.evaluation.text` (tables and summary lines). Every name is importable from here.

By default (``suite="standard"``) AutoAttack runs beside the attacks asked for, so the worst case is
AutoAttack-grade; ``suite="quick"`` runs only the attacks asked for and the result's ``strength`` is
``upper-bound``, which every printed line and report repeats in words. AutoAttack runs stage by stage
over the batches with a per-stage record and a resumable state file (:mod:`robustlab.stages`).

:func:`evaluate_model` measures, on the same test samples: clean accuracy; robust accuracy under each
attack (by registry spec, e.g. ``fgsm``, ``pgd-20``, ``cw_linf``, ``autoattack``); the per-sample worst
case over all attacks (a sample counts as robust only if it is classified correctly and every attack
failed on it); the robustness gap ``clean - worst case`` and the paper's gap ``clean - CW`` (paper
Table 1 uses CW); mean max-softmax confidence, split by correct / wrong, with histogram counts, and the
expected calibration error (Guo et al. 2017, 15 bins) of every measurement; bootstrap 95% intervals over
test samples. Every robust number is stored with the attack name and parameters that produced it.

Preprocessing defences (anything exposing ``.differentiable`` / ``.random``, e.g.
:class:`robustlab.defenses.preprocessing.Defended`) are attacked adaptively, always:
``robustlab.attacks.wrappers.adaptive_model`` gives the model the attacks differentiate (BPDA through
non-differentiable transforms, EOT over random ones, Athalye et al. 2018) while predictions use the
real defended model. If the wrapper is unavailable the evaluation refuses to run rather than print a
non-adaptive number. A *random* model is classified ``random_passes`` times per input (fresh randomness
each pass, as deployed): its accuracy is the mean over passes (the expected accuracy of one deployed
prediction) and ``accuracy_per_draw`` lists each pass; worst case is taken per pass.

Every attack's random draws on a batch are seeded from ``(seed, attack, batch)``, so results do not
depend on which process attacks which batch: under ``torchrun`` each of N ranks attacks every N-th
batch and the ranks' per-batch results are gathered into exactly the single-process arrays.

:func:`evaluate_run` evaluates a run directory and merges the result into ``RUN_DIR/metrics.json``
(atomically; keys written by training or by evaluations at another budget are kept; a new evaluation at
the same threat replaces that threat's entry and per-sample file as a whole, and only when asked to:
``overwrite``). Schema::

    metrics.json
      clean_accuracy, test_size, cost, selected_epoch     # written by training, left untouched
      evaluations:                                        # one entry per threat, key threat_key(norm, eps)
        "linf-0.3":                                       #   e.g. norm "linf", eps 0.3
          threat:   {norm, eps}
          samples:  {split: "test", n, of, selection, digest, file}  # file: per-sample arrays (relative)
          model:    {adaptive, differentiable, random, random_passes, eot_samples, num_classes, weights_sha256}
          clean:      MEASUREMENT
          attacks:    {label: MEASUREMENT, ...}           # label = the spec as given, e.g. "pgd-20"
          worst_case: MEASUREMENT                         # attack: {name: "worst_case", over: [labels]}
          strength: "autoattack-grade" | "upper-bound"    # full AutoAttack among the attacks, or not (strength())
          gap:      {clean_minus_worst_case, clean_minus_cw, cw_attack}   # cw entries None without cw_linf
          cost:     copy of the run's training cost {train_seconds, seconds_per_epoch, peak_memory_mb, device}
          seed, n_boot, seconds, versions: {robustlab, torch}
          run_config: {dataset, model, defense, seed, finished}  (with --checkpoint: {dataset, model, checkpoint})
    MEASUREMENT = {accuracy, ci95: [low, high], accuracy_per_draw (random models only), ece, seconds,
                   stages (AutoAttack only): {clean | stage name: {accuracy, seconds}},
                   attack: null (clean) | {name, spec, label, params, eps, norm, adaptive},
                   confidence: {mean, mean_correct, mean_wrong, n_correct, n_wrong,
                                histogram: {edges (21), correct (20 counts), wrong (20 counts)}}}

Per-sample arrays (``evaluation/<threat key>.npz``, read with :func:`read_samples`, no pickle):
``indices`` (n,) into the test split (with ``n`` below the split size: a fixed-seed random subset),
``labels`` (n,), ``correct:<label>`` bool and ``confidence:<label>`` float32 of shape (passes, n) for
``clean``, every attack label and ``worst_case``, ``worst_case_attack`` (passes, n) index into
``attack_labels`` (-1: the clean image, for a sample misclassified clean that no attack misclassified).
``correct:clean[0]`` and ``correct:worst_case[0]`` are what McNemar's test (:func:`robustlab.stats.mcnemar`)
compares between two defences evaluated on the same samples.
"""

from __future__ import annotations

# Every name the module had before it became a package is importable from here, private ones too (tests and
# callers import them): those outside __all__ are listed as re-exports, hence F401 is off for this file.
# adaptive_model and evaluate_model are looked up on this package by measure._adaptive and run.evaluate_run,
# so replacing them here (monkeypatch) reaches the code that uses them.
# ruff: noqa: F401
from robustlab.attacks.wrappers import adaptive_model
from robustlab.evaluation.measure import (
    _adaptive,
    _classify,
    _clean_all,
    _merge_ranks,
    _outside_budget,
    _stage_summary,
    _to_host,
    _versions,
    _worst_case,
    evaluate_model,
)
from robustlab.evaluation.plan import (
    _INTERNAL_ARGS,
    DEFAULT_ATTACKS,
    DEFAULT_SUITE,
    SUITES,
    AttackSpec,
    _attack_record,
    _label,
    resolve_attacks,
)
from robustlab.evaluation.result import (
    AUTOATTACK_GRADE,
    ECE_BINS,
    HISTOGRAM_BINS,
    UPPER_BOUND,
    UPPER_BOUND_NOTE,
    EvaluationResult,
    Measurement,
    confidence_summary,
    is_full_autoattack,
    strength,
    threat_key,
)
from robustlab.evaluation.run import evaluate_checkpoint, evaluate_run
from robustlab.evaluation.samples import SUBSET_SEED, SUBSETS, choose_samples, subset, subset_name, subset_text
from robustlab.evaluation.store import _sha256, read_evaluation, read_samples, save_evaluation
from robustlab.evaluation.text import _attack_text, evidence_line, format_table, stage_lines, summary_lines

__all__ = [
    "AUTOATTACK_GRADE",
    "DEFAULT_ATTACKS",
    "DEFAULT_SUITE",
    "SUITES",
    "UPPER_BOUND",
    "UPPER_BOUND_NOTE",
    "SUBSETS",
    "EvaluationResult",
    "Measurement",
    "confidence_summary",
    "evaluate_checkpoint",
    "evaluate_model",
    "evaluate_run",
    "evidence_line",
    "format_table",
    "is_full_autoattack",
    "read_evaluation",
    "read_samples",
    "resolve_attacks",
    "save_evaluation",
    "stage_lines",
    "strength",
    "choose_samples",
    "subset",
    "subset_name",
    "subset_text",
    "summary_lines",
    "threat_key",
]

