"""Segmentation losses an attack can maximise, selected by name with the attack's ``loss`` field.

Each maps logits ``(B, K, D, H, W)`` and labels ``(B, 1, D, H, W)`` int64 to a scalar.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from torch import Tensor

from robustseg.errors import ConfigError

LossFn = Callable[[Tensor, Tensor], Tensor]

# The papers' attack loss: MONAI DiceCE with one-hot labels and softmax logits (Hanif et al.; Malik et al.).
_DICE_CE = DiceCELoss(to_onehot_y=True, softmax=True)
_DICE = DiceLoss(to_onehot_y=True, softmax=True)


def ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Voxel-averaged cross-entropy."""
    return F.cross_entropy(logits, labels[:, 0])


def dice_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``: soft Dice plus cross-entropy, as in the papers."""
    return _DICE_CE(logits, labels)


def dice(logits: Tensor, labels: Tensor) -> Tensor:
    """MONAI ``DiceLoss(to_onehot_y=True, softmax=True)``."""
    return _DICE(logits, labels)


def masked_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy averaged over the voxels still predicted correctly (0 when none is).

    Spends the whole budget on voxels not yet flipped instead of pushing wrong voxels further.
    """
    per_voxel = F.cross_entropy(logits, labels[:, 0], reduction="none")  # (B, D, H, W)
    correct = (logits.argmax(dim=1) == labels[:, 0]).to(per_voxel.dtype)  # (B, D, H, W)
    return (per_voxel * correct).sum() / correct.sum().clamp_min(1.0)


class _Losses(dict):
    """``dict`` whose missing keys raise ``ConfigError`` listing the known losses."""

    def __missing__(self, name: str) -> LossFn:
        raise ConfigError(f"attack.loss: unknown loss {name!r}; known: {sorted(self)}")


LOSSES: Mapping[str, LossFn] = _Losses(ce=ce, dice_ce=dice_ce, dice=dice, masked_ce=masked_ce)


def check_loss(name: str, attack: str, *, targeted: bool = False) -> None:
    """Raise ``ConfigError`` for an unknown loss, or for ``masked_ce`` in targeted mode (it has no meaning there)."""
    if name not in LOSSES:
        raise ConfigError(f"{attack}.loss: unknown loss {name!r}; known: {sorted(LOSSES)}")
    if targeted and name == "masked_ce":
        raise ConfigError(f"{attack}.loss: masked_ce is untargeted only; use ce, dice or dice_ce with targeted=true")


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """Labels ``(B, 1, D, H, W)`` to a float one-hot ``(B, K, D, H, W)``."""
    return F.one_hot(labels[:, 0], num_classes).movedim(-1, 1).float()  # (B, K, D, H, W)


__all__ = ["LOSSES", "ce", "check_loss", "dice", "dice_ce", "masked_ce", "one_hot"]
