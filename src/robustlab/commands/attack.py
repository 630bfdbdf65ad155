"""``robustlab attack RUN_DIR``: attack N test images of a run, save them, draw a figure grid.

The N images are a fixed-seed random sample of the test split by default, the same ones ``robustlab
evaluate --n N`` attacks (``--subset first``: the first N, which on an ImageFolder source sorted by class
covers only its first classes). Saves ``x_adv``, ``x``, ``y``, the images' ``indices`` in the test split
and the clean and adversarial predictions to an ``.npz`` (written atomically), and prints the robust
accuracy together with the name of the attack that produced it. A run with an input-transform defence
is attacked adaptively (BPDA / EOT, see :func:`robustlab.attacks.wrappers.adaptive_model`); accuracy is
always measured on the defended model.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
import yaml

from robustlab.attacks.wrappers import EOT_SAMPLES, adaptive_model
from robustlab.cli import app, console, example
from robustlab.config import parse_number
from robustlab.errors import InputError

ParamOpt = Annotated[
    list[str] | None, typer.Option("--param", "-p", help="attack parameter key=value, e.g. -p steps=40 (repeatable)")
]


def _attack_params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--param expects key=value, got '{item}'")
        if key.strip() in ("eps", "norm"):
            raise InputError(f"{key.strip()} belongs to the threat model, not to the attack's parameters: "
                             f"give it as --{key.strip()}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML reads 2/255 and 1e-3 as strings: numbers, as everywhere else
            with contextlib.suppress(ValueError):
                parsed = parse_number(parsed)
        params[key.strip()] = parsed
    return params


def _figure(x: np.ndarray, x_adv: np.ndarray, clean: np.ndarray, adv: np.ndarray, y: np.ndarray, title: str) -> bytes:
    """PNG of up to 8 columns: original / adversarial / amplified perturbation, with predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(8, len(x))
    delta = x_adv[:k] - x[:k]
    scale = max(float(np.abs(delta).max()), 1e-12)
    rows = (x[:k], x_adv[:k], 0.5 + delta / (2 * scale))
    names = ("original", "adversarial", f"perturbation (x{0.5 / scale:.1f})")
    fig, axes = plt.subplots(3, k, figsize=(1.4 * k, 4.6), squeeze=False)
    for r, (images, name) in enumerate(zip(rows, names, strict=True)):
        for c in range(k):
            ax = axes[r][c]
            image = images[c].transpose(1, 2, 0)
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"y={y[c]} pred={clean[c]}", fontsize=7)
            elif r == 1:
                ax.set_title(f"pred={adv[c]}", fontsize=7, color="red" if adv[c] != y[c] else "black")
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


