"""AutoAttack inside an evaluation: stage by stage over all batches, shown as it goes, resumable.

:func:`robustlab.attacks.autoattack` runs its stages (APGD-CE, APGD-T, FAB-T, Square) on one batch.
An evaluation of thousands of images runs for hours on a CPU, so here the loop is turned around: each
stage attacks the still-robust points of every batch before the next stage starts. That gives

- a progress bar per stage with an ETA (on a terminal), and one line per finished stage with the
  robust accuracy left after it (always, so a log file shows it too);
- the per-stage robust accuracy in the result, not only the final one;
- a state file written (atomically) after every stage: which points are still robust and the
  adversarial images of the points attacked so far, in the spirit of auto-attack's ``state.py``. An
  interrupted evaluation that is started again with the same model, samples, attack and seed skips the
  finished stages; one with anything different ignores the file.

Each stage packs the points still robust in every batch into full batches before attacking them (as
the official AutoAttack does), so late stages, which see few robust points per original batch, still
run on full batches. Every packed batch's random draws are seeded from ``(seed, stream, packed batch,
stage)``, so a resumed evaluation gives exactly the uninterrupted result.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from robustlab.attacks.autoattack import (
    FULL_QUERIES,
    FULL_STEPS,
    attacked_model,
    autoattack,
    autoattack_stages,
    run_stage,
)
from robustlab.attacks.core import frozen
from robustlab.attacks.wrappers import EOT_SAMPLES
from robustlab.data import Split
from robustlab.defenses.preprocessing import InputTransform
from robustlab.distributed import batch_seed
from robustlab.errors import ConfigError
from robustlab.memory import split_on_oom
from robustlab.metrics import iterate
from robustlab.progress import progress_bar, progress_line
from robustlab.rundir import load_tagged_arrays, save_tagged_arrays

Batches = Callable[[], Any]  # yields (x, y) device batches of the evaluated samples, in `mine` order


@dataclass
class StagedResult:
    """Per batch: the adversarial images; per stage: the still-robust mask of every batch and its seconds."""

    x_adv: dict[int, torch.Tensor]
    masks: dict[str, dict[int, np.ndarray]]  # "clean", then each stage name
    seconds: dict[str, float]
    resumed_stages: int


#: Bumped when the state file's contents change, so an older file is ignored rather than misread.
STATE_FORMAT = 2


def stage_params(params: dict[str, Any]) -> dict[str, Any]:
    """AutoAttack's ``version``, ``steps``, ``queries``, ``eot_samples`` from a record; unknown keys are errors."""
    accepted = {"version", "steps", "queries", "eot_samples"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        names = ", ".join(k for k in inspect.signature(autoattack).parameters if k in accepted)
        raise ConfigError(f"attack 'autoattack' has no parameter {', '.join(unknown)}; accepted: {names}")
    return {"version": "standard", "steps": FULL_STEPS, "queries": FULL_QUERIES, "eot_samples": EOT_SAMPLES,
            **params}


def model_digest(model: nn.Module) -> str:
    """A hash of every parameter and buffer, and of the settings of every input transform (a squeezer's
    bit depth, a noise level: plain attributes, not in the state dict): a state file only resumes the very
    same model, not the same classifier behind another transform."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too
    for name, module in model.named_modules():
        if isinstance(module, InputTransform):
            digest.update(f"{name}={module!r}".encode())
    return digest.hexdigest()[:16]


def state_file(state_dir: Path, key: str, label: str, rank: int, world_size: int) -> Path:
    """``STATE_DIR/<threat key>.<label>.partial.npz`` (one per rank under torchrun)."""
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)
    suffix = f".rank{rank}of{world_size}" if world_size > 1 else ""
    return state_dir / f"{key}.{slug}{suffix}.partial.npz"


def run_autoattack(
    model: nn.Module,
    grad_model: nn.Module,
    split: Split,
    mine: Sequence[int],
    batch_size: int,
    device: torch.device,
    params: dict[str, Any],
    *,
    eps: float,
    norm: str,
    seed: int,
    stream: int,
    label: str,
    state_path: Path | None = None,
    fingerprint: dict[str, Any] | None = None,
    progress: bool = False,
) -> StagedResult:
    """AutoAttack on the batches ``mine`` of ``split``, stage by stage; see the module docstring.

    ``grad_model`` is what the stages differentiate and what judges success (the evaluation's adaptive
    model, as :func:`robustlab.attacks.autoattack` would be given it). ``fingerprint`` describes
    everything else the result depends on; a state file written under another one is not resumed.
    """
    p = stage_params(params)
    # each stage's attack retries an out-of-memory batch in halves, as the evaluation's other attacks do
    stages = [(name, split_on_oom(fn), kw)
              for name, fn, kw in autoattack_stages(p["version"], p["steps"], p["queries"])]
    attacked = attacked_model(grad_model, p["version"], p["eot_samples"])
    keep_candidates = p["version"] == "rand"
    tag = json.dumps({**(fingerprint or {}), "format": STATE_FORMAT, "params": p, "eps": eps, "norm": norm,
                      "seed": seed, "stream": stream, "batches": list(mine), "batch_size": batch_size,
                      **({"survivors": "keep their best candidate"} if keep_candidates else {})},
                     sort_keys=True, default=str)

    def batches() -> Any:
        return zip(mine, iterate(split, batch_size, device, mine), strict=True)

    saved = load_tagged_arrays(state_path, tag) if state_path is not None else None
    if saved is not None:
        masks, seconds, x_adv = _restore(saved, batches(), [s[0] for s in stages])
    else:
        masks, seconds, x_adv = {"clean": {}}, {}, {}
        for batch, (x, y) in batches():
            torch.manual_seed(batch_seed(seed, stream, batch, 0))
            with frozen(grad_model), torch.no_grad():
                masks["clean"][batch] = (grad_model(x).argmax(1) == y).cpu().numpy()
            x_adv[batch] = x.cpu()
    done = len(masks) - 1
    total = sum(len(m) for m in masks["clean"].values())
    if done:
        progress_line(f"{label}: resuming after stage {done}/{len(stages)} ({stages[done - 1][0]}) from {state_path}",
                      progress, sys.stderr)
    _run_stages(stages, done, masks, seconds, x_adv, batches, grad_model, attacked, device, eps=eps, norm=norm,
                seed=seed, stream=stream, label=label, tag=tag, state_path=state_path, progress=progress,
                total=total, batch_size=batch_size, keep_candidates=keep_candidates)
    return StagedResult(x_adv, masks, seconds, done)


def _run_stages(
    stages: list, done: int, masks: dict[str, dict[int, np.ndarray]], seconds: dict[str, float],
    x_adv: dict[int, torch.Tensor], batches: Callable[[], Any], grad_model: nn.Module, attacked: nn.Module,
    device: torch.device, *, eps: float, norm: str, seed: int, stream: int, label: str, tag: str,
    state_path: Path | None, progress: bool, total: int, batch_size: int, keep_candidates: bool = False,
) -> None:
    """Stages ``done`` onwards over every batch, saving the state after each; updates the mappings in place.

    ``keep_candidates``: see :func:`robustlab.attacks.autoattack.run_stage`.
    """
    for k, stage in enumerate(stages[done:], start=done):
        name = stage[0]
        previous = masks[stages[k - 1][0]] if k else masks["clean"]
        tic = time.perf_counter()
        x, y, owners = _still_robust(batches, previous, device)
        robust = torch.ones(len(y), dtype=torch.bool, device=device)
        # each still-robust point's adversarial image so far: the point itself, or with ``keep_candidates``
        # the best candidate of the stages before, which this stage's candidate must beat to replace it
        adv = torch.cat([x_adv[batch][where] for batch, where in owners]).to(device) if owners else x.clone()
        chunks = range(0, len(y), batch_size)
        bar = progress_bar(total=len(chunks), desc=f"{label} {k + 1}/{len(stages)} {name}", enabled=progress)
        for chunk, start in enumerate(chunks):
            torch.manual_seed(batch_seed(seed, stream, chunk, k + 1))
            part = slice(start, start + batch_size)
            run_stage(stage, grad_model, attacked, x[part], y[part], adv[part], robust[part], eps=eps, norm=norm,
                      keep_candidates=keep_candidates)
            bar.update(1)
        bar.close()
        masks[name] = _scatter(owners, previous, robust.cpu(), adv.cpu(), x_adv)
        seconds[name] = time.perf_counter() - tic
        if state_path is not None:
            _save(state_path, tag, masks, seconds, x_adv)
        left = sum(int(m.sum()) for m in masks[name].values())
        progress_line(f"{label} stage {k + 1}/{len(stages)} {name}: {left} of {total} still robust "
                      f"({100 * left / max(total, 1):.2f}%), {seconds[name]:.1f} s", progress, sys.stderr)


def _still_robust(
    batches: Batches, robust: dict[int, np.ndarray], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """The still-robust points of every batch packed together, and (batch, positions) to put them back.

    A stage then attacks full batches of robust points, as the official AutoAttack does: one call on
    256 robust points costs far less than three calls on ~85 (per-call overhead on a CPU, occupancy on
    a GPU), and the points a stage sees no longer depend on how the evaluation was batched.
    """
    xs, ys, owners = [], [], []
    for batch, (x, y) in batches():
        where = torch.from_numpy(robust[batch]).nonzero().squeeze(1)
        xs.append(x[where.to(x.device)])
        ys.append(y[where.to(y.device)])
        owners.append((batch, where))
    if not xs:
        return torch.empty(0, device=device), torch.empty(0, dtype=torch.long, device=device), owners
    return torch.cat(xs), torch.cat(ys), owners


def _scatter(
    owners: list[tuple[int, torch.Tensor]], previous: dict[int, np.ndarray], robust: torch.Tensor,
    adv: torch.Tensor, x_adv: dict[int, torch.Tensor],
) -> dict[int, np.ndarray]:
    """Each batch's robust mask after the stage; writes the packed adversarial images back into ``x_adv``."""
    masks, start = {}, 0
    for batch, where in owners:
        stop = start + len(where)
        mask = previous[batch].copy()
        mask[where.numpy()] = robust[start:stop].numpy()
        x_adv[batch][where] = adv[start:stop]
        masks[batch], start = mask, stop
    return masks


def _save(path: Path, tag: str, masks: dict[str, dict[int, np.ndarray]], seconds: dict[str, float],
          x_adv: dict[int, torch.Tensor]) -> None:
    """Masks per stage, seconds per stage, and the adversarial images of the points a stage attacked."""
    order = sorted(masks["clean"])
    names = list(masks)
    stacked = np.stack([np.concatenate([masks[n][b] for b in order]) for n in names])
    attacked = stacked[0]
    images = torch.cat([x_adv[b] for b in order]).numpy()[attacked]
    save_tagged_arrays(path, tag, {"names": np.array(names), "masks": stacked,
                                   "seconds": np.array([seconds.get(n, 0.0) for n in names]), "attacked": images})


def _restore(
    state: dict[str, np.ndarray], batches: Any, stage_names: list[str]
) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, float], dict[int, torch.Tensor]]:
    names = [str(n) for n in state["names"]]
    if names[0] != "clean" or names[1:] != stage_names[: len(names) - 1]:
        raise ConfigError("AutoAttack state file does not match the stages of this version")
    masks: dict[str, dict[int, np.ndarray]] = {n: {} for n in names}
    seconds = {n: float(s) for n, s in zip(names, state["seconds"], strict=True) if n != "clean"}
    x_adv: dict[int, torch.Tensor] = {}
    attacked = state["masks"][0]
    images = torch.from_numpy(state["attacked"])
    start, taken = 0, 0
    for batch, (x, _) in batches:
        stop = start + len(x)
        for i, n in enumerate(names):
            masks[n][batch] = state["masks"][i][start:stop]
        adv = x.cpu().clone()
        here = torch.from_numpy(attacked[start:stop])
        count = int(here.sum())
        adv[here] = images[taken : taken + count]
        x_adv[batch] = adv
        start, taken = stop, taken + count
    return masks, seconds, x_adv
