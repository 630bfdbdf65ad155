"""The experiment grid runner: validation before training, resumability, locking, results table."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from robustlab.defenses import DEFENSES
from robustlab.errors import ConfigError, RobustlabError
from robustlab.experiments import BUILTIN_PROFILES, cell_row, load_experiment, plan_experiment, run_experiment
from robustlab.report.data import load_results
from robustlab.rundir import RunDir, read_csv

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "paper"


def tiny_experiment(**grid) -> dict:
    """Digits, LeNet-5, one short epoch, 60 test images, two cheap attacks, no audit: seconds per cell."""
    return {
        "name": "tiny",
        "base": {
            "data": {"dataset": "digits", "val_size": 100, "train_subset": 400, "test_subset": 60},
            "model": {"name": "lenet5"},
            "train": {"epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0,
                      "val_robust_size": 50, "val_attack_steps": 2},
            "threat": {"eps": 0.1},
        },
        "grid": {"defenses": ["standard"], "eps": [0.1], "seeds": [0], **grid},
        "evaluation": {"attacks": ["fgsm", "pgd-3"], "suite": "quick", "audit": False},
    }


def run(spec: dict, out: Path, **kwargs):
    kwargs.setdefault("isolate", False)
    return run_experiment(load_experiment(spec), out, log=lambda line: None, **kwargs)


# --- validation before any training ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("grid", "field"),
    [
        ({"defenses": ["standard", "no_such_defence"]}, "grid.defenses[1]"),
        ({"datasets": ["digits", "nosuchdata"]}, "grid.datasets[1]"),
        ({"eps": [0.1, 1.5]}, "grid.eps[1]"),
        ({"eps": [-0.1]}, "grid.eps[0]"),
        ({"models": ["nosuchnet"]}, "grid.models[0]"),
        ({"defenses": [{"name": "standard", "bogus": 1}]}, "grid.defenses[0]"),
    ],
)
def test_bad_grid_fails_before_training_naming_the_field(tmp_path, grid, field):
    with pytest.raises(ConfigError) as info:
        run(tiny_experiment(**grid), tmp_path / "out")
    message = str(info.value)
    assert field in message and "\n" not in message
    assert not (tmp_path / "out" / "runs").exists(), "a run started although the grid was invalid"


@pytest.mark.parametrize(
    ("evaluation", "field"),
    [
        ({"attacks": ["fgsm", "no_such_attack"]}, "evaluation.attacks[1]"),
        ({"attacks": ["fgsm", {"name": "pgd", "steps": 0}]}, "evaluation.attacks[1]: attack 'pgd': steps must be >= 1"),
        ({"suite": "nope"}, "evaluation.suite"),
        ({"options": {"eot_sample": 3}}, "evaluation.options.eot_sample"),
        ({"audit": True, "audit_options": {"bogus": 1}}, "evaluation.audit_options.bogus"),
        ({"options": {"progress": True}}, "evaluation.options.progress"),  # the command line's, not the config's
        ({"audit": True, "audit_options": {"checkpoint": "x"}}, "evaluation.audit_options.checkpoint"),
    ],
)
def test_bad_evaluation_settings_fail_before_training(tmp_path, evaluation, field):
    spec = tiny_experiment()
    spec["evaluation"].update(evaluation)
    with pytest.raises(ConfigError, match=re.escape(field)):
        run(spec, tmp_path / "out")
    assert not (tmp_path / "out" / "runs").exists()


def test_a_grid_with_progress_reports_each_attack_and_audit_check_as_it_finishes(tmp_path, capsys):
    spec = tiny_experiment()
    spec["evaluation"].update(audit=True, audit_options={"n": 40, "steps": 2, "square_queries": 20,
                                                         "surrogate": False})
    run(spec, tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "evaluate: fgsm done in" in err and "evaluate: pgd-3 done in" in err, err
    assert "audit 1/7 accuracy_vs_eps: " in err and "audit 7/7 bpda: " in err, err
    row = load_results(tmp_path / "out").rows[0]
    assert row["audit_verdict"] in ("pass", "warn", "fail") and not row.get("audit_pending")


def test_a_cell_awaiting_its_audit_is_marked_audit_pending(tmp_path, monkeypatch):
    import robustlab.audit

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(robustlab.audit, "audit_run", interrupted)
    spec = tiny_experiment()
    spec["evaluation"].update(audit=True)
    with pytest.raises(KeyboardInterrupt):
        run(spec, tmp_path / "out")
    cell = plan_experiment(load_experiment(spec), tmp_path / "out").cells[0]
    row = cell_row(cell, audit=True)
    assert row["status"] == "finished" and row["audit_pending"] and "audit_verdict" not in row
    assert "audit_pending" not in cell_row(cell), "a grid without audits has none pending"
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    first = next(r for r in rows if r["cell"] == cell.id)
    assert first["status"] == "finished" and first["audit_pending"] and first["worst_case"] is not None, \
        "the results table has the evaluation while the (long) audit runs"


def test_a_grid_run_with_its_data_elsewhere_keeps_its_cells_and_evaluates_from_there(tmp_path, monkeypatch):
    """Another machine keeps the data in another folder: --data-dir says where, not what the cells train."""
    import robustlab.evaluation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    spec, out = tiny_experiment(seeds=[0, 1]), tmp_path / "out"
    run(spec, out, data_dir=str(tmp_path / "here"), only=["seed=0"])
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(robustlab.evaluation, "evaluate_run", interrupted)
        run(spec, out, data_dir=str(tmp_path / "here"), only=["seed=1"])  # trained, evaluation to come
    again = run(spec, out, data_dir=str(tmp_path / "there"))
    done, trained = "digits-lenet5-standard-eps0.1-s0", "digits-lenet5-standard-eps0.1-s1"
    assert again.skipped == [done] and again.ran == [trained] and not again.failed
    data_dir = {name: yaml.safe_load((out / "runs" / name / "config.yaml").read_text())["data"]["data_dir"]
                for name in (done, trained)}
    assert data_dir == {done: str(tmp_path / "here"), trained: str(tmp_path / "there")}, \
        "the evaluated cell still names the other machine's folder, or a finished one was rewritten"


def test_reevaluate_before_evaluates_older_cells_again_once_and_keeps_training_and_audit(tmp_path, monkeypatch):
    import robustlab.audit
    from robustlab import training

    calls: list[str] = []
    real_train, real_audit = training.train, robustlab.audit.audit_run
    monkeypatch.setattr(training, "train", lambda *a, **k: (calls.append("train"), real_train(*a, **k))[1])
    monkeypatch.setattr(robustlab.audit, "audit_run", lambda *a, **k: (calls.append("audit"), real_audit(*a, **k))[1])
    spec, out = tiny_experiment(), tmp_path / "out"
    spec["evaluation"].update(audit=True, audit_options={"n": 20, "steps": 1, "square_queries": 5,
                                                         "surrogate": False})
    run(spec, out)
    cell = plan_experiment(load_experiment(spec), out).cells[0]
    first = json.loads(cell.state_path.read_text())["evaluated_at"]
    assert calls == ["train", "audit"]
    again = run(spec, out, reevaluate_before=first + 1e-3)
    assert again.ran == [cell.id] and calls == ["train", "audit"], "trained or audited again"
    assert json.loads(cell.state_path.read_text())["evaluated_at"] > first
    assert run(spec, out, reevaluate_before=first + 1e-3).skipped == [cell.id], "evaluated a third time"
    assert run(spec, out, reevaluate_before=first - 1.0).skipped == [cell.id], "an earlier moment changed nothing"


def test_reevaluate_before_reads_an_iso_time_or_a_git_commit(monkeypatch):
    from robustlab.commands.experiment import _moment

    assert _moment("2026-12-04T17:00") == 1796403600.0 == _moment("2026-12-04T18:00+01:00")
    with pytest.raises(ConfigError, match="neither an ISO 8601 time .* nor a git commit"):
        _moment("no-such-commit-or-time")
    if shutil.which("git") and (Path(__file__).resolve().parents[1] / ".git").exists():
        monkeypatch.chdir(Path(__file__).resolve().parents[1])
        assert 1.7e9 < _moment("HEAD") < 4e9


def _committed_grids() -> list[tuple[Path, Path, str]]:
    """(results directory, config, profile) of every grid committed under benchmarks/paper-*."""
    root = Path(__file__).resolve().parents[1]
    configs = {yaml.safe_load(path.read_text())["name"]: path for path in (root / "configs" / "paper").glob("*.yaml")}
    grids = []
    for record in sorted(root.glob("benchmarks/paper-*/experiment.json")):
        settings = json.loads(record.read_text())
        grids.append((record.parent, configs[settings["name"]], settings["profile"]))
    return grids


@pytest.mark.parametrize(("results_dir", "config", "profile"), _committed_grids(),
                         ids=lambda value: value.name if isinstance(value, Path) else value)
def test_a_committed_grid_is_what_its_config_plans_so_a_rerun_skips_its_finished_work(results_dir, config, profile):
    """A config edited after its grid ran would make the rerun refuse its cells, or quietly evaluate them again."""
    from robustlab.experiments.config import _evaluation_kwargs, _signature
    from robustlab.experiments.plan import _read_state
    from robustlab.experiments.run import _config_matches

    plan = plan_experiment(load_experiment(config), results_dir, profile=profile, data_dir="/elsewhere/data")
    assert {c.id for c in plan.cells} >= {p.name for p in (results_dir / "runs").iterdir() if p.is_dir()}
    for cell in plan.cells:
        if not RunDir(cell.run_dir).exists():
            continue
        assert _config_matches(cell), f"{cell.id}: its config.yaml differs from what {config.name} plans"
        evaluated = _read_state(cell).get("evaluation")
        if evaluated is not None:
            current = _signature(_evaluation_kwargs(plan.evaluation, cell.config.train.device))
            assert evaluated == current, f"{cell.id}: evaluated with other settings than {config.name} now asks"


def test_missing_dataset_fails_before_training(tmp_path):
    spec = tiny_experiment(datasets=["mnist"])
    with pytest.raises(ConfigError, match=r"data\.dataset 'mnist'.*--data-dir"):
        run(spec, tmp_path / "out", data_dir=str(tmp_path / "empty"))
    assert not (tmp_path / "out" / "runs").exists()


def test_unknown_experiment_keys_and_profiles_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'grid.defences'"):
        load_experiment({"grid": {"defences": ["standard"]}})
    with pytest.raises(ConfigError, match="unknown key 'evaluaton'"):
        load_experiment({"evaluaton": {}})
    with pytest.raises(ConfigError, match=r"base: .*train\.lr"):
        plan_experiment(load_experiment({"base": {"train": {"lr": -1}}}), tmp_path)
    with pytest.raises(ConfigError, match="--profile: unknown profile 'fast'; valid: paper, quick"):
        plan_experiment(load_experiment({}), tmp_path, profile="fast")


def test_cli_bad_config_is_one_line_exit_2(tmp_path, capsys):
    from robustlab.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_experiment(defenses=["standard", "nope"])))
    with pytest.raises(SystemExit) as info:
        main(["experiment", str(path), "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: grid.defenses[1]: unknown defense 'nope'") and "\n" not in err


# --- profiles and the paper configs ---------------------------------------------------------------
def test_paper_profile_is_the_papers_hyperparameters(tmp_path):
    spec = tiny_experiment()
    del spec["grid"]["eps"]  # the profile's eps applies
    plan = plan_experiment(load_experiment(spec), tmp_path, profile="paper")
    train = plan.cells[0].config.train
    assert (train.optimizer, train.lr, train.batch_size, train.epochs) == ("sgd", 0.01, 128, 50)
    assert (train.momentum, train.weight_decay) == (0.9, 5e-4)
    assert plan.cells[0].config.threat.eps == 0.03
    assert set(BUILTIN_PROFILES) == {"paper", "quick"}


@pytest.mark.parametrize(
    ("name", "dataset", "model", "standard_eps"),
    [("mnist", "mnist", "lenet5", 0.3), ("cifar10", "cifar10", "resnet18", 8 / 255),
     ("imagenet_subset", "imagenet-subset", "efficientnet_b0", 4 / 255)],
)
def test_paper_configs_cover_the_papers_matrix(tmp_path, name, dataset, model, standard_eps):
    spec = load_experiment(CONFIGS / f"{name}.yaml")
    for profile in ("paper", "quick"):
        plan = plan_experiment(spec, tmp_path, profile=profile)
        assert {c.config.data.dataset for c in plan.cells} == {dataset}
        assert {c.config.model.name for c in plan.cells} == {model}
        assert sorted({round(c.config.threat.eps, 6) for c in plan.cells}) == sorted([0.03, round(standard_eps, 6)])
        assert {"standard", "hybrid"} <= {c.config.defense.name for c in plan.cells}
    paper = plan_experiment(spec, tmp_path, profile="paper")
    assert {c.config.defense.name for c in paper.cells} <= set(DEFENSES)
    assert paper.cells[0].config.train.epochs == 50


def test_cifar10_cpu_profile_is_the_whole_matrix_at_a_narrower_resnet18(tmp_path):
    spec = load_experiment(CONFIGS / "cifar10.yaml")
    cpu = plan_experiment(spec, tmp_path, profile="cpu")
    mnist = plan_experiment(load_experiment(CONFIGS / "mnist.yaml"), tmp_path, profile="paper")
    assert {c.axes["defense"] for c in cpu.cells} == {c.axes["defense"] for c in mnist.cells}
    assert sorted({round(c.config.threat.eps, 6) for c in cpu.cells}) == [0.03, round(8 / 255, 6)]
    for cell in cpu.cells:
        data, model = cell.config.data, cell.config.model
        assert (data.train_subset, data.test_subset, data.val_size) == (None, None, 5000)
        assert (model.name, model.depth) == ("resnet18", None) and model.width < 64
    assert (cpu.evaluation.n, cpu.evaluation.subset, cpu.evaluation.suite) == (1000, "first", "standard")
    paper = plan_experiment(spec, tmp_path, profile="paper")
    assert {(c.config.model.name, c.config.model.width) for c in paper.cells} == {("resnet18", None)}


def test_imagenet_subset_cpu_profile_is_the_papers_rows_and_pgd_at_at_a_narrower_efficientnet(tmp_path):
    spec = load_experiment(CONFIGS / "imagenet_subset.yaml")
    cpu = plan_experiment(spec, tmp_path, profile="cpu")
    assert [c.axes["defense"] for c in cpu.cells[:2]] == ["standard", "standard"]  # the paper's rows first
    assert {c.axes["defense"] for c in cpu.cells} == {"standard", "hybrid", "pgd_at"}
    assert sorted({round(c.config.threat.eps, 6) for c in cpu.cells}) == [round(4 / 255, 6), 0.03]
    for cell in cpu.cells:
        data, model = cell.config.data, cell.config.model
        assert (data.train_subset, data.test_subset, data.val_size) == (None, None, 500)
        assert model.name == "efficientnet_b0" and model.width < 32 and cell.config.train.channels_last
    assert cpu.evaluation.suite == "standard" and cpu.evaluation.n is None  # all 500 test images
    paper = plan_experiment(spec, tmp_path, profile="paper")
    assert {(c.config.model.name, c.config.model.width) for c in paper.cells} == {("efficientnet_b0", None)}


@pytest.mark.parametrize(("name", "profiles"), [("cifar10", ("paper", "cpu")), ("imagenet_subset", ("paper",))])
def test_colour_image_grids_use_colour_preprocessing_not_mnists(tmp_path, name, profiles):
    """The preprocessing defaults are MNIST's (1-bit squeezing, a pooled reformer); a colour grid that fell
    back to them would measure transforms that destroy the image, not Xu et al.'s squeezer (5 bits, 2x2
    median) or MagNet's CIFAR-10 reformer (no pooling)."""
    spec = load_experiment(CONFIGS / f"{name}.yaml")
    for profile in profiles:
        cells = plan_experiment(spec, tmp_path, profile=profile).cells
        params = {c.config.defense.name: c.config.defense.params for c in cells}
        assert (params["feature_squeezing"]["bits"], params["feature_squeezing"]["median"]) == (5, 2), profile
        assert params["noise_injection"]["sigma"] < 0.2, profile
        assert params["autoencoder"]["pool"] == 1, profile


