"""Attack throughput (images/s): robustlab vs torchattacks vs ART, same model, same batch, one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_attacks.py --run RUN_DIR [--n 256] [--threads 1]

RUN_DIR is a trained run (e.g. a standard LeNet-5 on MNIST). After a warm-up call on a small slice, the
libraries are called in turn (ours, torchattacks, ART, ours, ...) ``--repeat`` times, so load on a shared
machine hits all of them alike; speeds are the median over rounds, and the ratio is the median of the
per-round ratios with a bootstrap 95% interval. Every library gets the same parameters (listed in the
table) and the robust accuracy it reached is printed beside its speed, so a fast but weak configuration
is visible.
Our APGD stops per sample once it is misclassified (same verdicts, see robustlab.attacks.apgd); the
``no early stop`` row shows the cost of the full schedule for comparison.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from robustlab.attacks import apgd, carlini_wagner_l2, fab_t, fgsm, pgd, square
from robustlab.runs import load_run


def _interleaved(
    fns: list[Callable[[], torch.Tensor] | None], repeat: int, budget: float = 120.0
) -> tuple[list[list[float]], list[torch.Tensor | None]]:
    """Wall times of ``fns`` called round-robin ``repeat`` times (fewer rounds once ``budget`` s are spent)."""
    times: list[list[float]] = [[] for _ in fns]
    outputs: list[torch.Tensor | None] = [None] * len(fns)
    spent = 0.0
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            if fn is None:
                continue
            start = time.perf_counter()
            outputs[i] = fn()
            seconds = time.perf_counter() - start
            times[i].append(seconds)
            spent += seconds
        if spent > budget:
            break
    return times, outputs


def _ratio(ours: list[float], theirs: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Median of the per-round speed ratios theirs_time / ours_time, with a bootstrap 95% interval."""
    if not ours or not theirs:
        return float("nan"), float("nan"), float("nan")
    ratios = np.asarray(theirs) / np.asarray(ours)
    rng = np.random.default_rng(seed)
    boots = np.median(rng.choice(ratios, size=(2000, len(ratios))), axis=1)
    return float(np.median(ratios)), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="trained run directory")
    parser.add_argument("--n", type=int, default=256, help="batch size (images attacked at once)")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=15, help="interleaved rounds (fewer once 120 s are spent)")
    parser.add_argument("--skip-art", action="store_true", help="leave ART out (it is the slowest)")
    parser.add_argument("--only", default="", help="comma-separated rows to run, e.g. FGSM,PGD-10 (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import torchattacks

    run = load_run(args.run)
    model = run.model.eval()
    x = run.data.test.images[: args.n].float() / 255
    y = run.data.test.labels[: args.n]
    eps = args.eps
    art = None if args.skip_art else _art_attacks(model, x, eps)

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    # name -> (params, ours, torchattacks, art)
    suite: dict[str, tuple[str, Callable, Callable, Callable | None]] = {
        "FGSM": (
            f"eps={eps}",
            lambda xs, ys: fgsm(model, xs, ys, eps=eps),
            lambda xs, ys: torchattacks.FGSM(model, eps=eps)(xs, ys),
            art and art["fgsm"],
        ),
        "PGD-10": (
            f"eps={eps}, step={eps / 4:g}, random start",
            lambda xs, ys: pgd(model, xs, ys, eps=eps, steps=10, step_size=eps / 4, generator=seeded()),
            lambda xs, ys: torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=10)(xs, ys),
            art and art["pgd"],
        ),
        "PGD-10 (ours with early stop as in evaluation)": (
            f"eps={eps}, step={eps / 4:g}, random start",
            lambda xs, ys: pgd(
                model, xs, ys, eps=eps, steps=10, step_size=eps / 4, early_stop=True, generator=seeded()
            ),
            lambda xs, ys: torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=10)(xs, ys),
            None,
        ),
        "CW-L2": (
            "c=1, kappa=0, 50 Adam steps, lr=0.01, 1 binary step",
            lambda xs, ys: carlini_wagner_l2(model, xs, ys, c=1.0, steps=50, binary_search_steps=1).x_adv,
            lambda xs, ys: torchattacks.CW(model, c=1.0, steps=50, lr=0.01)(xs, ys),
            art and art["cw"],
        ),
        "APGD-CE": (
            f"eps={eps}, 100 steps, 1 restart",
            lambda xs, ys: apgd(model, xs, ys, eps=eps, steps=100, generator=seeded()),
            lambda xs, ys: torchattacks.APGD(model, eps=eps, steps=100, seed=0)(xs, ys),
            art and art["apgd"],
        ),
        "APGD-CE (ours without early stop)": (
            f"eps={eps}, 100 steps, 1 restart",
            lambda xs, ys: apgd(model, xs, ys, eps=eps, steps=100, early_stop=False, generator=seeded()),
            lambda xs, ys: torchattacks.APGD(model, eps=eps, steps=100, seed=0)(xs, ys),
            None,
        ),
        "FAB-T": (
            f"eps={eps}, 10 steps, 9 target classes, 1 restart",
            lambda xs, ys: fab_t(model, xs, ys, eps=eps, steps=10, n_target_classes=9, generator=seeded()),
            lambda xs, ys: torchattacks.FAB(model, eps=eps, steps=10, multi_targeted=True, n_classes=10, seed=0)(
                xs, ys
            ),
            None,
        ),
        "Square": (
            f"eps={eps}, 1000 queries, p_init=0.8, 1 restart",
            lambda xs, ys: square(model, xs, ys, eps=eps, queries=1000, generator=seeded()),
            lambda xs, ys: torchattacks.Square(model, eps=eps, n_queries=1000, p_init=0.8, seed=0)(xs, ys),
            None,
        ),
    }
    print(f"model: {run.config.model.name} on {run.config.data.dataset}, batch {args.n}, threads {args.threads}")
    print(
        "| attack | parameters | ours img/s | torchattacks img/s | ART img/s | ours/torchattacks [95% CI] "
        "| ours/ART [95% CI] | robust acc % ours / ta / ART | rounds |"
    )
    print("|" + "---|" * 9)
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    for name, (params, ours, theirs, art_fn) in suite.items():
        if only and name not in only:
            continue
        fns = [ours, theirs, art_fn]
        for fn in fns:
            if fn is not None:
                fn(x[:8], y[:8])  # warm-up
        times, outputs = _interleaved([fn and (lambda fn=fn: fn(x, y)) for fn in fns], args.repeat)
        speed, acc = [], []
        for t, out in zip(times, outputs, strict=True):
            speed.append(args.n / float(np.median(t)) if t else float("nan"))
            with torch.no_grad():
                acc.append(float((model(torch.as_tensor(out)).argmax(1) == y).float().mean()) if t else float("nan"))
        vs_ta, lo_ta, hi_ta = _ratio(times[0], times[1])
        vs_art, lo_art, hi_art = _ratio(times[0], times[2])
        print(
            f"| {name} | {params} | {speed[0]:.1f} | {speed[1]:.1f} | {speed[2]:.1f} "
            f"| {vs_ta:.2f}x [{lo_ta:.2f}, {hi_ta:.2f}] | {vs_art:.2f}x [{lo_art:.2f}, {hi_art:.2f}] "
            f"| {100 * acc[0]:.1f} / {100 * acc[1]:.1f} / {100 * acc[2]:.1f} | {len(times[0])} |",
            flush=True,
        )


