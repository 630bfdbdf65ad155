"""Dataset registry, deterministic validation split, npz/folder sources and the tensor loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustlab.data import TensorLoader, load_dataset
from robustlab.data.loader import random_crop, random_flip
from robustlab.errors import DataError
from tests.conftest import requires_imagenet_subset, requires_mnist, shared_data_dir


def test_digits_is_embedded_and_split_deterministically(digits):
    again = load_dataset("digits", val_size=200)
    assert digits.train.images.dtype == torch.uint8
    assert digits.train.images.shape[1:] == (1, 8, 8)
    assert len(digits.val) == 200
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert digits.describe()["hashes"] == again.describe()["hashes"]


def test_other_split_seed_changes_validation_but_not_test(digits):
    other = load_dataset("digits", val_size=200, split_seed=1)
    assert other.describe()["hashes"]["val"] != digits.describe()["hashes"]["val"]
    assert other.describe()["hashes"]["test"] == digits.describe()["hashes"]["test"]


def test_val_and_train_are_disjoint_and_cover_the_train_split():
    full = load_dataset("digits", val_size=0)
    split = load_dataset("digits", val_size=300)
    def keys(part):
        return [x.numpy().tobytes() + bytes([int(y)]) for x, y in zip(part.images, part.labels, strict=True)]

    rows = set(keys(full.train))
    carved = keys(split.val)
    assert all(r in rows for r in carved)
    assert len(split.train) + len(split.val) == len(full.train)


def test_val_size_too_large_is_a_clear_error():
    with pytest.raises(DataError, match="data.val_size"):
        load_dataset("digits", val_size=100_000)


def test_missing_mnist_offline_names_data_dir(tmp_path):
    from robustlab.data.sources import load_mnist

    with pytest.raises(DataError, match="--data-dir"):
        load_mnist(tmp_path, download=False)


def test_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "toy.npz"
    np.savez(path, x_train=rng.integers(0, 256, (50, 6, 6, 3), dtype=np.uint8), y_train=rng.integers(0, 3, 50),
             x_test=rng.integers(0, 256, (10, 6, 6, 3), dtype=np.uint8), y_test=rng.integers(0, 3, 10))
    data = load_dataset(f"npz:{path}", val_size=10)
    assert data.train.images.shape == (40, 3, 6, 6) and data.channels == 3 and data.num_classes <= 3


def test_npz_with_float_pixels_is_rejected(tmp_path):
    path = tmp_path / "float.npz"
    np.savez(path, x_train=np.zeros((4, 5, 5), np.float32), y_train=np.zeros(4), x_test=np.zeros((2, 5, 5), np.float32),
             y_test=np.zeros(2))
    with pytest.raises(DataError, match="uint8"):
        load_dataset(f"npz:{path}", val_size=1)


def test_loader_yields_float_pixels_and_is_reproducible(digits):
    loader = TensorLoader(digits.train.images, digits.train.labels, 64, shuffle=True, seed=3)
    first = [y.clone() for _, y in loader]
    x, _ = next(iter(loader))
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert all(torch.equal(a, b) for a, b in zip(first, [y for _, y in loader], strict=True))
    loader.set_epoch(1)
    assert not torch.equal(first[0], next(iter(loader))[1])
    assert sum(len(y) for y in first) == len(digits.train)


def test_random_crop_and_flip_keep_shape_and_content():
    x = torch.rand(16, 3, 12, 12)
    generator = torch.Generator().manual_seed(0)
    cropped = random_crop(x, 4, generator)
    assert cropped.shape == x.shape
    flipped = random_flip(x, generator)
    same = [(torch.equal(f, o) or torch.equal(f, o.flip(2))) for f, o in zip(flipped, x, strict=True)]
    assert all(same)
    assert random_crop(x, 0).equal(x)


@requires_mnist
def test_mnist_from_shared_data():
    data = load_dataset("mnist", shared_data_dir(), val_size=1000)
    assert len(data.train) == 59_000 and len(data.test) == 10_000
    assert data.image_size == 28 and int(data.test.labels[0]) == 7


@requires_imagenet_subset
@pytest.mark.slow
def test_imagenet_subset_from_shared_data():
    data = load_dataset("imagenet-subset", shared_data_dir(), val_size=500)
    assert data.num_classes == 10 and data.image_size == 64 and data.channels == 3
    assert len(data.test) == 500


def test_subsets_of_a_class_sorted_source_are_random_samples(tmp_path):
    """ImageFolder trees come sorted by class: a 'first N' subset would hold one class only."""
    labels = np.repeat(np.arange(5), 40)
    path = tmp_path / "sorted.npz"
    np.savez(path, x_train=np.zeros((200, 4, 4), np.uint8), y_train=labels,
             x_test=np.zeros((200, 4, 4), np.uint8), y_test=labels)
    data = load_dataset(f"npz:{path}", val_size=50, train_subset=30, test_subset=30)
    for part in (data.train, data.val.head(20), data.test):
        assert len(set(part.labels.tolist())) >= 3
    assert len(data.train) == 30 and len(data.test) == 30