@pytest.mark.parametrize(("name", "profile", "n_cells"), [("mnist", "paper", 4), ("cifar10", "cpu", 6)])
def test_seed_config_trains_the_paper_grids_cells_with_other_seeds(tmp_path, name, profile, n_cells):
    """configs/paper/<name>_seeds.yaml must differ from the paper grid's cells by the seed alone, or its
    seeds would not pair with the grid's seed 0."""
    grid = plan_experiment(load_experiment(CONFIGS / f"{name}.yaml"), tmp_path, profile=profile)
    seeds = plan_experiment(load_experiment(CONFIGS / f"{name}_seeds.yaml"), tmp_path, profile=profile)
    assert seeds.evaluation == grid.evaluation
    by_id = {c.id: c.config.model_dump() for c in grid.cells}
    assert sorted(c.config.seed for c in seeds.cells) == sorted([1, 2] * (n_cells // 2))
    for cell in seeds.cells:
        twin = by_id[cell.id.rsplit("-s", 1)[0] + "-s0"]
        assert {**cell.config.model_dump(), "seed": 0} == twin, cell.id


# --- where rules: settings for some cells only -----------------------------------------------------
WARMUP_AT_LARGE_EPS = {"match": {"eps": 0.1, "defense": ["fast_at"]}, "set": {"defense": {"eps_warmup": 1}}}


def test_where_rule_sets_only_the_cells_it_matches(tmp_path):
    spec = tiny_experiment(defenses=["standard", "fast_at"], eps=[0.05, "1/10"])
    spec["where"] = [WARMUP_AT_LARGE_EPS]
    plan = plan_experiment(load_experiment(spec), tmp_path)
    warmups = {c.id: c.config.defense.params.get("eps_warmup") for c in plan.cells}
    assert warmups == {
        "digits-lenet5-standard-eps0.05-s0": None, "digits-lenet5-standard-eps0.1-s0": None,
        "digits-lenet5-fast_at-eps0.05-s0": None, "digits-lenet5-fast_at-eps0.1-s0": 1,
    }
    assert plan.rules == [{"source": "where[0]", **WARMUP_AT_LARGE_EPS, "cells": ["digits-lenet5-fast_at-eps0.1-s0"]}]


def test_profile_where_rules_apply_only_under_that_profile(tmp_path):
    spec = tiny_experiment(defenses=["fast_at"], eps=[0.1])
    spec["profiles"] = {"large": {"where": [WARMUP_AT_LARGE_EPS]}}
    plain = plan_experiment(load_experiment(spec), tmp_path)
    profiled = plan_experiment(load_experiment(spec), tmp_path, profile="large")
    assert plain.rules == [] and "eps_warmup" not in plain.cells[0].config.defense.params
    assert profiled.rules[0]["source"] == "profiles.large.where[0]"
    assert profiled.cells[0].config.defense.params["eps_warmup"] == 1


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"match": {"epsilon": 0.1}, "set": {}}, r"where\[0\]\.match\.epsilon: not a grid axis; valid: dataset,"),
        ({"match": {"eps": "a/b"}, "set": {}}, r"where\[0\]\.match\.eps: expected a number"),
        ({"match": {"eps": 0.3}, "set": {"train": {"lr": 0.1}}}, r"where\[0\]: matches no cell of the grid"),
        ({"match": {"seed": 0}, "set": {"threat": {"eps": 0.2}}}, r"where\[0\]\.set\.threat\.eps: set by the grid"),
        ({"match": {"defense": "standard"}, "set": {"defense": {"eps_warmup": 1}}},
         r"cell digits-lenet5-standard-eps0\.1-s0 \(with where\[0\]\): .*eps_warmup"),
        ({"match": {"seed": 0}}, r"where\.0\.set"),
    ],
)
def test_bad_where_rule_fails_before_training_naming_the_rule(tmp_path, rule, message):
    spec = tiny_experiment(defenses=["standard"], eps=[0.1])
    spec["where"] = [rule]
    with pytest.raises(ConfigError, match=message) as info:
        run(spec, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out" / "runs").exists()


def test_where_rules_are_recorded_and_reported(tmp_path):
    from robustlab.report import write_report

    spec = tiny_experiment()
    spec["where"] = [{"match": {"seed": 0}, "set": {"train": {"val_attack_steps": 3}}}]
    out = tmp_path / "out"
    run(spec, out)
    recorded = json.loads((out / "experiment.json").read_text())["where"]
    assert recorded == [{"source": "where[0]", **spec["where"][0], "cells": ["digits-lenet5-standard-eps0.1-s0"]}]
    write_report(out)
    assert ("Settings for some cells only (where[0]): train.val_attack_steps=3 where seed=0 "
            "(1 cell(s): digits-lenet5-standard-eps0.1-s0).") in (out / "report.md").read_text()


# --- --only: part of a grid ------------------------------------------------------------------------
def test_only_runs_the_selected_cells_and_a_later_run_finishes_the_rest(tmp_path):
    spec = tiny_experiment(defenses=["standard", "fast_at"], eps=[0.05, 0.1])
    out = tmp_path / "out"
    first = run(spec, out, only=["defense=fast_at", "eps=0.1"])
    assert first.ran == ["digits-lenet5-fast_at-eps0.1-s0"] and not first.failed
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["digits-lenet5-fast_at-eps0.1-s0"]
    assert len(first.rows) == 4, "the results table lists the whole grid, unselected cells as pending"
    rest = run(spec, out)
    assert rest.skipped == ["digits-lenet5-fast_at-eps0.1-s0"] and len(rest.ran) == 3


@pytest.mark.parametrize(
    ("only", "message"),
    [
        (["epsilon=0.1"], r"--only\.match\.epsilon: not a grid axis"),
        (["defense"], r"--only 'defense': expected AXIS=VALUE"),
        (["defense=hybrid"], r"--only defense=hybrid: matches no cell of the grid"),
    ],
)
def test_bad_only_filter_fails_before_training(tmp_path, only, message):
    with pytest.raises(ConfigError, match=message):
        run(tiny_experiment(), tmp_path / "out", only=only)
    assert not (tmp_path / "out" / "runs").exists()


# --- running, resuming, locking -------------------------------------------------------------------
def test_grid_runs_every_cell_and_second_run_skips_them(tmp_path):
    spec = tiny_experiment(defenses=["standard", {"name": "standard", "label": "standard_b"}], eps=[0.05, 0.1])
    out = tmp_path / "out"
    first = run(spec, out)
    assert len(first.ran) == 4 and not first.failed
    ids = {r["cell"] for r in first.rows}
    assert ids == {f"digits-lenet5-{d}-eps{e}-s0" for d in ("standard", "standard_b") for e in ("0.05", "0.1")}
    table = read_csv(out / "results.csv")
    assert len(table) == 4 and all(r["status"] == "finished" for r in table)
    # every robust column names its attack, and robust accuracy never exceeds clean accuracy
    for row in table:
        assert {"acc:fgsm", "acc:pgd-3", "clean", "worst_case"} <= set(row)
        assert row["worst_case"] <= min(row["acc:fgsm"], row["acc:pgd-3"]) <= row["clean"]
    weights = out / "runs" / "digits-lenet5-standard-eps0.1-s0" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    second = run(spec, out)
    assert second.ran == [] and sorted(second.skipped) == sorted(ids)
    assert weights.stat().st_mtime_ns == stamp, "a finished cell was retrained"
    summary = json.loads((out / "results.json").read_text())
    assert summary["rows"][0]["evaluation"]["attacks"]["pgd-3"]["attack"]["name"] == "pgd"


def test_interrupted_cell_resumes_from_last_epoch(tmp_path, monkeypatch):
    from robustlab import training

    spec = tiny_experiment()
    spec["base"]["train"]["epochs"] = 2
    original = training.Trainer._save_checkpoint
    calls = []

    def interrupt_after_first_epoch(self, epoch):
        original(self, epoch)
        calls.append(epoch)
        if epoch == 0 and len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.Trainer, "_save_checkpoint", interrupt_after_first_epoch)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(spec, out)
    cell = out / "runs" / "digits-lenet5-standard-eps0.1-s0"
    assert not RunDir(cell).is_finished() and len(read_csv(cell / "history.csv")) == 1
    row = cell_row(plan_experiment(load_experiment(spec), out).cells[0])
    assert (row["status"], row["epochs_done"], row["epochs"]) == ("running", 1, 2)
    stale = {k: v for k, v in row.items() if k not in ("epochs_done", "epochs")}  # written before it started
    (out / "results.json").write_text(json.dumps({"rows": [{**stale, "status": "pending"}]}))
    fresh = load_results(out).rows[0]
    assert (fresh["status"], fresh["epochs_done"], fresh["epochs"]) == ("running", 1, 2), "read from the run"
    lines: list[str] = []
    result = run_experiment(load_experiment(spec), out, log=lines.append, isolate=False)
    assert any("(resuming)" in line for line in lines)
    assert calls == [0, 1], "the resumed run repeated epoch 1 instead of continuing at epoch 2"
    assert result.ran == ["digits-lenet5-standard-eps0.1-s0"] and RunDir(cell).is_finished()
    assert [int(r["epoch"]) for r in read_csv(cell / "history.csv")] == [1, 2]


