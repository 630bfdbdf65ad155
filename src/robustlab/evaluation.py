"""Honest, complete metrics of one model (DESIGN.md "Evaluation protocol").

By default (``suite="standard"``) AutoAttack runs beside the attacks asked for, so the worst case is
AutoAttack-grade; ``suite="quick"`` runs only the attacks asked for and the result's ``strength`` is
``upper-bound``, which every printed line and report repeats in words. AutoAttack runs stage by stage
over the batches with a per-stage record and a resumable state file (:mod:`robustlab.stages`).

:func:`evaluate_model` measures, on the same test samples: clean accuracy; robust accuracy under each
attack (by registry spec, e.g. ``fgsm``, ``pgd-20``, ``cw_linf``, ``autoattack``); the per-sample worst
case over all attacks (a sample counts as robust only if every attack failed on it); the robustness
gap ``clean - worst case`` and the paper's gap ``clean - CW`` (paper Table 1 uses CW); mean max-softmax
confidence, split by correct / wrong, with histogram counts, and the expected calibration error
(Guo et al. 2017, 15 bins) of every measurement; bootstrap 95% intervals over test samples. Every
robust number is stored with the attack name and parameters that produced it.

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
the same threat replaces that threat's entry and per-sample file as a whole). Schema::

    metrics.json
      clean_accuracy, test_size, cost, selected_epoch     # written by training, left untouched
      evaluations:                                        # one entry per threat, key threat_key(norm, eps)
        "linf-0.3":                                       #   e.g. norm "linf", eps 0.3
          threat:   {norm, eps}
          samples:  {split: "test", n, of, selection, digest, file}  # file: per-sample arrays (relative)
          model:    {adaptive, differentiable, random, random_passes, eot_samples, weights_sha256}
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
``attack_labels``. ``correct:clean[0]`` and ``correct:worst_case[0]`` are what McNemar's test
(:func:`robustlab.stats.mcnemar`) compares between two defences evaluated on the same samples.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from robustlab import distributed
from robustlab.attacks.autoattack import FULL_QUERIES, FULL_STEPS
from robustlab.attacks.registry import ATTACKS, make_attack, parse_attack_spec
from robustlab.attacks.wrappers import EOT_SAMPLES, adaptive_model
from robustlab.data import Split, load_dataset
from robustlab.devices import bf16_autocast
from robustlab.errors import CheckpointError, ConfigError, InputError, RobustlabError
from robustlab.memory import split_on_oom
from robustlab.metrics import iterate
from robustlab.progress import progress_bar, progress_line
from robustlab.rundir import RunDir, atomic_write_bytes, load_foreign_checkpoint
from robustlab.runs import load_run, select_device
from robustlab.stages import model_digest, run_autoattack, stage_params, state_file
from robustlab.stats import bootstrap_ci, calibration_error
from robustlab.validation import check_eps

AttackSpec = str | dict[str, Any]

#: FGSM, PGD-20 with a random start and CW-Linf (PGD on the CW margin): the paper's Table 1 attacks.
DEFAULT_ATTACKS: tuple[str, ...] = ("fgsm", "pgd-20", "cw_linf")
#: (label, spec) a suite adds: ``standard`` = AutoAttack (Croce & Hein 2020: APGD-CE, APGD-T, FAB-T,
#: Square); ``rand`` = its version for random defences (APGD-CE, APGD-DLR). The evaluation's adaptive
#: wrapper already applies EOT to a random model, so the ``rand`` suite does not average a second time
#: (``eot_samples=1`` inside AutoAttack; the record's ``adaptive`` field names the EOT actually used).
#: ``quick`` adds nothing: only the attacks asked for run, and the result is labelled an upper bound.
SUITES: dict[str, tuple[tuple[str, AttackSpec], ...]] = {
    "standard": (("autoattack", "autoattack"),),
    "rand": (("autoattack-rand", {"name": "autoattack", "version": "rand", "eot_samples": 1}),),
    "quick": (),
}
#: The default: AutoAttack-grade (``rand`` for a random model), the only default that cannot overstate.
DEFAULT_SUITE = "standard"
#: ``strength`` of an evaluation whose worst case includes a full-budget AutoAttack.
AUTOATTACK_GRADE = "autoattack-grade"
#: ``strength`` of any weaker evaluation: its robust accuracy is an upper bound, not a robustness claim.
UPPER_BOUND = "upper-bound"
UPPER_BOUND_NOTE = (
    "upper bound on robustness, not a robustness claim: no full AutoAttack ran "
    "(drop --suite quick, or set evaluation.suite: standard)"
)
ECE_BINS = 15
#: Seed of the random test subset evaluated with ``n`` (fixed, so all runs see the same samples).
SUBSET_SEED = 0
HISTOGRAM_BINS = 20
#: Arguments the evaluation itself supplies or that would change what is measured; not "parameters".
_INTERNAL_ARGS = {"model", "x", "y", "eps", "norm", "targeted", "target", "generator", "validate"}


#: How ``n`` of a split's samples are chosen: ``random`` (a fixed-seed random ``n``; a prefix of a folder
#: dataset, sorted by class, would test a few classes only) or ``first`` (the first ``n`` in the split's
#: order: RobustBench's convention on CIFAR-10, whose test batch is not sorted by class).
SUBSETS = ("random", "first")


def choose_samples(split: Split, n: int | None, how: str = "random") -> tuple[Split, torch.Tensor]:
    """The evaluated samples: all of ``split``, or ``n`` of them chosen as ``how`` says (:data:`SUBSETS`).

    Both choices are fixed (the random one by ``SUBSET_SEED``, independent of the attack seed), so every
    evaluation of the same split with the same ``n`` sees the same samples, which paired tests
    (McNemar) require.
    """
    if how not in SUBSETS:
        raise ConfigError(f"unknown subset '{how}'; valid: {', '.join(SUBSETS)}")
    if n is None or n >= len(split):
        return split, torch.arange(len(split))
    if how == "first":
        indices = torch.arange(n)
    else:
        generator = torch.Generator().manual_seed(SUBSET_SEED)
        indices = torch.randperm(len(split), generator=generator)[:n].sort().values
    return Split(split.images[indices], split.labels[indices]), indices


#: The samples :func:`evaluate_model` attacks for a given ``n`` (default: the fixed random subset).
subset = choose_samples


def subset_name(n: int, total: int, how: str) -> str:
    """The name every output gives the evaluated samples: ``all``, ``first-1000``, ``random-1000-seed0``."""
    if n >= total:
        return "all"
    return f"first-{n}" if how == "first" else f"random-{n}-seed{SUBSET_SEED}"


def subset_text(samples: dict[str, Any]) -> str:
    """Readable sample description from an entry's ``samples``: "the first 1000 of 10000 test images"."""
    n, total, split = samples.get("n"), samples.get("of"), samples.get("split", "test")
    name = samples.get("subset") or ("all" if n == total else f"random-{n}-seed{SUBSET_SEED}")
    if name == "all":
        return f"all {n} {split} images"
    if name.startswith("first-"):
        return f"the first {n} of {total} {split} images"
    return f"a fixed random {n} of {total} {split} images (seed {name.rsplit('seed', 1)[-1]})"


