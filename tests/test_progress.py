"""Progress output: a live bar on a terminal, one plain line per epoch / attack in a log."""

from __future__ import annotations

import io
import sys

from robustlab import progress
from robustlab.evaluation import evaluate_run
from robustlab.progress import is_terminal, progress_bar
from robustlab.training import train


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_is_drawn_on_a_terminal_and_not_in_a_log(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert is_terminal()
    bar = progress_bar(total=3, desc="work")
    assert not bar.disable
    bar.update(2)
    bar.close()
    assert "\r" in terminal.getvalue()

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert not is_terminal()
    bar = progress_bar(total=3, desc="work")
    assert bar.disable
    bar.update(2)
    bar.close()
    assert log.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", terminal)
    assert progress_bar(total=3, desc="work", enabled=False).disable  # --no-progress on a terminal


def test_a_log_gets_a_heartbeat_line_for_long_work_and_nothing_once_it_is_done(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.0)
    bar = progress_bar(total=4, desc="work", unit="batch", initial=1)
    bar.set_postfix_str("pgd-20")
    bar.update(1)
    bar.set_postfix({"loss": "0.123"})
    bar.update(1)
    bar.update(1)  # the work is done: its caller's own line says so
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split(" [")[0] for line in lines] == ["work: 2/4 batch", "work: 3/4 batch"]
    assert lines[0].endswith(", pgd-20]") and lines[1].endswith(", loss=0.123]")
    assert "\r" not in log.getvalue()

    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 3600.0)
    log.truncate(0)
    bar = progress_bar(total=4, desc="work")
    bar.update(2)
    assert log.getvalue() == ""  # at most one line an hour
    assert progress_bar(total=4, desc="work", enabled=False).disable


def test_a_log_hears_that_a_long_step_is_still_running_until_the_bar_is_closed_or_dropped(monkeypatch):
    """One batch of FAB-T on EfficientNet takes most of an hour: the log must not be silent for it."""
    import gc
    import threading
    import time

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(progress, "STALL_SECONDS", 0.05)
    bar = progress_bar(total=3, desc="autoattack 3/4 fab-t", unit="batch")
    time.sleep(0.3)
    assert "autoattack 3/4 fab-t: 0/3 batch, still working: no batch finished for 00:0" in log.getvalue()
    bar.close()
    time.sleep(0.05)
    said = log.getvalue()
    time.sleep(0.3)
    assert log.getvalue() == said, "a closed bar's watcher still spoke"

    dropped = progress_bar(total=3, desc="dropped", unit="batch")
    del dropped  # its loop raised: nobody closes it
    gc.collect()
    time.sleep(0.3)
    assert "heartbeat dropped" not in [t.name for t in threading.enumerate()]


def test_training_and_evaluation_write_one_line_per_step_to_a_log(digits, tmp_path, capsys):
    config = {"data": {"dataset": "digits", "val_size": 200, "train_subset": 256}, "model": {"name": "lenet5"},
              "train": {"epochs": 3, "batch_size": 64, "optimizer": "adam", "lr": 0.003}, "threat": {"eps": 0.1}}
    train(config, tmp_path / "run", progress=True, data=digits)
    out, err = capsys.readouterr()  # captured: not a terminal
    assert "\r" not in out + err
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("epoch ")] == [
        "epoch 1", "epoch 2", "epoch 3"
    ]
    evaluate_run(tmp_path / "run", attacks=["fgsm", "pgd-2"], n=40, n_boot=20, progress=True, suite="quick")
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    assert [line.split(" done")[0] for line in err.splitlines()] == [
        "evaluate: clean", "evaluate: fgsm", "evaluate: pgd-2"
    ]
