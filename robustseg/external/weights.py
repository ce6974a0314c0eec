"""Reading weight files without executing code from them (through :func:`robustseg.checkpoint_io.safe_torch_load`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from robustseg.checkpoint_io import safe_torch_load


def numpy_data_globals() -> list[Any]:
    """numpy scalar and dtype reconstructors: plain data (nnU-Net checkpoints log numpy floats), never code."""
    import numpy.dtypes as dtypes

    allowed: list[Any] = [np.dtype, *(getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType"))]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            allowed.append(__import__(module, fromlist=["scalar"]).scalar)
        except (ImportError, AttributeError):
            continue
    return allowed


def safe_load(path: str | Path, what: str = "weights") -> Any:
    """``torch.load(weights_only=True)`` with numpy scalars allowed as data; anything needing code is refused.

    Raises:
        CheckpointError: the file is missing, unreadable, or holds objects only a full unpickle could rebuild.
    """
    return safe_torch_load(path, what=what, safe_globals=numpy_data_globals())
