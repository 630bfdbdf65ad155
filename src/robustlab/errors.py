"""User-facing errors.

Every mistake a user can make (bad config key, unknown dataset, eps out of range, images in [0, 255],
a corrupt checkpoint, missing data offline) raises :class:`RobustlabError`. The CLI turns it into one
clear line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations


class RobustlabError(Exception):
    """A mistake in the user's input, explained in one line."""

    def __str__(self) -> str:
        # one line even when the message quotes a key, value or file name that holds a newline
        return " ".join(super().__str__().splitlines())


class ConfigError(RobustlabError):
    """A config file or override that does not validate."""


class DataError(RobustlabError):
    """A dataset that is unknown, missing or malformed."""


class CheckpointError(RobustlabError):
    """A run directory or weight file that is missing, truncated or corrupt."""


class InputError(RobustlabError):
    """Tensors handed to an attack or metric that break the pixel-space convention."""
