"""The audit of one finished run, its PGD running every step and then stopping early, side by side.

Early stopping (``audit_model(early_stop=None)``, the evaluation's policy) leaves an image alone once it
is misclassified; it counts as broken either way. This prints both audits' seconds, their ratio, each
measurement's accuracy and whether every check's status agrees, in one process on the same images:

    OMP_NUM_THREADS=1 python benchmarks/bench_audit_early_stop.py RUN_DIR --n 32
"""

from __future__ import annotations

import argparse
import time

import torch

from robustlab.audit import audit_model, train_surrogate
from robustlab.runs import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--n", type=int, default=32, help="first test images audited")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--surrogate-cache", default="results/surrogates",
                        help="where the grid keeps its transfer surrogates (trained here if absent)")
    args = parser.parse_args()
    loaded = load_run(args.run_dir, torch.device("cpu"))
    surrogate = train_surrogate(loaded.data, model=loaded.config.model.model_dump(), epochs=3, seed=1,
                                cache_dir=args.surrogate_cache)
    eps = loaded.config.threat.eps
    print(f"{args.run_dir}: first {args.n} test images, {loaded.config.threat.norm} eps={eps:g}, "
          f"pgd-{args.steps}, square-{args.queries}, torch threads {torch.get_num_threads()}\n")
    reports = {}
    for early_stop in (False, None):
        start = time.perf_counter()
        report = audit_model(loaded.model, loaded.data.test, eps=eps, norm=loaded.config.threat.norm, n=args.n,
                             steps=args.steps, square_queries=args.queries, surrogate=surrogate,
                             early_stop=early_stop)
        reports[early_stop] = (report, time.perf_counter() - start)
    (full, full_s), (stop, stop_s) = reports[False], reports[None]
    print("| check | status, every step | status, early stop |\n|---|---|---|")
    for a, b in zip(full.checks, stop.checks, strict=True):
        print(f"| {a.name} | {a.status} | {b.status} |")
    curve = [full.check("accuracy_vs_eps").evidence["accuracy"], stop.check("accuracy_vs_eps").evidence["accuracy"]]
    print(f"\naccuracy vs eps, every step: {[round(100 * a, 1) for a in curve[0]]}; "
          f"early stop: {[round(100 * a, 1) for a in curve[1]]}")
    print(f"seconds: every step {full_s:.1f}, early stop {stop_s:.1f}; speed-up {full_s / stop_s:.2f}x")


if __name__ == "__main__":
    main()
