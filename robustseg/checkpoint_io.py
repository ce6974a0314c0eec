"""Load files that can hold a pickle (checkpoints, state dicts) without ever running code from them.

``torch.load(weights_only=False)`` unpickles arbitrary Python objects, and unpickling can call any function the
file names: a ``.ckpt`` whose pickle runs ``os.system`` runs it the moment it is loaded, before any check of
its contents. robustseg therefore reads every such file with :func:`safe_torch_load`, which loads with
``weights_only=True`` (tensors, containers and plain Python values only) and refuses anything else with a
:class:`~robustseg.errors.CheckpointError` that says what the file holds and how to proceed.

An expert who trusts a file that holds more than weights can name it explicitly, never by default::

    ROBUSTSEG_TRUST_PICKLE=/abs/path/model.ckpt python evaluate.py --target /abs/path/model.ckpt

(several files separated by ``os.pathsep``). Only the files named there are unpickled with
``weights_only=False``, and each such load is logged as a warning. See docs/safety.md.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from robustseg.errors import CheckpointError

log = logging.getLogger(__name__)

TRUST_ENV = "ROBUSTSEG_TRUST_PICKLE"  # os.pathsep-separated files an expert allows to be fully unpickled


def trusted_files() -> set[str]:
    """The real paths listed in ``$ROBUSTSEG_TRUST_PICKLE`` (empty when unset)."""
    raw = os.environ.get(TRUST_ENV, "")
    return {os.path.realpath(p) for p in raw.split(os.pathsep) if p.strip()}


def is_trusted(path: str | Path) -> bool:
    """Whether the user named ``path`` in ``$ROBUSTSEG_TRUST_PICKLE`` (symlinks resolved)."""
    return os.path.realpath(path) in trusted_files()


def _unsafe_globals(path: Path) -> list[str]:
    """The importable names (``module.attr``) a ``torch.save`` archive refers to beyond torch's allowlist."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # not a zip archive, or an older torch without the helper: the caller words it generally
        return []


def _how_to_trust(path: Path) -> str:
    return (
        f"If you trust this file and its origin, name it explicitly: {TRUST_ENV}={os.path.realpath(path)} "
        "(only then is it unpickled with weights_only=False), or re-save its tensors as a plain state dict "
        "(torch.save(model.state_dict(), 'weights.pt')) in the environment that made it; see docs/safety.md"
    )


def safe_torch_load(
    path: str | Path,
    *,
    what: str,
    map_location: str | torch.device = "cpu",
    safe_globals: Sequence[Any] = (),
    trusted: bool = False,
) -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error for every way the file can be unusable.

    Args:
        path: a file written by ``torch.save`` (a Lightning ``.ckpt``, a ``.pt``/``.pth`` state dict, ...).
        what: what the file is, for messages, e.g. ``"checkpoint"`` or ``"state dict of model.yaml"``.
        map_location: where tensors are put; CPU by default (callers move the network themselves).
        safe_globals: extra classes/functions the caller knows to be harmless data types (e.g. numpy scalar
            types in nnU-Net checkpoints), allowed for this load only (``torch.serialization.safe_globals``).
        trusted: load with ``weights_only=False``; for callers with an explicit user opt-in (a config key).
            A file named in ``$ROBUSTSEG_TRUST_PICKLE`` is trusted as well. Never the default.

    Returns:
        Whatever the file holds (usually a dict of tensors / a Lightning checkpoint dict).

    Raises:
        CheckpointError: the file is missing, a directory, empty, truncated or corrupt, not a PyTorch file, or
            holds Python objects other than weights (named, with how to proceed).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: is a directory, not a file written by torch.save")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise CheckpointError(f"{what} {path}: cannot read it: {err.strerror or err}") from None
    if size == 0:
        raise CheckpointError(f"{what} {path}: the file is empty (0 bytes), e.g. an interrupted save or copy")
    if trusted or is_trusted(path):
        log.warning("unpickling %s %s with weights_only=False: trusted explicitly, it may run code", what, path)
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as err:
            raise CheckpointError(f"{what} {path}: cannot be read: {type(err).__name__}: {err}") from None
    try:
        if safe_globals and hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals(list(safe_globals)):
                return torch.load(path, map_location=map_location, weights_only=True)
        if safe_globals:  # torch < 2.5: no scoped allowlist
            torch.serialization.add_safe_globals(list(safe_globals))
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(_refusal(path, what, err)) from None
    except PermissionError as err:
        raise CheckpointError(f"{what} {path}: cannot read it: {err.strerror or err}") from None
    except Exception as err:  # RuntimeError (zip reader), EOFError, ValueError, ...: not a loadable torch file
        raise CheckpointError(
            f"{what} {path}: corrupt or truncated, not a complete file written by torch.save "
            f"({type(err).__name__}: {_first_line(err)})"
        ) from None


def _refusal(path: Path, what: str, err: Exception) -> str:
    """Why ``weights_only=True`` refused ``path``: unsafe objects, a plain pickle, or garbage."""
    if not zipfile.is_zipfile(path):
        return (
            f"{what} {path}: not a PyTorch checkpoint (no torch.save zip archive). It is corrupt, or a plain or "
            "legacy pickle, which robustseg never unpickles because unpickling can run arbitrary code. "
            + _how_to_trust(path)
        )
    names = _unsafe_globals(path)
    held = f"Python objects other than weights ({', '.join(names[:8])})" if names else "Python objects"
    detail = "" if names else f" ({_last_line(err)})"
    return (
        f"{what} {path}: refused to load: it holds {held} that only a full unpickle can rebuild, and unpickling "
        f"can run arbitrary code{detail}. robustseg loads checkpoints with weights_only=True; every checkpoint "
        "robustseg writes loads that way. " + _how_to_trust(path)
    )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no detail"


def _last_line(err: Exception) -> str:
    """torch's weights-only message ends with the reason (e.g. the blocked global) before a docs line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.strip().startswith("Check the")]
    return lines[-1] if lines else "no detail"
