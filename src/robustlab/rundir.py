"""Run directories: everything a training run produces, written atomically, never silently overwritten.

Layout of ``RUN_DIR/``::

    config.yaml         the validated config that produced the run
    metadata.json       versions, seed, git commit, device, data split sizes and hashes, status
    history.csv         one row per epoch
    model.safetensors   the selected (best-validation) weights
    last.safetensors    weights at the end of the last finished epoch  } what an interrupted
    resume.pt           optimiser / scheduler / RNG / objective state  } run resumes from; resume.pt
                        alone suffices (it holds the last and the selected weights too), so an
                        unfinished run carried to another machine without its .safetensors resumes
    metrics.json        final evaluation

Every file is written to a temporary sibling, fsynced, then renamed over the target, so a crash or
SIGKILL leaves either the old or the new file, never a torn one. ``resume.pt`` holds only tensors and
plain containers and is loaded with ``weights_only=True``: nothing is unpickled.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from robustlab import schemas
from robustlab.errors import CheckpointError, RobustlabError
from robustlab.schemas import problem

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty (EOFError)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: read/write permissions a plain ``open(path, "w")`` would give (mkstemp's own 0600 would hide results
#: from the other users of a shared results folder)
_FILE_MODE = 0o666 & ~_umask()
#: the same for a directory made with ``tempfile.mkdtemp`` (0700) and renamed into place
DIR_MODE = 0o777 & ~_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename; on failure the old file is intact."""
    path = Path(path)
    try:  # a full disk or a read-only folder can already fail here
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise RobustlabError(f"could not write {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _FILE_MODE)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise RobustlabError(f"could not write {path}: {error.strerror or error}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temp files (``.NAME.*.tmp``) that writes interrupted by a kill left in ``directory``."""
    stale = [p for p in Path(directory).glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save_tagged_arrays(path: str | Path, tag: str, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` and the ``tag`` of the computation they belong to, as one compressed ``.npz`` written
    atomically: the partial state of a long evaluation or audit, read back by :func:`load_tagged_arrays`."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, tag=np.array(tag), **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_tagged_arrays(path: str | Path, tag: str) -> dict[str, np.ndarray] | None:
    """The arrays saved at ``path`` under ``tag``; None when the file is absent, unreadable, or another
    computation's (its tag differs), so a partial state is only ever resumed by the very same work."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "tag" not in archive.files or str(archive["tag"]) != tag:
                return None
            return {key: archive[key] for key in archive.files if key != "tag"}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


#: Deepest nesting a file robustlab reads may have (its own files nest about 6 deep); deeper is damage,
#: and would otherwise end in a RecursionError when read, validated or written back.
MAX_JSON_DEPTH = 64


def _depth_exceeds(data: Any, limit: int) -> bool:
    """Whether ``data`` nests containers deeper than ``limit`` (iterative: no recursion to overflow)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def read_json(path: str | Path, schema: type[BaseModel] | None = None) -> Any:
    """Read a JSON file; with ``schema`` (see :mod:`robustlab.schemas`) also check its content.

    Every problem is a one-line :class:`CheckpointError` naming the file (and the field): a missing
    file, invalid JSON, nesting deeper than :data:`MAX_JSON_DEPTH`, or content of the wrong shape.
    The data is returned as read (a plain dict), so callers index it knowing the types hold.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing file: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"corrupt JSON in {path}: {error}") from None
    except RecursionError:
        raise CheckpointError(f"corrupt JSON in {path}: nested deeper than {MAX_JSON_DEPTH} levels") from None
    if _depth_exceeds(data, MAX_JSON_DEPTH):
        raise CheckpointError(f"corrupt JSON in {path}: nested deeper than {MAX_JSON_DEPTH} levels")
    if schema is not None:
        try:
            schema.model_validate(data)
        except ValidationError as error:
            raise CheckpointError(f"corrupt {path}: {problem(error)}") from None
    return data


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write rows (dicts, possibly with differing keys) as CSV; columns in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read a history CSV back, converting numeric cells to int or float (as they were written)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    except (csv.Error, UnicodeDecodeError) as error:
        raise CheckpointError(f"corrupt CSV in {path}: {error}") from None


def _number(text: str | None) -> Any:
    if text is None or text == "":
        return None
    for parse in (int, float):  # an epoch number read back stays "3", not "3.0", when rewritten on resume
        try:
            return parse(text)
        except ValueError:
            continue
    return text


def save_weights(path: str | Path, model: nn.Module) -> None:
    """Save a model's state dict as safetensors, atomically."""
    save_state_dict(path, model.state_dict())


def save_state_dict(path: str | Path, state: dict[str, torch.Tensor]) -> None:
    """Save a state dict (tensors only) as safetensors, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write_bytes(path, save_safetensors_bytes(tensors))


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Load safetensors weights into ``model``; a missing, corrupt or mismatched file is a CheckpointError."""
    path = Path(path)
    try:
        tensors = load_safetensors_bytes(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"weights not found: {path}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"corrupt or truncated weights file {path}: {error}") from None
    check_finite(tensors, path)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"weights in {path} do not fit the model: {_mismatch(error)}") from None


