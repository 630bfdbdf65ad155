"""From a config (or a finished run directory) to data and a model, the same way everywhere."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from robustlab.config import RunConfig, build_config
from robustlab.data import DatasetSplits, load_dataset
from robustlab.errors import CheckpointError, ConfigError
from robustlab.models import build_model
from robustlab.rundir import RunDir, load_weights


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit unavailable device is a ConfigError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: CUDA was requested but is not available on this machine")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally require deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def prepare_data(config: RunConfig) -> DatasetSplits:
    d = config.data
    return load_dataset(
        d.dataset, d.data_dir, val_size=d.val_size, split_seed=d.split_seed,
        train_subset=d.train_subset, test_subset=d.test_subset,
    )


def prepare_model(config: RunConfig, data: DatasetSplits) -> nn.Module:
    """The run's model; wrapped in ``Defended(model, transform)`` when its defence uses an input transform.

    One forward pass of one blank image checks that the model takes the data's images: LeNet-5 pools
    3x3 images down to nothing, which would otherwise be a RuntimeError traceback (at build time or in
    the first batch) instead of one line.
    """
    from robustlab.defenses import Defended, build_input_transform

    m = config.model
    shape = tuple(data.train.images.shape[1:])
    try:
        model = build_model(
            m.name, data.num_classes, data.channels, data.image_size, data.mean, data.std, depth=m.depth,
            width=m.width,
        )
        transform = build_input_transform(config.defense.name, config.defense.params, data.channels)
        model = model if transform is None else Defended(model, transform)
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
    except RuntimeError as error:
        raise ConfigError(
            f"model '{m.name}' cannot take the {shape[1]}x{shape[2]} images of '{data.name}' "
            f"({str(error).splitlines()[0][:120]}); use larger images or another model"
        ) from None
    return model.train()


@dataclass
class LoadedRun:
    """A finished (or interrupted) run brought back: its config, data splits and selected weights."""

    path: Path
    config: RunConfig
    data: DatasetSplits
    model: nn.Module


def load_run(path: str | Path, device: torch.device | str = "cpu", weights: str = "model") -> LoadedRun:
    """Rebuild a run's data and model and load ``model.safetensors`` (or ``last.safetensors``)."""
    run = RunDir(path)
    if not run.path.is_dir():
        raise CheckpointError(f"run directory not found: {run.path}")
    try:
        config = build_config(run.read_config_dict())
    except ConfigError as error:
        raise CheckpointError(f"config.yaml in {run.path} does not validate: {error}") from None
    data = prepare_data(config)
    model = prepare_model(config, data)
    load_weights(run.weights if weights == "model" else run.last_weights, model)
    model.to(device).eval()
    return LoadedRun(run.path, config, data, model)
