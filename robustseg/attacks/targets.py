"""Named rules that derive a target label map from the true labels, for targeted attacks.

A rule maps labels ``(B, 1, D, H, W)`` int64 to a target map of the same shape. Attacks pick one by name with
their ``target`` field; an explicit map can instead be passed as ``attack(model, x, y, target=map)``.
To add a rule, add one function to ``TARGETS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from robustseg.errors import ConfigError


def background(labels: Tensor) -> Tensor:
    """Every voxel to class 0: the attack tries to erase all foreground (organs, tumours)."""
    return torch.zeros_like(labels)


def foreground_swap(labels: Tensor) -> Tensor:
    """Every foreground class ``k`` to ``k + 1`` (the largest present class wraps to 1); background stays.

    A harder target than ``background``: organs must be relabelled as other organs.
    """
    top = int(labels.max())
    if top < 2:
        return labels.clone()
    swapped = labels % top + 1  # 1 -> 2, ..., top -> 1
    return torch.where(labels > 0, swapped, labels)


class _Rules(dict):
    """``dict`` whose missing keys raise ``ConfigError`` listing the known rules."""

    def __missing__(self, name: str) -> Callable[[Tensor], Tensor]:
        raise ConfigError(f"attack.target: unknown target rule {name!r}; known: {sorted(self)}")


TARGETS: Mapping[str, Callable[[Tensor], Tensor]] = _Rules(background=background, foreground_swap=foreground_swap)