def test_failed_cell_is_recorded_others_run_and_rerun_fixes_it(tmp_path, monkeypatch):
    from robustlab import training
    from robustlab.errors import RobustlabError

    real_train = training.train

    def flaky(config, run_dir, **kwargs):
        if config.threat.eps == 0.05:
            raise RobustlabError("training diverged at epoch 1 (loss is nan); lower train.lr")
        return real_train(config, run_dir, **kwargs)

    monkeypatch.setattr(training, "train", flaky)
    out = tmp_path / "out"
    spec = tiny_experiment(eps=[0.05, 0.1])
    first = run(spec, out)
    bad, good = "digits-lenet5-standard-eps0.05-s0", "digits-lenet5-standard-eps0.1-s0"
    assert first.ran == [good] and first.failed == {bad: "training diverged at epoch 1 (loss is nan); lower train.lr"}
    assert {r["cell"]: r["status"] for r in read_csv(out / "results.csv")} == {bad: "failed", good: "finished"}
    monkeypatch.setattr(training, "train", real_train)
    second = run(spec, out)
    assert second.ran == [bad] and second.skipped == [good] and not second.failed
    assert {r["status"] for r in second.rows} == {"finished"}


def test_a_finished_cell_whose_config_cannot_be_read_is_named_as_such(tmp_path):
    spec, out = tiny_experiment(), tmp_path / "out"
    run(spec, out)
    cell = plan_experiment(load_experiment(spec), out).cells[0]
    (cell.run_dir / "config.yaml").write_text("train: [unclosed\n")
    with pytest.raises(RobustlabError, match="config.yaml cannot be read"):
        run(spec, out)


