"""CUDA checks: run with ``pytest -m gpu`` on a machine with a GPU (skipped without one).

- one epoch of every defence on a small CIFAR-10 slice with bf16 autocast + channels-last, and its
  training steps under ``torch.cuda.set_sync_debug_mode("error")`` (any host synchronisation raises);
- evaluation (fgsm, pgd-20, cw_linf and a shortened AutoAttack) gives the same per-sample verdicts on
  CUDA as on the CPU for the same weights and seeds, within the tolerance stated in the test;
- the gradient-masking audit reaches the same verdicts on CUDA as on the CPU;
- ``split_on_oom`` recovers from a real CUDA out-of-memory error;
- ``robustlab experiment --workers 1`` trains and evaluates a grid on the GPU.

CIFAR-10 comes from ``../shared/data`` (or ``$ROBUSTLAB_DATA``) when present; otherwise the epoch runs
on CIFAR-shaped random images, which checks that every defence runs, not what it learns.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from robustlab import training
from robustlab.audit import audit_model, noise_tolerance
from robustlab.data import DatasetSplits, Split, load_dataset
from robustlab.defenses import TrainState
from robustlab.evaluation import evaluate_model
from robustlab.memory import BatchSplitter
from robustlab.training import RunningStats, Trainer, train
from tests.conftest import SHARED_DATA
from tests.test_host_sync import DEFENSES

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


def _cifar_slice(n_train: int = 512) -> DatasetSplits:
    roots = [Path(p) for p in (os.environ.get("ROBUSTLAB_DATA"), SHARED_DATA) if p]
    for root in roots:
        if (root / "cifar-10-batches-py").is_dir():
            data = load_dataset("cifar10", root, val_size=200)
            return DatasetSplits(data.name, data.train.head(n_train), data.val, data.test.head(200), data.num_classes,
                                 data.class_names, data.mean, data.std, data.default_augment, data.split_seed)
    g = torch.Generator().manual_seed(0)

    def split(size: int) -> Split:
        return Split(torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (size,), generator=g))

    return DatasetSplits("cifar10", split(n_train), split(200), split(200), 10, [str(i) for i in range(10)],
                         (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), "crop_flip", 0)


@pytest.fixture(scope="module")
def cifar_slice() -> DatasetSplits:
    return _cifar_slice()


def _config(defense: str, params: dict) -> dict:
    return {
        "data": {"dataset": "cifar10", "val_size": 200},
        "model": {"name": "preact_resnet18"},
        "train": {"epochs": 1, "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "amp": True, "channels_last": True,
                  "val_robust_size": 100, "val_attack_steps": 3, "device": "cuda"},
        "threat": {"eps": 8 / 255},
        "defense": {"name": defense, **params},
    }


@pytest.mark.parametrize(("defense", "params"), DEFENSES, ids=lambda v: v if isinstance(v, str) else "")
def test_one_epoch_of_every_defence_with_bf16_and_channels_last(tmp_path, cifar_slice, defense, params):
    result = train(_config(defense, params), tmp_path / "run", progress=False, data=cifar_slice)
    row = result.history[0]
    assert np.isfinite(row["train_loss"]) and 0.0 <= row["val_clean_acc"] <= 1.0
    assert result.metrics["cost"]["device"].startswith("cuda")


@pytest.mark.parametrize(("defense", "params"), DEFENSES, ids=lambda v: v if isinstance(v, str) else "")
def test_training_steps_never_synchronise(tmp_path, cifar_slice, defense, params):
    """The loader's batches and ``train_step`` under the mode that raises on any host synchronisation."""
    trainer = Trainer(training.build_config(_config(defense, params)), tmp_path / "run", progress=False,
                      data=cifar_slice)
    state = TrainState(epochs=1, steps_per_epoch=len(trainer.loader), eps=8 / 255, generator=trainer.generator)
    running = RunningStats()
    batches = iter(trainer.loader)
    trainer.train_step(*next(batches), state, running)  # first call: lazy initialisation, cuDNN setup
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.train_step(*next(batches), state, running)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    loss, _ = running.read()
    assert np.isfinite(loss)


