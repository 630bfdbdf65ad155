"""evaluate_model / evaluate_run on a tiny digits model: worst case, gaps, intervals, files, adaptivity."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch

from robustlab.errors import RobustlabError
from robustlab.evaluation import (
    confidence_summary,
    evaluate_model,
    evaluate_run,
    read_evaluation,
    read_samples,
    resolve_attacks,
    subset,
    threat_key,
)
from robustlab.metrics import predict
from robustlab.rundir import read_json

FAST = ("fgsm", "pgd-10", {"name": "cw_linf", "steps": 10})


@pytest.fixture(scope="module")
def result(trained_digits):
    test = trained_digits.data.test
    return evaluate_model(trained_digits.model, test, eps=0.1, attacks=FAST, n=120, suite="quick", n_boot=200)


@pytest.fixture
def run_copy(trained_digits, tmp_path):
    """A private copy of the shared trained run, so writing metrics.json never disturbs other tests."""
    return shutil.copytree(trained_digits.run_dir, tmp_path / "run")


def test_worst_case_is_per_sample_and_below_every_attack(result):
    assert list(result.attacks) == ["fgsm", "pgd-10", "cw_linf(steps=10)"]
    for m in result.attacks.values():
        # robust in the worst case => robust to each attack
        assert not np.any(result.worst_case.correct & ~m.correct)
        assert result.worst_case.accuracy <= m.accuracy
    stacked = np.stack([m.correct for m in [result.clean, *result.attacks.values()]])
    assert np.array_equal(result.worst_case.correct, stacked.all(axis=0))
    assert result.robust_accuracy == result.worst_case.accuracy
    # an eps of 0.1 breaks a standard model on many digits, but not all of them
    assert 0 < result.worst_case.accuracy < result.clean.accuracy


def test_a_sample_misclassified_clean_is_not_robust_whatever_the_attacks_output():
    """FGSM's step can carry a misclassified image to the right side; it still must not count as robust."""
    from robustlab.evaluation.measure import _worst_case
    from robustlab.evaluation.result import Measurement

    def measurement(label, correct):
        correct = np.array([correct], dtype=bool)
        return Measurement(label, None, correct, np.full(correct.shape, 0.9, dtype=np.float32))

    clean = measurement("clean", [True, False, True])
    attacks = {"fgsm": (measurement("fgsm", [True, True, False]), np.array([0.9, 0.8, 0.2]))}
    worst, _ = _worst_case(clean, attacks, n_boot=10, seed=0)
    assert worst.correct.tolist() == [[True, False, False]]


def test_a_sample_counted_wrong_keeps_a_wrong_prediction_for_its_confidence():
    """Clean-misclassified, every attack's output right: the worst case keeps the clean image (index -1)."""
    from robustlab.evaluation.measure import _worst_case
    from robustlab.evaluation.result import Measurement

    clean = Measurement("clean", None, np.array([[True, False]]), np.array([[0.9, 0.4]], dtype=np.float32))
    fgsm = Measurement("fgsm", None, np.array([[False, True]]), np.array([[0.7, 0.95]], dtype=np.float32))
    worst, choice = _worst_case(clean, {"fgsm": (fgsm, np.array([[0.1, 0.95]]))}, n_boot=10, seed=0)
    assert choice.tolist() == [[0, -1]]
    assert worst.confidence[0].tolist() == pytest.approx([0.7, 0.4])
    assert worst.summary()["confidence"]["mean_wrong"] == pytest.approx(0.55)


def test_clean_accuracy_matches_plain_prediction(result, trained_digits):
    test, indices = subset(trained_digits.data.test, 120)
    expected = float((predict(trained_digits.model, test) == test.labels).float().mean())
    assert result.clean.accuracy == pytest.approx(expected)
    assert result.samples["n"] == 120 and result.samples["digest"] == test.digest()
    assert np.array_equal(result.indices, indices.numpy())


def test_subset_is_a_fixed_random_sample_not_a_prefix(trained_digits):
    split = trained_digits.data.test
    part, indices = subset(split, 50)
    again, same = subset(split, 50)
    assert torch.equal(indices, same) and torch.equal(part.labels, split.labels[indices])
    assert not torch.equal(indices, torch.arange(50)) and len(set(indices.tolist())) == 50
    whole, all_indices = subset(split, None)
    assert whole is split and len(all_indices) == len(split)


