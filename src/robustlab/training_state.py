"""What a training run records and restores around its loop (:mod:`robustlab.training`).

The run directory's preparation (fresh, resumed or refused), the environment recorded in
``metadata.json``, the RNG state saved with every checkpoint, peak memory, and the selected weights
written back from ``resume.pt``.
"""

from __future__ import annotations

import platform
import random
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustlab.config import RunConfig, build_config, config_to_dict, trained_identity
from robustlab.errors import RobustlabError
from robustlab.rundir import (
    RunDir,
    load_resume_state,
    remove_temp_files,
    save_state_dict,
)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def git_state(directory: Path = Path(__file__).parent) -> dict[str, Any]:
    """``git_commit`` (HEAD) and ``git_dirty`` (uncommitted changes under ``directory``) of the code that ran.

    A result produced by a modified package is not reproducible from the commit alone, so the
    run's metadata says so. Both are None outside a git checkout (an installed wheel).
    """
    if shutil.which("git") is None:
        return {"git_commit": None, "git_dirty": None}

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=directory)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD") or None
    status = git("status", "--porcelain", "--", ".") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def environment() -> dict[str, Any]:
    import robustlab

    return {
        "robustlab": robustlab.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **git_state(),
    }


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(_flatten(random.getstate()))}
    np_state = np.random.get_state()
    state["numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    state["numpy_pos"] = int(np_state[2])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _flatten(python_state: tuple) -> list[int]:
    version, internal, gauss = python_state
    return [version, *internal, -1 if gauss is None else 0]


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    flat = state["python"]
    random.setstate((flat[0], tuple(flat[1:-1]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trains_the_same(run_dir: str | Path, config: RunConfig) -> bool:
    """Whether ``run_dir``'s config trains what ``config`` trains (:func:`trained_identity`); False when it
    has no readable config."""
    try:
        previous = build_config(RunDir(run_dir).read_config_dict())
    except RobustlabError:
        return False
    return trained_identity(previous) == trained_identity(config)


def _prepare_run_dir(run: RunDir, config: RunConfig, overwrite: bool) -> bool:
    """Create or validate the run directory; returns True when an unfinished run should resume."""
    if run.path.exists() and any(run.path.iterdir()) and not run.exists():
        raise RobustlabError(f"{run.path} exists and is not a robustlab run; choose another --out")
    if run.exists():
        if overwrite:  # empty it, keep the directory: its lock (held by this process) stays valid
            run.clear()
        elif run.is_finished():
            raise RobustlabError(f"{run.path} holds a finished run; pass --overwrite to replace it")
        else:
            remove_temp_files(run.path)
            previous = build_config(run.read_config_dict())
            if trained_identity(previous) != trained_identity(config):
                if run.resume.exists():
                    raise RobustlabError(
                        f"{run.path} holds an unfinished run with a different config; "
                        "resume it with the same config or pass --overwrite"
                    )
                # no epoch finished (e.g. the data failed to load): nothing to lose, start with the new config
                run.write_config(config_to_dict(config))
            return run.resume.exists()
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(config_to_dict(config))
    return False

def restore_selected_weights(run_dir: str | Path) -> bool:
    """Write ``model.safetensors`` from ``resume.pt`` when only the latter came along (a fresh clone).

    Returns whether it wrote the file: False when the weights are there already or ``resume.pt`` is
    absent or older than the selected weights it should hold.
    """
    run = RunDir(run_dir)
    if run.weights.exists() or not run.resume.exists():
        return False
    selected = load_resume_state(run.resume).get("selected")
    if not selected:
        return False
    save_state_dict(run.weights, selected)
    return True