def _mismatch(error: RuntimeError) -> str:
    """What ``load_state_dict`` found wrong (missing / unexpected keys, shapes), in one bounded line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = " ".join(lines[1:3]) or (lines[0] if lines else type(error).__name__)
    return detail if len(detail) <= 300 else detail[:297] + "..."


def check_finite(tensors: dict[str, Any], path: str | Path) -> None:
    """Refuse weights holding NaN or infinity (a diverged run, or a damaged file), naming the tensors.

    Such a model outputs NaN for every input; every accuracy and attack downstream would be nonsense.
    """
    bad = [k for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(f"weights in {path} hold NaN or infinite values ({bad[0]}{more}): "
                              "the run diverged or the file is damaged")


def load_foreign_checkpoint(path: str | Path, model: nn.Module) -> None:
    """Load a user's own checkpoint: safetensors, or a .pt/.pth state dict read with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        load_weights(path, model)
        return
    try:
        state = _load_tensors_only(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as error:  # torch raises many types for corrupt or unsafe files
        problem = _torch_load_problem(error)
        if problem.endswith("refused"):  # a whole pickled model, most often: say what loads instead
            problem += " (save the weights alone: torch.save(model.state_dict(), PATH))"
        raise CheckpointError(f"cannot load {path} safely (weights_only=True): {problem}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    check_finite(state, path)
    target = model.net if hasattr(model, "net") and not any(k.startswith("net.") for k in state) else model
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"weights in {path} do not fit the model: {_mismatch(error)}") from None


def _load_tensors_only(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` without torch's UserWarnings (about the pickle protocol of a file
    it then refuses): the one-line error that follows says all there is to say."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def _torch_load_problem(error: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, without torch's advice to load it unsafely."""
    if "Weights only load failed" in str(error):
        return "it holds Python objects, not only tensors, and unpickling them could run code; refused"
    return first_line(error)


def save_resume_state(path: str | Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_resume_state(path: str | Path) -> dict[str, Any]:
    try:
        return _load_tensors_only(path)
    except Exception as error:
        raise CheckpointError(f"corrupt resume state {path}: {_torch_load_problem(error)}") from None


class RunLock:
    """An exclusive, non-blocking ``fcntl.flock`` on a directory; released by :meth:`close` or at exit."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = os.open(path, os.O_RDONLY)
        if fcntl is None:  # no fcntl (Windows): nothing to lock with
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise RobustlabError(
                f"{path} is being trained by another process (it holds the directory's lock); "
                "wait for it to finish, or choose another --out"
            ) from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


class RunDir:
    """Paths and status of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    metadata = property(lambda self: self.path / "metadata.json")
    history = property(lambda self: self.path / "history.csv")
    weights = property(lambda self: self.path / "model.safetensors")
    last_weights = property(lambda self: self.path / "last.safetensors")
    resume = property(lambda self: self.path / "resume.pt")
    metrics = property(lambda self: self.path / "metrics.json")

    def exists(self) -> bool:
        return self.config.exists()

    def lock(self) -> RunLock:
        """Take this run directory's lock (creating the directory), or fail at once if another process holds it.

        Two ``robustlab train`` commands on one ``--out`` would otherwise both train and overwrite each
        other's checkpoints (an experiment's cells have their own locks for the same reason). The lock is
        an ``fcntl`` lock on the directory itself: no lock file appears in the run or beside it, and the
        kernel frees the lock when its holder dies.
        """
        return RunLock(self.path)

    def clear(self) -> None:
        """Delete everything in the directory (``--overwrite``) but the directory itself, which holds the lock."""
        for child in self.path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def read_metadata(self) -> dict[str, Any]:
        """``metadata.json`` checked against :class:`robustlab.schemas.Metadata` ({} when absent)."""
        return read_json(self.metadata, schemas.Metadata) if self.metadata.exists() else {}

    def read_metrics(self) -> dict[str, Any]:
        """``metrics.json`` checked against :class:`robustlab.schemas.Metrics` ({} when absent)."""
        return read_json(self.metrics, schemas.Metrics) if self.metrics.exists() else {}

    def is_finished(self) -> bool:
        """Whether ``metadata.json`` says finished; a damaged one is an error, not "unfinished"."""
        return self.read_metadata().get("status") == "finished"

    def write_config(self, config_dict: dict[str, Any]) -> None:
        atomic_write_text(self.config, yaml.safe_dump(config_dict, sort_keys=False))

    def read_config_dict(self) -> dict[str, Any]:
        if not self.config.exists():
            raise CheckpointError(f"{self.path} is not a run directory (no config.yaml)")
        try:
            data = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise CheckpointError(f"corrupt config.yaml in {self.path}: {first_line(error)}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"corrupt config.yaml in {self.path}: not a mapping")
        from robustlab.config import RunConfig, drop_retired_keys

        for note in drop_retired_keys(data):
            warnings.warn(f"{self.path}: {note}", stacklevel=2)
        missing = [name for name in RunConfig.model_fields if name not in data]
        if missing:  # a run's config.yaml is always written whole: a missing section means a truncated file
            raise CheckpointError(f"corrupt config.yaml in {self.path}: no {', '.join(missing)} (truncated?)")
        return data

    def update_metadata(self, **fields: Any) -> dict[str, Any]:
        data = self.read_metadata()
        data.update(fields)
        write_json(self.metadata, data)
        return data

    def update_metrics(self, **fields: Any) -> dict[str, Any]:
        data = self.read_metrics()
        data.update(fields)
        write_json(self.metrics, data)
        return data