def test_gap_arithmetic_and_intervals(result):
    cw = result.attacks["cw_linf(steps=10)"]
    assert result.gap == pytest.approx(result.clean.accuracy - result.worst_case.accuracy)
    assert result.paper_gap == pytest.approx(result.clean.accuracy - cw.accuracy)
    assert result.paper_gap <= result.gap
    d = result.to_dict()
    assert d["gap"]["clean_minus_worst_case"] == pytest.approx(result.gap)
    assert d["gap"]["cw_attack"] == "cw_linf(steps=10)"
    for m in (result.clean, *result.attacks.values(), result.worst_case):
        low, high = m.ci95
        assert 0 <= low <= m.accuracy <= high <= 1 and high - low > 0


def test_every_robust_number_names_its_attack(result):
    d = result.to_dict()
    pgd = d["attacks"]["pgd-10"]["attack"]
    assert pgd["name"] == "pgd" and pgd["params"]["steps"] == 10 and pgd["params"]["random_start"] is True
    assert pgd["params"]["early_stop"] is True, "a deterministic model stops early on fooled samples"
    assert pgd["eps"] == 0.1 and pgd["norm"] == "linf" and pgd["adaptive"].startswith("none")
    assert d["attacks"]["cw_linf(steps=10)"]["attack"]["params"]["steps"] == 10
    assert d["worst_case"]["attack"] == {"name": "worst_case", "over": list(result.attacks)}
    assert d["clean"]["attack"] is None


def test_confidence_statistics(result):
    d = result.to_dict()
    for entry in (d["clean"], d["worst_case"], *d["attacks"].values()):
        conf = entry["confidence"]
        assert sum(conf["histogram"]["correct"]) == conf["n_correct"]
        assert sum(conf["histogram"]["wrong"]) == conf["n_wrong"]
        assert conf["n_correct"] + conf["n_wrong"] == 120
        assert 0.0 <= entry["ece"] <= 1.0
    # the worst-case adversarial of a sample is a misclassified one whenever any attack succeeded
    wrong = ~result.worst_case.correct
    assert d["worst_case"]["confidence"]["n_wrong"] == int(wrong.sum())
    summary = confidence_summary(np.array([[0.2, 0.97, 1.0]]), np.array([[False, True, True]]))
    assert summary["mean_correct"] == pytest.approx(0.985) and summary["histogram"]["correct"][-1] == 2


def test_attacks_are_seeded_and_leave_the_model_in_its_mode(trained_digits):
    model = trained_digits.model.train()
    try:
        runs = [evaluate_model(model, trained_digits.data.test, eps=0.1, attacks=("pgd-3",), n=40, suite="quick",
                               n_boot=10, seed=1) for _ in range(2)]
        assert model.training
    finally:
        model.eval()
    assert np.array_equal(runs[0].attacks["pgd-3"].correct, runs[1].attacks["pgd-3"].correct)


def test_unknown_attack_or_suite_fails_before_any_work():
    with pytest.raises(RobustlabError, match="unknown attack 'nope'"):
        resolve_attacks(["fgsm", "nope"], None)
    with pytest.raises(RobustlabError, match="suite"):
        resolve_attacks(["fgsm"], "bogus")
    with pytest.raises(RobustlabError, match="twice"):
        resolve_attacks(["fgsm", "FGSM"], None)
    with pytest.raises(RobustlabError, match="at least one"):
        resolve_attacks("", None)


def test_standard_suite_needs_autoattack():
    from robustlab.attacks import ATTACKS

    if "autoattack" in ATTACKS:
        assert [label for label, _ in resolve_attacks(["fgsm"], "standard")] == ["fgsm", "autoattack"]
        labels = [label for label, _ in resolve_attacks("fgsm, pgd-5", "rand")]
        assert labels == ["fgsm", "pgd-5", "autoattack-rand"]
    else:
        with pytest.raises(RobustlabError, match="autoattack"):
            resolve_attacks(["fgsm"], "standard")


