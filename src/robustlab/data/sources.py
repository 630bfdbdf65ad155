"""Raw dataset sources, each returning uint8 NCHW tensors for the train and test splits.

Sources: ``digits`` (scikit-learn's bundled 8x8 handwritten digits: the embedded, offline default),
``mnist`` and ``cifar10`` (torchvision's on-disk layout, downloaded when online), ``imagenet-subset``
and ``folder:PATH`` (an ImageFolder tree with ``train/`` and ``val/`` or ``test/``), and ``npz:PATH``
(arrays ``x_train, y_train, x_test, y_test``, uint8 HWC). Nothing here is ever unpickled.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from robustlab.errors import DataError

DATA_ENV = "ROBUSTLAB_DATA"
#: Labels are class indices below this bound: a model has one output per class, so a stray label of
#: 2**40 would otherwise ask for a layer with that many outputs (MemoryError, or a hang).
MAX_CLASSES = 100_000
DOWNLOAD_TIMEOUT_ENV = "ROBUSTLAB_DOWNLOAD_TIMEOUT"


@dataclass
class RawDataset:
    """Train and test splits as uint8 tensors (N, C, H, W) with int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: list[str] = field(default_factory=list)
    #: where the images came from, for a run's metadata.json (e.g. files and the md5s checked on load)
    source: dict[str, object] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names) or int(max(self.y_train.max(), self.y_test.max())) + 1


def default_data_dir() -> Path:
    """``$ROBUSTLAB_DATA`` if set, else ``~/.cache/robustlab/data``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "robustlab" / "data"


def _missing(name: str, root: Path, reason: str) -> DataError:
    return DataError(
        f"dataset '{name}' is not under {root} and could not be downloaded ({reason}); "
        f"pass --data-dir (or set {DATA_ENV}) to a folder that holds it"
    )


def load_digits() -> RawDataset:
    """scikit-learn's 1,797 8x8 digits (values 0-16), scaled to uint8; a fixed 20% test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(20240).permutation(len(labels))
    n_test = len(labels) // 5
    test, train = order[:n_test], order[n_test:]
    return RawDataset(
        torch.from_numpy(images[train]),
        torch.from_numpy(labels[train]),
        torch.from_numpy(images[test]),
        torch.from_numpy(labels[test]),
        [str(d) for d in range(10)],
    )


