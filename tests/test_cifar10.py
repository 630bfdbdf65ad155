"""CIFAR-10 end to end from ../shared/data (skipped where it is absent), and naming the attacked samples.

The end-to-end test trains a ResNet-18 of width 4 for one epoch on 256 training images, so it checks the
plumbing (data identity, validation carved from training images, clean accuracy on all
10,000 test images, attacks on the first N, every output naming them), not accuracy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from robustlab.data import load_dataset
from robustlab.evaluation import evaluate_model, format_table, subset_text, summary_lines
from robustlab.models import build_model
from tests.conftest import SHARED_DATA, requires_cifar10

#: torchvision's md5 list for the official CIFAR-10 python batches (``CIFAR10.train_list`` and ``test_list``)
TORCHVISION_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                     "test_batch", "batches.meta")


def test_first_n_subset_is_named_and_clean_covers_every_test_image(digits):
    model = build_model("lenet5", digits.num_classes, digits.channels, digits.image_size).eval()
    result = evaluate_model(model, digits.test, eps=0.1, attacks=["fgsm"], n=30, subset="first", n_boot=50,
                            suite="quick")
    assert result.indices.tolist() == list(range(30))
    assert result.samples["subset"] == "first-30"
    assert result.samples["n"] == 30 and result.samples["of"] == len(digits.test)
    clean_all = result.to_dict()["clean_all"]
    assert clean_all["n"] == len(digits.test)
    with torch.no_grad():
        expected = (model(digits.test.float_images()).argmax(1) == digits.test.labels).float().mean().item()
    assert clean_all["accuracy"] == pytest.approx(expected)
    text = "\n".join(summary_lines(result))
    assert f"the first 30 of {len(digits.test)} test images" in text and "first-30" in text
    assert "first 30" in format_table(result).title

    random = evaluate_model(model, digits.test, eps=0.1, attacks=["fgsm"], n=30, n_boot=50, suite="quick")
    assert random.samples["subset"] == "random-30-seed0" and random.indices.tolist() != list(range(30))
    whole = evaluate_model(model, digits.test, eps=0.1, attacks=["fgsm"], subset="first", n_boot=50, suite="quick")
    assert whole.samples["subset"] == "all" and "clean_all" not in whole.to_dict()
    assert subset_text(whole.samples) == f"all {len(digits.test)} test images"


def test_evaluate_cli_names_the_attacked_subset(trained_digits, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_digits.run_dir, run)
    shown = subprocess.run(
        [sys.executable, "-m", "robustlab", "evaluate", str(run), "--attacks", "fgsm", "--n", "30",
         "--subset", "first", "--no-progress", "--n-boot", "50"],
        capture_output=True, text=True, timeout=300,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    total = len(trained_digits.data.test)
    assert f"first 30 of {total} test images" in shown.stdout and f"all {total} test images" in shown.stdout


def test_unknown_subset_is_a_one_line_error(digits):
    from robustlab.errors import ConfigError

    model = build_model("lenet5", digits.num_classes, digits.channels, digits.image_size).eval()
    with pytest.raises(ConfigError, match="valid: random, first"):
        evaluate_model(model, digits.test, eps=0.1, attacks=["fgsm"], n=10, subset="last")


def test_resnet18_width_keeps_the_shape():
    narrow, full = build_model("resnet18", 10, 3, 32, width=16), build_model("resnet18", 10, 3, 32)
    convs = [m for m in narrow.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len([m for m in full.modules() if isinstance(m, torch.nn.Conv2d)])
    assert [c.out_channels for c in convs][:1] == [16] and convs[-1].out_channels == 128
    assert narrow(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@requires_cifar10
def test_cifar10_identity_and_splits():
    data = load_dataset("cifar10", SHARED_DATA, val_size=5000)
    assert (len(data.train), len(data.val), len(data.test)) == (45_000, 5_000, 10_000)
    described = data.describe()
    files = described["source"]["files"]
    assert sorted(files) == sorted(TORCHVISION_FILES)
    from torchvision.datasets import CIFAR10

    assert files == {**dict(CIFAR10.train_list + CIFAR10.test_list), "batches.meta": CIFAR10.meta["md5"]}
    # the validation images are carved from the training batches, never from the test batch
    from robustlab.data.sources import load_cifar10

    raw_train = {bytes(img) for img in load_cifar10(SHARED_DATA, download=False).x_train.flatten(1).numpy()}
    assert all(bytes(img) in raw_train for img in data.val.images.flatten(1).numpy())
    assert data.split_seed == 0


@requires_cifar10
def test_cifar10_experiment_end_to_end(tmp_path):
    """train + evaluate + experiment + report on a slice of the real files, offline."""
    experiment = {
        "name": "cifar10-slice",
        "base": {
            "data": {"dataset": "cifar10", "train_subset": 256, "val_size": 100},
            "model": {"name": "resnet18", "width": 4},
            "train": {"epochs": 1, "batch_size": 64, "select": "last", "schedule": "constant"},
        },
        "grid": {"defenses": ["standard"], "eps": ["8/255"]},
        "evaluation": {"attacks": ["fgsm"], "n": 20, "subset": "first", "audit": False},
    }
    path = tmp_path / "cifar.yaml"
    path.write_text(yaml.safe_dump(experiment))
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "robustlab", "experiment", str(path), "--out", str(out),
         "--data-dir", str(SHARED_DATA), "--no-isolate"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    run = next((out / "runs").iterdir())
    metadata = json.loads((run / "metadata.json").read_text())
    assert metadata["data"]["sizes"] == {"train": 256, "val": 100, "test": 10_000}
    assert metadata["data"]["source"]["files"]["test_batch"] == "40351d587109b95175f43aff81a1287e"
    metrics = json.loads((run / "metrics.json").read_text())
    entry = next(iter(metrics["evaluations"].values()))
    assert entry["samples"]["subset"] == "first-20" and entry["clean_all"]["n"] == 10_000
    arrays = np.load(run / entry["samples"]["file"])
    assert arrays["indices"].tolist() == list(range(20))
    assert metrics["test_size"] == 10_000
    assert entry["clean_all"]["accuracy"] == pytest.approx(metrics["clean_accuracy"])
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["test_subset"] == "first-20" and row["clean_n"] == 10_000
    report = (out / "report.md").read_text()
    assert "clean accuracy on all 10000 test images" in report and "the first 20 of 10000 test images" in report