class _Noise(torch.nn.Module):
    differentiable, random = True, True

    def forward(self, x):
        return (x + 0.05 * torch.randn_like(x)).clamp(0, 1)


def test_preprocessing_defence_goes_through_the_adaptive_wrapper(trained_digits, monkeypatch):
    from robustlab.defenses.preprocessing import Defended

    calls = {}

    def adaptive_model(model, eot_samples):
        calls["eot"] = eot_samples
        return model, f"EOT({eot_samples})"

    monkeypatch.setattr("robustlab.evaluation.adaptive_model", adaptive_model)
    defended = Defended(trained_digits.model, _Noise())
    res = evaluate_model(defended, trained_digits.data.test, eps=0.1, attacks=("fgsm",), n=30, suite="quick", n_boot=10,
                         eot_samples=3, random_passes=4)
    assert calls == {"eot": 3}
    assert res.model_info["adaptive"] == "EOT(3)" and res.model_info["random_passes"] == 4
    assert res.attacks["fgsm"].attack["adaptive"] == "EOT(3)"
    assert res.clean.correct.shape == (4, 30)
    assert len(res.to_dict()["clean"]["accuracy_per_draw"]) == 4


def test_a_random_defence_gets_the_rand_version_of_autoattack(trained_digits):
    from robustlab.attacks import ATTACKS
    from robustlab.defenses.preprocessing import Defended, GaussianNoise

    if "autoattack" not in ATTACKS:
        pytest.skip("autoattack is not registered")
    test = trained_digits.data.test
    res = evaluate_model(Defended(trained_digits.model, GaussianNoise(sigma=0.1)), test, eps=0.1,
                         attacks=("fgsm",), suite="standard", n=8, n_boot=10, eot_samples=2, random_passes=2)
    assert list(res.attacks) == ["fgsm", "autoattack-rand"]
    assert res.attacks["autoattack-rand"].attack["params"]["version"] == "rand"
    assert res.model_info["suite"].startswith("rand")
    plain = evaluate_model(trained_digits.model, test, eps=0.1, attacks=("fgsm",), suite="standard", n=8,
                           n_boot=10)
    assert list(plain.attacks) == ["fgsm", "autoattack"] and "suite" not in plain.model_info


def test_evaluate_run_merges_metrics_and_saves_per_sample_arrays(run_copy):
    before = read_json(run_copy / "metrics.json")
    first = evaluate_run(run_copy, attacks=("fgsm",), n=50, suite="quick", n_boot=50)
    second = evaluate_run(run_copy, attacks=("fgsm", "pgd-5"), eps=0.05, n=50, suite="quick", n_boot=50)
    metrics = read_json(run_copy / "metrics.json")
    for key in before:  # training's keys survive
        assert metrics[key] == before[key]
    assert set(metrics["evaluations"]) == {threat_key("linf", 0.1), threat_key("linf", 0.05)}
    entry = read_evaluation(run_copy)  # the run's own threat, eps 0.1
    assert entry["attacks"]["fgsm"]["accuracy"] == pytest.approx(first.attacks["fgsm"].accuracy)
    assert entry["cost"] == before["cost"] and len(entry["model"]["weights_sha256"]) == 16
    arrays = read_samples(run_copy, eps=0.05, norm="linf")
    assert np.array_equal(arrays["correct:worst_case"], second.worst_case.correct)
    assert list(arrays["attack_labels"]) == ["fgsm", "pgd-5"]
    assert arrays["labels"].shape == (50,)
    with pytest.raises(RobustlabError, match="no evaluation at linf-0.2"):
        read_evaluation(run_copy, eps=0.2, norm="linf")


