"""Default `robustlab evaluate` vs the quick suite vs the official AutoAttack, per sample, on trained runs.

    PYTHONPATH=src:/path/to/auto-attack OMP_NUM_THREADS=1 python benchmarks/crosscheck_autoattack.py \\
        RUN_DIR [RUN_DIR ...] --n 500 [--json out.json]

For each run (evaluated at its own threat, on the fixed random ``--n`` test images every robustlab
evaluation uses):

- ``default``: :func:`robustlab.evaluation.evaluate_run` with its defaults (what ``robustlab evaluate RUN``
  runs: FGSM, PGD-20, CW-Linf and AutoAttack, per-sample worst case), not written to the run;
- ``quick``: the same with ``suite="quick"`` (no AutoAttack: an upper bound);
- ``official``: fra31/auto-attack's ``AutoAttack(version="standard")`` (``"rand"`` for a random
  defence) on the same images, attacking the same adaptive model robustlab attacks (BPDA / EOT through
  :func:`robustlab.attacks.wrappers.adaptive_model`), robust = the defended model still right on its output.

It prints a markdown row per run: robust accuracy of each, McNemar's test of default vs official on
the per-sample results (b = robust only under robustlab's default, c = robust only under the official
AutoAttack), and the CPU seconds of robustlab's AutoAttack (default minus quick: the same cheap attacks
with the same seeds run in both) beside the official one's, measured in the same process. Needs the
official package importable (``autoattack``); without it the script says so and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def _cpu(fn):
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def official_autoattack(model, x, y, eps: float, norm: str, random: bool, batch_size: int):
    """Per-sample robustness under fra31/auto-attack, judged by ``model`` (the defended model)."""
    from autoattack import AutoAttack

    from robustlab.attacks.wrappers import adaptive_model

    attacked, _ = adaptive_model(model)
    adversary = AutoAttack(attacked, norm="Linf" if norm == "linf" else "L2", eps=eps, seed=0, verbose=False,
                           version="rand" if random else "standard", device=str(x.device))
    x_adv = adversary.run_standard_evaluation(x, y, bs=batch_size)
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).cpu().numpy()


def crosscheck(run_dir: str, n: int, batch_size: int) -> dict:
    from robustlab.data import Split
    from robustlab.evaluation import evaluate_run, subset
    from robustlab.runs import load_run
    from robustlab.stats import mcnemar

    quick, quick_s = _cpu(lambda: evaluate_run(run_dir, n=n, suite="quick", write=False, progress=True))
    default, default_s = _cpu(lambda: evaluate_run(run_dir, n=n, write=False, progress=True))
    loaded = load_run(run_dir, torch.device("cpu"))
    model = loaded.model.eval()
    split, indices = subset(loaded.data.test, n)
    assert isinstance(split, Split) and np.array_equal(indices.numpy(), default.indices)
    x, y = split.float_images(), split.labels
    random = bool(default.model_info["random"])
    theirs, official_s = _cpu(
        lambda: official_autoattack(model, x, y, default.threat["eps"], default.threat["norm"], random, batch_size)
    )
    ours = default.worst_case.correct[0].astype(bool)
    test = mcnemar(ours, theirs)
    aa_label = next(k for k, m in default.attacks.items() if m.attack["name"] == "autoattack")
    return {
        "run": run_dir, "defense": loaded.config.defense.name, "eps": default.threat["eps"], "n": n,
        "adaptive": default.model_info["adaptive"], "clean": default.clean.accuracy,
        "quick": quick.robust_accuracy, "quick_strength": quick.strength,
        "default": default.robust_accuracy, "default_strength": default.strength,
        "autoattack_alone": default.attacks[aa_label].accuracy, "stages": default.attacks[aa_label].stages,
        "official": float(theirs.mean()),
        "robust_only_quick_vs_default": int((quick.worst_case.correct[0] & ~ours).sum()),
        "robust_only_default_vs_quick": int((ours & ~quick.worst_case.correct[0]).sum()),
        "mcnemar_default_vs_official": {"b": test.b, "c": test.c, "p": test.p_value, "method": test.method},
        "cpu_seconds": {"robustlab_autoattack": default_s - quick_s, "official": official_s,
                        "quick": quick_s, "default": default_s},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="trained run directories")
    parser.add_argument("--n", type=int, default=500, help="test images (the fixed random subset)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    try:
        import autoattack  # noqa: F401
    except ImportError:
        print("skipped: the official AutoAttack (fra31/auto-attack) is not importable; put its checkout on "
              "PYTHONPATH", file=sys.stderr)
        sys.exit(0)
    torch.set_num_threads(1)
    rows = []
    print("| model | eps | n | quick suite | default | official AutoAttack | robust only under quick "
          "| McNemar default vs official (b / c, p) | CPU s AutoAttack robustlab / official |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        r = crosscheck(run, args.n, args.batch_size)
        rows.append(r)
        m, s = r["mcnemar_default_vs_official"], r["cpu_seconds"]
        print(f"| {r['defense']} ({r['adaptive']}) | {r['eps']:g} | {r['n']} | {100 * r['quick']:.1f}% "
              f"| {100 * r['default']:.1f}% | {100 * r['official']:.1f}% "
              f"| {r['robust_only_quick_vs_default']} ({r['robust_only_default_vs_quick']} the other way) "
              f"| {m['b']} / {m['c']}, p = {m['p']:.3g} | {s['robustlab_autoattack']:.0f} / {s['official']:.0f} |",
              flush=True)
        print(f"  stages: { {k: round(100 * v['accuracy'], 2) for k, v in r['stages'].items()} }", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
