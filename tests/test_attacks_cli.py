"""``robustlab attack``: saves adversarial examples and a figure, names the attack, fails in one line."""

from __future__ import annotations

import numpy as np
import pytest

from robustlab.cli import main
from robustlab.evaluation import subset


def test_attack_command_saves_npz_and_figure(trained_digits, tmp_path, capsys):
    out, figure = tmp_path / "adv.npz", tmp_path / "grid.png"
    with pytest.raises(SystemExit) as info:
        main(
            [
                "attack",
                str(trained_digits.run_dir),
                "--attack",
                "pgd-5",
                "--eps",
                "0.2",
                "--n",
                "40",
                "--out",
                str(out),
                "--figure",
                str(figure),
                "--batch-size",
                "16",
            ]
        )
    assert info.value.code == 0
    printed = capsys.readouterr().out
    saved = np.load(out)
    assert saved["x_adv"].shape == saved["x"].shape == (40, 1, 8, 8)
    assert np.abs(saved["x_adv"] - saved["x"]).max() <= 0.2 + 1e-6
    assert saved["x_adv"].min() >= 0 and saved["x_adv"].max() <= 1
    robust = 100 * float((saved["pred_adv"] == saved["y"]).mean())
    assert f"robust accuracy under pgd-5 (linf eps=0.2) on 40 test images: {robust:.2f}% (an upper bound" in printed
    assert str(saved["attack"]) == "pgd-5" and figure.read_bytes()[:4] == b"\x89PNG"
    # the images are robustlab evaluate's fixed random sample, not the first 40 (class-sorted on ImageFolder data)
    _, indices = subset(trained_digits.data.test, 40)
    assert np.array_equal(saved["indices"], indices.numpy())
    assert np.array_equal(saved["y"], trained_digits.data.test.labels[indices].numpy())


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--attack", "nope"], "unknown attack 'nope'"),
        (["--eps", "-0.1"], "eps must be"),
        (["--eps", "2"], "pixel range"),
        (["--attack", "apgd_ce", "-p", "bogus=1"], "no parameter bogus"),
        (["-p", "steps"], "key=value"),
        (["-p", "steps=abc"], "steps must be an int, got 'abc'"),
        (["-p", "steps=-3"], "steps must be >= 1"),
        (["--attack", "pgd-0"], "steps must be >= 1"),
        (["-p", "step_size=-1"], "step_size must be a number > 0"),
        (["-p", "step_size=abc"], "step_size must be a number > 0, got 'abc'"),
        (["-p", "eps=0.5"], "eps belongs to the threat model"),
        (["-p", "loss=foo"], "unknown attack loss 'foo'"),
    ],
)
def test_attack_command_user_errors(trained_digits, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as info:
        main(["attack", str(trained_digits.run_dir), "--out", str(tmp_path / "a.npz"), *extra])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("error:") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "a.npz").exists()


def test_attack_command_is_adaptive_on_a_preprocessing_defence(tmp_path, capsys, digits):
    from robustlab.training import train

    config = {
        "data": {"dataset": "digits", "val_size": 200},
        "model": {"name": "lenet5"},
        "train": {"epochs": 1, "optimizer": "adam", "lr": 0.003, "select": "last"},
        "defense": {"name": "feature_squeezing", "bits": 2},
    }
    run = train(config, tmp_path / "squeezed", progress=False, data=digits)
    with pytest.raises(SystemExit) as info:
        main(["attack", str(run.run_dir), "-a", "pgd-3", "--eps", "0.1", "--n", "16", "--out", str(tmp_path / "a.npz")])
    assert info.value.code == 0
    assert "robust accuracy under pgd-3 with BPDA (linf eps=0.1)" in capsys.readouterr().out


def test_attack_parameters_take_fractions_and_exponents(trained_digits, tmp_path, capsys):
    """YAML reads 2/255 and 1e-3 as strings; the command reads them as the numbers they are."""
    out = tmp_path / "a.npz"
    with pytest.raises(SystemExit) as info:
        main(["attack", str(trained_digits.run_dir), "-a", "pgd-3", "-p", "step_size=2/255", "--n", "8",
              "--out", str(out)])
    assert info.value.code == 0, capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["attack", str(trained_digits.run_dir), "-a", "cw_l2", "-p", "lr=1e-3", "-p", "steps=2", "--n", "8",
              "--out", str(tmp_path / "b.npz")])
    assert info.value.code == 0, capsys.readouterr().err


def test_attack_command_never_replaces_a_file_silently(trained_digits, tmp_path, capsys):
    """An existing --out needs --overwrite, and --out / --figure must name an .npz / a .png: the weights
    of a run (model.safetensors) cannot be written over by mistake."""
    run = trained_digits.run_dir
    weights = (run / "model.safetensors").read_bytes()
    taken = tmp_path / "taken.npz"
    taken.write_bytes(b"the first attack's results")
    for target, message in ((["--out", str(run / "model.safetensors")], "must name a .npz file"),
                            (["--out", str(taken)], "pass --overwrite"),
                            (["--out", str(tmp_path / "a.npz"), "--figure", str(tmp_path / "a.jpg")], "a .png file")):
        with pytest.raises(SystemExit) as info:
            main(["attack", str(run), "-a", "fgsm", "--n", "8", *target])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and "Traceback" not in err
    assert (run / "model.safetensors").read_bytes() == weights
    assert taken.read_bytes() == b"the first attack's results"
    with pytest.raises(SystemExit) as info:
        main(["attack", str(run), "-a", "fgsm", "--n", "8", "--out", str(taken), "--overwrite"])
    assert info.value.code == 0 and np.load(taken)["x_adv"].shape[0] == 8
