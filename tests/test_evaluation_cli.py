"""`robustlab evaluate` end to end on a tiny digits run, and its one-line errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from robustlab.cli import main
from robustlab.evaluation import subset
from robustlab.rundir import read_json, save_weights

QUICK = ["--n", "40", "--n-boot", "50", "--no-progress", "--suite", "quick"]


@pytest.fixture
def run_copy(trained_digits, tmp_path):
    return shutil.copytree(trained_digits.run_dir, tmp_path / "run")


def _run(argv: list[str]) -> None:
    try:
        main(argv)
    except SystemExit as stop:  # typer's standalone mode exits with 0 on success
        assert stop.code in (0, None)


def _fail(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_evaluate_run_end_to_end(run_copy, capsys):
    _run(["evaluate", str(run_copy), "--attacks", "fgsm,pgd-5", *QUICK])
    out = capsys.readouterr().out
    assert "worst_case" in out and "pgd steps=5" in out and "95% CI" in out
    assert "robust accuracy UPPER BOUND (per-sample worst case, min over fgsm, pgd-5)" in out
    assert "upper bound on robustness, not a robustness claim" in out, "the quick suite says what it is"
    assert "robust numbers are upper bounds" in out and "strongest evidence: " in out
    evaluation = read_json(run_copy / "metrics.json")["evaluations"]["linf-0.1"]
    assert list(evaluation["attacks"]) == ["fgsm", "pgd-5"] and evaluation["strength"] == "upper-bound"
    assert evaluation["samples"]["n"] == 40
    assert (run_copy / evaluation["samples"]["file"]).is_file()


def test_cli_evaluate_own_checkpoint(trained_digits, tmp_path, capsys):
    weights = tmp_path / "mine.safetensors"
    save_weights(weights, trained_digits.model)
    pt = tmp_path / "net.pt"
    torch.save(trained_digits.model.net.state_dict(), pt)
    common = ["--model", "lenet5", "--dataset", "digits", "--eps", "0.1", "--attacks", "fgsm", *QUICK]
    _run(["evaluate", "--checkpoint", str(weights), "--out", str(tmp_path / "a"), *common])
    _run(["evaluate", "--checkpoint", str(pt), "--out", str(tmp_path / "b"), *common])
    capsys.readouterr()
    a = read_json(tmp_path / "a" / "metrics.json")["evaluations"]["linf-0.1"]
    b = read_json(tmp_path / "b" / "metrics.json")["evaluations"]["linf-0.1"]
    assert a["run_config"]["checkpoint"] == str(weights)
    # the safetensors file carries the run's normalisation, so it reproduces the run's clean accuracy
    test, _ = subset(trained_digits.data.test, 40)
    expected = float((trained_digits.model(test.float_images()).argmax(1) == test.labels).float().mean())
    assert a["clean"]["accuracy"] == pytest.approx(expected)
    assert 0 <= b["clean"]["accuracy"] <= 1


def test_cli_evaluate_never_replaces_a_recorded_evaluation_without_overwrite(run_copy, capsys):
    _run(["evaluate", str(run_copy), "--attacks", "fgsm,pgd-5", *QUICK])
    before = (run_copy / "metrics.json").read_bytes()
    err = _fail(["evaluate", str(run_copy), "--attacks", "fgsm", *QUICK[:2], "--suite", "quick"], capsys)
    assert "already holds an evaluation at linf-0.1 (upper-bound, 40 test images)" in err and "--overwrite" in err
    assert (run_copy / "metrics.json").read_bytes() == before
    _run(["evaluate", str(run_copy), "--attacks", "fgsm", *QUICK, "--overwrite"])
    assert list(read_json(run_copy / "metrics.json")["evaluations"]["linf-0.1"]["attacks"]) == ["fgsm"]


def test_cli_evaluate_checks_every_budget_of_a_curve_before_attacking(run_copy, capsys):
    _run(["evaluate", str(run_copy), "--attacks", "fgsm", *QUICK])  # the run's own eps, 0.1
    err = _fail(["evaluate", str(run_copy), "--eps", "0.05,0.1", "--attacks", "fgsm", *QUICK], capsys)
    assert "already holds an evaluation at linf-0.1" in err and "leave that budget out" in err
    assert list(read_json(run_copy / "metrics.json")["evaluations"]) == ["linf-0.1"], "0.05 was attacked first"


def test_cli_evaluate_checkpoint_refuses_to_write_into_a_training_run(trained_digits, run_copy, tmp_path, capsys):
    weights = tmp_path / "mine.safetensors"
    save_weights(weights, trained_digits.model)
    before = (run_copy / "metrics.json").read_bytes()
    err = _fail(["evaluate", "--checkpoint", str(weights), "--model", "lenet5", "--dataset", "digits",
                 "--eps", "0.1", "--out", str(run_copy), *QUICK], capsys)
    assert "is a training run" in err
    assert (run_copy / "metrics.json").read_bytes() == before


def test_cli_missing_run_dir(tmp_path, capsys):
    assert "run directory not found" in _fail(["evaluate", str(tmp_path / "nope"), *QUICK], capsys)


def test_cli_corrupt_weights_keep_metrics(run_copy, capsys):
    before = (run_copy / "metrics.json").read_bytes()
    (run_copy / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "corrupt or truncated weights" in _fail(["evaluate", str(run_copy), *QUICK], capsys)
    assert (run_copy / "metrics.json").read_bytes() == before


def test_cli_unknown_attack_and_bad_flags(run_copy, tmp_path, capsys):
    bad_attack = ["evaluate", str(run_copy), "--attacks", "fgsm,bogus", *QUICK]
    assert "unknown attack 'bogus'" in _fail(bad_attack, capsys)
    assert "eps" in _fail(["evaluate", str(run_copy), "--eps", "2", *QUICK], capsys)
    assert "--checkpoint also needs --dataset, --eps" in _fail(
        ["evaluate", "--checkpoint", str(tmp_path / "x.pt"), "--model", "lenet5"], capsys
    )
    assert "give a RUN_DIR" in _fail(["evaluate"], capsys)


def test_cli_warns_about_an_unfinished_run(run_copy, capsys):
    from robustlab.rundir import RunDir

    RunDir(run_copy).update_metadata(status="running")
    _run(["evaluate", str(run_copy), "--attacks", "fgsm", *QUICK])
    assert "warning: this run has not finished training" in capsys.readouterr().out
    assert read_json(run_copy / "metrics.json")["evaluations"]["linf-0.1"]["run_config"]["finished"] is False


def test_cli_several_budgets_give_an_accuracy_vs_eps_curve(run_copy, capsys):
    _run(["evaluate", str(run_copy), "--attacks", "pgd-5", "--eps", "0.02,8/255,0.2", *QUICK])
    capsys.readouterr()
    evaluations = read_json(run_copy / "metrics.json")["evaluations"]
    curve = [evaluations[key]["worst_case"]["accuracy"] for key in ("linf-0.02", "linf-0.0313725", "linf-0.2")]
    assert curve[0] >= curve[1] >= curve[2] and curve[0] > curve[2]
