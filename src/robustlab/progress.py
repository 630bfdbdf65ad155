"""Progress output that suits where it goes: a live bar on a terminal, plain lines in a log.

A tqdm bar redraws itself with a carriage return on every update. On a terminal that is one line that
moves; in a log file (a grid worker's output, CI, ``nohup``, ``| tee``) it is thousands of partial
lines. So the bar is drawn only when standard error is a terminal, and long work reports its steps
(one line per epoch, one per attack) with :func:`progress_line`, which reads the same in both places.
"""

from __future__ import annotations

import sys
from typing import IO

from tqdm.auto import tqdm

__all__ = ["is_terminal", "progress_bar", "progress_line"]


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default: standard error, where bars go) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(*, total: int, desc: str, enabled: bool = True, unit: str = "batch", initial: int = 0) -> tqdm:
    """A tqdm bar that is drawn only when ``enabled`` and standard error is a terminal.

    Elsewhere the returned bar is disabled (its ``update`` / ``set_postfix`` cost nothing), and the
    caller's :func:`progress_line` calls are all that reaches the log.
    """
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False,
                disable=not (enabled and is_terminal()))


def progress_line(text: str, enabled: bool = True, file: IO[str] | None = None) -> None:
    """Print one line of progress (above a live bar, if there is one); nothing when not ``enabled``."""
    if enabled:
        tqdm.write(text, file=file)