class _Hidden(torch.nn.Module):
    """Hides a defence's differentiable/random flags: what a naive (non-adaptive) evaluation would see."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, x):
        return self.inner(x)


def test_bpda_breaks_what_a_naive_attack_reports_as_robust(trained_digits):
    from robustlab.defenses.preprocessing import Defended, FeatureSqueezing

    defended = Defended(trained_digits.model, FeatureSqueezing(bits=3, median=1))
    test = trained_digits.data.test
    adaptive = evaluate_model(defended, test, eps=0.1, attacks=("pgd-10",), n=100, suite="quick", n_boot=10)
    naive = evaluate_model(_Hidden(defended), test, eps=0.1, attacks=("pgd-10",), n=100, suite="quick", n_boot=10)
    assert adaptive.model_info["adaptive"] == "BPDA" and naive.model_info["adaptive"].startswith("none")
    assert adaptive.clean.accuracy == naive.clean.accuracy
    # rounding has zero gradient: the naive number is the false robustness BPDA exposes
    assert adaptive.robust_accuracy < naive.robust_accuracy - 0.1


def test_random_defence_uses_eot_and_reports_per_draw(trained_digits):
    from robustlab.defenses.preprocessing import Defended, GaussianNoise

    defended = Defended(trained_digits.model, GaussianNoise(sigma=0.1))
    res = evaluate_model(defended, trained_digits.data.test, eps=0.1, attacks=("pgd-5",), n=40, suite="quick",
                         n_boot=10, eot_samples=4, random_passes=3)
    assert res.model_info["adaptive"] == "EOT(4)" and res.model_info["random"] is True
    assert res.attacks["pgd-5"].attack["params"]["early_stop"] is False, "stopped on a fooled EOT average"
    per_draw = res.to_dict()["worst_case"]["accuracy_per_draw"]
    assert len(per_draw) == 3 and np.mean(per_draw) == pytest.approx(res.robust_accuracy)


def test_merging_ranks_keeps_batch_order_and_tolerates_a_rank_without_batches():
    from robustlab.evaluation import _merge_ranks

    aa = [{"aa": {"masks": {"clean": {0: 1, 2: 3}}, "seconds": {"x": 2.0}}},
          {"aa": {"masks": {"clean": {1: 2}}, "seconds": {"x": 5.0}}},
          {"aa": {"masks": {"clean": {}}, "seconds": {}}}]
    parts = [({"clean": {0: "a", 2: "c"}}, {"clean": 1.0}, aa[0]), ({"clean": {1: "b"}}, {"clean": 3.0}, aa[1]),
             ({}, {"clean": 0.5}, aa[2])]
    columns, seconds, staged = _merge_ranks(parts)
    assert [columns["clean"][b] for b in sorted(columns["clean"])] == ["a", "b", "c"] and seconds == {"clean": 3.0}
    assert staged == {"aa": {"masks": {"clean": {0: 1, 1: 2, 2: 3}}, "seconds": {"x": 5.0}}}


SMALL_AA = {"name": "autoattack", "steps": 3, "queries": 20}


def _small_autoattack(model, test, **options):
    return evaluate_model(model, test, eps=0.1, attacks=("fgsm", SMALL_AA), suite="quick", n=60, batch_size=20,
                          n_boot=10, **options)


def test_autoattack_stages_are_recorded_and_an_interrupted_evaluation_resumes_identically(
    trained_digits, tmp_path, monkeypatch
):
    import robustlab.stages as stages

    model, test = trained_digits.model, trained_digits.data.test
    whole = _small_autoattack(model, test, state_dir=tmp_path / "whole")
    label = "autoattack(queries=20,steps=3)"
    recorded = whole.attacks[label].stages
    assert list(recorded) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    accuracies = [s["accuracy"] for s in recorded.values()]
    assert accuracies == sorted(accuracies, reverse=True), "each stage only removes robust points"
    assert whole.to_dict()["attacks"][label]["stages"] == recorded
    assert not list((tmp_path / "whole").glob("*.partial.npz")), "state removed once finished"

    real, calls = stages.run_stage, []

    def dies_in_stage_three(*args, **kwargs):
        calls.append(args[0][0])
        if calls.count("fab-t") == 1:  # FAB-T's first packed batch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "run_stage", dies_in_stage_three)
    with pytest.raises(KeyboardInterrupt):
        _small_autoattack(model, test, state_dir=tmp_path / "resumed")
    saved = sorted(f.name for f in (tmp_path / "resumed").glob("*.partial.npz"))
    assert saved == ["linf-0.1.autoattack_queries=20_steps=3_.partial.npz", "linf-0.1.fgsm.partial.npz"], saved
    calls.clear()
    monkeypatch.setattr(stages, "run_stage", lambda *a, **k: (calls.append(a[0][0]), real(*a, **k))[1])
    resumed = _small_autoattack(model, test, state_dir=tmp_path / "resumed")
    assert set(calls) == {"fab-t", "square"}, "APGD-CE and APGD-T are not run again"
    stages_seconds = sum(s["seconds"] for s in resumed.attacks[label].stages.values())
    assert resumed.attacks[label].seconds >= stages_seconds, "its time counts the stages read back too"
    for name in ("correct", "confidence"):
        for m in ("clean", label, "worst_case"):
            first = getattr(whole.attacks.get(m, whole.clean if m == "clean" else whole.worst_case), name)
            again = getattr(resumed.attacks.get(m, resumed.clean if m == "clean" else resumed.worst_case), name)
            assert np.array_equal(first, again), (name, m)
    assert [s["accuracy"] for s in resumed.attacks[label].stages.values()] == accuracies


def test_an_interrupted_evaluation_reads_back_the_attacks_it_finished(trained_digits, tmp_path, monkeypatch,
                                                                       capsys):
    import robustlab.evaluation.measure as measure

    model, test = trained_digits.model, trained_digits.data.test
    options = {"eps": 0.1, "attacks": ("fgsm", "pgd-3", "cw_linf-5"), "suite": "quick", "n": 60, "batch_size": 20,
               "n_boot": 10}
    whole = evaluate_model(model, test, **options)
    real, labels = measure._attack_batches, []

    def dies_in_cw(job, index, label, *args):
        labels.append(label)
        if label == "cw_linf-5":
            raise KeyboardInterrupt
        return real(job, index, label, *args)

    monkeypatch.setattr(measure, "_attack_batches", dies_in_cw)
    with pytest.raises(KeyboardInterrupt):
        evaluate_model(model, test, state_dir=tmp_path, **options)
    assert f"interrupted: 2 state file(s) of finished attacks or AutoAttack stages are kept in {tmp_path}; rerun" \
        in capsys.readouterr().err
    assert sorted(f.name for f in tmp_path.glob("*.partial.npz")) == ["linf-0.1.fgsm.partial.npz",
                                                                      "linf-0.1.pgd-3.partial.npz"]
    import shutil

    shutil.copytree(tmp_path, tmp_path.parent / "copy")
    labels.clear()
    monkeypatch.setattr(measure, "_attack_batches", lambda job, index, label, *a: (labels.append(label),
                                                                                  real(job, index, label, *a))[1])
    evaluate_model(model, test, state_dir=tmp_path.parent / "copy", **{**options, "seed": 1})
    assert labels == ["clean", "fgsm", "pgd-3", "cw_linf-5"], "another evaluation's results were read back"
    labels.clear()
    resumed = evaluate_model(model, test, state_dir=tmp_path, **options)
    assert labels == ["clean", "cw_linf-5"], "FGSM and PGD ran again"
    for label in ("fgsm", "pgd-3", "cw_linf-5"):
        assert np.array_equal(resumed.attacks[label].correct, whole.attacks[label].correct), label
        assert np.array_equal(resumed.attacks[label].confidence, whole.attacks[label].confidence), label
    assert resumed.attacks["pgd-3"].seconds > 0
    assert np.array_equal(resumed.worst_case.correct, whole.worst_case.correct)
    assert not list(tmp_path.glob("*.partial.npz")), "state removed once finished"


def test_each_stage_attacks_full_batches_of_the_still_robust_points(trained_digits, monkeypatch):
    import robustlab.stages as stages

    real, sizes = stages.run_stage, {}

    def spy(stage, grad_model, attacked, x, y, adv, robust, **kwargs):
        sizes.setdefault(stage[0], []).append(len(x))
        assert bool(robust.all()), "only still-robust points are packed"
        return real(stage, grad_model, attacked, x, y, adv, robust, **kwargs)

    monkeypatch.setattr(stages, "run_stage", spy)
    result = _small_autoattack(trained_digits.model, trained_digits.data.test)
    recorded = result.attacks["autoattack(queries=20,steps=3)"].stages
    names = list(recorded)  # clean, then the stages in order
    for before, name in zip(names, names[1:], strict=False):
        calls = sizes.get(name, [])
        assert sum(calls) == round(recorded[before]["accuracy"] * 60), "every still-robust point is attacked once"
        assert all(size == 20 for size in calls[:-1]), f"packed into batches of 20: {calls}"
    assert len(sizes["apgd-t"]) < 3, "the robust points left after APGD-CE fill fewer batches than the 60 images"


def test_a_state_file_of_another_evaluation_is_not_resumed(trained_digits, tmp_path):
    model, test = trained_digits.model, trained_digits.data.test
    from robustlab.stages import _save, state_file

    label = "autoattack(queries=20,steps=3)"
    path = state_file(tmp_path, "linf-0.1", label, 0, 1)
    robust = {0: np.ones(20, bool), 1: np.ones(20, bool), 2: np.ones(20, bool)}  # "every point survived"
    _save(path, "another evaluation", {"clean": robust, "apgd-ce": robust, "apgd-t": robust, "fab-t": robust,
                                       "square": robust}, {}, {b: torch.zeros(20, 1, 8, 8) for b in robust})
    reference = _small_autoattack(model, test)
    res = _small_autoattack(model, test, state_dir=tmp_path)
    assert np.array_equal(res.attacks[label].correct, reference.attacks[label].correct)
    assert res.attacks[label].accuracy < 1.0


def test_strength_of_an_evaluation(trained_digits):
    from robustlab.evaluation import AUTOATTACK_GRADE, UPPER_BOUND, UPPER_BOUND_NOTE, strength, summary_lines

    res = _small_autoattack(trained_digits.model, trained_digits.data.test)
    assert res.strength == UPPER_BOUND, "AutoAttack at 3 steps / 20 queries is not the full attack"
    entry = res.to_dict()
    assert entry["strength"] == UPPER_BOUND and strength(entry) == UPPER_BOUND
    assert any(UPPER_BOUND_NOTE in line for line in summary_lines(res))
    full = {"name": "autoattack", "params": {}}
    assert strength({"attacks": {"autoattack": {"attack": full}}}) == AUTOATTACK_GRADE, "inferred when not stored"
    assert strength({"attacks": {"pgd-20": {"attack": {"name": "pgd", "params": {"steps": 20}}}}}) == UPPER_BOUND
    assert [label for label, _ in resolve_attacks(["fgsm"], None)] == ["fgsm"], "None is the quick suite"


def test_committed_paper_grid_results_read_as_autoattack_grade():
    from pathlib import Path

    from robustlab.evaluation import AUTOATTACK_GRADE, strength

    files = sorted(Path(__file__).parents[1].glob("benchmarks/paper-mnist-paper/runs/*/metrics.json"))
    if not files:
        pytest.skip("no committed paper grid results")
    for path in files:
        for entry in (read_json(path).get("evaluations") or {}).values():
            assert strength(entry) == AUTOATTACK_GRADE, path


def test_evidence_line_names_the_strongest_attack_and_bpda(trained_digits):
    from robustlab.defenses.preprocessing import Defended, FeatureSqueezing
    from robustlab.evaluation import evidence_line

    defended = Defended(trained_digits.model, FeatureSqueezing(bits=3, median=1))
    res = evaluate_model(defended, trained_digits.data.test, eps=0.1, attacks=("fgsm", "pgd-10"), suite="quick",
                         n=60, n_boot=10)
    line = evidence_line(res)
    clean = res.clean.per_sample >= 0.5
    counts = {k: int((clean & (m.per_sample < 0.5)).sum()) for k, m in res.attacks.items()}
    best = max(counts, key=counts.__getitem__)
    assert line.startswith(f"strongest evidence: {best} broke {counts[best]} of {int(clean.sum())}")
    assert "BPDA" in line


def test_autoattack_stage_by_stage_agrees_with_autoattack_on_each_batch(trained_digits):
    """The evaluation's stage-by-stage AutoAttack draws its random numbers per (batch, stage), not in one
    stream per batch as ``autoattack`` does: the verdicts may differ by seed noise, never systematically."""
    from robustlab.attacks import autoattack
    from robustlab.stats import mcnemar

    model, test = trained_digits.model, trained_digits.data.test
    label = "autoattack(queries=20,steps=3)"
    staged = _small_autoattack(model, test, seed=3).attacks[label].correct[0]
    split, _ = subset(test, 60)
    x, y = split.float_images(), split.labels
    direct = torch.cat([
        autoattack(model, x[i:i + 20], y[i:i + 20], eps=0.1, steps=3, queries=20,
                   generator=torch.Generator().manual_seed(i)).robust
        for i in range(0, 60, 20)
    ]).numpy()
    test_result = mcnemar(staged, direct)
    assert test_result.b + test_result.c <= 6 and test_result.p_value > 0.05, test_result


def test_state_file_digest_covers_models_with_scalar_buffers():
    """BatchNorm's 0-d ``num_batches_tracked`` cannot be viewed as bytes without a reshape; the digest
    must still see it change."""
    from torch import nn

    from robustlab.models import build_model
    from robustlab.stages import model_digest

    model = build_model("resnet18", 10, 3, 8, width=8)
    before = model_digest(model)
    batch_norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    batch_norm.num_batches_tracked += 1
    assert model_digest(model) != before


def test_the_rand_version_keeps_an_earlier_stage_candidate_that_a_later_stage_does_not_beat(monkeypatch):
    """Stage by stage as in one batch: a point no stage breaks keeps the highest-loss candidate of all its
    stages (the ``rand`` version's contract), not the last stage's or its clean image."""
    from torch import nn

    import robustlab.stages as stages
    from robustlab.attacks import autoattack
    from robustlab.data import Split

    class Sum(nn.Module):  # class 0 until the pixel sum passes 10: a brighter image has a higher loss
        def forward(self, x):
            s = x.flatten(1).sum(1)
            return torch.stack([10 - s, torch.zeros_like(s)], 1)

    def shift(delta):
        def attack(model, x, y, *, eps, norm, generator=None, validate=True, **kwargs):
            return (x + delta).clamp(0, 1)
        return attack

    fixed = [("brighter", shift(0.1), {}), ("darker", shift(-0.05), {})]
    monkeypatch.setattr(stages, "autoattack_stages", lambda *args: fixed)
    images = torch.full((3, 1, 2, 2), 128, dtype=torch.uint8)
    split, labels = Split(images, torch.zeros(3, dtype=torch.long)), torch.zeros(3, dtype=torch.long)
    run = stages.run_autoattack(Sum(), Sum(), split, [0], 3, torch.device("cpu"), {"version": "rand"}, eps=0.1,
                                norm="linf", seed=0, stream=1, label="autoattack-rand")
    x = split.float_images()
    assert torch.allclose(run.x_adv[0] - x, torch.full_like(x, 0.1)), "the brighter candidate survives"
    monkeypatch.setattr(sys.modules["robustlab.attacks.autoattack"], "autoattack_stages", lambda *args: fixed)
    direct = autoattack(Sum(), x, labels, eps=0.1, version="rand")
    assert torch.equal(run.x_adv[0], direct.x_adv)


def test_an_autoattack_state_file_is_not_resumed_under_another_eot(trained_digits, tmp_path, monkeypatch):
    """EOT's draws per step shape every stage's result but are not a parameter of the stages: the state's
    tag must record them, so that a rerun with another EOT attacks again instead of reading back."""
    import robustlab.evaluation.measure as measure
    import robustlab.stages as stages
    from robustlab.defenses.preprocessing import Defended, GaussianNoise

    noisy = Defended(trained_digits.model, GaussianNoise(sigma=0.1))

    def evaluate(eot_samples):
        return evaluate_model(noisy, trained_digits.data.test, eps=0.1, attacks=(SMALL_AA,), suite="quick", n=20,
                              batch_size=20, n_boot=10, eot_samples=eot_samples, random_passes=1, state_dir=tmp_path)

    real_batches, real_stage, stages_run = measure._attack_batches, stages.run_stage, []

    def stopped_after_the_stages(job, index, label, *args):  # every stage done and saved, nothing else
        if label != "clean":
            raise KeyboardInterrupt
        return real_batches(job, index, label, *args)

    monkeypatch.setattr(measure, "_attack_batches", stopped_after_the_stages)
    with pytest.raises(KeyboardInterrupt):
        evaluate(eot_samples=4)
    assert list(tmp_path.glob("*autoattack*.partial.npz"))
    monkeypatch.setattr(measure, "_attack_batches", real_batches)
    monkeypatch.setattr(stages, "run_stage", lambda *a, **k: (stages_run.append(a[0][0]), real_stage(*a, **k))[1])
    evaluate(eot_samples=2)
    assert stages_run[0] == "apgd-ce", "attacked again from the first stage"
    stages_run.clear()
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(measure, "_attack_batches", stopped_after_the_stages)
        evaluate(eot_samples=2)
    monkeypatch.setattr(measure, "_attack_batches", real_batches)
    stages_run.clear()
    evaluate(eot_samples=2)
    assert stages_run == [], "the same EOT reads the stages back"


def test_the_record_says_autoattack_crafts_in_fp32_under_bf16_attacks(trained_digits):
    def precision(attacks):
        return evaluate_model(trained_digits.model, trained_digits.data.test, eps=0.1, attacks=attacks, suite="quick",
                              n=20, n_boot=10, attack_precision="bf16").model_info["attack_precision"]

    assert precision(("fgsm",)) == "bf16"
    assert precision(("fgsm", SMALL_AA)) == "bf16 (AutoAttack in fp32)"


def test_state_file_digest_tells_transforms_of_one_classifier_apart():
    """A sweep of squeezer or noise settings over one trained classifier must not resume one setting's
    state (evaluation or audit) for another: the settings are attributes, not in the state dict."""
    from torch import nn

    from robustlab.defenses.preprocessing import Defended, FeatureSqueezing, GaussianNoise
    from robustlab.models import build_model
    from robustlab.stages import model_digest

    base = build_model("lenet5", 10, 1, 28)
    digests = {model_digest(m) for m in (
        base, Defended(base, FeatureSqueezing(bits=1, median=1)), Defended(base, FeatureSqueezing(bits=5, median=3)),
        Defended(base, GaussianNoise(sigma=0.05)), Defended(base, GaussianNoise(sigma=0.5)),
        nn.Sequential(FeatureSqueezing(bits=2, median=1), base),
    )}
    assert len(digests) == 6
    assert model_digest(Defended(base, GaussianNoise(sigma=0.5))) == model_digest(Defended(base, GaussianNoise(0.5)))


def test_evaluate_model_takes_float_pixels_with_labels_as_a_split(trained_digits):
    from robustlab.data import Split

    model, test = trained_digits.model, trained_digits.data.test
    part = Split(test.images[:40], test.labels[:40])
    options = {"eps": 0.1, "attacks": ["fgsm"], "suite": "quick", "n_boot": 10}
    from_split = evaluate_model(model, part, **options)
    from_pixels = evaluate_model(model, (part.float_images(), part.labels), **options)
    assert np.array_equal(from_split.worst_case.correct, from_pixels.worst_case.correct)
    assert from_split.samples["digest"] == from_pixels.samples["digest"]


def test_the_chance_warning_counts_the_models_classes_not_the_evaluated_ones(trained_digits):
    """20 images of one class are not a one-class problem: a good model on them is not near chance."""
    from robustlab.data import Split
    from robustlab.evaluation import summary_lines

    test = trained_digits.data.test
    threes = test.labels == 3
    split = Split(test.images[threes][:20], test.labels[threes][:20])
    result = evaluate_model(trained_digits.model, split, eps=0.1, attacks=["fgsm"], suite="quick", n_boot=10)
    assert result.model_info["num_classes"] == 10
    assert result.clean.accuracy > 0.5 and not any("close to chance" in line for line in summary_lines(result))


def test_a_model_near_chance_is_called_out():
    from robustlab.metrics import chance_warning

    assert "close to chance (10.0% for 10 classes)" in chance_warning(0.1031, 10)
    assert chance_warning(0.52, 2) is not None
    assert chance_warning(0.5, 10) is None and chance_warning(0.9, 2) is None
