"""Audit a model (:func:`audit_model`) or a run directory (:func:`audit_run`), with a transfer surrogate."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab import distributed
from robustlab.attacks import frozen
from robustlab.attacks.wrappers import EOT_SAMPLES
from robustlab.audit.auditor import _Auditor, _declares
from robustlab.audit.checks import (
    _check_accuracy_vs_eps,
    _check_blackbox,
    _check_bpda,
    _check_fgsm,
    _check_gradients,
    _check_more_steps,
    _check_randomness,
)
from robustlab.audit.report import AuditCheck, AuditReport, Z
from robustlab.config import build_config
from robustlab.data import DatasetSplits, Split
from robustlab.errors import InputError, RobustlabError
from robustlab.progress import progress_line
from robustlab.rundir import RunDir
from robustlab.stages import model_digest
from robustlab.validation import check_batch, check_eps

#: An unfinished audit's measurements, beside the ``audit.json`` it becomes (see ``audit_model(checkpoint=)``).
AUDIT_CHECKPOINT = "audit.partial.npz"


def audit_model(
    model: nn.Module,
    data: Split | tuple[torch.Tensor, torch.Tensor],
    *,
    eps: float,
    norm: str = "linf",
    n: int | None = 200,
    seed: int = 0,
    surrogate: nn.Module | None = None,
    steps: int = 20,
    bpda: bool | None = None,
    eot: int | None = None,
    square_queries: int = 1000,
    batch_size: int = 256,
    fuse: bool = True,
    checkpoint: str | Path | None = None,
    progress: bool = False,
    early_stop: bool | None = None,
) -> AuditReport:
    """Run the gradient-masking checklist on the first ``n`` images of ``data`` at budget ``eps``.

    Args:
        data: a uint8 :class:`~robustlab.data.Split` or float ``(x, y)`` in pixel space.
        surrogate: an independently trained model for the transfer attack (check 4); without one
            only Square runs there (see :func:`train_surrogate`).
        steps: PGD steps of the reference white-box attack; check 2 compares it with 5x the steps
            and 3 restarts.
        bpda: whether the audited evaluation attacks through BPDA. ``None`` follows robustlab's
            evaluation protocol (``attacks.wrappers.adaptive_model``): BPDA iff the model is a
            ``Defended`` whose transform declares ``differentiable=False``.
        eot: EOT passes per gradient. ``None`` follows the same protocol: ``EOT_SAMPLES`` passes iff
            the model declares ``random=True``. ``eot=1`` means no EOT.
        fuse: the checks differentiate a fused copy of the classifier, as evaluation does
            (:func:`robustlab.models.fused.fused_classifier`; the same function, faster), the EOT and
            BPDA checks included; verdicts and the randomness check still use the model itself.
        checkpoint: a file that keeps every finished attack measurement as soon as it is made, so an
            interrupted audit started again with the same model, images, surrogate and settings
            continues where it stopped (an audit with anything different ignores the file). The
            caller deletes it once the report is written.
        progress: print one line per check as it finishes (its status and seconds), for a log.
        early_stop: whether the checks' PGD leaves an image alone once it is misclassified (it counts as
            broken either way). ``None`` follows the evaluation (``evaluation.plan``): on, unless the model
            declares ``random=True`` (one noisy pass that misclassifies proves nothing). Stopping saves
            most of the audit's work on images broken in a few steps (a standard model's: nearly all).
    Returns:
        An :class:`AuditReport`; the model's mode and ``requires_grad`` flags are left as found.

    Under ``torchrun`` every rank calls this with the same arguments; each measures every N-th batch
    (on its own GPU) and every rank returns the whole report, equal to the single-process one.
    """
    x, y = _audit_images(data, n, eps, norm)
    declared_bpda, declared_random = _declares(model)
    use_bpda = declared_bpda if bpda is None else bpda
    eot_samples = (EOT_SAMPLES if declared_random else 1) if eot is None else max(1, int(eot))
    stop_early = not declared_random if early_stop is None else bool(early_stop)
    device = next(model.parameters()).device
    group = distributed.setup(device.type)
    if group.enabled and device.type == "cuda":  # one GPU per rank, as in evaluation
        device = torch.device("cuda", group.local_rank)
        model.to(device)
    if surrogate is not None:
        surrogate.to(device)
    settings = {
        "eps": float(eps),
        "norm": norm,
        "n": int(y.shape[0]),
        "seed": seed,
        "steps": steps,
        "bpda": use_bpda,
        "eot_samples": eot_samples,
        "square_queries": square_queries,
        "surrogate": surrogate is not None,
        "fused": bool(fuse),
        "early_stop": stop_early,
        "noise": f"{Z:g} Agresti-Coull binomial standard errors",
    }
    modes = [m.training for m in model.modules()]
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with frozen(model), torch.random.fork_rng(devices=devices):  # draws are seeded per batch
            model.eval()
            if surrogate is not None:
                surrogate.eval()
            tag = _checkpoint_tag(model, surrogate, x, y, settings, batch_size) if checkpoint is not None else ""
            auditor = _Auditor(model, x.to(device), y.to(device), eps=float(eps), norm=norm, seed=seed, steps=steps,
                               bpda=use_bpda, eot=eot_samples, batch_size=batch_size, group=group, fuse=fuse,
                               checkpoint=None if checkpoint is None else Path(checkpoint), tag=tag,
                               early_stop=stop_early)
            if auditor.resumed and group.is_main:
                print(f"audit: resuming with {auditor.resumed} finished measurement(s) from {checkpoint}",
                      file=sys.stderr)
            try:
                checks = _run_checks(auditor, surrogate, square_queries, progress and group.is_main)
            except KeyboardInterrupt:
                if checkpoint is not None and Path(checkpoint).exists() and group.is_main:
                    print(f"\ninterrupted: the audit's finished measurements are kept in {checkpoint}; rerun the "
                          "same command to resume", file=sys.stderr)
                raise
    finally:
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode
    return AuditReport(checks, settings, resumed_seconds=auditor.resumed_seconds)


def _checkpoint_tag(
    model: nn.Module, surrogate: nn.Module | None, x: torch.Tensor, y: torch.Tensor, settings: dict[str, Any],
    batch_size: int,
) -> str:
    """What an audit's measurements depend on: weights (the surrogate's too), images, labels, settings and
    batching (each batch's random draws are seeded by its index)."""
    images = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes())
    images.update(y.detach().cpu().numpy().tobytes())
    return json.dumps({
        "format": 1, "model": model_digest(model), "surrogate": None if surrogate is None else model_digest(surrogate),
        "images": images.hexdigest()[:16], "batch_size": batch_size, "settings": settings,
    }, sort_keys=True)


