"""Bad inputs: every one is answered with one clear error, never a traceback or a silent result.

API checks assert the error type and the words that tell the user what to fix; CLI checks run the real
entry point (``robustlab.cli.main``) in-process and assert a non-zero exit and exactly one ``error:``
line with no traceback.
"""

from __future__ import annotations

import math
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from robustlab.attacks import fgsm, make_attack, pgd
from robustlab.config import load_config
from robustlab.data import load_dataset
from robustlab.errors import ConfigError, DataError, InputError, RobustlabError
from robustlab.models import build_model
from robustlab.validation import check_eps, check_images, check_labels
from tests.reliability_support import assert_one_error_line, main_in_process

TRAIN = ["train", "--dataset", "digits", "--epochs", "1", "--no-progress", "--set", "data.train_subset=64",
         "--set", "data.val_size=50"]


@pytest.fixture(scope="module")
def lenet() -> torch.nn.Module:
    return build_model("lenet5", 10, 1, 8).eval()


def _batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(n, 1, 8, 8), torch.arange(n) % 10


# --- images ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda x: x.index_fill(0, torch.tensor([1]), math.nan), "NaN or infinite"),
        (lambda x: x.index_fill(0, torch.tensor([0]), math.inf), "NaN or infinite"),
        (lambda x: x * 255, "divide by 255"),
        (lambda x: x - 0.5, "must lie in [0, 1]"),
        (lambda x: (x * 255).to(torch.uint8), "x.float() / 255"),
        (lambda x: x[:, 0], "shape (N, C, H, W)"),
        (lambda x: x[:0], "empty"),
        (lambda x: x.numpy(), "must be a torch.Tensor"),
        (lambda x: x.permute(0, 2, 3, 1), "x.permute(0, 3, 1, 2)"),
    ],
    ids=["nan", "inf", "0-255", "negative", "uint8", "3d", "empty", "numpy", "channels-last"],
)
def test_bad_images_are_refused_by_attacks(lenet, make, message):
    x, y = _batch()
    bad = make(x)
    with pytest.raises(InputError, match=re.escape(message)):
        check_images(bad)
    for attack in (pgd, fgsm):
        with pytest.raises(InputError, match=re.escape(message)):
            attack(lenet, bad, y[: len(bad)], eps=0.1)


# --- labels ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([0, 1, 2, 10]), "labels must be < 10"),
        (torch.tensor([0, 1, -1, 3]), "labels must be >= 0"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), "integer tensor"),
        (torch.tensor([0, 1, 2]), "shape (4,)"),
    ],
    ids=["too-large", "negative", "float", "wrong-length"],
)
def test_bad_labels_are_refused(lenet, labels, message):
    x, _ = _batch()
    with pytest.raises(InputError, match=re.escape(message)):
        pgd(lenet, x, labels, eps=0.1, steps=2)
    with pytest.raises(InputError):
        check_labels(labels, 4, 10)


@pytest.mark.parametrize(
    "options",
    [{}, {"eps": 0.0}, {"restarts": 2}, {"early_stop": True}, {"targeted": True}],
    ids=["plain", "zero-budget", "restarts", "early-stop", "targeted"],
)
def test_labels_are_checked_against_the_models_classes_on_every_pgd_path(lenet, options):
    """pgd checks labels on its own first forward pass (no probe pass): every path must still refuse."""
    x, y = _batch()
    options = {"eps": 0.1, "steps": 2, **options}
    bad = torch.tensor([0, 1, 2, 10])
    with pytest.raises(InputError, match="labels must be < 10"):
        if options.get("targeted"):
            pgd(lenet, x, y, target=bad, **options)
        else:
            pgd(lenet, x, bad, **options)


# --- budgets -----------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [-0.1, 5, math.nan, math.inf, "a lot"])
def test_bad_eps_is_refused_by_attacks(lenet, eps):
    x, y = _batch()
    with pytest.raises(InputError, match="eps"):
        pgd(lenet, x, y, eps=eps, steps=2)
    with pytest.raises(InputError, match="eps"):
        check_eps(eps, "linf")