def test_a_refused_config_leaves_the_finished_cell_and_the_results_table_untouched(tmp_path):
    """Running a grid with a changed config is refused before anything runs or is written: the finished
    cells and the results table (which once turned them all into "failed" rows) stay as they are."""
    spec, out = tiny_experiment(), tmp_path / "out"
    run(spec, out)
    cell = plan_experiment(load_experiment(spec), out).cells[0]
    state, table = cell.state_path.read_bytes(), (out / "results.csv").read_bytes()
    changed = json.loads(json.dumps(spec))
    changed["base"]["train"]["epochs"] = 2
    with pytest.raises(RobustlabError, match="1 cell.* hold finished runs trained with another config"):
        run(changed, out)
    assert (out / "results.csv").read_bytes() == table
    assert cell.state_path.read_bytes() == state, "the refusal was written into the finished cell"
    again = run(spec, out)
    assert again.skipped == [cell.id] and [r["status"] for r in load_results(out).rows] == ["finished"]


def test_a_cell_failure_recorded_earlier_is_cleared_once_the_cell_is_fine(tmp_path):
    spec, out = tiny_experiment(), tmp_path / "out"
    run(spec, out)
    cell = plan_experiment(load_experiment(spec), out).cells[0]
    cell.state_path.write_text(json.dumps({**json.loads(cell.state_path.read_text()), "error": "an old failure"}))
    assert run(spec, out).skipped == [cell.id]
    assert [r["status"] for r in load_results(out).rows] == ["finished"], "the old error still marks it failed"


