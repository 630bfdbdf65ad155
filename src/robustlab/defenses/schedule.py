"""Training-budget schedules: how the eps an objective trains at grows over the iterations.

The hybrid defence's dynamic augmentation (paper §3.1) ramps ``eps_t`` from a fraction of the target
budget to the target; the other adversarial objectives use the same function, from 0 and linear, as an
optional eps warm-up (``eps_warmup`` epochs), which keeps a small network from stalling near chance
when it meets the full budget on its first batch (seen with PGD-AT on LeNet-5 at MNIST eps 0.3).
"""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["linear", "cosine", "exponential", "step"]


def eps_schedule(
    step: float, ramp_steps: float, eps: float, start_fraction: float = 0.1, schedule: Schedule = "linear",
    plateaus: int = 4,
) -> float:
    """The training budget after ``step`` iterations: the hybrid's ramp (paper §3.1; docs/defences.md).

    With ``p = min(1, step / ramp_steps)`` and ``e0 = eps * start_fraction``:
    linear ``e0 + (eps - e0) p``; cosine ``e0 + (eps - e0)(1 - cos(pi p)) / 2``; exponential (geometric)
    ``e0 (eps / e0) ** p``; step ``e0 + (eps - e0) floor(p * plateaus) / plateaus``. ``ramp_steps <= 0``
    means no ramp (always ``eps``).
    """
    progress = 1.0 if ramp_steps <= 0 else max(0.0, step / ramp_steps)
    if progress >= 1.0:
        return eps
    start = eps * start_fraction
    if schedule == "linear":
        shape = progress
    elif schedule == "cosine":
        shape = (1.0 - math.cos(math.pi * progress)) / 2.0
    elif schedule == "step":
        shape = math.floor(progress * plateaus) / plateaus
    elif schedule == "exponential":
        return 0.0 if start == 0 else start * (eps / start) ** progress
    else:
        raise ValueError(f"unknown eps schedule {schedule!r}")
    return start + (eps - start) * shape