@app.command(
    short_help="Attack a run's test images and save the adversarial examples (.npz, optional PNG).",
    epilog=example("robustlab attack runs/digits-hybrid --attack pgd-40 --eps 0.1 --out adv.npz --figure adv.png"),
)
def attack(
    run_dir: Annotated[Path, typer.Argument(help="a finished training run directory")],
    attack: Annotated[
        str, typer.Option("--attack", "-a", help="registered attack, e.g. fgsm, pgd-40, apgd_ce")
    ] = "pgd",
    eps: Annotated[str | None, typer.Option(help="budget in pixels, e.g. 0.3 or 8/255 (default: the run's)")] = None,
    norm: Annotated[str | None, typer.Option(help="linf or l2 (default: the run's threat norm)")] = None,
    out: Annotated[Path, typer.Option(help="where to save x_adv/x/y/predictions (.npz)")] = Path("adv.npz"),
    n: Annotated[int, typer.Option(help="attack N test images (see --subset)")] = 256,
    subset: Annotated[str, typer.Option(help="which N: random (fixed seed, as evaluate) or first")] = "random",
    figure: Annotated[
        Path | None, typer.Option(help="also save a PNG grid: original / adversarial / perturbation")
    ] = None,
    param: ParamOpt = None,
    batch_size: Annotated[int, typer.Option(help="images per attack batch")] = 128,
    eot_samples: Annotated[int, typer.Option(help="EOT draws when the defence is random")] = EOT_SAMPLES,
    seed: Annotated[int, typer.Option(help="seed of the attack's random generator")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out / --figure file")] = False,
) -> None:
    """Attack N of a trained run's test images (a fixed random sample) and save the adversarial examples."""
    from robustlab.attacks.registry import make_attack, parse_attack_spec
    from robustlab.config import parse_number
    from robustlab.evaluation.samples import choose_samples
    from robustlab.metrics import iterate
    from robustlab.rundir import atomic_write_bytes
    from robustlab.runs import load_run, select_device
    from robustlab.validation import check_eps

    if n < 1 or batch_size < 1:
        raise InputError("--n and --batch-size must be >= 1")
    _check_outputs(out, figure, overwrite)
    run = load_run(run_dir, device=select_device(device))
    norm = norm or run.config.threat.norm
    if norm not in ("linf", "l2"):
        raise InputError(f"--norm must be linf or l2, got '{norm}'")
    budget = check_eps(parse_number(eps) if eps is not None else run.config.threat.eps, norm)
    name, _ = parse_attack_spec(attack)
    kwargs = _attack_params(list(param or []))
    generator = torch.Generator().manual_seed(seed)
    if "generator" in _accepted(name):
        kwargs["generator"] = generator
    craft = make_attack(attack, eps=budget, norm=norm, **kwargs)
    model = run.model.eval()
    attacked, adaptation = adaptive_model(model, eot_samples=eot_samples)
    test, indices = choose_samples(run.data.test, n, subset)
    xs, advs, ys, clean, preds = [], [], [], [], []
    on = next(model.parameters()).device
    for x, y in iterate(test, batch_size, on):
        x_adv = craft(attacked, x, y)
        with torch.no_grad():
            clean.append(model(x).argmax(1).cpu())
            preds.append(model(x_adv).argmax(1).cpu())
        xs.append(x.cpu())
        advs.append(x_adv.cpu())
        ys.append(y.cpu())
    x_all, adv_all, y_all = torch.cat(xs).numpy(), torch.cat(advs).numpy(), torch.cat(ys).numpy()
    clean_all, pred_all = torch.cat(clean).numpy(), torch.cat(preds).numpy()
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        x_adv=adv_all,
        x=x_all,
        y=y_all,
        indices=indices.numpy(),
        pred_clean=clean_all,
        pred_adv=pred_all,
        attack=np.array(attack),
        eps=np.array(budget),
        norm=np.array(norm),
        adaptive=np.array(adaptation),
    )
    atomic_write_bytes(out, buffer.getvalue())
    label = attack + ("" if adaptation == "none" else f" with {adaptation}")
    bound = "" if name == "autoattack" else " (an upper bound on robustness: AutoAttack is the reference)"
    robust = float((pred_all == y_all).mean())
    if figure is not None:
        title = f"{label}, {norm} eps={budget:g}: robust accuracy {100 * robust:.2f}%"
        atomic_write_bytes(figure, _figure(x_all, adv_all, clean_all, pred_all, y_all, title))
    console.print(
        f"robust accuracy under {label} ({norm} eps={budget:g}) on {len(y_all)} test images: "
        f"{100 * robust:.2f}%{bound} (clean {100 * float((clean_all == y_all).mean()):.2f}%) -> {out}",
        markup=False,
        highlight=False,
    )


def _check_outputs(out: Path, figure: Path | None, overwrite: bool) -> None:
    """Refuse, before any work, an output that would replace a file silently or is not what it says."""
    for path, suffix, flag in ((out, ".npz", "--out"), (figure, ".png", "--figure")):
        if path is None:
            continue
        if path.suffix.lower() != suffix:
            raise InputError(f"{flag} must name a {suffix} file, got '{path}'")
        if path.exists() and not overwrite:
            raise InputError(f"{path} exists; pass --overwrite to replace it, or choose another {flag}")


def _accepted(name: str) -> set[str]:
    import inspect

    from robustlab.attacks.registry import ATTACKS

    return set(inspect.signature(ATTACKS[name]).parameters)