def download_timeout() -> float:
    """Seconds a download may stall before it is abandoned (``$ROBUSTLAB_DOWNLOAD_TIMEOUT``, default 20).

    urllib waits forever by default, so an offline machine behind a firewall that drops packets would
    hang instead of answering with the ``--data-dir`` message.
    """
    text = os.environ.get(DOWNLOAD_TIMEOUT_ENV, "20")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise DataError(f"{DOWNLOAD_TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


def _torchvision_split(cls: type, root: Path, train: bool, name: str, download: bool):
    try:
        return cls(root=str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise _missing(name, root, "downloads disabled") from None
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(download_timeout())
    existing = _directories(root)
    try:
        return cls(root=str(root), train=train, download=True)
    except Exception as error:  # network errors come in many types
        _remove_new_empty_directories(root, existing)  # torchvision made e.g. MNIST/raw before it failed
        detail = (str(error).strip().splitlines() or [""])[0][:160]
        raise _missing(name, root, f"{type(error).__name__}: {detail}") from None
    finally:
        socket.setdefaulttimeout(previous)


def _directories(root: Path) -> set[Path]:
    return {Path(path) for path, _, _ in os.walk(root)} if root.is_dir() else set()


def _remove_new_empty_directories(root: Path, existing: set[Path]) -> None:
    """Remove the directories under (and including) ``root`` that a failed download created and left empty."""
    for directory in sorted(_directories(root) - existing, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            directory.rmdir()  # only succeeds when empty


def _as_nchw(array: np.ndarray, name: str = "images") -> torch.Tensor:
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4:
        array = array.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{name} must be (N, H, W) or (N, H, W, C), got shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array))


def load_mnist(root: Path, download: bool = True) -> RawDataset:
    from torchvision.datasets import MNIST

    train = _torchvision_split(MNIST, root, True, "mnist", download)
    test = _torchvision_split(MNIST, root, False, "mnist", download)
    return RawDataset(
        train.data[:, None].contiguous(),
        train.targets.long(),
        test.data[:, None].contiguous(),
        test.targets.long(),
        [str(d) for d in range(10)],
    )


def load_cifar10(root: Path, download: bool = True) -> RawDataset:
    """CIFAR-10 in torchvision's layout; its ``source`` names every file with the md5 torchvision checked.

    torchvision refuses to load unless each batch and ``batches.meta`` has the md5 of its own list, so
    the recorded md5s are the identity of the data a run saw (no second hashing pass needed).
    """
    from torchvision.datasets import CIFAR10

    train = _torchvision_split(CIFAR10, root, True, "cifar10", download)
    test = _torchvision_split(CIFAR10, root, False, "cifar10", download)
    files = {name: md5 for name, md5 in [*CIFAR10.train_list, *CIFAR10.test_list]}
    files[CIFAR10.meta["filename"]] = CIFAR10.meta["md5"]
    return RawDataset(
        _as_nchw(train.data),
        torch.tensor(train.targets, dtype=torch.long),
        _as_nchw(test.data),
        torch.tensor(test.targets, dtype=torch.long),
        list(train.classes),
        source={"loader": "torchvision.datasets.CIFAR10", "folder": CIFAR10.base_folder,
                "md5_verified_by": "torchvision (check_integrity on load)", "files": files},
    )


def _read_image_folder(folder: Path, classes: list[str], size: int | None) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    images, labels = [], []
    for label, cls in enumerate(classes):
        if not (folder / cls).is_dir():  # a class the test split does not have
            continue
        for path in sorted((folder / cls).iterdir()):
            if not path.is_file():
                continue
            try:
                with Image.open(path) as image:
                    image = image.convert("RGB")
                    if size is None:
                        size = image.size[0]
                    if image.size != (size, size):
                        image = image.resize((size, size), Image.BILINEAR)
                    images.append(np.asarray(image, dtype=np.uint8))
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
                raise DataError(f"cannot read image {path}: {error}") from None
            labels.append(label)
    if not images:
        raise DataError(f"no images found under {folder}")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_image_folder(path: Path, size: int | None = None, name: str | None = None) -> RawDataset:
    """An ImageFolder tree: ``path/train/<class>/*`` and ``path/val/<class>/*`` (or ``test/``)."""
    name = name or f"folder:{path}"
    train_dir = path / "train"
    test_dir = next((path / d for d in ("val", "test") if (path / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        where = ("give folder: the directory that holds train/ and val/" if name.startswith("folder:")
                 else "pass --data-dir to the folder that holds it")
        raise DataError(f"dataset '{name}': expected {path}/train/<class>/ and {path}/val/<class>/ (or test/); {where}")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    unknown = sorted({d.name for d in test_dir.iterdir() if d.is_dir()} - set(classes))
    if unknown:  # its images would be dropped silently, and the test set would shrink unnoticed
        raise DataError(f"dataset '{name}': {test_dir.name}/ has class(es) {unknown[:5]} that train/ lacks")
    x_train, y_train = _read_image_folder(train_dir, classes, size)
    empty = [cls for index, cls in enumerate(classes) if not (y_train == index).any()]
    if empty:
        raise DataError(f"dataset '{name}': train/ class(es) {empty[:5]} hold no images")
    x_test, y_test = _read_image_folder(test_dir, classes, x_train.shape[1])
    names = _class_descriptions(path, classes)
    return RawDataset(_as_nchw(x_train), torch.from_numpy(y_train), _as_nchw(x_test), torch.from_numpy(y_test), names)


def _class_descriptions(path: Path, classes: list[str]) -> list[str]:
    """Use ``classes.txt`` (index, wnid, description) when present for readable class names."""
    described = {}
    listing = path / "classes.txt"
    if listing.is_file():
        for line in listing.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                described[parts[1]] = parts[2].split(",")[0]
    return [described.get(c, c) for c in classes]


def load_imagenet_subset(root: Path) -> RawDataset:
    path = root / "imagenet-subset"
    if not path.is_dir():
        raise _missing("imagenet-subset", root, "it is not downloadable; copy the folder there")
    return load_image_folder(path, name="imagenet-subset")


def load_npz(path: Path) -> RawDataset:
    """Arrays ``x_train, y_train, x_test, y_test`` (uint8 images HWC or HW) from an .npz, no pickle."""
    if not path.is_file():
        raise DataError(f"npz dataset not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(archive.files)
            if missing:
                raise DataError(f"{path} lacks arrays: {', '.join(sorted(missing))}")
            arrays = {k: archive[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        unsafe = "pickle" in str(error)  # numpy's own advice would be to load it unsafely
        why = ("it is not a plain archive of arrays (numpy would have to unpickle it, which could run code); "
               "save plain arrays with np.savez: uint8 images, integer labels") if unsafe else str(error)
        raise DataError(f"cannot read {path} as .npz: {why}") from None
    for key in ("x_train", "x_test"):
        if arrays[key].dtype != np.uint8:
            raise DataError(f"{path}: {key} must be uint8 pixels in [0, 255], got {arrays[key].dtype}")
    for key in ("y_train", "y_test"):
        labels = arrays[key]
        if labels.dtype.kind not in "iu":  # float labels would be truncated, strings and booleans are not classes
            raise DataError(f"{path}: {key} must hold integer class labels, got dtype {labels.dtype}")
        if labels.ndim != 1:
            raise DataError(f"{path}: {key} must be a vector of labels (N,), got shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= MAX_CLASSES):
            bad = labels.min() if labels.min() < 0 else labels.max()
            raise DataError(f"{path}: {key} holds label {bad}; labels must lie in [0, {MAX_CLASSES})")
    return RawDataset(
        _as_nchw(arrays["x_train"], f"{path}: x_train"),
        torch.from_numpy(arrays["y_train"].astype(np.int64)),
        _as_nchw(arrays["x_test"], f"{path}: x_test"),
        torch.from_numpy(arrays["y_test"].astype(np.int64)),
    )


def check_raw(raw: RawDataset, name: str) -> None:
    """Refuse a dataset whose splits cannot train and test one model, before anything is built or written.

    Counts of images and labels agree, neither split is empty, test images have the train images'
    channels and size (1 or 3 channels), labels are classes in ``[0, MAX_CLASSES)`` and every test
    label is a class the training split has. (Whether the images are large enough depends on the
    model: :func:`robustlab.runs.prepare_model` checks that.)
    """
    for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"dataset '{name}': {x.shape[0]} {split} images but {y.shape[0]} labels")
        if x.shape[0] == 0:
            raise DataError(f"dataset '{name}': the {split} split is empty")
        if y.min() < 0 or y.max() >= MAX_CLASSES:
            raise DataError(f"dataset '{name}': {split} labels must lie in [0, {MAX_CLASSES})")
    if raw.x_test.shape[1:] != raw.x_train.shape[1:]:
        train, test = (tuple(t.shape[1:]) for t in (raw.x_train, raw.x_test))
        raise DataError(f"dataset '{name}': test images are (C, H, W) = {test}, train images {train}; they must match")
    if raw.x_train.shape[1] not in (1, 3):
        raise DataError(f"dataset '{name}': images must have 1 or 3 channels, got {raw.x_train.shape[1]}")
    unseen = sorted(set(raw.y_test.unique().tolist()) - set(raw.y_train.unique().tolist()))
    if unseen:
        raise DataError(f"dataset '{name}': test label(s) {unseen[:5]} never occur in the training split")