def test_locked_cell_is_left_to_its_owner(tmp_path):
    spec = tiny_experiment(seeds=[0, 1])
    out = tmp_path / "out"
    (out / "locks").mkdir(parents=True)
    with FileLock(str(out / "locks" / "digits-lenet5-standard-eps0.1-s0.lock")):
        result = run(spec, out, wait_for_locked=False)
    assert result.ran == ["digits-lenet5-standard-eps0.1-s1"]
    assert not (out / "runs" / "digits-lenet5-standard-eps0.1-s0").exists()
    statuses = {r["cell"]: r["status"] for r in result.rows}
    assert statuses["digits-lenet5-standard-eps0.1-s0"] == "pending"


def test_training_uses_eps_only_where_the_objective_or_validation_reads_it():
    from robustlab.config import build_config
    from robustlab.training import training_uses_eps

    def uses(defense: str, **train) -> bool:
        return training_uses_eps(build_config({"defense": {"name": defense}, "train": train}))

    assert not uses("standard") and not uses("feature_squeezing") and not uses("autoencoder")
    assert uses("pgd_at") and uses("trades") and uses("lipschitz") and uses("hybrid")
    assert uses("standard", select="val_robust"), "validation PGD at eps picks the checkpoint"


def test_cells_whose_training_ignores_eps_train_once(tmp_path, monkeypatch):
    from robustlab import training

    trained = []
    real_train = training.train

    def counting_train(config, run_dir, **kwargs):
        trained.append(Path(run_dir).name)
        return real_train(config, run_dir, **kwargs)

    monkeypatch.setattr(training, "train", counting_train)
    out = tmp_path / "out"
    lines: list[str] = []
    spec = tiny_experiment(defenses=["standard", "fast_at"], eps=[0.05, 0.1])
    result = run_experiment(load_experiment(spec), out, log=lines.append, isolate=False)
    first, second = (out / "runs" / f"digits-lenet5-standard-eps{e}-s0" for e in ("0.05", "0.1"))
    fast = [f"digits-lenet5-fast_at-eps{e}-s0" for e in ("0.05", "0.1")]
    assert sorted(trained) == sorted([first.name, *fast]), "standard trained twice, or fast_at (uses eps) once"
    assert len(result.ran) == 4 and not result.failed
    assert f"[{second.name}] sharing the training of {first.name} (it does not depend on eps)" in lines
    assert (second / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    assert (second / "history.csv").read_text() == (first / "history.csv").read_text()
    assert yaml.safe_load((second / "config.yaml").read_text())["threat"]["eps"] == 0.1
    assert json.loads((second / "metadata.json").read_text())["training_shared_with"] == first.name
    metrics = json.loads((second / "metrics.json").read_text())
    assert list(metrics["evaluations"]) == ["linf-0.1"], "the twin's evaluation was copied"
    assert metrics["cost"] == json.loads((first / "metrics.json").read_text())["cost"]
    assert not list((out / "runs").glob(".*")), "the scratch directory was left behind"
    assert second.stat().st_mode & 0o777 == first.stat().st_mode & 0o777, "the shared cell is private (0700)"
    rows = {r["cell"]: r for r in read_csv(out / "results.csv")}
    assert rows[second.name]["training_shared_with"] == first.name and not rows[first.name]["training_shared_with"]
    from robustlab.report import write_report

    report = write_report(out)["markdown"].read_text()
    assert f"measured (robustlab); training shared with {first.name}" in report
    again = run(spec, out)
    assert again.ran == [] and len(again.skipped) == 4


def test_a_trained_cell_awaiting_its_evaluation_reads_evaluating_not_measured(tmp_path, monkeypatch):
    import robustlab.evaluation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(robustlab.evaluation, "evaluate_run", interrupted)
    spec, out = tiny_experiment(), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(spec, out)
    cell = plan_experiment(load_experiment(spec), out).cells[0]
    assert RunDir(cell.run_dir).is_finished() and cell_row(cell)["status"] == "evaluating"
    (out / "results.json").write_text(json.dumps({"rows": [{**cell_row(cell), "status": "running"}]}))
    assert load_results(out).rows[0]["status"] == "evaluating", "a stale 'running' row was not refreshed"
    from robustlab.report.build import table1
    from robustlab.report.data import seed_stats

    assert table1({"standard": seed_stats(load_results(out).rows)}, []).rows[0][1] == "not measured (cell evaluating)"


def test_a_grid_can_be_reported_before_its_first_cell_is_done(tmp_path, monkeypatch):
    from robustlab import training
    from robustlab.report import write_report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    spec, out = tiny_experiment(defenses=["standard", "fast_at"]), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(spec, out)
    assert [r["status"] for r in load_results(out).rows] == ["pending", "pending"]
    assert "not measured (cell pending)" in write_report(out)["markdown"].read_text()


def test_results_kept_without_weights_are_skipped_and_a_weightless_twin_is_not_shared(tmp_path):
    """A results directory committed without its weights (benchmarks/paper-*) still skips finished cells."""
    spec = tiny_experiment(eps=[0.05, 0.1])
    out = tmp_path / "out"
    run(spec, out, only=["eps=0.05"])
    first = out / "runs" / "digits-lenet5-standard-eps0.05-s0"
    for name in ("model.safetensors", "last.safetensors", "resume.pt"):
        (first / name).unlink(missing_ok=True)
    lines: list[str] = []
    result = run_experiment(load_experiment(spec), out, log=lines.append, isolate=False)
    assert result.skipped == [first.name] and result.ran == ["digits-lenet5-standard-eps0.1-s0"]
    assert "[digits-lenet5-standard-eps0.1-s0] training" in lines, "shared a twin that has no weights"
    assert not result.failed


def test_a_cell_sharing_a_finished_twin_carries_its_weights_in_resume_pt_until_it_is_done(tmp_path, monkeypatch):
    """A results directory committed mid-evaluation (without .safetensors) must let a fresh clone continue."""
    spec = tiny_experiment(eps=[0.05, 0.1])
    out = tmp_path / "out"
    run(spec, out, only=["eps=0.05"])
    first, second = (out / "runs" / f"digits-lenet5-standard-eps{e}-s0" for e in ("0.05", "0.1"))
    assert not (first / "resume.pt").exists(), "a done cell keeps its resume state"
    selected = (first / "model.safetensors").read_bytes()
    import robustlab.evaluation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(robustlab.evaluation, "evaluate_run", interrupted)
        run(spec, out)
    assert (second / "resume.pt").exists(), "the shared cell has no resume.pt while its evaluation is pending"
    for name in ("model.safetensors", "last.safetensors"):  # what a fresh clone of the committed results lacks
        (second / name).unlink()
    lines: list[str] = []
    result = run_experiment(load_experiment(spec), out, log=lines.append, isolate=False)
    assert result.ran == [second.name] and not result.failed
    assert f"[{second.name}] model.safetensors restored from resume.pt (trained on another machine)" in lines
    assert (second / "model.safetensors").read_bytes() == selected
    assert not (second / "resume.pt").exists(), "the done cell kept its resume state"


def test_a_trained_cell_whose_weights_are_gone_says_how_to_continue(tmp_path):
    spec = tiny_experiment()
    out = tmp_path / "out"
    run(spec, out)
    cell = plan_experiment(load_experiment(spec), out).cells[0]
    (cell.run_dir / "model.safetensors").unlink()
    state = json.loads(cell.state_path.read_text())
    cell.state_path.write_text(json.dumps({k: v for k, v in state.items() if k != "evaluation"}))
    result = run(spec, out)
    message = result.failed[cell.id]
    assert "its weights are gone" in message and f"delete {cell.run_dir}" in message


def test_cell_waits_for_a_twin_that_another_process_is_training(tmp_path):
    spec = tiny_experiment(eps=[0.05, 0.1])
    out = tmp_path / "out"
    (out / "locks").mkdir(parents=True)
    with FileLock(str(out / "locks" / "digits-lenet5-standard-eps0.05-s0.lock")):
        lines: list[str] = []
        result = run_experiment(load_experiment(spec), out, log=lines.append, isolate=False, wait_for_locked=False)
    assert result.ran == [] and not (out / "runs").exists()
    assert any("waits for digits-lenet5-standard-eps0.05-s0, whose training it shares" in line for line in lines)
    finished = run(spec, out)  # the lock is free again: the twin trains, then the cell shares it
    assert finished.ran == ["digits-lenet5-standard-eps0.05-s0", "digits-lenet5-standard-eps0.1-s0"]


@pytest.mark.slow  # each child process re-imports torch: ~10 s idle, minutes on a loaded machine
def test_isolated_training_runs_in_a_child_process(tmp_path):
    out = tmp_path / "out"
    result = run(tiny_experiment(), out, isolate=True)
    assert len(result.ran) == 1 and not result.failed
    metadata = json.loads((out / "runs" / result.ran[0] / "metadata.json").read_text())
    assert metadata["status"] == "finished"
    # a user error raised inside the child comes back as that cell's one-line failure
    blocker = out / "runs" / "digits-lenet5-standard-eps0.05-s0"
    blocker.mkdir(parents=True)
    (blocker / "notes.txt").write_text("not a run")
    second = run(tiny_experiment(eps=[0.05, 0.1]), out, isolate=True)
    assert second.failed == {blocker.name: f"{blocker} exists and is not a robustlab run; choose another --out"}
    assert second.skipped == [result.ran[0]]
    assert {r["cell"]: r["status"] for r in second.rows}[blocker.name] == "failed"


def test_worker_environments_split_threads_and_pin_one_gpu_per_worker(monkeypatch):
    from robustlab.experiments import worker_environments

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_environments(2, gpus=0, cpus=8) == [{"OMP_NUM_THREADS": "4"}] * 2
    assert [e["CUDA_VISIBLE_DEVICES"] for e in worker_environments(3, gpus=2, cpus=2)] == ["0", "1", "0"]
    assert worker_environments(3, gpus=2, cpus=2)[0]["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in worker_environments(2, gpus=2, cpus=4)] == ["4", "6"]


# --- hostile experiment files and results directories ---------------------------------------------
def test_an_explicitly_empty_axis_is_refused():
    """``grid.defenses: []`` quietly ran ``standard`` (base's defence)."""
    with pytest.raises(ConfigError, match=re.escape("grid.defenses: empty list")):
        load_experiment(tiny_experiment(defenses=[]))


@pytest.mark.parametrize("name", ["../../escaped_exp", "ABSOLUTE"], ids=["dotdot", "absolute"])
def test_experiment_name_cannot_write_outside_results(tmp_path, capsys, monkeypatch, name):
    """The name was joined unclean: ``../../escaped_exp`` wrote the whole tree two levels above ``results/``,
    an absolute name wrote to that path. Now it is cleaned into one path component, like cell ids."""
    from tests.reliability_support import main_in_process

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    name = str(tmp_path / "abs_escape") if name == "ABSOLUTE" else name
    path = work / "exp.yaml"
    path.write_text(yaml.safe_dump({**tiny_experiment(), "name": name}))
    code, _, err = main_in_process(["experiment", str(path), "--no-report", "--no-isolate"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    (results,) = (work / "results").iterdir()
    assert (results / "results.csv").exists()


def test_damaged_cell_state_stops_the_grid_before_any_work(tmp_path, capsys):
    """A cell's ``experiment.json`` holding ``[]`` was an AttributeError traceback."""
    from tests.reliability_support import assert_one_error_line, main_in_process

    out = tmp_path / "out"
    run(tiny_experiment(), out)
    (state,) = (out / "runs").glob("*/experiment.json")
    state.write_text("[]")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_experiment()))
    code, _, err = main_in_process(["experiment", str(path), "--out", str(out), "--no-report"], capsys)
    assert_one_error_line(code, err, str(state), "(top level)")
    assert state.read_text() == "[]"


def test_grid_evaluation_defaults_to_autoattack_grade_and_the_quick_profiles_say_quick():
    import inspect

    from robustlab.evaluation import DEFAULT_SUITE, evaluate_run
    from robustlab.experiments import EvaluationSettings, _evaluation_kwargs

    assert "suite" not in _evaluation_kwargs(EvaluationSettings(), "cpu"), "unset: evaluate_run's default"
    assert inspect.signature(evaluate_run).parameters["suite"].default == DEFAULT_SUITE == "standard"
    assert BUILTIN_PROFILES["quick"].evaluation["suite"] == "quick"
    for path in sorted(Path(__file__).parents[1].glob("configs/paper/*.yaml")):
        spec = yaml.safe_load(path.read_text())
        quick = (spec.get("profiles") or {}).get("quick") or {}
        if "evaluation" in quick:
            assert quick["evaluation"].get("suite") == "quick", path