def _audit_images(
    data: Split | tuple[torch.Tensor, torch.Tensor], n: int | None, eps: float, norm: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images of ``data`` as float pixels and their labels; bad arguments fail here."""
    x, y = (data.float_images(), data.labels) if isinstance(data, Split) else data
    if n is not None:
        if n < 1:
            raise InputError(f"n must be >= 1, got {n}")
        x, y = x[:n], y[:n]
    check_batch(x, y)
    if check_eps(eps, norm) == 0:
        raise InputError("the audit needs eps > 0")
    if norm not in ("linf", "l2"):
        raise InputError(f"norm must be 'linf' or 'l2', got {norm!r}")
    return x, y


def _run_checks(
    auditor: _Auditor, surrogate: nn.Module | None, square_queries: int, progress: bool
) -> list[AuditCheck]:
    """Every check of :data:`CHECK_NAMES`, in that order; with ``progress``, a line as each one finishes."""
    steps = [
        lambda: _check_accuracy_vs_eps(auditor),
        lambda: _check_more_steps(auditor),
        lambda: _check_fgsm(auditor),
        lambda: _check_blackbox(auditor, surrogate, square_queries),
        lambda: _check_gradients(auditor),
        lambda: _check_randomness(auditor),
        lambda: _check_bpda(auditor),
    ]
    checks = []
    for number, step in enumerate(steps, 1):
        tic = time.perf_counter()
        checks.append(step())
        progress_line(f"audit {number}/{len(steps)} {checks[-1].name}: {checks[-1].status}, "
                      f"{time.perf_counter() - tic:.1f} s", progress, sys.stderr)
    return checks


def train_surrogate(
    data: DatasetSplits,
    *,
    model: str | dict[str, Any] = "lenet5",
    epochs: int = 3,
    seed: int = 1,
    train_subset: int | None = 20_000,
    cache_dir: str | Path | None = None,
) -> nn.Module:
    """A quickly trained *standard* model on ``data``'s training split, the source of transfer attacks.

    ``model`` is a model name or a config ``model`` section (``{"name": "wide_resnet", "depth": 28}``).
    Trained with robustlab's own training loop in a throw-away run directory (Adam, lr 1e-3). With
    ``cache_dir`` the weights are kept there as safetensors, keyed by the training images, model and
    recipe, so the audits of every run of one experiment share one surrogate.
    """
    from robustlab.rundir import load_weights, save_weights
    from robustlab.runs import prepare_model
    from robustlab.training import train

    if train_subset is not None and len(data.train) > train_subset:
        data = dataclasses.replace(data, train=data.train.head(train_subset))
    config = {
        "seed": seed,
        "data": {"dataset": data.name, "val_size": len(data.val)},
        "model": {"name": model} if isinstance(model, str) else model,
        "defense": {"name": "standard"},
        "train": {
            "epochs": epochs,
            "optimizer": "adam",
            "lr": 1e-3,
            "weight_decay": 0.0,
            "select": "last",
            "schedule": "constant",
        },
    }
    cached = None
    if cache_dir is not None:
        recipe = json.dumps([config, data.train.digest()], sort_keys=True).encode()
        cached = Path(cache_dir) / f"surrogate-{hashlib.sha256(recipe).hexdigest()[:16]}.safetensors"
        if cached.exists():
            surrogate = prepare_model(build_config(config), data)
            load_weights(cached, surrogate)
            return surrogate.eval()
    with tempfile.TemporaryDirectory(prefix="robustlab-surrogate-") as tmp:
        surrogate = train(config, Path(tmp) / "surrogate", progress=False, data=data).model.eval()
    if cached is not None and distributed.from_environment().is_main:
        save_weights(cached, surrogate)
    return surrogate


def audit_run(
    run_dir: str | Path,
    *,
    n: int = 500,
    eps: float | None = None,
    seed: int = 0,
    device: str = "auto",
    surrogate: bool = True,
    surrogate_epochs: int = 3,
    surrogate_cache: str | Path | None = None,
    progress: bool = False,
    overwrite: bool = False,
    **options: Any,
) -> AuditReport:
    """Audit a finished run on its test split and write ``RUN_DIR/audit.json`` atomically.

    An existing ``audit.json`` is only replaced with ``overwrite`` (checked before any work).

    Finished measurements are kept in ``RUN_DIR/audit.partial.npz`` until the report is written, so an
    interrupted audit run again continues where it stopped.

    ``eps`` and the norm default to the run's threat model. With ``surrogate=True`` a standard model of
    the run's architecture is trained for ``surrogate_epochs`` on the run's training split as the
    transfer-attack source (reused from ``surrogate_cache`` when one was trained there already). Other
    keyword options go to :func:`audit_model`. Under ``torchrun`` the ranks share the work (the surrogate's
    training too) and rank 0 writes.
    """
    from robustlab.rundir import write_json
    from robustlab.runs import load_run, select_device

    started = time.perf_counter()
    loaded = load_run(run_dir, select_device(device))  # under torchrun, audit_model moves it to the rank's GPU
    budget = check_eps(loaded.config.threat.eps if eps is None else eps, loaded.config.threat.norm)
    written = RunDir(run_dir).path / "audit.json"
    if written.exists() and not overwrite:
        raise RobustlabError(f"{written} exists; pass --overwrite (overwrite=True) to audit again and replace it")
    source = None
    if surrogate:
        source = train_surrogate(
            loaded.data, model=loaded.config.model.model_dump(), epochs=surrogate_epochs, seed=seed + 1,
            cache_dir=surrogate_cache,
        )
        source.to(next(loaded.model.parameters()).device)
    run = RunDir(run_dir)
    report = audit_model(
        loaded.model,
        loaded.data.test,
        eps=budget,
        norm=loaded.config.threat.norm,
        n=n,
        seed=seed,
        surrogate=source,
        checkpoint=run.path / AUDIT_CHECKPOINT,
        progress=progress,
        **options,
    )
    from robustlab.evaluation import subset_name

    report.settings.update(
        run_dir=str(loaded.path),
        split="test",
        subset=subset_name(int(report.settings["n"]), len(loaded.data.test), "first"),  # audit_model takes the first n
        surrogate=f"standard {loaded.config.model.name}, {surrogate_epochs} epochs" if surrogate else None,
    )
    report.seconds = time.perf_counter() - started + report.resumed_seconds
    if distributed.from_environment().is_main:
        write_json(run.path / "audit.json", report.to_dict())
        (run.path / AUDIT_CHECKPOINT).unlink(missing_ok=True)
    return report
