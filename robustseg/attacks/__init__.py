"""Adversarial attacks on volumetric segmentation. Importing this package registers every attack in ``ATTACKS``.

Public API: ``ATTACKS.build({"name": ..., **fields})`` -> a frozen dataclass ``attack``;
``attack(model, images, labels) -> adversarial``; ``attack_volume(...)`` for whole volumes; ``LOSSES[name]``.
"""

from __future__ import annotations

from robustseg.attacks import apgd, cospgd, noise, pgd, segpgd, transfer, vafa  # noqa: F401  (import = registration)
from robustseg.attacks.base import Attack, parse_budget
from robustseg.attacks.losses import LOSSES
from robustseg.attacks.ssim import perceptibility, ssim3d
from robustseg.attacks.targets import TARGETS
from robustseg.attacks.volume import SlidingWindowModel, attack_volume
from robustseg.registry import ATTACKS

__all__ = [
    "ATTACKS",
    "LOSSES",
    "TARGETS",
    "Attack",
    "SlidingWindowModel",
    "attack_volume",
    "parse_budget",
    "perceptibility",
    "ssim3d",
]