def _art_attacks(model: torch.nn.Module, x: torch.Tensor, eps: float) -> dict[str, Callable]:
    from art.attacks.evasion import (
        AutoProjectedGradientDescent,
        CarliniL2Method,
        FastGradientMethod,
        ProjectedGradientDescent,
    )
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(
        model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=10,
        clip_values=(0.0, 1.0), device_type="cpu",
    )

    def wrap(attack) -> Callable:
        return lambda xs, ys: torch.from_numpy(attack.generate(xs.numpy(), y=ys.numpy()))

    return {
        "fgsm": wrap(FastGradientMethod(classifier, norm=np.inf, eps=eps, batch_size=len(x))),
        "pgd": wrap(
            ProjectedGradientDescent(
                classifier, norm=np.inf, eps=eps, eps_step=eps / 4, max_iter=10, num_random_init=1,
                batch_size=len(x), verbose=False,
            )
        ),
        "cw": wrap(
            CarliniL2Method(
                classifier, confidence=0.0, learning_rate=0.01, binary_search_steps=1, max_iter=50,
                initial_const=1.0, batch_size=len(x), verbose=False,
            )
        ),
        "apgd": wrap(
            AutoProjectedGradientDescent(
                classifier, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=100, nb_random_init=1,
                batch_size=len(x), loss_type="cross_entropy", verbose=False,
            )
        ),
    }


if __name__ == "__main__":
    main()
