"""Gaussian noise: the random baseline of Malik et al. (BMVC 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from robustseg.attacks.base import Attack, make_generator, set_budgets
from robustseg.errors import ConfigError
from robustseg.registry import ATTACKS


@ATTACKS.register("gn")
@dataclass(frozen=True)
class GN(Attack):
    """Additive Gaussian noise ``x + sigma N(0, 1)``, clipped to ``[0, 1]``; no model forward.

    Args:
        sigma: standard deviation in ``[0, 1]`` intensity units (float or ``"8/255"``).
        seed: noise seed (same seed, same noise); ``None`` follows the global torch RNG.
        allow_large_budget: accept ``sigma >= 1`` (refused by default: almost always ``8`` meant as ``8/255``).
    """

    uses_gradients: ClassVar[bool] = False

    sigma: float = 8 / 255
    seed: int | None = None
    allow_large_budget: bool = False

    def __post_init__(self) -> None:
        set_budgets(self, "sigma")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"GN.seed: expected an integer or null, got {self.seed!r}")

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        if self.sigma == 0:
            return images.clone()
        generator = make_generator(self.seed, images.device)
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        return images + self.sigma * noise
