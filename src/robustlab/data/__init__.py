"""Dataset registry: name -> in-memory train / validation / test splits in pixel space.

``load_dataset("mnist", data_dir=...)`` returns :class:`DatasetSplits` whose tensors are uint8 NCHW; the
validation split is carved deterministically from the training split (size and seed recorded, and
hashed so a run can prove which images it was selected on). The test split is never used for model
selection.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from robustlab.data.loader import TensorLoader
from robustlab.data.sources import (
    RawDataset,
    check_raw,
    default_data_dir,
    load_cifar10,
    load_digits,
    load_image_folder,
    load_imagenet_subset,
    load_mnist,
    load_npz,
)
from robustlab.errors import DataError
from robustlab.validation import check_batch

__all__ = [
    "DATASETS",
    "DatasetSplits",
    "Split",
    "TensorLoader",
    "default_data_dir",
    "load_dataset",
    "validate_dataset_name",
]

#: name -> (loader taking the data root, default augmentation for training)
DATASETS: dict[str, tuple[Callable[[Path], RawDataset], str]] = {
    "digits": (lambda root: load_digits(), "none"),
    "mnist": (load_mnist, "none"),
    "cifar10": (load_cifar10, "crop_flip"),
    "imagenet-subset": (load_imagenet_subset, "crop_flip"),
}
_PREFIXES = ("folder:", "npz:")


def validate_dataset_name(name: str) -> None:
    """Raise DataError listing the valid names unless ``name`` is a registered dataset or a path source."""
    if name in DATASETS or name.startswith(_PREFIXES):
        return
    valid = ", ".join([*DATASETS, "folder:PATH", "npz:PATH"])
    raise DataError(f"unknown dataset '{name}'; valid: {valid}")


@dataclass
class Split:
    """Images as stored, uint8 (N, C, H, W) in [0, 255], and their int64 labels (N,).

    Keeping the bytes makes a split cheap to hold, exact to hash (:meth:`digest`, which proves which
    images a run was evaluated on) and unambiguous: :meth:`float_images` is the one conversion to the
    [0, 1] pixels models and attacks take. Float pixels from elsewhere come in through :meth:`from_pixels`.
    """

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8:
            got = self.images.dtype if isinstance(self.images, torch.Tensor) else type(self.images).__name__
            raise DataError(f"a Split holds uint8 images in [0, 255], got {got}; "
                            "for float pixels in [0, 1] use Split.from_pixels(x, y)")
        if self.images.dim() != 4:
            raise DataError(f"a Split's images must have shape (N, C, H, W), got {tuple(self.images.shape)}")
        labels = self.labels
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise DataError("a Split's labels must be an integer tensor")
        if labels.shape != (self.images.shape[0],):
            raise DataError(f"a Split of {self.images.shape[0]} images needs labels of shape "
                            f"({self.images.shape[0]},), got {tuple(labels.shape)}")

    @classmethod
    def from_pixels(cls, x: torch.Tensor, y: torch.Tensor) -> Split:
        """A split of float images in [0, 1] that are 8-bit images divided by 255 (every dataset robustlab
        reads); other values cannot be stored exactly as bytes and are refused."""
        check_batch(x, y)
        scaled = x.detach().cpu().double() * 255
        stored = scaled.round()
        if (scaled - stored).abs().max() > 1e-3:
            raise DataError("the images are not 8-bit pixels divided by 255, so a Split cannot hold them exactly; "
                            "attack such tensors directly (robustlab.attacks) instead of through a Split")
        return cls(stored.to(torch.uint8), y.detach().cpu().long())

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def float_images(self) -> torch.Tensor:
        return self.images.float().div_(255.0)

    def head(self, n: int | None) -> Split:
        return self if n is None else Split(self.images[:n], self.labels[:n])


@dataclass
class DatasetSplits:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_augment: str
    split_seed: int
    #: the source's own identity (:attr:`RawDataset.source`), e.g. CIFAR-10's files and md5s
    source: dict[str, object] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    def describe(self) -> dict[str, object]:
        """Sizes, seed and content hashes of each split, for a run's metadata.json."""
        return {
            "dataset": self.name,
            "num_classes": self.num_classes,
            "image_shape": list(self.train.images.shape[1:]),
            "split_seed": self.split_seed,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "hashes": {"train": self.train.digest(), "val": self.val.digest(), "test": self.test.digest()},
            **({"source": self.source} if self.source else {}),
        }


def _raw(name: str, root: Path) -> RawDataset:
    if name.startswith("folder:"):
        return load_image_folder(Path(name.removeprefix("folder:")).expanduser())
    if name.startswith("npz:"):
        return load_npz(Path(name.removeprefix("npz:")).expanduser())
    return DATASETS[name][0](root)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    std = x.std(dim=1).clamp_min(1e-3)
    return tuple(round(v, 4) for v in x.mean(dim=1).tolist()), tuple(round(v, 4) for v in std.tolist())


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    val_size: int = 1000,
    split_seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> DatasetSplits:
    """Load ``name`` and carve ``val_size`` validation images from its training split with ``split_seed``."""
    validate_dataset_name(name)
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    raw = _raw(name, root)
    check_raw(raw, name)
    n_train = raw.x_train.shape[0]
    if val_size < 0:
        raise DataError(f"data.val_size={val_size} must be >= 0")
    if val_size >= n_train:
        raise DataError(f"data.val_size={val_size} must be smaller than the {n_train} training images")
    # Splits keep the seeded random order (not the source order), so any prefix - a train or test subset,
    # the validation images the loop attacks - is a random sample even where the source is sorted by class
    # (ImageFolder trees). The full test split keeps its source order.
    generator = torch.Generator().manual_seed(split_seed)
    order = torch.randperm(n_train, generator=generator)
    val_index, train_index = order[:val_size], order[val_size:]
    train = Split(raw.x_train[train_index], raw.y_train[train_index]).head(train_subset)
    val = Split(raw.x_train[val_index], raw.y_train[val_index])
    test = Split(raw.x_test, raw.y_test)
    if test_subset is not None and test_subset < len(test):
        pick = torch.randperm(len(test), generator=generator)[:test_subset].sort().values
        test = Split(test.images[pick], test.labels[pick])
    mean, std = _channel_stats(train.images)
    default_augment = DATASETS[name][1] if name in DATASETS else "none"
    num_classes = raw.num_classes
    names = raw.class_names or [str(i) for i in range(num_classes)]
    return DatasetSplits(
        name, train, val, test, num_classes, names, mean, std, default_augment, split_seed, raw.source
    )
