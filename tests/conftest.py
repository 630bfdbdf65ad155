"""Shared fixtures: the embedded digits data, a tiny trained model, and the optional shared datasets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data_dir() -> Path:
    return SHARED_DATA


requires_mnist = pytest.mark.skipif(
    not (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").exists(),
    reason="MNIST not present under ../shared/data",
)
requires_cifar10 = pytest.mark.skipif(
    not (SHARED_DATA / "cifar-10-batches-py" / "test_batch").exists(),
    reason="CIFAR-10 not present under ../shared/data",
)
requires_imagenet_subset = pytest.mark.skipif(
    not (SHARED_DATA / "imagenet-subset" / "train").is_dir(), reason="imagenet-subset not present under ../shared/data"
)


# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine threads oversubscribe.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _single_thread_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def digits():
    from robustlab.data import load_dataset

    return load_dataset("digits", val_size=200)


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory, digits):
    """A standard-trained LeNet-5 on digits (about 2 seconds), shared by attack and metric tests."""
    from robustlab.training import train

    config = {
        "data": {"dataset": "digits", "val_size": 200},
        "model": {"name": "lenet5"},
        "train": {
            "epochs": 8, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0, "select": "last",
        },
        "threat": {"eps": 0.1},
    }
    result = train(config, tmp_path_factory.mktemp("runs") / "std", progress=False, data=digits)
    return result
