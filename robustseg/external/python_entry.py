"""Models that are code: ``python: package.module:function`` returning an ``nn.Module``.

Loading code named in a YAML file runs that code with the user's rights: it is the user's own choice, as with any
Python import, and robustseg never does it for a spec that does not say ``python:``.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any

from torch import nn

from robustseg.errors import ConfigError

ENTRY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def load_python(
    entry: str, kwargs: dict[str, Any] | None, spec_path: Path, python_path: str | None = None
) -> nn.Module:
    """Import ``package.module``, call ``function(**kwargs)`` and check it returned a module.

    Args:
        python_path: a folder (relative to the spec) put first on ``sys.path`` before the import.
    """
    if not isinstance(entry, str) or not ENTRY.match(entry):
        raise ConfigError(f"{spec_path}: python: expected 'package.module:function', got {entry!r}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ConfigError(f"{spec_path}: kwargs: expected a mapping of keyword arguments, got {kwargs!r}")
    if python_path:
        folder = Path(python_path) if Path(python_path).is_absolute() else spec_path.parent / python_path
        if not folder.is_dir():
            raise ConfigError(f"{spec_path}: python_path: folder {python_path!r} not found (looked for {folder})")
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    module_name, function_name = entry.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{spec_path}: python: cannot import {module_name!r} ({err})") from err
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"{spec_path}: python: {module_name!r} has no callable {function_name!r}")
    try:
        net = function(**(kwargs or {}))
    except TypeError as err:
        raise ConfigError(f"{spec_path}: kwargs: {entry} rejected the keyword arguments {kwargs}: {err}") from err
    if not isinstance(net, nn.Module):
        raise ConfigError(f"{spec_path}: python: {entry} returned {type(net).__name__}, expected a torch.nn.Module")
    return net
