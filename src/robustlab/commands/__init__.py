"""Sub-commands beyond train / evaluate / demo, one module each.

Every module here defines its command(s) with ``@app.command()`` on ``robustlab.cli.app``; the CLI
imports them all at start-up (``load_commands``), so adding a command never touches ``cli.py``.
"""

from __future__ import annotations

import importlib
import pkgutil


def load_commands() -> None:
    """Import every module of this package so its commands register themselves."""
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{module}")
