"""Data-parallel training under ``torchrun`` (Gloo on CPU): one run split across two processes.

The global batch is split row-wise across ranks and the gradients are averaged over the global batch,
so two ranks must reach the weights one process reaches (standard training has no randomness beyond
the shared data order). Adversarial objectives attack inside their loss; they must not deadlock.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from robustlab.data import TensorLoader
from robustlab.evaluation import read_evaluation, read_samples
from tests.reliability_support import ROOT, subprocess_env

COMMON = ["--dataset", "digits", "--model", "lenet5", "--epochs", "1", "--batch-size", "64", "--lr", "0.05",
          "--set", "data.val_size=200", "--set", "data.train_subset=512", "--set", "data.test_subset=100",
          "--no-progress"]


def _robustlab(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    command = [sys.executable, *launcher, "-m", "robustlab", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=ROOT)


def _train(out, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    return _robustlab("train", *COMMON, *args, "--out", str(out), nproc=nproc)


def test_shards_of_a_batch_are_its_rows_split_across_ranks():
    images = torch.arange(10 * 4, dtype=torch.uint8).reshape(10, 1, 2, 2)
    labels = torch.arange(10)

    def batches(shard):
        loader = TensorLoader(images, labels, 4, shuffle=True, augment="flip", seed=3, shard=shard)
        return list(loader)

    whole = batches((0, 1))
    ranks = [batches((rank, 3)) for rank in range(3)]
    for step, (x, y) in enumerate(whole):
        for rank in range(3):
            assert torch.equal(ranks[rank][step][0], x[rank::3]) and torch.equal(ranks[rank][step][1], y[rank::3])


def test_two_ranks_reach_the_weights_of_one_process(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    done = _train(single)
    assert done.returncode == 0, done.stderr
    done = _train(double, nproc=2)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("finished standard on digits") == 1, "rank 0 alone reports the run"
    one, two = load_file(single / "last.safetensors"), load_file(double / "last.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5), name
    assert json.loads((double / "metadata.json").read_text())["world_size"] == 2
    metrics = json.loads((double / "metrics.json").read_text())
    assert metrics["cost"]["world_size"] == 2
    assert metrics["clean_accuracy"] == json.loads((single / "metrics.json").read_text())["clean_accuracy"]


@pytest.mark.parametrize("defense", ["hybrid", pytest.param("trades", marks=pytest.mark.slow)])
def test_adversarial_objectives_train_data_parallel(tmp_path, defense):
    out = tmp_path / defense
    done = _train(out, "--defense", defense, "--eps", "0.1", nproc=2)
    assert done.returncode == 0, done.stderr
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 2 and "val_clean_acc" in history[0]


def test_a_mistake_stops_every_rank_with_one_line(tmp_path):
    out = tmp_path / "run"
    assert _train(out).returncode == 0
    done = _train(out, nproc=2)
    assert done.returncode != 0
    assert "holds a finished run; pass --overwrite to replace it" in done.stderr
    assert "robustlab/training.py" not in done.stderr, "a user error, not a traceback (torchrun adds its own)"


def _two_ranks_resumed_after_epoch_1(out, *options: str) -> None:
    """A two-rank run of 2 epochs stopped after epoch 1, then resumed on two ranks.

    The stop is staged: a finished 1-epoch run is marked unfinished with 2 epochs (its resume.pt is
    the state a 2-epoch run has after epoch 1, given a constant learning rate).
    """
    assert _train(out, "--epochs", "1", *options, nproc=2).returncode == 0
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("epochs: 1\n", "epochs: 2\n"))
    metadata = json.loads((out / "metadata.json").read_text())
    (out / "metadata.json").write_text(json.dumps({**metadata, "status": "running"}))
    done = _train(out, "--epochs", "2", *options, nproc=2)
    assert done.returncode == 0, done.stderr
    assert len((out / "history.csv").read_text().splitlines()) == 3


def _same_weights(a, b, atol: float) -> None:
    one, two = load_file(a / "last.safetensors"), load_file(b / "last.safetensors")
    for name in one:
        assert torch.allclose(one[name], two[name], atol=atol), name


def test_a_data_parallel_run_resumes_where_it_stopped(tmp_path):
    """A two-rank run stopped after epoch 1 of 2 resumes on two ranks and ends where one process ends."""
    constant = ["--set", "train.schedule=constant"]
    assert _train(tmp_path / "reference", "--epochs", "2", *constant).returncode == 0
    _two_ranks_resumed_after_epoch_1(tmp_path / "resumed", *constant)
    _same_weights(tmp_path / "reference", tmp_path / "resumed", atol=1e-5)


def test_a_data_parallel_run_with_random_starts_resumes_to_the_uninterrupted_weights(tmp_path):
    """Fast-AT draws a random start on every rank: a two-rank run resumed after epoch 1 must draw on rank 1
    what the uninterrupted two-rank run drew there, and end with the same weights."""
    options = ["--defense", "fast_at", "--eps", "0.1", "--set", "train.schedule=constant"]
    assert _train(tmp_path / "whole", "--epochs", "2", *options, nproc=2).returncode == 0
    _two_ranks_resumed_after_epoch_1(tmp_path / "resumed", *options)
    _same_weights(tmp_path / "whole", tmp_path / "resumed", atol=1e-6)


def test_two_ranks_evaluate_exactly_what_one_process_evaluates(tmp_path):
    """Each rank attacks every other batch (random starts seeded per batch); rank 0 gathers and writes."""
    single = tmp_path / "single"
    assert _train(single).returncode == 0
    double = tmp_path / "double"
    shutil.copytree(single, double)
    options = ["--attacks", "fgsm,pgd-3", "--samples", "100", "--batch-size", "16", "--no-progress",
               "--suite", "quick"]  # 7 batches
    one = _robustlab("evaluate", str(single), *options)
    assert one.returncode == 0, one.stderr
    two = _robustlab("evaluate", str(double), *options, nproc=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote ") == 1, "rank 0 alone reports and writes"
    a, b = read_samples(single), read_samples(double)
    assert a.keys() == b.keys() and "correct:pgd-3" in a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not a["correct:pgd-3"].all(), "the attack must fool the model on some images for this to test seeding"
    accuracy = {k: v["accuracy"] for k, v in read_evaluation(single)["attacks"].items()}
    assert accuracy == {k: v["accuracy"] for k, v in read_evaluation(double)["attacks"].items()}


def test_two_ranks_run_autoattack_within_noise_of_one_process(tmp_path):
    """AutoAttack's stages pack each rank's still-robust points into full batches, so its random draws
    depend on the number of ranks: the verdicts agree with one process within seed noise, not bit for bit."""
    from robustlab.stats import mcnemar

    single = tmp_path / "single"
    assert _train(single).returncode == 0
    double = tmp_path / "double"
    shutil.copytree(single, double)
    options = ["--attacks", "fgsm,autoattack-5", "--eps", "0.03", "--samples", "100", "--batch-size", "16",
               "--no-progress", "--suite", "quick"]
    one = _robustlab("evaluate", str(single), *options)
    assert one.returncode == 0, one.stderr
    two = _robustlab("evaluate", str(double), *options, nproc=2)
    assert two.returncode == 0, two.stderr
    a, b = read_samples(single, eps=0.03), read_samples(double, eps=0.03)
    np.testing.assert_array_equal(a["correct:fgsm"], b["correct:fgsm"])
    ours, theirs = a["correct:autoattack-5"][0], b["correct:autoattack-5"][0]
    assert 0 < ours.sum() < ours.size and 0 < theirs.sum() < theirs.size
    test = mcnemar(ours, theirs)
    assert test.b + test.c <= 6 and test.p_value > 0.05, test
    stages = read_evaluation(double, eps=0.03)["attacks"]["autoattack-5"]["stages"]
    assert {"apgd-ce", "apgd-t", "fab-t", "square"} <= set(stages)
    assert not list(double.glob("evaluation/*.partial.npz")), "every rank's state file removed when done"


def test_two_ranks_audit_exactly_what_one_process_audits(tmp_path):
    """Each rank runs every check on every other batch (draws seeded per batch); rank 0 prints and writes."""
    single = tmp_path / "single"
    assert _train(single).returncode == 0
    double = tmp_path / "double"
    shutil.copytree(single, double)
    options = ["--samples", "60", "--batch-size", "16", "--steps", "3", "--queries", "20", "--no-surrogate",
               "--device", "cpu"]  # 4 batches
    one = _robustlab("audit", str(single), *options)
    assert one.returncode == 0, one.stderr
    two = _robustlab("audit", str(double), *options, nproc=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("verdict:") == 1, "rank 0 alone reports"
    a, b = (json.loads((run / "audit.json").read_text()) for run in (single, double))
    assert a["checks"] == b["checks"]
    assert a["checks"][0]["evidence"]["accuracy"][-1] < a["checks"][0]["evidence"]["accuracy"][0], (
        "PGD must fool the model on some images for this to test seeding"
    )


def test_two_ranks_train_the_audits_surrogate_in_their_own_scratch_directories(tmp_path):
    """Only rank 0 writes a run directory; the other ranks get the trained weights sent, not read from it."""
    run = tmp_path / "run"
    assert _train(run).returncode == 0
    options = ["--samples", "32", "--batch-size", "16", "--steps", "2", "--queries", "10", "--device", "cpu"]
    done = _robustlab("audit", str(run), *options, nproc=2)
    assert done.returncode == 0, done.stderr
    transfer = json.loads((run / "audit.json").read_text())["checks"][3]["evidence"]
    assert "transfer pgd-2" in transfer and transfer["not_run"] == []