def test_attack_iterations_without_early_stopping_never_synchronise(trained_digits):
    from robustlab.attacks import pgd

    model = copy.deepcopy(trained_digits.model).to(CUDA).eval()
    x, y = (t.to(CUDA) for t in next(iter(_batches(trained_digits.data.test, 128))))
    generator = torch.Generator().manual_seed(0)
    pgd(model, x, y, eps=0.1, steps=2, generator=generator, validate=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pgd(model, x, y, eps=0.1, steps=10, generator=generator, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _batches(split: Split, size: int):
    for start in range(0, len(split), size):
        yield split.images[start : start + size].float() / 255, split.labels[start : start + size]


def test_evaluation_agrees_between_cuda_and_cpu(trained_digits):
    """Same weights, same seeds (random starts are drawn on the CPU for both): the per-sample verdicts
    of every attack agree on >= 97% of the samples and each accuracy is within two standard errors.
    (Not bit-identical: cuDNN and the CPU sum in different orders, which moves a few borderline samples.)"""
    test = trained_digits.data.test
    attacks = ["fgsm", "pgd-20", "cw_linf", {"name": "autoattack", "steps": 20, "queries": 300}]
    cpu = evaluate_model(copy.deepcopy(trained_digits.model), test, eps=0.1, attacks=attacks, n_boot=10,
                         device="cpu", suite="quick")
    gpu = evaluate_model(copy.deepcopy(trained_digits.model), test, eps=0.1, attacks=attacks, n_boot=10,
                         device=CUDA, suite="quick")
    for label in ["clean", *cpu.attacks, "worst_case"]:
        a = cpu.clean if label == "clean" else cpu.worst_case if label == "worst_case" else cpu.attacks[label]
        b = gpu.clean if label == "clean" else gpu.worst_case if label == "worst_case" else gpu.attacks[label]
        agreement = (a.correct == b.correct).mean()
        assert agreement >= 0.97, (label, agreement)
        assert abs(a.accuracy - b.accuracy) <= noise_tolerance(a.accuracy, b.accuracy, len(test)), label


def test_bf16_attacks_on_cuda_agree_with_fp32(trained_digits):
    model = copy.deepcopy(trained_digits.model)
    attacks = ["pgd-20", {"name": "apgd_ce", "steps": 20}]
    fp32 = evaluate_model(model, trained_digits.data.test, eps=0.05, attacks=attacks, n_boot=10, device=CUDA,
                          suite="quick")
    bf16 = evaluate_model(model, trained_digits.data.test, eps=0.05, attacks=attacks, n_boot=10, device=CUDA,
                          attack_precision="bf16", suite="quick")
    a, b = fp32.robust_accuracy, bf16.robust_accuracy
    assert abs(a - b) <= noise_tolerance(a, b, len(trained_digits.data.test)), (a, b)


def test_audit_verdicts_agree_between_cuda_and_cpu(trained_digits):
    def statuses(device: torch.device) -> dict[str, str]:
        model = copy.deepcopy(trained_digits.model).to(device)
        report = audit_model(model, trained_digits.data.test, eps=0.1, n=200, steps=10, square_queries=300)
        return {check.name: check.status for check in report.checks}

    assert statuses(CUDA) == statuses(torch.device("cpu"))


def test_split_on_oom_recovers_from_a_real_cuda_out_of_memory():
    """A batch of 8 asks for 1.2x the free memory; halves of 4 ask for 0.6x and fit."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    per_row = int(free * 0.15) // 4  # float32 elements per row
    calls: list[int] = []

    def hungry(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        scratch = torch.empty(x.shape[0] * per_row, device=CUDA)
        return x * 2 + scratch[:1].zero_()

    splitter = BatchSplitter()
    x = torch.arange(8.0, device=CUDA)
    try:
        out = splitter(hungry, x)
    finally:
        torch.cuda.empty_cache()
    assert torch.equal(out, x * 2)
    assert calls[0] == 8 and splitter.limit is not None and splitter.limit <= 4


def test_experiment_with_one_worker_runs_on_the_gpu(tmp_path):
    from robustlab.cli import main
    from tests.test_experiments import tiny_experiment

    spec = tiny_experiment(defenses=["standard", "hybrid"])
    spec["base"]["train"]["device"] = "cuda"
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit) as info:
        main(["experiment", str(path), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert info.value.code in (0, None)
    devices = [json.loads(p.read_text()).get("device") for p in (tmp_path / "out").rglob("metadata.json")]
    assert len(devices) == 2 and all(str(d).startswith("cuda") for d in devices), devices
