"""Evaluate a run directory or a checkpoint of one's own, and save the result beside it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import robustlab.evaluation as _package
from robustlab import distributed
from robustlab.attacks.wrappers import EOT_SAMPLES
from robustlab.data import load_dataset
from robustlab.errors import CheckpointError
from robustlab.evaluation.plan import DEFAULT_ATTACKS, DEFAULT_SUITE, AttackSpec
from robustlab.evaluation.result import EvaluationResult, threat_key
from robustlab.evaluation.store import _sha256, refuse_to_replace, save_evaluation
from robustlab.rundir import RunDir, load_foreign_checkpoint
from robustlab.runs import load_run, select_device


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
    fuse: bool = True,
    overwrite: bool = False,
) -> EvaluationResult:
    """Evaluate a run's selected weights on its test split at the run's threat (or ``eps``/``norm``).

    The training cost from ``metrics.json`` is copied into the result; with ``write`` the result is
    merged into ``metrics.json`` under ``evaluations[threat_key]`` and per-sample arrays are saved. An
    evaluation already there at the same threat is only replaced with ``overwrite`` (checked before
    any attack runs); an interrupted one, which left only its state files, resumes.
    """
    run = RunDir(run_dir)
    # damaged metrics.json / metadata.json are reported now, not after every attack has run
    previous, finished = run.read_metrics(), run.is_finished()
    loaded = load_run(run_dir, select_device(device))
    norm = norm or loaded.config.threat.norm
    eps = loaded.config.threat.eps if eps is None else eps
    if write and not overwrite:
        refuse_to_replace(run.path, [threat_key(norm, eps)])
    result = _package.evaluate_model(  # looked up on the package, where tests replace it
        loaded.model, loaded.data.test, eps=eps, norm=norm, attacks=attacks, suite=suite,
        batch_size=batch_size, seed=seed, n=n, subset=subset, eot_samples=eot_samples,
        random_passes=random_passes, n_boot=n_boot, progress=progress, attack_precision=attack_precision,
        state_dir=Path(run_dir) / "evaluation" if write else None, fuse=fuse,
    )
    result.cost = previous.get("cost")
    result.model_info["weights_sha256"] = _sha256(run.weights)
    result.extra.update(run_config={"dataset": loaded.config.data.dataset, "model": loaded.config.model.name,
                                    "defense": loaded.config.defense.name, "seed": loaded.config.seed,
                                    "finished": finished})
    if write and distributed.from_environment().is_main:
        save_evaluation(result, run.path)
    return result


def threat_keys_of(run_dir: str | Path, budgets: Sequence[float | None], norm: str | None) -> list[str]:
    """The :func:`threat_key` of each budget (None: the run's own eps) at ``norm`` (None: the run's own)."""
    from robustlab.config import parse_number

    threat = (RunDir(run_dir).read_config_dict().get("threat") or {}) if RunDir(run_dir).config.exists() else {}
    norm = norm or threat.get("norm", "linf")
    return [threat_key(norm, parse_number(threat.get("eps", 0.0)) if eps is None else eps) for eps in budgets]


def evaluate_checkpoint(
    model_name: str,
    checkpoint: str | Path,
    dataset: str,
    *,
    eps: float,
    data_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    overwrite: bool = False,
    **options: Any,
) -> EvaluationResult:
    """Evaluate a model of one's own: a registered architecture with weights from ``checkpoint``.

    ``checkpoint`` is safetensors (preferred) or a ``.pt`` state dict read with ``weights_only=True``.
    A robustlab checkpoint carries its ``Normalize`` buffers; a bare network state dict is evaluated
    on [0, 1] pixels with identity normalisation. ``options`` are :func:`evaluate_model`'s. ``out_dir``
    must not be a training run, and an evaluation already there at the same threat is only replaced
    with ``overwrite``.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if out_dir is not None:  # a damaged metrics.json there is reported before the attacks, not after
        if RunDir(out_dir).config.exists():
            raise CheckpointError(f"{out_dir} is a training run: a checkpoint's evaluation needs a directory of "
                                  "its own (--out)")
        RunDir(out_dir).read_metrics()
        if not overwrite:
            refuse_to_replace(out_dir, [threat_key(options.get("norm", "linf"), eps)])
    from robustlab.models import build_model

    data = load_dataset(dataset, data_dir, val_size=1)
    model = build_model(model_name, data.num_classes, data.channels, data.image_size)
    load_foreign_checkpoint(path, model)
    state_dir = None if out_dir is None else Path(out_dir) / "evaluation"
    result = _package.evaluate_model(  # looked up on the package, where tests replace it
        model, data.test, eps=eps, device=select_device(device), state_dir=state_dir, **options
    )
    result.model_info["weights_sha256"] = _sha256(path)
    result.extra.update(run_config={"dataset": dataset, "model": model_name, "checkpoint": str(path)})
    if out_dir is not None and distributed.from_environment().is_main:
        save_evaluation(result, out_dir)
    return result

