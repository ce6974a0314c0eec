"""Named rules that derive a target label map for targeted attacks, the same way on every tile, batch and case.

A rule maps labels ``(B, 1, D, H, W)`` int64 and the number of classes ``K`` of the model to a target map of the
same shape, voxel by voxel: class ``k`` goes to the same target class wherever it occurs. A rule never looks at
which classes happen to be present (that is what a tile or a training batch would change), only at ``K``.
Attacks pick one by name with their ``target`` field; an explicit map can instead be passed as
``attack(model, x, y, target=map)``. To add a rule, add one function to ``TARGETS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from robustseg.errors import ConfigError

Rule = Callable[[Tensor, int], Tensor]


def background(labels: Tensor, num_classes: int) -> Tensor:
    """Every voxel to class 0: the attack tries to erase all foreground (organs, tumours)."""
    return torch.zeros_like(labels)


def foreground_swap(labels: Tensor, num_classes: int) -> Tensor:
    """Every foreground class ``k`` to ``k + 1``, class ``K - 1`` wrapping to 1; background stays.

    A harder target than ``background``: organs must be relabelled as other organs. Needs ``K >= 3`` (two
    foreground classes), else some class would map to itself.
    """
    if num_classes < 3:
        raise ConfigError(
            f"attack.target: foreground_swap needs at least two foreground classes (num_classes >= 3), got "
            f"num_classes={num_classes}; use target=background"
        )
    swapped = labels % (num_classes - 1) + 1  # 1 -> 2, ..., K-2 -> K-1, K-1 -> 1
    return torch.where(labels > 0, swapped, labels)


class _Rules(dict):
    """``dict`` whose missing keys raise ``ConfigError`` listing the known rules."""

    def __missing__(self, name: str) -> Rule:
        raise ConfigError(f"attack.target: unknown target rule {name!r}; known: {sorted(self)}")


TARGETS: Mapping[str, Rule] = _Rules(background=background, foreground_swap=foreground_swap)


def derive_target(rule: str, labels: Tensor, num_classes: int) -> Tensor:
    """The target map ``(B, 1, D, H, W)`` of ``labels`` under the named rule, checked with :func:`check_target`.

    Call it once on a whole volume (``attack_volume`` does, before tiling) or with the model's ``num_classes``.
    """
    if int(labels.max()) >= num_classes or int(labels.min()) < 0:
        raise ValueError(
            f"attack.target: labels span {int(labels.min())}..{int(labels.max())} but the model has "
            f"{num_classes} classes"
        )
    target = TARGETS[rule](labels, num_classes)
    check_target(target, labels, f"target rule {rule!r}")
    return target


def check_target(target: Tensor, labels: Tensor, who: str = "attack") -> None:
    """Raise ``ValueError`` when ``target`` equals the true ``labels`` on a map with foreground: a targeted attack
    towards the truth only makes the prediction better."""
    if target.shape != labels.shape:
        raise ValueError(f"{who}: target map shape {tuple(target.shape)} != labels {tuple(labels.shape)}")
    if bool((labels > 0).any()) and torch.equal(target.to(labels), labels):
        raise ValueError(
            f"{who}: the target map equals the true labels; a targeted attack would push towards the truth"
        )
