"""Checks of the evaluation settings and the output location, before anything is written.

Every bad value is a :class:`~robustseg.errors.ConfigError` naming the key, the value and what was expected;
the output directory is created only after the configuration, the models and the output location are known to
be valid, so a failed start leaves nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from robustseg.errors import ConfigError
from robustseg.evaluation.lock import POLICIES

MODES = ("pipeline", "tiles")


def max_cases(value: Any) -> int | None:
    """``max_cases``: a positive integer or null (all cases).

    Raises:
        ConfigError: ``0``, negative numbers, booleans, fractions and text are refused, naming the value.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"max_cases={value!r}: expected a positive integer or null (all cases)")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"max_cases={value!r}: expected a positive integer or null (all cases)") from None
    if number < 1:
        raise ConfigError(f"max_cases={value!r}: expected a positive integer (>= 1) or null (all cases)")
    return number


def settings(cfg: Any) -> None:
    """The evaluation keys that need no data or model to check."""
    if cfg.attack_mode not in MODES:
        raise ConfigError(f"attack_mode={cfg.attack_mode!r}: expected one of {list(MODES)}")
    max_cases(cfg.get("max_cases"))
    lock = str(cfg.get("lock", "fail"))
    if lock not in POLICIES:
        raise ConfigError(f"lock={lock!r}: expected one of {list(POLICIES)} (fail at once, or wait for the owner)")


def output_location(out: Path) -> None:
    """``out`` must be a directory or creatable as one, and writable; raises before anything is written.

    Raises:
        ConfigError: ``output_dir`` is an existing file, under a file, or not writable (named).
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={str(out)!r} is an existing file, not a directory; choose another output_dir")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"output_dir={str(out)!r}: {probe} is a file, so the directory cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"output_dir={str(out)!r}: {probe} is not writable by this user; choose a writable output_dir"
        )


def make_output_dir(out: Path) -> None:
    """Create ``out``; an OS error (read-only or full file system) becomes a ConfigError naming the path."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output_dir={str(out)!r}: cannot create it ({err.strerror or err})") from err
