"""Segmentation networks. Importing this package registers every builder in ``MODELS``."""

from __future__ import annotations

from robustseg.models import monai_nets, umamba  # noqa: F401  (import = registration)
from robustseg.models.tiny import TINY
from robustseg.registry import MODELS

__all__ = ["MODELS", "TINY"]
