"""How much faster attacks run through the fused copy (:func:`robustlab.models.fused.fused_copy`).

Side by side in one process, CPU seconds of this process (``time.process_time``; with one thread these
are core-seconds, which other users of a shared CPU inflate far less than wall-clock seconds). Compare
the printed ratios, not absolute seconds across machines.

1. ``passes``: per architecture, one forward pass (no grad) and one input gradient (forward + backward,
   what every gradient attack step costs) on a batch, for the model as built, BatchNorm folded only,
   channels_last only, and both (the fused copy). Rounds interleave the variants.
2. ``autoattack``: every standard AutoAttack stage on the same images through the model and through its
   fused copy. Labels are the model's own predictions and eps is tiny, so every image stays robust and
   goes through every stage at full cost (seconds per robust image, the unit a grid budget multiplies);
   the per-sample verdicts of the two are compared.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_fused_model.py --parts passes,autoattack \\
        --aa-model resnet18:8 --aa-images 24
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from robustlab.attacks.autoattack import autoattack_stages
from robustlab.models import build_model
from robustlab.models.fused import ChannelsLastInput, fused_copy

#: name, input channels, image size, build options
ARCHITECTURES = {
    "lenet5": (1, 28, {}),
    "resnet18:8": (3, 32, {"width": 8}),
    "preact_resnet18:16": (3, 32, {"width": 16}),
    "efficientnet_b0": (3, 64, {}),
}


def model_with_statistics(spec: str) -> tuple[nn.Module, int, int]:
    """An eval-mode model whose BatchNorm layers hold non-trivial statistics (as a trained one does)."""
    channels, size, options = ARCHITECTURES[spec]
    torch.manual_seed(0)
    model = build_model(spec.split(":")[0], 10, channels, size, **options)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval(), channels, size


def variants(model: nn.Module) -> dict[str, nn.Module]:
    folded = fuse(model, inplace=False)
    layout = ChannelsLastInput(copy.deepcopy(model).to(memory_format=torch.channels_last))  # type: ignore[call-overload]
    built = {"as built": model, "BN folded": folded, "channels_last": layout, "fused copy": fused_copy(model)}
    for net in built.values():
        for parameter in net.parameters():
            parameter.requires_grad_(False)
    return built


def _seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def _input_gradient(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    inputs = x.clone().requires_grad_(True)
    torch.autograd.grad(nn.functional.cross_entropy(net(inputs), y), inputs)


def bench_passes(specs: list[str], batch: int, rounds: int) -> None:
    print("| model | batch | variant | forward s | gradient s | forward speed-up | gradient speed-up |")
    print("|---|---|---|---|---|---|---|")
    for spec in specs:
        model, channels, size = model_with_statistics(spec)
        x = torch.rand(batch, channels, size, size)
        y = torch.randint(0, 10, (batch,))
        nets = variants(model)
        totals = {name: [0.0, 0.0] for name in nets}

        for _ in range(rounds):
            for name, net in nets.items():
                with torch.no_grad():
                    totals[name][0] += _seconds(lambda net=net, x=x: net(x))
                totals[name][1] += _seconds(lambda net=net, x=x, y=y: _input_gradient(net, x, y))
        base_f, base_g = totals["as built"]
        for name, (f, g) in totals.items():
            print(f"| {spec} | {batch} | {name} | {f / rounds:.4f} | {g / rounds:.4f} | "
                  f"{base_f / f:.2f}x | {base_g / g:.2f}x |")


def bench_autoattack(spec: str, images: int) -> None:
    model, channels, size = model_with_statistics(spec)
    torch.manual_seed(1)
    x = torch.rand(images, channels, size, size)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image starts correct, and eps 1e-4 keeps (nearly) all of them robust
    nets = {"model": model, "fused copy": fused_copy(model)}
    seconds = {name: {} for name in nets}
    verdicts = {}
    for name, net in nets.items():
        robust = torch.ones(images, dtype=torch.bool)
        for stage, attack, kwargs in autoattack_stages("standard"):
            generator = torch.Generator().manual_seed(0)
            start = time.process_time()
            x_adv = attack(net, x, y, eps=1e-4, generator=generator, **kwargs)
            seconds[name][stage] = (time.process_time() - start) / images
            with torch.no_grad():
                robust &= model(x_adv).argmax(1) == y  # judged by the model itself in both columns
        verdicts[name] = robust
    print(f"\nAutoAttack (standard) on {spec}, {images} images kept robust (eps 1e-4): CPU s per robust image")
    print("| stage | model | fused copy | speed-up |")
    print("|---|---|---|---|")
    for stage in seconds["model"]:
        a, b = seconds["model"][stage], seconds["fused copy"][stage]
        print(f"| {stage} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    a, b = sum(seconds["model"].values()), sum(seconds["fused copy"].values())
    print(f"| all | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    same = int((verdicts["model"] == verdicts["fused copy"]).sum())
    print(f"robust after every stage: model {int(verdicts['model'].sum())}, fused copy "
          f"{int(verdicts['fused copy'].sum())}; same verdict on {same} of {images}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="passes,autoattack")
    parser.add_argument("--models", default=",".join(ARCHITECTURES))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--aa-model", default="resnet18:8", choices=list(ARCHITECTURES))
    parser.add_argument("--aa-images", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = args.parts.split(",")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if "passes" in parts:
        bench_passes(args.models.split(","), args.batch, args.rounds)
    if "autoattack" in parts:
        bench_autoattack(args.aa_model, args.aa_images)


if __name__ == "__main__":
    main()
