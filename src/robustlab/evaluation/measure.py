"""Attack one model on its test samples and measure every result (:func:`evaluate_model`).

The work is split in steps: check the arguments, place the model (one GPU per ``torchrun`` rank), choose
the adaptive model and the attacks, run every attack over this rank's batches (:func:`_attack_all`),
gather the ranks, and turn the per-batch arrays into measurements (:func:`_result`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import robustlab.evaluation as _package
from robustlab import distributed
from robustlab.attacks.registry import parse_attack_spec
from robustlab.attacks.wrappers import EOT_SAMPLES
from robustlab.data import Split
from robustlab.devices import bf16_autocast
from robustlab.errors import ConfigError, InputError
from robustlab.evaluation.plan import DEFAULT_ATTACKS, DEFAULT_SUITE, AttackSpec, _attack_record, resolve_attacks
from robustlab.evaluation.result import (
    AUTOATTACK_GRADE,
    UPPER_BOUND,
    EvaluationResult,
    Measurement,
    is_full_autoattack,
    threat_key,
)
from robustlab.evaluation.samples import SUBSET_SEED, choose_samples, subset_name
from robustlab.metrics import iterate
from robustlab.models.fused import fused_classifier, is_fused
from robustlab.progress import progress_bar, progress_line
from robustlab.rundir import load_tagged_arrays, save_tagged_arrays
from robustlab.stages import model_digest, run_autoattack, state_file
from robustlab.stats import bootstrap_ci
from robustlab.validation import check_eps

#: ``model_info["attack_model"]`` when the attacks differentiate a fused copy.
FUSED_LABEL = "fused copy (BatchNorm folded into convolutions, channels_last); verdicts from the model"
#: ``model_info["adaptive"]`` of a model that declares no transform: attacks differentiate it as it is.
PLAIN_MODEL = "none (plain model)"
#: One attack as :func:`_attack_all` runs it: (label, attack callable, record).
Built = tuple[str, Any, dict[str, Any]]


def evaluate_model(
    model: nn.Module,
    split: Split | tuple[torch.Tensor, torch.Tensor],
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
    fuse: bool = True,
) -> EvaluationResult:
    """Clean, per-attack and worst-case accuracy of ``model`` on ``n`` samples of ``split`` (all by default).

    Args:
        split: a :class:`~robustlab.data.Split`, or float images in [0, 1] with their labels (8-bit
            pixels divided by 255, as every dataset robustlab reads: :meth:`Split.from_pixels`).
        n: how many samples the attacks see (all by default); with fewer than the whole split, clean
            accuracy is also measured on every sample of it (``clean_all``).
        subset: which ``n`` samples (:data:`SUBSETS`): ``random`` (a fixed-seed draw) or ``first``.
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
        attack_precision: ``"fp32"`` (default) or ``"bf16"``: the attacks' gradient passes run under
            bfloat16 autocast (faster on a GPU). Every decision an attack takes (misclassified already,
            broken, closer adversarial found) and every verdict on the crafted images is still the
            float32 model's (:func:`robustlab.attacks.core.float32_logits`); FAB and Square run wholly
            in float32, and AutoAttack, the reference, always crafts in float32. Recorded as
            ``model_info["attack_precision"]``.
        state_dir: where each finished attack's per-sample results, and AutoAttack's state after every
            stage (:mod:`robustlab.stages`), are saved, so an interrupted evaluation resumes; the files are
            removed when the evaluation finishes. None: no state is kept.
        fuse: the attacks differentiate a faster copy of the classifier (BatchNorm folded into its
            convolutions, channels_last: :func:`robustlab.models.fused.fused_copy`; the same function to
            float rounding); every verdict is still the model's own prediction. ``False``: the attacks
            differentiate the model itself. Recorded as ``model_info["attack_model"]``.

    Under ``torchrun`` every rank calls this with the same arguments; each attacks its share of the
    batches (on its own GPU) and every rank returns the whole, gathered result.
    """
    eps = _checked_eps(eps, norm, attack_precision, n=n, batch_size=batch_size, eot_samples=eot_samples,
                       random_passes=random_passes, n_boot=n_boot)
    plan = resolve_attacks(attacks, suite)
    if isinstance(split, tuple | list) and len(split) == 2:
        split = Split.from_pixels(*split)
    elif not isinstance(split, Split):
        raise InputError(f"evaluate_model takes a Split or an (images, labels) pair, got {type(split).__name__}")
    total, whole = len(split), split
    split, indices = choose_samples(split, n, subset)
    if len(split) == 0:
        raise InputError("the evaluation split is empty")
    device, group = _place(model, device)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        grad_model, info, passes, built = _prepare(model, attacks, suite, plan, eps, norm, eot_samples,
                                                   random_passes, attack_precision, fuse)
        job = _Job(model, grad_model, split, distributed.my_batches(math.ceil(len(split) / batch_size), group),
                   batch_size, device, group, eps, norm, seed, passes, attack_precision, state_dir,
                   progress and group.is_main)
        with torch.random.fork_rng(devices=job.rng_devices), torch.no_grad():  # a random model draws no RNG of ours
            info["num_classes"] = int(model(split.images[:1].to(device).float().div_(255)).shape[1])
        try:
            columns, seconds, staged, finished_states = _attack_all(job, built)
        except KeyboardInterrupt:
            _say_what_is_kept(state_dir, threat_key(norm, eps))
            raise
        clean_all = None
        if len(split) < total:
            with torch.random.fork_rng(devices=job.rng_devices):
                torch.manual_seed(seed)
                clean_all = _clean_all(model, whole, batch_size, device, passes, n_boot, seed)
    finally:
        model.train(was_training)
    if group.enabled:  # each rank attacked every world_size-th batch: put the batches back in order
        columns, seconds, staged = _merge_ranks(distributed.gather((columns, seconds, staged)))
    for path in finished_states:
        path.unlink(missing_ok=True)
    return _result(job, built, columns, seconds, staged, indices=indices, total=total, subset=subset, info=info,
                   n_boot=n_boot, started=started, clean_all=clean_all)


def _say_what_is_kept(state_dir: str | Path | None, key: str) -> None:
    """After Ctrl-C: where the finished attacks (and AutoAttack's finished stages) wait for a rerun."""
    kept = sorted(Path(state_dir).glob(f"{key}.*.partial.npz")) if state_dir is not None else []
    if kept:
        print(f"\ninterrupted: {len(kept)} state file(s) of finished attacks or AutoAttack stages are kept in "
              f"{kept[0].parent}; rerun the same command to resume", file=sys.stderr)


def _checked_eps(eps: float, norm: str, attack_precision: str, **sizes: int | None) -> float:
    """The validated budget; every argument that cannot be measured with fails here, before any work."""
    eps = check_eps(eps, norm)
    if norm not in ("linf", "l2"):
        raise ConfigError(f"threat.norm must be 'linf' or 'l2', got '{norm}'")
    for name, value in sizes.items():
        if value is not None and int(value) < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if attack_precision not in ("fp32", "bf16"):
        raise InputError(f"attack_precision must be 'fp32' or 'bf16', got {attack_precision!r}")
    return eps


def _place(model: nn.Module, device: torch.device | str | None) -> tuple[torch.device, distributed.Distributed]:
    """Move ``model`` to ``device`` (default: where it is; under ``torchrun`` on CUDA: the rank's GPU)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    group = distributed.setup(device.type)
    if group.enabled and device.type == "cuda":  # one GPU per rank
        device = torch.device("cuda", group.local_rank)
    model.to(device)
    return device, group


def _prepare(
    model: nn.Module, attacks: Sequence[AttackSpec], suite: str | None, plan: list[tuple[str, AttackSpec]],
    eps: float, norm: str, eot_samples: int, random_passes: int, attack_precision: str, fuse: bool,
) -> tuple[nn.Module, dict[str, Any], int, list[Built]]:
    """The model attacks differentiate, the model record, forward passes per input, and the built attacks.

    A random model asked for the ``standard`` suite gets ``rand`` (see :func:`evaluate_model`).
    """
    grad_model, info = _adaptive(model, eot_samples, fuse)
    if info["random"] and suite == "standard":
        plan = resolve_attacks(attacks, "rand")
        info["suite"] = "rand (standard asked for; the model is random)"
    passes = random_passes if info["random"] else 1
    built = [
        (label, *_attack_record(label, spec, eps, norm, info["adaptive"], info["random"])) for label, spec in plan
    ]
    if attack_precision == "bf16" and any(record["name"] == "autoattack" for _, _, record in built):
        attack_precision = "bf16 (AutoAttack in fp32)"
    info.update(random_passes=passes, eot_samples=eot_samples if info["random"] else None,
                attack_precision=attack_precision)
    return grad_model, info, passes, built


@dataclass
class _Job:
    """What every attack of one evaluation shares: the models, the samples, this rank's batches, the threat."""

    model: nn.Module
    grad_model: nn.Module
    split: Split
    mine: list[int]
    batch_size: int
    device: torch.device
    group: distributed.Distributed
    eps: float
    norm: str
    seed: int
    passes: int
    attack_precision: str
    state_dir: str | Path | None
    speak: bool  # progress output: asked for, and this is the main rank

    @property
    def rng_devices(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []


def _attack_all(
    job: _Job, built: list[Built]
) -> tuple[dict[str, dict[int, tuple[np.ndarray, ...]]], dict[str, float], dict[str, dict[str, Any]], list[Path]]:
    """Classify this rank's batches clean and under every attack: per-batch arrays, seconds, AutoAttack stages.

    With a ``state_dir``, each finished attack's per-batch results are saved there at once (AutoAttack
    saves its own state after every stage), so an interrupted evaluation run again reads them back instead
    of attacking again. Also returns those state files, to remove once the evaluation is complete.
    """
    bar = progress_bar(total=len(job.mine) * (1 + len(built)), desc="evaluate", enabled=job.speak)
    columns: dict[str, dict[int, tuple[np.ndarray, ...]]] = {}
    seconds: dict[str, float] = {}
    staged: dict[str, dict[str, Any]] = {}
    fingerprint = (
        {"model": model_digest(job.model), "samples": job.split.digest(), "passes": job.passes,
         "fused": is_fused(job.grad_model)}
        if job.state_dir else None
    )
    finished_states: list[Path] = []
    for index, (label, attack, record) in enumerate([("clean", None, None), *built]):
        bar.set_postfix_str(label)
        checkpoint = _attack_checkpoint(job, index, label, record, fingerprint)
        saved = None if checkpoint is None else _load_columns(*checkpoint)
        if saved is not None:
            columns[label], seconds[label] = saved
            finished_states.append(checkpoint[0])
            bar.update(len(job.mine))
            progress_line(f"evaluate: {label} read back from {checkpoint[0]} (it finished before an interruption)",
                          job.speak, sys.stderr)
            continue
        tic = time.perf_counter()
        earlier = 0.0  # seconds an interrupted run already spent on the stages read back
        with torch.random.fork_rng(devices=job.rng_devices):
            found = None
            if record is not None and record["name"] == "autoattack":
                path = None if job.state_dir is None else state_file(
                    Path(job.state_dir), threat_key(job.norm, job.eps), label, job.group.rank, job.group.world_size)
                run = run_autoattack(job.model, job.grad_model, job.split, job.mine, job.batch_size, job.device,
                                     parse_attack_spec(record["spec"])[1], eps=job.eps, norm=job.norm, seed=job.seed,
                                     stream=index, label=label, state_path=path,
                                     fingerprint=_autoattack_fingerprint(fingerprint, record), progress=job.speak)
                staged[label] = {"masks": run.masks, "seconds": run.seconds}
                finished_states += [path] if path is not None else []
                found = run.x_adv
                earlier = sum(run.seconds.get(name, 0.0) for name in list(run.masks)[1 : 1 + run.resumed_stages])
            results, outside = _attack_batches(job, index, label, attack, found, bar)
        if bool(outside):
            raise RuntimeError(f"attack '{label}' left the {job.norm} ball of radius {job.eps} or the [0, 1] box")
        columns[label] = _to_host(results)
        seconds[label] = time.perf_counter() - tic + earlier
        if checkpoint is not None:
            _save_columns(*checkpoint, columns[label], seconds[label])
            finished_states.append(checkpoint[0])
        if bar.disable:  # no live bar (a log, not a terminal): one line per attack instead
            progress_line(f"evaluate: {label} done in {seconds[label]:.1f}s", job.speak, sys.stderr)
    bar.close()
    return columns, seconds, staged, finished_states


def _autoattack_fingerprint(fingerprint: dict[str, Any] | None, record: dict[str, Any]) -> dict[str, Any] | None:
    """AutoAttack's state tag: the evaluation's fingerprint and, where the stages differentiate an adapted
    model (EOT over its randomness, BPDA through a transform), that adaptation, which the stage
    parameters do not show (a plain model has none to record)."""
    if fingerprint is None or record["adaptive"] == PLAIN_MODEL:
        return fingerprint
    return {**fingerprint, "adaptive": record["adaptive"]}


def _attack_checkpoint(
    job: _Job, index: int, label: str, record: dict[str, Any] | None, fingerprint: dict[str, Any] | None
) -> tuple[Path, str] | None:
    """Where an attack's finished results are kept, and the tag of everything they depend on; None for the
    clean pass (seconds), AutoAttack (its stages keep their own state) and an evaluation without state_dir."""
    if job.state_dir is None or record is None or record["name"] == "autoattack":
        return None
    path = state_file(Path(job.state_dir), threat_key(job.norm, job.eps), label, job.group.rank, job.group.world_size)
    tag = json.dumps({**(fingerprint or {}), "format": 1, "label": label, "record": record, "eps": job.eps,
                      "norm": job.norm, "seed": job.seed, "stream": index, "batches": list(job.mine),
                      "batch_size": job.batch_size, "attack_precision": job.attack_precision},
                     sort_keys=True, default=str)
    return path, tag


def _save_columns(path: Path, tag: str, columns: dict[int, tuple[np.ndarray, ...]], seconds: float) -> None:
    """One attack's per-batch arrays as ``"<batch>.<column>"`` entries, with its batches and seconds."""
    arrays = {f"{batch}.{i}": column for batch, parts in columns.items() for i, column in enumerate(parts)}
    save_tagged_arrays(path, tag, {**arrays, "batches": np.array(sorted(columns)), "seconds": np.array(seconds)})


def _load_columns(path: Path, tag: str) -> tuple[dict[int, tuple[np.ndarray, ...]], float] | None:
    """What :func:`_save_columns` wrote under ``tag``; None when there is no such file."""
    saved = load_tagged_arrays(path, tag)
    if saved is None:
        return None
    batches = saved["batches"].tolist()
    width = sum(key.startswith(f"{batches[0]}.") for key in saved) if batches else 0
    return {batch: tuple(saved[f"{batch}.{i}"] for i in range(width)) for batch in batches}, float(saved["seconds"])


def _attack_batches(
    job: _Job, index: int, label: str, attack: Any, found: Any, bar: Any
) -> tuple[dict[int, tuple[torch.Tensor, ...]], torch.Tensor]:
    """One attack (None: clean; ``index`` seeds it) over this rank's batches, the results left on the device.

    ``found`` holds the adversarials AutoAttack already crafted, per batch. Also returns whether any
    adversarial left the threat model, as a 0-d bool on the device.
    """
    results: dict[int, tuple[torch.Tensor, ...]] = {}  # on the device until the attack is done
    outside = torch.zeros((), dtype=torch.bool, device=job.device)
    for batch, (x, y) in zip(job.mine, iterate(job.split, job.batch_size, job.device, job.mine), strict=True):
        torch.manual_seed(distributed.batch_seed(job.seed, index, batch))
        if found is not None:
            x_adv = found[batch].to(job.device)
        elif attack is not None:
            with bf16_autocast(job.device, job.attack_precision == "bf16"):
                x_adv = attack(job.grad_model, x, y)
        if attack is not None:
            outside = outside | _outside_budget(x_adv, x, job.eps, job.norm, label)
            x = x_adv
        results[batch] = _classify(job.model, x, y, job.passes)
        bar.update(1)
    return results, outside


def _measurement(
    label: str, record: dict | None, columns: dict, seconds: dict[str, float], staged: dict[str, Any],
    n_boot: int, seed: int,
) -> tuple[Measurement, np.ndarray]:
    """One label's measurement from its per-batch arrays, and its per-sample true-class probability."""
    batches = [columns[label][batch] for batch in sorted(columns[label])]
    correct, confidence, p_true = (np.concatenate(c, axis=1) for c in zip(*batches, strict=True))
    m = Measurement(label, record, correct, confidence.astype(np.float32), seconds[label])
    m.ci95 = bootstrap_ci(m.per_sample, n_boot, seed)
    if label in staged:
        m.stages = _stage_summary(staged[label])
    return m, p_true


def _result(
    job: _Job, built: list[Built], columns: dict, seconds: dict[str, float], staged: dict[str, Any], *,
    indices: torch.Tensor, total: int, subset: str, info: dict[str, Any], n_boot: int, started: float,
    clean_all: dict[str, Any] | None,
) -> EvaluationResult:
    """The :class:`EvaluationResult` of the gathered per-batch arrays of every attack."""
    split, seed = job.split, job.seed
    clean, _ = _measurement("clean", None, columns, seconds, staged, n_boot, seed)
    measured = {label: _measurement(label, record, columns, seconds, staged, n_boot, seed)
                for label, _, record in built}
    worst, worst_index = _worst_case(clean, measured, n_boot, seed)
    grade = AUTOATTACK_GRADE if any(is_full_autoattack(record) for _, _, record in built) else UPPER_BOUND
    return EvaluationResult(
        threat={"norm": job.norm, "eps": job.eps},
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


def _adaptive(model: nn.Module, eot_samples: int, fuse: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The model attacks differentiate, and a record of the adaptive mode (BPDA / EOT) chosen.

    With ``fuse``, the classifier inside is a :func:`~robustlab.models.fused.fused_copy` (a plain model,
    or the classifier behind a :class:`~robustlab.defenses.preprocessing.Defended` transform).
    """
    differentiable = getattr(model, "differentiable", None)
    random = getattr(model, "random", None)
    attacked = fused_classifier(model) if fuse else model
    if differentiable is None and random is None:
        grad_model, info = attacked, {"adaptive": PLAIN_MODEL, "differentiable": True, "random": False}
    else:
        # looked up on the package, so that replacing ``robustlab.evaluation.adaptive_model`` reaches here
        grad_model, description = _package.adaptive_model(attacked, eot_samples=eot_samples)
        info = {"adaptive": str(description), "differentiable": differentiable is not False, "random": bool(random)}
    info["attack_model"] = FUSED_LABEL if is_fused(attacked) else "the model itself"
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
    clean: Measurement, measured: dict[str, tuple[Measurement, np.ndarray]], n_boot: int, seed: int
) -> tuple[Measurement, np.ndarray]:
    """Per sample (and pass): robust only if it is classified correctly clean and every attack failed;
    its adversarial is the strongest one.

    A sample misclassified clean is not robust even where every attack's output happens to be
    classified correctly (a single FGSM step or a random start can land on the right side), as in
    AutoAttack, which never attacks such a sample and counts it wrong.

    The image kept for the confidence statistics is, per sample, a misclassified adversarial if any
    attack succeeded, and among those (or among all when none did) the one giving the true class the
    lowest probability. A sample misclassified clean that no attack's output misclassifies keeps its
    clean image instead (index -1 in the returned choice), so a sample counted wrong is never
    described by the confidence of a correct prediction.
    """
    labels = list(measured)
    record = {"name": "worst_case", "over": labels}
    correct = np.stack([measured[k][0].correct for k in labels])
    confidence = np.stack([measured[k][0].confidence for k in labels])
    p_true = np.stack([measured[k][1] for k in labels])
    choice = np.argmin(correct * 2.0 + p_true, axis=0)
    pick = np.take_along_axis(confidence, choice[None], axis=0)[0]
    wrong_only_clean = ~clean.correct & np.take_along_axis(correct, choice[None], axis=0)[0]
    pick = np.where(wrong_only_clean, clean.confidence, pick)
    choice = np.where(wrong_only_clean, -1, choice)
    seconds = sum(measured[k][0].seconds for k in labels)
    worst = Measurement("worst_case", record, correct.all(axis=0) & clean.correct, pick, seconds)
    worst.ci95 = bootstrap_ci(worst.per_sample, n_boot, seed)
    return worst, choice.astype(np.int16)


def _versions() -> dict[str, str]:
    import robustlab

    return {"robustlab": robustlab.__version__, "torch": torch.__version__}

