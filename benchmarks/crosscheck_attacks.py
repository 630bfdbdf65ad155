"""Robust accuracy / distortion of our attacks next to torchattacks' on the same model and inputs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/crosscheck_attacks.py [--run MNIST_RUN_DIR]

Digits: a LeNet-5 trained like the test fixture, all 359 test images. With ``--run`` also a trained MNIST
run (first 1000 test images). Prints one markdown row per comparison; the same comparisons are asserted
(within 0.5 pp / 5 %) in tests/test_attacks_crosscheck.py.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torchattacks

from robustlab.attacks import apgd, autoattack, carlini_wagner_l2, pgd


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return 100 * float((model(x).argmax(1) == y).float().mean())


def _row(what: str, ours: float, theirs: float, unit: str, seconds: tuple[float, float]) -> None:
    print(
        f"| {what} | {ours:.2f}{unit} | {theirs:.2f}{unit} | {ours - theirs:+.2f} "
        f"| {seconds[0]:.1f} / {seconds[1]:.1f} |",
        flush=True,
    )


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def compare(model, x, y, name: str, eps: float, aa: bool, cw: dict) -> None:
    def g():
        return torch.Generator().manual_seed(0)

    a, ta = _timed(lambda: apgd(model, x, y, eps=eps, steps=100, generator=g()))
    b, tb = _timed(lambda: torchattacks.APGD(model, eps=eps, steps=100, seed=0)(x, y))
    _row(f"{name}: APGD-CE-100 robust acc, eps={eps}", _acc(model, a, y), _acc(model, b, y), "%", (ta, tb))
    n = min(len(x), 300)
    c, tc = _timed(lambda: carlini_wagner_l2(model, x[:n], y[:n], **cw, binary_search_steps=1, abort_early=False))
    d, td = _timed(lambda: torchattacks.CW(model, **cw)(x[:n], y[:n]))
    theirs = (d - x[:n]).flatten(1).norm(dim=1)  # torchattacks returns x itself where it fails
    both = c.success & (theirs > 0)
    _row(
        f"{name}: CW-L2 median L2 on samples both broke ({cw}, n={n}; success ours "
        f"{c.success.float().mean():.2f} / theirs {(theirs > 0).float().mean():.2f})",
        float(c.l2[both].median()),
        float(theirs[both].median()),
        "",
        (tc, td),
    )
    if aa:
        r, tr = _timed(lambda: autoattack(model, x, y, eps=eps, steps=10, generator=g()))
        s, ts = _timed(lambda: torchattacks.AutoAttack(model, eps=eps, seed=0)(x, y))
        _row(
            f"{name}: AutoAttack (APGD/APGD-T/FAB-T 10 steps, Square 5000) robust acc, eps={eps}",
            100 * r.robust_accuracy,
            _acc(model, s, y),
            "%",
            (tr, ts),
        )
        print(f"  our per-stage record: { {k: round(100 * v, 2) for k, v in r.accuracy.items()} }")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", help="a trained MNIST run directory")
    parser.add_argument("--no-autoattack", action="store_true", help="skip the (slow) AutoAttack comparison")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from robustlab.data import load_dataset
    from robustlab.training import train

    data = load_dataset("digits", val_size=200)
    config = {
        "data": {"dataset": "digits", "val_size": 200},
        "model": {"name": "lenet5"},
        "train": {
            "epochs": 8,
            "batch_size": 64,
            "optimizer": "adam",
            "lr": 0.003,
            "weight_decay": 0.0,
            "select": "last",
        },
        "threat": {"eps": 0.1},
    }
    model = train(config, tempfile.mkdtemp() + "/digits", progress=False, data=data).model.eval()
    x, y = data.test.images.float() / 255, data.test.labels
    print("| comparison | ours | torchattacks | difference | seconds ours / theirs |")
    print("|---|---|---|---|---|")
    compare(model, x, y, "digits LeNet-5", 0.1, aa=not args.no_autoattack, cw={"c": 1.0, "steps": 50, "lr": 0.01})
    if args.run:
        from robustlab.runs import load_run

        run = load_run(args.run)
        model = run.model.eval()
        x, y = run.data.test.images[:1000].float() / 255, run.data.test.labels[:1000]
        x_adv = pgd(model, x, y, eps=0.3, steps=40, step_size=0.01, generator=torch.Generator().manual_seed(0))
        print(
            f"| MNIST LeNet-5: clean / PGD-40 (eps 0.3, step 0.01) acc, n=1000 | {_acc(model, x, y):.2f}% / "
            f"{_acc(model, x_adv, y):.2f}% | | | |"
        )
        compare(model, x, y, "MNIST LeNet-5", 0.1, aa=False, cw={"c": 10.0, "steps": 100, "lr": 0.01})


if __name__ == "__main__":
    main()