@pytest.mark.parametrize("eps", ["-0.1", "5", "nan", "1/0", "lots"])
def test_bad_eps_in_config_and_cli(eps, capsys):
    with pytest.raises(ConfigError, match="eps"):
        load_config(None, [f"threat.eps={eps}"])
    code, _, err = main_in_process([*TRAIN, "--eps", eps, "--out", "/nonexistent/never-written"], capsys)
    assert_one_error_line(code, err, "eps")


@pytest.mark.parametrize("options", [{"steps": -3}, {"step_size": -0.01}, {"restarts": 0}], ids=str)
def test_pgd_settings_that_would_leave_the_images_unattacked_are_refused(lenet, options):
    """A negative step count or step size once returned the (random start) images: clean accuracy
    reported as robust accuracy."""
    x, y = _batch()
    with pytest.raises(InputError, match="pgd needs"):
        pgd(lenet, x, y, eps=0.1, **options)


@pytest.mark.parametrize(("spec", "message"), [
    ({"name": "pgd", "eps": 0.5}, "eps belongs to the threat model"),
    ({"name": "apgd_ce", "steps": 0}, "steps must be >= 1"),
    ({"name": "square", "queries": 2.5}, "queries must be an int"),
    ({"name": "pgd", "early_stop": "yes"}, "early_stop must be a bool"),
    # wrappers that pass **kwargs on are checked against the function that takes them
    ({"name": "cw_linf", "foo": 1}, "attack 'cw_linf' has no parameter foo"),
    ({"name": "cw_linf", "loss": "ce"}, "attack 'cw_linf' has no parameter loss"),  # it is PGD on the CW loss
    ({"name": "mifgsm", "steps": 2.5}, "steps must be an int"),
    ({"name": "autoattack", "bogus": 1}, "attack 'autoattack' has no parameter bogus"),
], ids=str)
def test_make_attack_refuses_bad_parameters_before_attacking(spec, message):
    with pytest.raises(RobustlabError, match=re.escape(message)):
        make_attack(spec, eps=0.1)


def test_small_nchw_images_are_not_mistaken_for_channels_last():
    check_images(torch.rand(4, 16, 1, 1))
    check_images(torch.rand(4, 2, 8, 3))


def test_an_eps_in_255ths_is_pointed_to_its_pixel_value():
    with pytest.raises(InputError, match=re.escape("for 8/255 write 8/255")):
        check_eps(8, "linf")


# --- splits ------------------------------------------------------------------------------------
def test_a_split_holds_bytes_and_float_pixels_come_in_through_from_pixels():
    """A float Split would be divided by 255 again (and in place) by float_images(): it is refused."""
    from robustlab.data import Split

    x, y = _batch()
    with pytest.raises(DataError, match=re.escape("Split.from_pixels")):
        Split(x, y)
    with pytest.raises(DataError, match="labels of shape"):
        Split((x * 255).round().to(torch.uint8), y[:2])
    pixels = (x * 255).round() / 255
    split = Split.from_pixels(pixels, y)
    assert torch.equal(split.float_images(), pixels) and torch.equal(split.float_images(), pixels)
    with pytest.raises(DataError, match="not 8-bit"):
        Split.from_pixels(pixels.clamp(max=0.999) + 0.0005, y)


def test_l2_budget_may_exceed_one_but_linf_may_not():
    assert load_config(None, ["threat.norm=l2", "threat.eps=2.0"]).threat.eps == 2.0
    with pytest.raises(ConfigError, match="exceeds the \\[0, 1\\] pixel range"):
        load_config(None, ["threat.norm=linf", "threat.eps=2.0"])


# --- names -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "valid"),
    [
        ("data.dataset=imagenet", "digits, mnist"),
        ("model.name=resnet19", "lenet5"),
        ("defense.name=madry", "pgd_at"),
    ],
)
def test_unknown_names_list_the_valid_ones(override, valid, capsys):
    with pytest.raises(RobustlabError, match=valid):
        load_config(None, [override])
    code, _, err = main_in_process([*TRAIN, "--set", override, "--out", "/nonexistent/x"], capsys)
    assert_one_error_line(code, err, "unknown", valid)


def test_unknown_attack_and_api_names():
    with pytest.raises(RobustlabError, match="unknown attack 'pgdd'; valid: .*pgd"):
        make_attack("pgdd", eps=0.1)
    with pytest.raises(DataError, match="valid: digits"):
        load_dataset("imagenet")
    with pytest.raises(ConfigError, match="valid: lenet5"):
        build_model("vgg")