def threat_key(norm: str, eps: float) -> str:
    """The key of an evaluation in ``metrics.json``: ``"linf-0.3"``, ``"linf-0.0313725"``."""
    return f"{norm}-{eps:.6g}"


@dataclass
class Measurement:
    """One accuracy on the evaluated samples, with what produced it and its per-sample data.

    ``correct`` and ``confidence`` have shape (passes, n): one row per forward pass (one for
    deterministic models), one column per test sample.
    """

    label: str
    attack: dict[str, Any] | None
    correct: np.ndarray
    confidence: np.ndarray
    seconds: float = 0.0
    ci95: tuple[float, float] = (math.nan, math.nan)
    stages: dict[str, dict[str, float]] | None = None  # AutoAttack: robust accuracy after each stage

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def per_sample(self) -> np.ndarray:
        """Per-sample correctness averaged over passes (0/1 for a deterministic model)."""
        return self.correct.mean(axis=0)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "accuracy": self.accuracy,
            "ci95": [self.ci95[0], self.ci95[1]],
            "attack": self.attack,
            "confidence": confidence_summary(self.confidence, self.correct),
            "ece": calibration_error(self.confidence.ravel(), self.correct.ravel(), ECE_BINS),
            "seconds": round(self.seconds, 3),
        }
        if self.correct.shape[0] > 1:
            out["accuracy_per_draw"] = [float(row.mean()) for row in self.correct]
        if self.stages is not None:
            out["stages"] = self.stages
        return out


