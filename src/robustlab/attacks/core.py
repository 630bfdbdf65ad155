"""The shared core of every gradient attack: state guard, input gradients, projections, and PGD.

``pgd`` is the one iterative first-order loop in the library (Madry et al. 2018). FGSM (Goodfellow et
al. 2015) is PGD with one full step and no random start; MI-FGSM (Dong et al. 2018) is PGD with
``momentum``; CW-Linf is PGD on the CW margin; the BPDA/EOT wrappers only change the model it sees.
Attacks are pure: the model's train/eval mode, its parameters, their requires_grad flags and its
buffers (BatchNorm running statistics) are restored exactly, and every output satisfies
``||x_adv - x||_p <= eps`` and ``0 <= x_adv <= 1``.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from robustlab.attacks.losses import objective
from robustlab.devices import to_device
from robustlab.errors import InputError
from robustlab.validation import check_batch, check_eps

Model = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Restore on exit, exactly, the buffers of every module in train mode (BatchNorm's ``running_mean``,
    ``running_var`` and ``num_batches_tracked``): forward passes inside still normalise with each batch's
    statistics, as training does, but leave no trace in the running ones. Modules in eval mode are not
    snapshotted: torch's modules never write their buffers there."""
    saved = [(b, b.detach().clone()) for m in model.modules() if m.training for b in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@contextlib.contextmanager
def frozen(model: Model) -> Iterator[None]:
    """Turn off parameter gradients for the attack, then restore every flag, the train/eval mode and buffers.

    The model is *not* switched to eval mode: the caller decides (evaluation runs in eval mode; a
    training objective may attack in either). Parameter tensors are never written, and the buffers of
    a train-mode model are restored (:func:`buffers_kept`): an attack's forward passes must not leave a
    trace in the running statistics.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    modes = [m.training for m in model.modules()]
    try:
        with buffers_kept(model):
            for p in params:
                p.requires_grad_(False)
            yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode


def input_gradient(
    model: Model,
    x: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    check_labels: tuple[torch.Tensor | None, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient of the summed per-sample ``loss_fn`` w.r.t. ``x``; returns (grad, per-sample loss, logits).

    ``check_labels`` are checked against the number of logits before the loss indexes them (how
    ``pgd`` validates labels without a separate probe forward pass).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        if check_labels:
            check_logits(logits, *check_labels)
        loss = loss_fn(logits, labels)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad.detach(), loss.detach(), logits.detach()


def _flat_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    return t.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (t.dim() - 1)))


def lp_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample ``norm`` ('linf' or 'l2') of a batch of perturbations, shape (N,)."""
    return t.flatten(1).norm(p=float("inf") if norm == "linf" else 2.0, dim=1)


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector (N,) so it broadcasts against the batch ``like`` (N, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def check_call(x: torch.Tensor, y: torch.Tensor, eps: float, norm: str) -> None:
    """The model-free half of :func:`check_attack_inputs`: images, labels, budget and norm."""
    check_batch(x, y)
    check_eps(eps, norm)
    if norm not in ("linf", "l2"):
        raise InputError(f"norm must be 'linf' or 'l2', got {norm!r}")


def check_classes(num_classes: int, *labels: torch.Tensor | None) -> None:
    """Raise :class:`~robustlab.errors.InputError` if a label is not one of the model's ``num_classes``."""
    for t in labels:
        if t is not None and t.numel() and int(t.max()) >= num_classes:
            raise InputError(f"labels must be < {num_classes} (the model's classes), found {int(t.max())}")


def check_logits(logits: torch.Tensor, *labels: torch.Tensor | None) -> None:
    """Check labels against the model's classes, and warn when the model's outputs are not finite.

    A model with NaN weights (a diverged run) returns NaN logits; their gradients are NaN and an attack
    would hand back images that are not adversarial examples at all, without a word. Called once per
    attack (on its first forward pass), never per iteration.
    """
    check_classes(logits.shape[1], *labels)
    if not bool(torch.isfinite(logits).all()):
        warnings.warn(
            "the model returned NaN or infinite logits; gradients through them are meaningless, so the "
            "attack's output is not an adversarial example (check the model's weights)",
            RuntimeWarning,
            stacklevel=4,
        )


def check_attack_inputs(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str) -> None:
    """Validate an attack call once, with one clear :class:`~robustlab.errors.InputError` per mistake.

    Checks the pixel-space images, the budget, the norm, and that every label is a class the model
    actually outputs (one eval-mode forward pass of a single image; mode and flags are restored).
    ``pgd`` skips that probe and checks the labels against the logits of its own first forward pass.
    """
    check_call(x, y, eps, norm)
    with frozen(model), torch.no_grad():
        if isinstance(model, nn.Module):
            model.eval()
        logits = model(x[:1])
    check_logits(logits, y)


def project(delta: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """Project a perturbation onto the Linf or L2 ball of radius ``eps`` (scalar or per-sample)."""
    if isinstance(eps, torch.Tensor):
        eps = eps.view(-1, *([1] * (delta.dim() - 1)))
        if norm == "linf":
            return torch.maximum(torch.minimum(delta, eps), -eps)
    elif norm == "linf":
        return delta.clamp(-eps, eps)
    factor = (eps / _flat_norm(delta, 2).clamp_min(1e-12)).clamp(max=1.0)
    return delta * factor


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction under the norm: sign for Linf, unit-L2 gradient for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / _flat_norm(grad, 2).clamp_min(1e-12)


def random_init(
    x: torch.Tensor, eps: float | torch.Tensor, norm: str, generator: torch.Generator | None
) -> torch.Tensor:
    """A uniform random start in the Linf ball, or a uniform point in the L2 ball."""
    if isinstance(eps, torch.Tensor):
        eps = eps.view(-1, *([1] * (x.dim() - 1)))
    if norm == "linf":
        noise = to_device(torch.rand(x.shape, generator=generator), x.device) * 2 - 1
        return noise * eps
    direction = to_device(torch.randn(x.shape, generator=generator), x.device)
    direction = direction / _flat_norm(direction, 2).clamp_min(1e-12)
    radius = to_device(torch.rand(x.shape[0], generator=generator), x.device)
    radius = radius.pow(1.0 / x[0].numel()).view(-1, *([1] * (x.dim() - 1)))
    return direction * radius * eps


def clip_to_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """Project ``x_adv`` back into the eps-ball around ``x`` and the [0, 1] box."""
    return (x + project(x_adv - x, eps, norm)).clamp_(0.0, 1.0)


def pgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    random_start: bool = True,
    restarts: int = 1,
    loss: str = "ce",
    targeted: bool = False,
    target: torch.Tensor | None = None,
    momentum: float = 0.0,
    early_stop: bool = False,
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Projected gradient ascent on ``loss`` inside the ``norm`` ball of radius ``eps``.

    Args:
        step_size: defaults to ``2.5 * eps / steps`` (Madry et al.'s rule of thumb).
        restarts: independent random restarts; a sample keeps the first restart that fools the model,
            and one that none fools keeps the last restart's point.
        targeted: move towards ``target`` (required) instead of away from ``y``.
        momentum: MI-FGSM decay factor mu (Dong et al. 2018); 0 gives plain PGD.
        early_stop: stop updating a sample once it is misclassified (targeted: classified as target).
            This never weakens an accuracy evaluation (the sample already counts as broken) and saves
            compute; adversarial *training* wants the loss maximiser instead, so it is off by default.
    Returns:
        x_adv with ``||x_adv - x||_norm <= eps`` and values in [0, 1].
    """
    if validate:
        check_call(x, y, eps, norm)
    elif norm not in ("linf", "l2"):
        raise InputError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if targeted and target is None:
        raise InputError("a targeted attack needs target labels")
    # a zero step is a zero budget's (an eps warm-up starts there); with a budget it attacks nothing
    budget = isinstance(eps, int | float) and eps > 0
    idle_step = step_size is not None and (step_size < 0 or (step_size == 0 and budget))
    if steps < 0 or restarts < 1 or idle_step:
        raise InputError(f"pgd needs steps >= 0, restarts >= 1 and step_size > 0, got steps={steps}, "
                         f"restarts={restarts}, step_size={step_size}")
    if eps == 0 or steps == 0:
        if validate:  # no forward pass of our own follows to check the labels on
            check_attack_inputs(model, x, y, eps, norm)
        return x.detach().clone()
    step_size = 2.5 * eps / steps if step_size is None else step_size
    labels = target if targeted else y
    loss_fn = objective(loss, targeted)
    # labels are checked against the model's classes on the first forward pass, not by a probe pass
    check_labels = (y, target) if validate else ()
    x = x.detach()
    with frozen(model):
        if restarts <= 1:
            return _pgd_run(
                model, x, labels, y, eps, steps, step_size, norm, random_start, loss_fn, targeted,
                momentum, early_stop, generator, False, check_labels,
            )[0]
        best = x.clone()
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for restart in range(restarts):
            todo: torch.Tensor | slice = (~fooled).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            if todo.numel() == x.shape[0]:
                todo = slice(None)  # the whole batch: views instead of gathered copies
            x_adv, done = _pgd_run(
                model, x[todo], labels[todo], y[todo], eps, steps, step_size, norm,
                random_start, loss_fn, targeted, momentum, early_stop, generator, restart + 1 < restarts,
                check_labels if restart == 0 else (),
            )
            best[todo] = x_adv
            fooled[todo] = done
    return best


def is_fooled(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor, targeted: bool) -> torch.Tensor:
    return logits.argmax(1) == target if targeted else misclassified(logits, y)


def misclassified(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.argmax(1) != y


def float32_logits(model: Model, x: torch.Tensor) -> torch.Tensor:
    """The model's logits without gradients and in float32, even inside a bfloat16 autocast region.

    Every decision an attack takes on a sample (already misclassified, broken, closer adversarial found)
    is the float32 model's: bfloat16 logits near the decision boundary can tie or flip, and an attack
    that stopped on a bfloat16-only success would leave an image the evaluation's float32 verdict
    counts as robust.
    """
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        return model(x)


def float32_confirmed(
    model: Model, x: torch.Tensor, hit: torch.Tensor, judge: Callable[..., torch.Tensor], *labels: torch.Tensor
) -> torch.Tensor:
    """``hit``, judged on logits of ``x`` from the attack's own (gradient) forward pass, kept only where
    the float32 model agrees.

    Outside autocast the logits already are the float32 model's: ``hit`` is returned as is, with no
    extra forward pass and no host synchronisation. Under autocast the rows that hit are re-classified
    by :func:`float32_logits` (one host read for their indices) and ``judge(logits, *labels)`` decides
    them again, each of ``labels`` (aligned with ``x``) restricted to those rows.
    """
    if not torch.is_autocast_enabled(x.device.type):
        return hit
    rows = hit.nonzero().squeeze(1)
    if rows.numel() == 0:
        return hit
    confirmed = hit.clone()
    confirmed[rows] = judge(float32_logits(model, x[rows]), *(t[rows] for t in labels))
    return confirmed


def _pgd_run(
    model: Model,
    x: torch.Tensor,
    labels: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
    norm: str,
    random_start: bool,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    targeted: bool,
    momentum: float,
    early_stop: bool,
    generator: torch.Generator | None,
    verdict: bool,
    check_labels: tuple[torch.Tensor | None, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """One PGD run from one (random) start; returns (x_adv, fooled).

    ``fooled`` is exact only with ``early_stop`` or ``verdict`` (an extra forward pass, needed only when
    another restart follows); without early stopping each step replaces the whole batch (no gathers or copies).
    """
    if random_start:
        x_adv = clip_to_ball(x + random_init(x, eps, norm, generator), x, eps, norm)
    else:  # written in place only under early stopping
        x_adv = x.clone() if early_stop else x
    velocity = torch.zeros_like(x) if momentum else x
    judge = functools.partial(is_fooled, targeted=targeted)
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    active: torch.Tensor | slice = torch.arange(x.shape[0], device=x.device) if early_stop else slice(None)
    for step_index in range(steps):
        grad, _, logits = input_gradient(
            model, x_adv[active], labels[active], loss_fn, check_labels if step_index == 0 else ()
        )
        if isinstance(active, torch.Tensor):
            y_now, labels_now = y[active], labels[active]
            hit = float32_confirmed(model, x_adv[active], judge(logits, y_now, labels_now), judge, y_now, labels_now)
            fooled[active] = hit  # every active sample was unfooled: an index write, no host read
            keep = ~hit
            active, grad = active[keep], grad[keep]
            if active.numel() == 0:
                break
        if momentum:
            grad = grad / grad.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            velocity[active] = momentum * velocity[active] + grad
            grad = velocity[active]
        step = x_adv[active] + step_size * ascent_direction(grad, norm)
        if isinstance(active, slice):  # the whole batch: a new tensor instead of a copy into x_adv
            x_adv = clip_to_ball(step, x, eps, norm)
        else:
            x_adv[active] = clip_to_ball(step, x[active], eps, norm)
    if verdict and (not isinstance(active, torch.Tensor) or active.numel()):
        logits = float32_logits(model, x_adv[active])
        fooled[active] = is_fooled(logits, y[active], labels[active], targeted)
    return x_adv.detach(), fooled


def fgsm(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    targeted: bool = False,
    target: torch.Tensor | None = None,
    random_start: bool = False,
    step_size: float | None = None,
    loss: str = "ce",
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Fast Gradient Sign Method: one step of size eps (Goodfellow et al. 2015).

    With ``random_start=True`` and ``step_size=1.25 * eps`` this is the FGSM-RS of fast adversarial
    training (Wong et al. 2020).
    """
    return pgd(
        model, x, y, eps=eps, steps=1, step_size=eps if step_size is None else step_size, norm=norm,
        random_start=random_start, loss=loss, targeted=targeted, target=target, generator=generator,
        validate=validate,
    )