def test_unknown_attack_in_cli(capsys, tmp_path):
    run = tmp_path / "run"
    assert main_in_process([*TRAIN, "--out", str(run)], capsys)[0] == 0
    argv = ["evaluate", str(run), "--attacks", "pgdd", "--n", "20", "--no-progress"]
    code, _, err = main_in_process(argv, capsys)
    assert_one_error_line(code, err, "unknown attack", "valid:")


def test_unknown_config_key_suggests_the_right_one(capsys):
    code, _, err = main_in_process([*TRAIN, "--set", "train.epoch=3", "--out", "/nonexistent/x"], capsys)
    assert_one_error_line(code, err, "unknown key 'train.epoch'", "did you mean 'epochs'")


# --- YAML files --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: {epochs: 3\n", "malformed YAML"),
        ("- 1\n- 2\n", "must contain a mapping"),
        ("train:\n  epochs: three\n", "train.epochs"),
        ("\x00\x01binary", "malformed YAML"),
        ("train: !!python/object/apply:os.system ['touch /tmp/robustlab-pwned']\n", "malformed YAML"),
    ],
    ids=["unclosed", "list", "wrong-type", "binary", "python-tag"],
)
def test_malformed_config_file(tmp_path, capsys, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    code, _, err = main_in_process(["train", str(path), "--out", str(tmp_path / "run")], capsys)
    assert_one_error_line(code, err, message)
    assert not Path("/tmp/robustlab-pwned").exists()
    assert not (tmp_path / "run").exists()


def test_config_file_not_utf8_or_missing(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("seed: 1 # caf\xe9\n".encode("latin-1"))
    assert_one_error_line(*main_in_process(["train", str(path)], capsys)[::2], "cannot read config file")
    assert_one_error_line(*main_in_process(["train", str(tmp_path / "nope.yaml")], capsys)[::2], "not found")


# --- data --------------------------------------------------------------------------------------
def test_missing_mnist_offline_names_data_dir(tmp_path, capsys, monkeypatch):
    """An empty --data-dir with no network: one line that names --data-dir, quickly."""
    started = time.perf_counter()
    argv = ["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--epochs", "1", "--out", str(tmp_path / "r")]
    code, _, err = main_in_process(argv, capsys)
    assert_one_error_line(code, err, "dataset 'mnist'", "--data-dir")
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "MNIST").exists(), "the failed download left its empty MNIST/raw behind"


def test_stalled_download_fails_within_the_timeout(tmp_path, monkeypatch):
    """A server that accepts the connection and never answers (a black-holed network) must not hang."""
    from torchvision.datasets import MNIST

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []
    def accept_and_stay_silent() -> None:
        for _ in range(8):
            accepted.append(server.accept()[0])

    threading.Thread(target=accept_and_stay_silent, daemon=True).start()
    monkeypatch.setattr(MNIST, "mirrors", [f"http://127.0.0.1:{server.getsockname()[1]}/"])
    monkeypatch.setenv("ROBUSTLAB_DOWNLOAD_TIMEOUT", "0.5")
    started = time.perf_counter()
    try:
        with pytest.raises(DataError, match="--data-dir"):
            load_dataset("mnist", tmp_path)
    finally:
        server.close()
        for connection in accepted:
            connection.close()
    assert time.perf_counter() - started < 15
    assert socket.getdefaulttimeout() is None  # the process-wide default is restored


def test_bad_download_timeout_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTLAB_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(DataError, match="ROBUSTLAB_DOWNLOAD_TIMEOUT"):
        load_dataset("mnist", tmp_path)


def test_bad_npz_and_folder_datasets(tmp_path, capsys):
    import numpy as np

    zeros = {"y_train": np.zeros(10), "x_test": np.zeros((4, 8, 8)), "y_test": np.zeros(4)}
    np.savez(tmp_path / "float.npz", x_train=np.zeros((10, 8, 8)), **zeros)
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.savez(tmp_path / "objects.npz", x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1),
             x_test=np.zeros(1), y_test=np.zeros(1))
    cases = {"float.npz": "must be uint8", "garbage.npz": "cannot read", "objects.npz": "which could run code",
             "missing.npz": "not found"}
    for name, message in cases.items():
        code, _, err = main_in_process(
            ["train", "--dataset", f"npz:{tmp_path / name}", "--out", str(tmp_path / "r")], capsys
        )
        assert_one_error_line(code, err, message)
        assert not (tmp_path / "r").exists(), "a config that cannot load its data left a run directory"
    (tmp_path / "folder" / "train" / "cat").mkdir(parents=True)
    code, _, err = main_in_process(
        ["train", "--dataset", f"folder:{tmp_path / 'folder'}", "--out", str(tmp_path / "r")], capsys
    )
    assert_one_error_line(code, err, "expected", "give folder: the directory")
    assert "allow_pickle" not in err and "--data-dir" not in err, "advice that does not apply here"