@dataclass
class EvaluationResult:
    """Everything :func:`evaluate_model` measured; ``to_dict`` is the ``metrics.json`` entry."""

    threat: dict[str, Any]
    labels: np.ndarray
    indices: np.ndarray
    clean: Measurement
    attacks: dict[str, Measurement]
    worst_case: Measurement
    worst_case_attack: np.ndarray
    model_info: dict[str, Any]
    samples: dict[str, Any]
    seed: int
    n_boot: int
    seconds: float
    strength: str = UPPER_BOUND
    cost: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return threat_key(self.threat["norm"], self.threat["eps"])

    @property
    def robust_accuracy(self) -> float:
        """The worst case over every attack run: the only number to call "robust accuracy"."""
        return self.worst_case.accuracy

    @property
    def gap(self) -> float:
        """Robustness gap, clean - worst-case accuracy (DESIGN.md)."""
        return self.clean.accuracy - self.worst_case.accuracy

    @property
    def cw_label(self) -> str | None:
        return next((k for k, m in self.attacks.items() if m.attack and m.attack["name"] == "cw_linf"), None)

    @property
    def paper_gap(self) -> float | None:
        """The paper's gap, clean - CW accuracy (paper Table 1), when CW-Linf was run."""
        label = self.cw_label
        return None if label is None else self.clean.accuracy - self.attacks[label].accuracy

    def to_dict(self) -> dict[str, Any]:
        return {
            "threat": self.threat,
            "samples": self.samples,
            "model": self.model_info,
            "clean": self.clean.summary(),
            "attacks": {label: m.summary() for label, m in self.attacks.items()},
            "worst_case": self.worst_case.summary(),
            "gap": {
                "clean_minus_worst_case": self.gap,
                "clean_minus_cw": self.paper_gap,
                "cw_attack": self.cw_label,
            },
            "strength": self.strength,
            "cost": self.cost,
            "seed": self.seed,
            "n_boot": self.n_boot,
            "seconds": round(self.seconds, 3),
            **self.extra,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-sample arrays saved next to ``metrics.json`` (see the module docstring)."""
        out: dict[str, np.ndarray] = {
            "labels": self.labels,
            "indices": self.indices,
            "attack_labels": np.array(list(self.attacks), dtype=str),
            "worst_case_attack": self.worst_case_attack,
        }
        for m in (self.clean, *self.attacks.values(), self.worst_case):
            out[f"correct:{m.label}"] = m.correct
            out[f"confidence:{m.label}"] = m.confidence
        return out


def confidence_summary(confidence: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    """Mean max-softmax overall and split by correct / wrong, and histogram counts over [0, 1]."""
    conf, hit = confidence.ravel().astype(np.float64), correct.ravel().astype(bool)
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)

    def mean(values: np.ndarray) -> float | None:
        return float(values.mean()) if values.size else None

    return {
        "mean": mean(conf),
        "mean_correct": mean(conf[hit]),
        "mean_wrong": mean(conf[~hit]),
        "n_correct": int(hit.sum()),
        "n_wrong": int((~hit).sum()),
        "histogram": {
            "edges": [round(float(e), 6) for e in edges],
            "correct": np.histogram(conf[hit], bins=edges)[0].tolist(),
            "wrong": np.histogram(conf[~hit], bins=edges)[0].tolist(),
        },
    }


def resolve_attacks(attacks: Sequence[AttackSpec], suite: str | None) -> list[tuple[str, AttackSpec]]:
    """(label, spec) for every attack to run; unknown attacks or suites fail here, before any work.

    ``suite=None`` is ``quick``: the attacks given and nothing else.
    """
    suite = suite or "quick"
    if suite not in SUITES:
        raise ConfigError(f"unknown suite '{suite}'; valid: {', '.join(SUITES)}")
    if SUITES[suite] and "autoattack" not in ATTACKS:
        raise RobustlabError(
            f"--suite {suite} needs the 'autoattack' attack, which is not registered in this installation"
        )
    if isinstance(attacks, str):
        attacks = [a for a in attacks.split(",") if a.strip()]
    labelled = [(_label(spec), spec) for spec in attacks]
    resolved, seen = [], set()
    for label, spec in [*labelled, *SUITES[suite]]:
        parse_attack_spec(spec)  # raises RobustlabError naming the valid attacks
        if label in seen:
            raise ConfigError(f"attack '{label}' is listed twice")
        seen.add(label)
        resolved.append((label, spec))
    if not resolved:
        raise ConfigError("no attack to run: give at least one, e.g. --attacks fgsm,pgd-20,cw_linf")
    return resolved


def is_full_autoattack(record: dict[str, Any] | None) -> bool:
    """Whether an attack record is AutoAttack at its full budget (100 steps; Square's 5,000 queries)."""
    if not record or record.get("name") != "autoattack":
        return False
    params = record.get("params") or {}
    queries = int(params.get("queries", FULL_QUERIES))
    full_queries = params.get("version", "standard") == "rand" or queries >= FULL_QUERIES
    return int(params.get("steps", FULL_STEPS)) >= FULL_STEPS and full_queries


def strength(entry: dict[str, Any]) -> str:
    """``autoattack-grade`` or ``upper-bound`` of a ``metrics.json`` evaluation entry.

    Read from the entry's ``strength`` field; entries written before that field existed are classified
    from the attacks that ran (a full AutoAttack among them makes the worst case AutoAttack-grade).
    """
    if entry.get("strength"):
        return str(entry["strength"])
    records = [m.get("attack") for m in (entry.get("attacks") or {}).values()]
    return AUTOATTACK_GRADE if any(is_full_autoattack(r) for r in records) else UPPER_BOUND


def _label(spec: AttackSpec) -> str:
    if isinstance(spec, str):
        return spec.strip().lower()
    params = ",".join(f"{k}={v}" for k, v in sorted(spec.items()) if k != "name")
    return f"{spec.get('name', '')}({params})" if params else str(spec.get("name", ""))


def _attack_record(
    label: str, spec: AttackSpec, eps: float, norm: str, adaptive: str, random: bool = False
) -> tuple[Any, dict]:
    """Build the attack callable and the record of exactly what it runs (defaults included).

    Attacks stop early on samples already misclassified (the answer is the same, faster), except on a
    random model: there an example that just fools the EOT average is often classified correctly again
    under fresh noise (the MNIST noise-injection cell at eps 0.3: PGD-20 23.7% with early stopping,
    0.0% in the audit's full 20 steps), so every step is taken.
    """
    name, params = parse_attack_spec(spec)
    fn = ATTACKS[name]
    signature = inspect.signature(fn).parameters
    extra = {"early_stop": not random} if "early_stop" in signature else {}
    attack = split_on_oom(make_attack(spec, eps=eps, norm=norm, **extra))
    defaults = {
        k: p.default for k, p in signature.items()
        if k not in _INTERNAL_ARGS and p.default is not inspect.Parameter.empty
        and p.kind is not p.VAR_KEYWORD
    }
    if name == "autoattack":  # its registry form takes **kwargs: record the stages' actual budgets
        defaults = stage_params(params)
    record = {
        "name": name, "label": label, "spec": spec, "params": {**defaults, **extra, **params},
        "eps": eps, "norm": norm, "adaptive": adaptive,
    }
    return attack, record


def _adaptive(model: nn.Module, eot_samples: int) -> tuple[nn.Module, dict[str, Any]]:
    """The model attacks differentiate, and a record of the adaptive mode (BPDA / EOT) chosen."""
    differentiable = getattr(model, "differentiable", None)
    random = getattr(model, "random", None)
    if differentiable is None and random is None:
        return model, {"adaptive": "none (plain model)", "differentiable": True, "random": False}
    grad_model, description = adaptive_model(model, eot_samples=eot_samples)
    info = {"adaptive": str(description), "differentiable": differentiable is not False, "random": bool(random)}
    return grad_model, info


@torch.no_grad()
def _classify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, passes: int) -> tuple[torch.Tensor, ...]:
    """(correct, max-softmax confidence, true-class probability), each (passes, batch), on x's device."""
    rows = []
    for _ in range(passes):
        probs = torch.softmax(model(x).float(), dim=1)
        confidence, predicted = probs.max(1)
        rows.append((predicted == y, confidence, probs.gather(1, y[:, None]).squeeze(1)))
    return tuple(torch.stack(column) for column in zip(*rows, strict=True))


def _to_host(results: dict[int, tuple[torch.Tensor, ...]]) -> dict[int, tuple[np.ndarray, ...]]:
    """Per-batch device results as numpy arrays, with one device-to-host copy per column."""
    order = sorted(results)
    if not order:
        return {}
    sizes = np.cumsum([results[b][0].shape[1] for b in order])[:-1]
    columns = [torch.cat([results[b][i] for b in order], dim=1).cpu().numpy() for i in range(len(results[order[0]]))]
    parts = [np.split(column, sizes, axis=1) for column in columns]
    return {b: tuple(part[k] for part in parts) for k, b in enumerate(order)}


def _outside_budget(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, label: str) -> torch.Tensor:
    """Whether an attack left the threat model (a bug, never a user error): a 0-d bool on the device.

    Read once per attack after its last batch, so checking a batch never waits for the accelerator.
    """
    if x_adv.shape != x.shape:
        raise RuntimeError(f"attack '{label}' returned images of shape {tuple(x_adv.shape)}, not {tuple(x.shape)}")
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    return (size > eps * (1 + 1e-4) + 1e-6).any() | (x_adv.min() < 0) | (x_adv.max() > 1)


def evaluate_model(
    model: nn.Module,
    split: Split,
    *,
    eps: float,
    norm: str = "linf",
    attacks: Sequence[AttackSpec] = DEFAULT_ATTACKS,
    suite: str | None = DEFAULT_SUITE,
    batch_size: int = 256,
    seed: int = 0,
    n: int | None = None,
    subset: str = "random",
    device: torch.device | str | None = None,
    eot_samples: int = EOT_SAMPLES,
    random_passes: int = 5,
    n_boot: int = 1000,
    progress: bool = False,
    attack_precision: str = "fp32",
    state_dir: str | Path | None = None,
) -> EvaluationResult:
    """Clean, per-attack and worst-case accuracy of ``model`` on ``n`` samples of ``split`` (all by default).

    Args:
        n, subset: attack ``n`` samples chosen as ``subset`` says (:data:`SUBSETS`: ``random``
            or ``first``); clean accuracy is then also measured on the whole split (``clean_all``).
        attacks: registry specs (``"pgd-40"``, ``{"name": "pgd", "steps": 50, "restarts": 5}``).
        suite: ``"standard"`` (default) adds AutoAttack, ``"rand"`` its version for random defences,
            ``"quick"`` (or None) nothing: the result's ``strength`` is then ``upper-bound``. A random
            model always gets ``rand`` (APGD-CE + APGD-DLR through EOT), AutoAttack's own protocol for
            randomised defences (Croce & Hein 2020): ``standard`` would push APGD-T's 9 targets, FAB-T
            and Square's 5,000 queries through EOT too (seen: still in APGD after 20 min on 1,000 MNIST
            images, one CPU core). ``model_info["suite"]`` records the switch; the label is ``autoattack-rand``.
        seed: seeds every attack's randomness (random starts) and the bootstrap; the caller's RNG state
            is left untouched.
        eot_samples: gradient samples per step for random defences (EOT).
        random_passes: forward passes per input for a random model (deterministic models use one).
        attack_precision: ``"fp32"`` (default) or ``"bf16"``: the attacks craft their examples under
            bfloat16 autocast (faster on a GPU); every verdict is still the float32 model's prediction
            on the crafted images. Recorded as ``model_info["attack_precision"]``.
        state_dir: where AutoAttack saves its per-sample state after every stage
            (:mod:`robustlab.stages`), so an interrupted evaluation resumes; the file is removed when
            the evaluation finishes. None: no state is kept.

    Under ``torchrun`` every rank calls this with the same arguments; each attacks its share of the
    batches (on its own GPU) and every rank returns the whole, gathered result.
    """
    eps = check_eps(eps, norm)
    if norm not in ("linf", "l2"):
        raise ConfigError(f"threat.norm must be 'linf' or 'l2', got '{norm}'")
    for name, value in (("n", n), ("batch_size", batch_size), ("eot_samples", eot_samples),
                        ("random_passes", random_passes), ("n_boot", n_boot)):
        if value is not None and int(value) < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if attack_precision not in ("fp32", "bf16"):
        raise InputError(f"attack_precision must be 'fp32' or 'bf16', got {attack_precision!r}")
    plan = resolve_attacks(attacks, suite)
    total = len(split)
    whole = split
    split, indices = choose_samples(split, n, subset)
    if len(split) == 0:
        raise InputError("the evaluation split is empty")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    group = distributed.setup(device.type)
    if group.enabled and device.type == "cuda":  # one GPU per rank
        device = torch.device("cuda", group.local_rank)
    model.to(device)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        grad_model, info = _adaptive(model, eot_samples)
        if info["random"] and suite == "standard":
            plan = resolve_attacks(attacks, "rand")
            info["suite"] = "rand (standard asked for; the model is random)"
        passes = random_passes if info["random"] else 1
        info.update(random_passes=passes, eot_samples=eot_samples if info["random"] else None,
                    attack_precision=attack_precision)
        built = [
            (label, *_attack_record(label, spec, eps, norm, info["adaptive"], info["random"])) for label, spec in plan
        ]
        mine = distributed.my_batches(math.ceil(len(split) / batch_size), group)
        speak = progress and group.is_main
        bar = progress_bar(total=len(mine) * (1 + len(built)), desc="evaluate", enabled=speak)
        rng_devices = [device] if device.type == "cuda" else []
        columns: dict[str, dict[int, tuple[np.ndarray, ...]]] = {}
        seconds: dict[str, float] = {}
        staged: dict[str, dict[str, Any]] = {}
        fingerprint = {"model": model_digest(model), "samples": split.digest(), "passes": passes} if state_dir else None
        finished_states: list[Path] = []
        for index, (label, attack, record) in enumerate([("clean", None, None), *built]):
            bar.set_postfix_str(label)
            tic = time.perf_counter()
            results: dict[int, tuple[torch.Tensor, ...]] = {}  # on the device until the attack is done
            outside = torch.zeros((), dtype=torch.bool, device=device)
            with torch.random.fork_rng(devices=rng_devices):
                if record is not None and record["name"] == "autoattack":
                    path = None if state_dir is None else state_file(
                        Path(state_dir), threat_key(norm, eps), label, group.rank, group.world_size)
                    run = run_autoattack(model, grad_model, split, mine, batch_size, device,
                                         parse_attack_spec(record["spec"])[1], eps=eps, norm=norm, seed=seed,
                                         stream=index, label=label, state_path=path, fingerprint=fingerprint,
                                         progress=progress and group.is_main)
                    staged[label] = {"masks": run.masks, "seconds": run.seconds}
                    finished_states += [path] if path is not None else []
                found = run.x_adv if label in staged else None
                for batch, (x, y) in zip(mine, iterate(split, batch_size, device, mine), strict=True):
                    torch.manual_seed(distributed.batch_seed(seed, index, batch))
                    if found is not None:
                        x_adv = found[batch].to(device)
                    elif attack is not None:
                        with bf16_autocast(device, attack_precision == "bf16"):
                            x_adv = attack(grad_model, x, y)
                    if attack is not None:
                        outside = outside | _outside_budget(x_adv, x, eps, norm, label)
                        x = x_adv
                    results[batch] = _classify(model, x, y, passes)
                    bar.update(1)
            if bool(outside):
                raise RuntimeError(f"attack '{label}' left the {norm} ball of radius {eps} or the [0, 1] box")
            columns[label] = _to_host(results)
            seconds[label] = time.perf_counter() - tic
            if bar.disable:  # no live bar (a log, not a terminal): one line per attack instead
                progress_line(f"evaluate: {label} done in {seconds[label]:.1f}s", speak, sys.stderr)
        bar.close()
        clean_all = None
        if len(split) < total:
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(seed)
                clean_all = _clean_all(model, whole, batch_size, device, passes, n_boot, seed)
    finally:
        model.train(was_training)
    if group.enabled:  # each rank attacked every world_size-th batch: put the batches back in order
        columns, seconds, staged = _merge_ranks(distributed.gather((columns, seconds, staged)))
    for path in finished_states:
        path.unlink(missing_ok=True)

    def measurement(label: str, record: dict | None) -> tuple[Measurement, np.ndarray]:
        batches = [columns[label][batch] for batch in sorted(columns[label])]
        correct, confidence, p_true = (np.concatenate(c, axis=1) for c in zip(*batches, strict=True))
        m = Measurement(label, record, correct, confidence.astype(np.float32), seconds[label])
        m.ci95 = bootstrap_ci(m.per_sample, n_boot, seed)
        if label in staged:
            m.stages = _stage_summary(staged[label])
        return m, p_true

    clean, _ = measurement("clean", None)
    measured = {label: measurement(label, record) for label, _, record in built}
    worst, worst_index = _worst_case(measured, n_boot, seed)
    grade = AUTOATTACK_GRADE if any(is_full_autoattack(record) for _, _, record in built) else UPPER_BOUND
    return EvaluationResult(
        threat={"norm": norm, "eps": eps},
        labels=split.labels.numpy(),
        clean=clean,
        attacks={label: m for label, (m, _) in measured.items()},
        worst_case=worst,
        worst_case_attack=worst_index,
        model_info=info,
        samples={"split": "test", "n": len(split), "of": total,
                 "subset": subset_name(len(split), total, subset),
                 "selection": "all" if len(split) == total else f"{subset} subset"
                 + (f" (seed {SUBSET_SEED})" if subset == "random" else ""),
                 "digest": split.digest()},
        indices=indices.numpy(),
        seed=seed,
        n_boot=n_boot,
        seconds=time.perf_counter() - started,
        strength=grade,
        extra={"versions": _versions(), **({"clean_all": clean_all} if clean_all else {})},
    )


def _clean_all(
    model: nn.Module, split: Split, batch_size: int, device: torch.device, passes: int, n_boot: int, seed: int
) -> dict[str, Any]:
    """Clean accuracy on every sample of ``split`` (cheap beside the attacks, which see a subset of it)."""
    correct = torch.cat([_classify(model, x, y, passes)[0] for x, y in iterate(split, batch_size, device)], dim=1)
    correct = correct.cpu().numpy()  # one device-to-host copy
    per_sample = correct.mean(axis=0)
    low, high = bootstrap_ci(per_sample, n_boot, seed)
    return {"accuracy": float(per_sample.mean()), "ci95": [low, high], "n": len(split), "split": "test"}


def _merge_ranks(parts: list[tuple[dict, dict[str, float], dict[str, dict[str, Any]]]]) -> tuple[dict, dict, dict]:
    """Every rank's per-batch results in one mapping; an attack's (or stage's) time is its slowest rank's."""
    columns = {label: {b: r for part, _, _ in parts for b, r in part.get(label, {}).items()}  # a rank may have none
               for label in parts[0][0]}
    seconds = {label: max(times[label] for _, times, _ in parts) for label in parts[0][1]}
    staged = {
        label: {
            "masks": {stage: {b: m for _, _, part in parts for b, m in part[label]["masks"][stage].items()}
                      for stage in entry["masks"]},
            "seconds": {stage: max(part[label]["seconds"].get(stage, 0.0) for _, _, part in parts)
                        for stage in entry["seconds"]},
        }
        for label, entry in parts[0][2].items()
    }
    return columns, seconds, staged


def _stage_summary(staged: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{stage: {accuracy, seconds}}``: the robust accuracy left after each AutoAttack stage, in order.

    The accuracy is judged by one forward pass of the model the attack differentiated (for a random
    model, one EOT average), as AutoAttack judges it; the measurement's own accuracy re-classifies the
    final images like every other attack.
    """
    out = {}
    for stage, masks in staged["masks"].items():
        robust = np.concatenate([masks[b] for b in sorted(masks)])
        out[stage] = {"accuracy": float(robust.mean()), "seconds": round(staged["seconds"].get(stage, 0.0), 3)}
    return out


def _worst_case(
    measured: dict[str, tuple[Measurement, np.ndarray]], n_boot: int, seed: int
) -> tuple[Measurement, np.ndarray]:
    """Per sample (and pass): robust only if every attack failed; its adversarial is the strongest one.

    The adversarial kept for the confidence statistics is, per sample, a misclassified one if any
    attack succeeded, and among those (or among all when none did) the one giving the true class the
    lowest probability.
    """
    labels = list(measured)
    record = {"name": "worst_case", "over": labels}
    correct = np.stack([measured[k][0].correct for k in labels])
    confidence = np.stack([measured[k][0].confidence for k in labels])
    p_true = np.stack([measured[k][1] for k in labels])
    choice = np.argmin(correct * 2.0 + p_true, axis=0)
    pick = np.take_along_axis(confidence, choice[None], axis=0)[0]
    seconds = sum(measured[k][0].seconds for k in labels)
    worst = Measurement("worst_case", record, correct.all(axis=0), pick, seconds)
    worst.ci95 = bootstrap_ci(worst.per_sample, n_boot, seed)
    return worst, choice.astype(np.int16)


def _versions() -> dict[str, str]:
    import robustlab

    return {"robustlab": robustlab.__version__, "torch": torch.__version__}


def save_evaluation(result: EvaluationResult, out_dir: str | Path) -> dict[str, Any]:
    """Save the per-sample arrays, merge ``result`` into ``out_dir/metrics.json``; return that file's data."""
    run = RunDir(out_dir)
    relative = Path("evaluation") / f"{result.key}.npz"
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **result.arrays())
    atomic_write_bytes(run.path / relative, buffer.getvalue())
    entry = result.to_dict()
    entry["samples"] = {**entry["samples"], "file": str(relative)}
    evaluations = dict(run.read_metrics().get("evaluations") or {})
    evaluations[result.key] = entry
    return run.update_metrics(evaluations=evaluations)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def evaluate_run(
    run_dir: str | Path,
    *,
    attacks: Sequence[AttackSpec] = DEFAULT_ATTACKS,
    suite: str | None = DEFAULT_SUITE,
    eps: float | None = None,
    norm: str | None = None,
    n: int | None = None,
    subset: str = "random",
    batch_size: int = 256,
    seed: int = 0,
    device: str = "auto",
    eot_samples: int = EOT_SAMPLES,
    random_passes: int = 5,
    n_boot: int = 1000,
    progress: bool = False,
    write: bool = True,
    attack_precision: str = "fp32",
) -> EvaluationResult:
    """Evaluate a run's selected weights on its test split at the run's threat (or ``eps``/``norm``).

    The training cost from ``metrics.json`` is copied into the result; with ``write`` the result is
    merged into ``metrics.json`` under ``evaluations[threat_key]`` and per-sample arrays are saved.
    """
    run = RunDir(run_dir)
    # damaged metrics.json / metadata.json are reported now, not after every attack has run
    previous, finished = run.read_metrics(), run.is_finished()
    loaded = load_run(run_dir, select_device(device))
    norm = norm or loaded.config.threat.norm
    eps = loaded.config.threat.eps if eps is None else eps
    result = evaluate_model(
        loaded.model, loaded.data.test, eps=eps, norm=norm, attacks=attacks, suite=suite,
        batch_size=batch_size, seed=seed, n=n, subset=subset, eot_samples=eot_samples,
        random_passes=random_passes, n_boot=n_boot, progress=progress, attack_precision=attack_precision,
        state_dir=Path(run_dir) / "evaluation" if write else None,
    )
    result.cost = previous.get("cost")
    result.model_info["weights_sha256"] = _sha256(run.weights)
    result.extra.update(run_config={"dataset": loaded.config.data.dataset, "model": loaded.config.model.name,
                                    "defense": loaded.config.defense.name, "seed": loaded.config.seed,
                                    "finished": finished})
    if write and distributed.from_environment().is_main:
        save_evaluation(result, run.path)
    return result


def evaluate_checkpoint(
    model_name: str,
    checkpoint: str | Path,
    dataset: str,
    *,
    eps: float,
    data_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    **options: Any,
) -> EvaluationResult:
    """Evaluate a model of one's own: a registered architecture with weights from ``checkpoint``.

    ``checkpoint`` is safetensors (preferred) or a ``.pt`` state dict read with ``weights_only=True``.
    A robustlab checkpoint carries its ``Normalize`` buffers; a bare network state dict is evaluated
    on [0, 1] pixels with identity normalisation. ``options`` are :func:`evaluate_model`'s.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if out_dir is not None:  # a damaged metrics.json there is reported before the attacks, not after
        RunDir(out_dir).read_metrics()
    from robustlab.models import build_model

    data = load_dataset(dataset, data_dir, val_size=1)
    model = build_model(model_name, data.num_classes, data.channels, data.image_size)
    load_foreign_checkpoint(path, model)
    state_dir = None if out_dir is None else Path(out_dir) / "evaluation"
    result = evaluate_model(model, data.test, eps=eps, device=select_device(device), state_dir=state_dir, **options)
    result.model_info["weights_sha256"] = _sha256(path)
    result.extra.update(run_config={"dataset": dataset, "model": model_name, "checkpoint": str(path)})
    if out_dir is not None and distributed.from_environment().is_main:
        save_evaluation(result, out_dir)
    return result


def _attack_text(record: dict[str, Any] | None) -> str:
    if record is None:
        return "-"
    if record["name"] == "worst_case":
        return "min over " + ", ".join(record["over"])
    given = parse_attack_spec(record["spec"])[1]
    shown = {**{k: v for k, v in record["params"].items() if k == "steps"}, **given}
    params = [f"{k}={v}" for k, v in shown.items() if v is not None]
    if record["params"].get("random_start"):
        params.append("random start")
    if not record["adaptive"].startswith("none"):
        params.append(f"via {record['adaptive']}")
    return " ".join([record["name"], *params, f"eps={record['eps']:.4g}"])


def format_table(result: EvaluationResult) -> Any:
    """A rich table of every measurement: accuracy with its 95% CI and the attack that produced it."""
    from rich.table import Table

    norm, eps = result.threat["norm"], result.threat["eps"]
    bound = "" if result.strength == AUTOATTACK_GRADE else " (quick suite: robust numbers are upper bounds)"
    table = Table(title=f"{subset_text(result.samples)}, {norm} eps={eps:.4g}: accuracy (%){bound}")
    for column in ("measure", "attack", "accuracy [95% CI]", "conf.", "ECE", "s"):
        table.add_column(column, justify="left" if column in ("measure", "attack") else "right")
    for m in (result.clean, *result.attacks.values(), result.worst_case):
        conf = float(m.confidence.mean())
        style = "bold" if m is result.worst_case else None
        table.add_row(
            m.label, _attack_text(m.attack),
            f"{100 * m.accuracy:.2f} [{100 * m.ci95[0]:.1f}, {100 * m.ci95[1]:.1f}]", f"{conf:.3f}",
            f"{calibration_error(m.confidence.ravel(), m.correct.ravel(), ECE_BINS):.3f}", f"{m.seconds:.1f}",
            style=style,
        )
    return table


def summary_lines(result: EvaluationResult) -> list[str]:
    """Plain-text lines under the table: robust accuracy and its strength, evidence, gaps, adaptive mode, cost."""
    w = result.worst_case
    graded = result.strength == AUTOATTACK_GRADE
    lines = []
    clean_all = result.extra.get("clean_all")
    if clean_all:
        lines.append(f"clean accuracy on all {clean_all['n']} test images: {100 * clean_all['accuracy']:.2f}% "
                     f"[{100 * clean_all['ci95'][0]:.1f}, {100 * clean_all['ci95'][1]:.1f}]; "
                     f"attacks on {subset_text(result.samples)} ({result.samples['subset']})")
    lines += [
        f"robust accuracy{'' if graded else ' UPPER BOUND'} (per-sample worst case, {_attack_text(w.attack)}): "
        f"{100 * w.accuracy:.2f}% [{100 * w.ci95[0]:.1f}, {100 * w.ci95[1]:.1f}]"
        + ("; AutoAttack-grade" if graded else f"; {UPPER_BOUND_NOTE}"),
        *stage_lines(result),
        evidence_line(result),
        f"robustness gap clean - worst case: {100 * result.gap:.2f} points"
        + (f"; paper's gap clean - CW ({result.cw_label}): {100 * result.paper_gap:.2f} points"
           if result.paper_gap is not None else "; paper's gap clean - CW: not measured (add cw_linf)"),
        f"attacks differentiate: {result.model_info['adaptive']}"
        + (f"; random model, accuracy = mean over {result.model_info['random_passes']} forward passes"
           if result.model_info["random"] else ""),
    ]
    if result.extra.get("run_config", {}).get("finished") is False:
        lines.append("warning: this run has not finished training; these are the weights selected so far")
    if result.cost:
        c = result.cost
        lines.append(f"training cost: {c.get('train_seconds')} s, {c.get('seconds_per_epoch')} s/epoch, "
                     f"peak memory {c.get('peak_memory_mb')} MB on {c.get('device')}")
    return lines


def stage_lines(result: EvaluationResult) -> list[str]:
    """One line per AutoAttack run: the robust accuracy left after each of its stages."""
    lines = []
    for label, m in result.attacks.items():
        if m.stages:
            steps = " -> ".join(f"{stage} {100 * s['accuracy']:.2f}%" for stage, s in m.stages.items())
            lines.append(f"{label} stages (robust after each): {steps}")
    return lines


def evidence_line(result: EvaluationResult) -> str:
    """The strongest evidence behind the worst case, and how a preprocessing / random defence was attacked.

    Counts, per attack, the test points classified correctly when clean that it broke (for a random
    model: correct in most passes, wrong in most passes).
    """
    clean = result.clean.per_sample >= 0.5
    broke = {label: clean & (m.per_sample < 0.5) for label, m in result.attacks.items()}
    best = max(broke, key=lambda label: int(broke[label].sum()))
    others = np.zeros_like(clean)
    for label, mask in broke.items():
        if label != best:
            others |= mask
    extra = int((others & ~broke[best]).sum())
    text = f"strongest evidence: {best} broke {int(broke[best].sum())} of {int(clean.sum())} correctly classified"
    stages = result.attacks[best].stages
    if stages:  # which AutoAttack stage did most of it
        names, accuracies = list(stages), [s["accuracy"] for s in stages.values()]
        drops = {names[i]: accuracies[i - 1] - accuracies[i] for i in range(1, len(names))}
        top = max(drops, key=drops.__getitem__)
        text += f" points (most in its {top} stage: {round(drops[top] * result.samples['n'])})"
    else:
        text += " points"
    text += f"; the other attacks broke {extra} more" if extra else "; no other attack broke a point it missed"
    info = result.model_info
    how = []
    if info.get("differentiable") is False:
        how.append("BPDA (straight-through gradients past the non-differentiable preprocessing)")
    if info.get("random"):
        how.append(f"EOT over {info.get('eot_samples')} random draws per gradient, accuracy over "
                   f"{info.get('random_passes')} passes")
    if how:
        text += "; the defence was attacked through " + " and ".join(how)
    return text


def read_evaluation(run_dir: str | Path, eps: float | None = None, norm: str | None = None) -> dict[str, Any]:
    """The ``metrics.json`` entry of one evaluation (default: at the run's own threat)."""
    run = RunDir(run_dir)
    evaluations = run.read_metrics().get("evaluations") or {}
    if eps is None or norm is None:
        threat = (run.read_config_dict().get("threat") or {}) if run.config.exists() else {}
        norm = norm or threat.get("norm", "linf")
        if eps is None:
            from robustlab.config import parse_number

            eps = parse_number(threat.get("eps", 0.3))
    key = threat_key(norm, float(eps))
    if key not in evaluations:
        have = ", ".join(evaluations) or "none"
        raise CheckpointError(f"no evaluation at {key} in {run.metrics} (have: {have}); evaluate first")
    return evaluations[key]


def read_samples(
    run_dir: str | Path, eps: float | None = None, norm: str | None = None
) -> dict[str, np.ndarray]:
    """The per-sample arrays of one evaluation (see the module docstring), loaded without pickle."""
    entry = read_evaluation(run_dir, eps, norm)
    path = Path(run_dir) / entry["samples"]["file"]
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise CheckpointError(f"missing per-sample file: {path}") from None
    except (ValueError, OSError) as error:
        raise CheckpointError(f"corrupt per-sample file {path}: {error}") from None


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

