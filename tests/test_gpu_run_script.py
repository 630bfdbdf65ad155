"""``benchmarks/gpu/run.sh --smoke``: the accelerator script's every step, at toy size, on this machine.

The script is the one command of a short accelerator run, so a broken step must show here, not
there. The smoke run (CPU, under 2 minutes on an idle 2-core machine) must finish every step within
its limit and leave each step's results under $OUT. The budget is raised here so that a loaded
machine slows the test down instead of failing it; the script's own default is 115 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_run_script_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_RUN_BUDGET_S": "360", "OMP_NUM_THREADS": "1",
           "PYTHON": os.environ.get("PYTHON", shutil.which("python") or "python3")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--smoke"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.md").read_text()
    steps = [line for line in summary.splitlines() if line.startswith("- (")]
    assert len(steps) == 4 and all(": ok," in line for line in steps), summary + (tmp_path / "run.log").read_text()
    log = (tmp_path / "run.log").read_text().lower()
    assert "passed" in log or "skipped" in log  # step (a) ran pytest (its tests skip without CUDA)
    throughput = json.loads((tmp_path / "b_throughput.json").read_text())
    assert {row["defense"] for row in throughput["train_step"]} == {"standard", "pgd_at (PGD-2)"}
    for row in throughput["train_step"]:
        assert set(row["seconds_per_step"]) == {"robustlab", "per-step reads", "minimal", "robustlab, second copy"}
    assert "images_per_second" in throughput["pgd"] or "skipped" in throughput["pgd"]
    for name, runs in (("c_cifar10.json", {"fast_at", "hybrid"}), ("d_imagenet.json", {"standard", "hybrid"})):
        payload = json.loads((tmp_path / name).read_text())
        assert {run["run"] for run in payload["runs"]} == runs, payload["skipped"]
        for run in payload["runs"]:
            assert 0.0 <= run["worst_case"] <= run["clean_accuracy_evaluated"] <= 1.0
            assert run["attacks"] and run["test_size"] > 0
    assert (tmp_path / "env.txt").read_text().strip()


def test_gpu_run_script_rejects_an_unknown_argument(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--quick"],
                          env={**os.environ, "OUT": str(tmp_path)}, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown argument --quick" in done.stderr
    assert not (tmp_path / "summary.md").exists()  # nothing ran


def _fake_cifar_folder(root: Path) -> dict[str, str]:
    """A folder shaped like torchvision's cifar-10-batches-py (16 images per batch); returns its md5s."""
    import hashlib
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for name in names:
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, 16).tolist(),
                 b"data": rng.integers(0, 256, (16, 3072), dtype=np.uint8),
                 b"filenames": [f"img_{i}.png".encode() for i in range(16)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}, protocol=4))
    return {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in folder.iterdir()}


def test_cifar10_parts_rebuild_every_file_byte_for_byte_and_refuse_a_corrupt_one(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    import pack_cifar10

    md5 = _fake_cifar_folder(tmp_path / "source")
    pack_cifar10.pack(tmp_path / "source" / "cifar-10-batches-py", tmp_path / "parts")
    parts = sorted((tmp_path / "parts").iterdir())
    assert [p.name for p in parts] == ["cifar10-part1", "cifar10-part2"]
    pack_cifar10.unpack(parts, tmp_path / "out", md5=md5)
    for name in md5:
        assert (tmp_path / "out" / "cifar-10-batches-py" / name).read_bytes() == \
            (tmp_path / "source" / "cifar-10-batches-py" / name).read_bytes()
    (parts[0] / "data_batch_1.tail.xz").write_bytes(__import__("lzma").compress(b"not the labels"))
    with pytest.raises(SystemExit, match="data_batch_1 rebuilt from .* does not match"):
        pack_cifar10.unpack(parts, tmp_path / "again", md5=md5)


def test_gpu_steps_refuse_a_run_the_step_does_not_have(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    import steps

    with pytest.raises(SystemExit, match="--runs nope: step imagenet has runs"):
        steps.paper_runs(tmp_path, smoke=True, deadline=float("inf"), which="imagenet", only=["nope"])
    assert not (tmp_path / "d_imagenet.json").exists()