def test_val_size_larger_than_the_data(capsys, tmp_path):
    argv = ["train", "--set", "data.val_size=5000", "--out", str(tmp_path / "r")]
    code, _, err = main_in_process(argv, capsys)
    assert_one_error_line(code, err, "data.val_size=5000")


def test_os_errors_are_one_line(tmp_path, capsys):
    """An environment failure (here --out under a regular file) is one line too, with exit status 1."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = main_in_process([*TRAIN, "--out", str(blocker / "run")], capsys)
    assert code == 1
    assert_one_error_line(code, err, "Not a directory", str(blocker))


def test_decompression_bomb_and_truncated_images_in_a_folder_dataset(tmp_path, capsys, monkeypatch):
    """Untrusted image files: PIL's decompression-bomb guard and a truncated PNG are one-line DataErrors."""
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "cat" / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # an 8x8 image now counts as a bomb (> 2 x limit)
    code, _, err = main_in_process(["train", "--dataset", f"folder:{tmp_path}", "--out", str(tmp_path / "r")], capsys)
    assert_one_error_line(code, err, "cannot read image", "a.png")
    monkeypatch.undo()
    png = tmp_path / "train" / "cat" / "a.png"
    png.write_bytes(png.read_bytes()[:40])
    code, _, err = main_in_process(["train", "--dataset", f"folder:{tmp_path}", "--out", str(tmp_path / "r")], capsys)
    assert_one_error_line(code, err, "cannot read image", "a.png")


# --- hostile but fair inputs: data, config and usage ------------------------------------------
def test_empty_validation_is_refused_before_anything_is_written(tmp_path, capsys):
    """``data.val_size=0`` ended in ``torch.cat(): expected a non-empty list`` after config.yaml was written."""
    out = tmp_path / "r"
    argv = ["train", "--dataset", "digits", "--epochs", "1", "--set", "data.val_size=0", "--out", str(out)]
    assert_one_error_line(*main_in_process(argv, capsys)[::2], "data.val_size")
    assert not out.exists()


def _npz(path: Path, **arrays) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    base = {
        "x_train": rng.integers(0, 256, (24, 8, 8), dtype=np.uint8), "y_train": np.arange(24) % 3,
        "x_test": rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), "y_test": np.arange(6) % 3,
    }
    np.savez(path, **{**base, **arrays})
    return path


def _npz_cases():
    import numpy as np

    labels = np.arange(24) % 3
    return {
        "negative-label": ({"y_train": np.where(labels == 2, -1, labels)}, "label -1"),
        "nan-labels": ({"y_train": np.where(labels == 2, np.nan, labels)}, "integer class labels"),
        "float-labels": ({"y_train": labels + 0.7}, "integer class labels"),  # would be truncated to integers
        "string-labels": ({"y_train": labels.astype(str)}, "integer class labels"),
        "2d-labels": ({"y_train": labels[:, None]}, "vector of labels"),
        "huge-label": ({"y_train": np.where(labels == 2, 2**40, labels)}, "labels must lie in [0, 100000)"),
        "empty-test": ({"x_test": np.zeros((0, 8, 8), np.uint8), "y_test": np.zeros(0, np.int64)},
                       "test split is empty"),
        "test-size-differs": ({"x_test": np.zeros((6, 10, 10), np.uint8)}, "must match"),
        "test-channels-differ": ({"x_train": np.zeros((24, 8, 8, 3), np.uint8)}, "must match"),
        "tiny-images": ({"x_train": np.zeros((24, 1, 1), np.uint8), "x_test": np.zeros((6, 1, 1), np.uint8)},
                        "cannot take the 1x1 images"),
        "unseen-test-class": ({"y_test": np.arange(6) % 4}, "never occur in the training split"),
        "count-mismatch": ({"y_test": np.arange(5) % 3}, "6 test images but 5 labels"),
    }


