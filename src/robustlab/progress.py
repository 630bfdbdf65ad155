"""Progress output that suits where it goes: a live bar on a terminal, plain lines in a log.

A tqdm bar redraws itself with a carriage return on every update. On a terminal that is one line that
moves; in a log file (a grid worker's output, CI, ``nohup``, ``| tee``) it is thousands of partial
lines. So the bar is drawn only when standard error is a terminal, and long work reports its steps
(one line per epoch, one per attack) with :func:`progress_line`, which reads the same in both places.
Between those lines a log gets a heartbeat instead of the bar: the bar's count and time left, one
line at most every :data:`HEARTBEAT_SECONDS`, so that an hour-long epoch or attack is not an hour of
silence; and when a single step takes long (one batch of FAB-T on EfficientNet: most of an hour), a
line every :data:`STALL_SECONDS` that says the step is still running and for how long.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from typing import IO, Any

from tqdm.auto import tqdm

__all__ = ["HEARTBEAT_SECONDS", "STALL_SECONDS", "is_terminal", "progress_bar", "progress_line"]

HEARTBEAT_SECONDS = 60.0
"""The least time between two heartbeat lines of one bar in a log."""

STALL_SECONDS = 600.0
"""Without an update for this long, a bar in a log says that its current step is still running."""


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default: standard error, where bars go) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(
    *, total: int, desc: str, enabled: bool = True, unit: str = "batch", initial: int = 0
) -> tqdm | _Heartbeat:
    """A tqdm bar, drawn when ``enabled`` and standard error is a terminal; in a log, its heartbeat.

    Either way the result has ``disable`` set when no live bar is drawn, so that callers print their
    per-step :func:`progress_line` calls only where no bar shows the same.
    """
    if enabled and not is_terminal():
        return _Heartbeat(total=total, desc=desc, unit=unit, initial=initial)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, disable=not enabled)


class _Heartbeat:
    """What stands for a bar in a log: a whole line with the bar's count, elapsed and remaining time,
    written to standard error at most every :data:`HEARTBEAT_SECONDS` and never once the work is done;
    and, from a watcher thread, a line after every :data:`STALL_SECONDS` without an update, until
    :meth:`close`.

    Takes the calls a tqdm bar takes (``update``, ``set_postfix``, ``set_postfix_str``, ``close``).
    """

    disable = True  # no live bar: the callers' per-step lines are still wanted

    def __init__(self, *, total: int, desc: str, unit: str, initial: int) -> None:
        self.total, self.desc, self.unit, self.initial, self.n = total, desc, unit, initial, initial
        self.postfix = ""
        self._started = self._last = self._updated = time.monotonic()
        self._closed = threading.Event()
        # the watcher holds the bar only weakly: a bar dropped without close() (its loop raised) stops it too
        threading.Thread(target=_watch, args=(weakref.ref(self), self._closed), name=f"heartbeat {desc}",
                         daemon=True).start()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._updated = time.monotonic()
        if self.n < self.total and now - self._last >= HEARTBEAT_SECONDS:
            self._last = now
            line = tqdm.format_meter(
                self.n, self.total, now - self._started, prefix=self.desc, unit=self.unit, postfix=self.postfix,
                initial=self.initial, bar_format="{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]",
            )
            print(line, file=sys.stderr, flush=True)

    def _say_if_stalled(self) -> None:
        now = time.monotonic()
        if now - self._updated >= STALL_SECONDS and now - self._last >= STALL_SECONDS and self.n < self.total:
            self._last = now
            line = (f"{self.desc}: {self.n}/{self.total} {self.unit}, still working: no {self.unit} finished for "
                    f"{tqdm.format_interval(now - self._updated)} ({tqdm.format_interval(now - self._started)} in all)")
            sys.stderr.write(line + "\n")  # one write: a line from this thread never splits another's
            sys.stderr.flush()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in {**(ordered_dict or {}), **kwargs}.items())

    def close(self) -> None:
        """Stop the watcher; nothing to clear: a log keeps its lines."""
        self._closed.set()


def _watch(bar: weakref.ref[_Heartbeat], closed: threading.Event) -> None:
    """Until the bar is closed or gone: after every STALL_SECONDS without an update, say so."""
    while not closed.wait(STALL_SECONDS / 10):
        alive = bar()
        if alive is None:
            return
        alive._say_if_stalled()
        del alive


def progress_line(text: str, enabled: bool = True, file: IO[str] | None = None) -> None:
    """Print one line of progress (above a live bar, if there is one); nothing when not ``enabled``."""
    if enabled:
        tqdm.write(text, file=file)
