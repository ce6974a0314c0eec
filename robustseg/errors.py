"""User-facing errors: the command-line entry points print these as one clear message, no traceback."""

from __future__ import annotations


class RobustsegError(Exception):
    """Base class of errors caused by the user's input (config, data, checkpoints), not by a bug."""


class ConfigError(RobustsegError, ValueError):
    """A config key, group option or value is invalid; the message names it and the closest valid one."""


class DataError(RobustsegError, ValueError):
    """A dataset, datalist or case is unusable; the message names the file or case and the problem."""


class CheckpointError(RobustsegError, ValueError):
    """A checkpoint does not fit the architecture or label set it is loaded for."""


class OutputError(RobustsegError, OSError):
    """An output location cannot be used: a file where a directory is expected, read-only, or a full disk."""