@pytest.mark.parametrize("case", list(_npz_cases()))
def test_npz_data_is_validated_before_training(tmp_path, capsys, case):
    """Each of these was a traceback (or a silently wrong run) before any check; now one line, no run directory."""
    arrays, message = _npz_cases()[case]
    path = _npz(tmp_path / "d.npz", **arrays)
    argv = ["train", "--dataset", f"npz:{path}", "--epochs", "1", "--no-progress", "--set", "data.val_size=4",
            "--out", str(tmp_path / "r")]
    started = time.perf_counter()
    assert_one_error_line(*main_in_process(argv, capsys)[::2], message)
    assert time.perf_counter() - started < 60  # the 2**40 label built (or hung on) a 2**40-output layer
    assert not (tmp_path / "r").exists()


def test_folder_dataset_classes_are_checked(tmp_path, capsys):
    """A train class without images, or a val class that train lacks, was accepted (the latter dropped silently)."""
    from PIL import Image

    for split, cls in (("train", "cat"), ("val", "cat"), ("train", "dog"), ("val", "dog")):
        (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / cls / "a.png")
    (tmp_path / "train" / "dog" / "a.png").unlink()
    argv = ["train", "--dataset", f"folder:{tmp_path}", "--out", str(tmp_path / "r")]
    assert_one_error_line(*main_in_process(argv, capsys)[::2], "class(es) ['dog'] hold no images")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "dog" / "a.png")
    (tmp_path / "val" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "bird" / "a.png")
    assert_one_error_line(*main_in_process(argv, capsys)[::2], "val/ has class(es) ['bird'] that train/ lacks")


@pytest.mark.parametrize(
    ("override", "message"),
    [("train.epochs=true", "train.epochs: expected a number, got true"),
     ("train.milestones=[2, -1]", "train.milestones.0"),
     ("defense.name=pgd_at", "defense.steps: expected a number, got true")],
    ids=["epochs-true", "milestones-out-of-range", "objective-param-true"],
)
def test_booleans_and_out_of_range_milestones_are_refused(override, message):
    extra = ["defense.steps=true"] if override.startswith("defense") else []
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override, *extra])


@pytest.mark.parametrize(
    "argv",
    [["train", "--epochs", "abc"], ["experiment", "x.yaml", "--workers", "0"],
     ["experiment", "x.yaml", "--workers", "-3"], ["train", "--epoch", "3"]],
    ids=["epochs-abc", "workers-0", "workers-negative", "unknown-option"],
)
def test_usage_errors_are_one_line(argv, capsys):
    """click printed ``Usage: ...`` / ``Try ...`` / ``Error: ...``; now one ``error:`` line with exit status 2."""
    code, _, err = main_in_process(argv, capsys)
    assert code == 2
    assert_one_error_line(code, err, f"robustlab {argv[0]} --help")
    assert "Usage:" not in err and len(err.strip().splitlines()) == 1, err


def test_a_config_path_that_is_not_a_regular_file_fails_at_once(tmp_path):
    """``robustlab train /dev/zero`` read forever; a FIFO would block forever."""
    import os

    from tests.reliability_support import run_cli

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo)):
        done = run_cli(["train", path], timeout=60)
        assert done.returncode == 2
        assert_one_error_line(done.returncode, done.stderr, "is not a regular file")


def test_nan_logits_are_warned_about(lenet):
    """A model with NaN weights returned "adversarial" images with no word of warning."""
    broken = build_model("lenet5", 10, 1, 8).eval()
    with torch.no_grad():
        next(broken.parameters()).fill_(math.nan)
    x, y = _batch()
    for attack in (pgd, fgsm):
        with pytest.warns(RuntimeWarning, match="NaN or infinite logits"):
            attack(broken, x, y, eps=0.1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pgd(lenet, x, y, eps=0.1, steps=2)  # a finite model: no warning
