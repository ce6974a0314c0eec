"""Attacks made to transfer from a surrogate to an unseen target: MI-FGSM, DI-FGSM (3D), VMI-FGSM.

All are L-inf projected like :class:`~robustseg.attacks.pgd.PGD`. Usage: craft on the surrogate,
``x_adv = attack(surrogate, x, y)``, then score ``target(x_adv)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustseg.attacks.base import check_positive_int, make_generator, parse_budget
from robustseg.attacks.best import track
from robustseg.attacks.losses import LOSSES
from robustseg.attacks.pgd import GradientAttack
from robustseg.errors import ConfigError
from robustseg.registry import ATTACKS


def _l1_normalise(grad: Tensor) -> Tensor:
    """``grad / mean|grad|`` per volume (Dong et al.'s L1 normalisation; the mean keeps the scale size-free)."""
    return grad / grad.abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-12)  # (B, C, D, H, W)


def _uniform(generator: torch.Generator | None, device: torch.device) -> float:
    return float(torch.rand((), generator=generator, device=device))


def diverse_logits(
    model: nn.Module, x: Tensor, generator: torch.Generator | None, resize_rate: float, prob: float
) -> Tensor:
    """3D input diversity (Xie et al., CVPR 2019) for segmentation, aligned back to the labels.

    With probability ``prob`` the volume ``(B, C, D, H, W)`` is shrunk by a random factor in
    ``[resize_rate, 1]`` (trilinear), zero-padded back to ``(D, H, W)`` at a random offset, passed through the
    model, and the logits of the placed region are cropped and resized back to ``(D, H, W)``, so that
    voxel ``v`` of the output still predicts label ``v``. Otherwise the plain forward. One model forward either way.
    """
    size = x.shape[2:]
    if _uniform(generator, x.device) >= prob:
        return model(x)
    scale = resize_rate + (1.0 - resize_rate) * _uniform(generator, x.device)
    small = [max(1, min(n, round(n * scale))) for n in size]
    offsets = [int(_uniform(generator, x.device) * (n - m + 1)) for n, m in zip(size, small)]
    shrunk = F.interpolate(x, size=small, mode="trilinear", align_corners=False)  # (B, C, d, h, w)
    region = tuple(slice(o, o + m) for o, m in zip(offsets, small))
    padded = x.new_zeros(x.shape)
    padded[(slice(None), slice(None), *region)] = shrunk  # (B, C, D, H, W)
    logits = model(padded)[(slice(None), slice(None), *region)]  # (B, K, d, h, w)
    return F.interpolate(logits, size=list(size), mode="trilinear", align_corners=False)  # (B, K, D, H, W)


@ATTACKS.register("mi_fgsm")
@dataclass(frozen=True)
class MIFGSM(GradientAttack):
    """MI-FGSM (Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018).

    ``g <- decay * g + grad / mean|grad|``, ``x <- clip(x + step_size * sign(g))``.

    Args:
        decay: momentum factor ``mu``.
        track_best: return the visited point with the lowest foreground Dice (as :class:`~robustseg.attacks.pgd.PGD`).
    """

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    decay: float = 1.0
    random_start: bool = False
    loss: str = "dice_ce"
    targeted: bool = False
    target: str = "background"
    seed: int | None = None
    track_best: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "decay", parse_budget(self.decay, "decay", type(self).__name__))

    def ascend(self, delta: Tensor, grad: Tensor, memory: Any) -> tuple[Tensor, Any]:
        momentum = _l1_normalise(grad) if memory is None else self.decay * memory + _l1_normalise(grad)
        return delta + self.step_size * momentum.sign(), momentum


@ATTACKS.register("di_fgsm")
@dataclass(frozen=True)
class DIFGSM(MIFGSM):
    """DI-FGSM (Xie et al., "Improving Transferability of Adversarial Examples with Input Diversity",
    CVPR 2019) with a 3D input-diversity transform (:func:`diverse_logits`); ``decay > 0`` gives M-DI2-FGSM.

    Args:
        resize_rate: smallest shrink factor of the random resize, in ``(0, 1]``.
        diversity_prob: probability of transforming the input at a step.
        seed: seeds the transforms (and the random start): same seed, same result.
    """

    decay: float = 0.0
    resize_rate: float = 0.9
    diversity_prob: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if not 0 < float(self.resize_rate) <= 1:
            raise ConfigError(f"{name}.resize_rate: expected a value in (0, 1], got {self.resize_rate!r}")
        if not 0 <= float(self.diversity_prob) <= 1:
            raise ConfigError(f"{name}.diversity_prob: expected a probability in [0, 1], got {self.diversity_prob!r}")

    def gradient(
        self, model: nn.Module, x: Tensor, labels: Tensor, step: int, generator: torch.Generator | None
    ) -> Tensor:
        x = x.detach().requires_grad_(True)
        logits = diverse_logits(model, x, generator, float(self.resize_rate), float(self.diversity_prob))
        value = LOSSES[self.loss](logits, labels)
        (grad,) = torch.autograd.grad(-value if self.targeted else value, x)
        return grad


@ATTACKS.register("vmi_fgsm")
@dataclass(frozen=True)
class VMIFGSM(MIFGSM):
    """VMI-FGSM (Wang and He, "Enhancing the Transferability of Adversarial Attacks through Variance
    Tuning", CVPR 2021): momentum on ``grad + v``, where ``v`` is the mean gradient over ``n_samples``
    uniform neighbours within ``beta * eps`` of the current point minus the gradient there.

    Runs ``steps * (1 + n_samples)`` model forwards.

    Args:
        n_samples: neighbours per step (``N``).
        beta: neighbourhood radius as a multiple of ``eps``.
    """

    n_samples: int = 5
    beta: float = 1.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.n_samples, "n_samples", type(self).__name__)
        object.__setattr__(self, "beta", parse_budget(self.beta, "beta", type(self).__name__))

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        generator = make_generator(self.seed, images.device)
        delta = self.init_delta(images, generator)
        delta = (images + delta).clamp(0, 1) - images
        momentum: Tensor | None = None
        variance = torch.zeros_like(images)
        radius = self.beta * self.eps
        tracker, recorder = self.tracking(model, images, labels)
        net = recorder if recorder is not None else model
        for step in range(self.steps):
            x = images + delta
            if recorder is not None:
                recorder.reset()
            grad = self.gradient(net, x, labels, step, generator)
            track(tracker, recorder, model, x)
            tuned = _l1_normalise(grad + variance)
            momentum = tuned if momentum is None else self.decay * momentum + tuned
            neighbours = torch.zeros_like(images)
            for _ in range(self.n_samples):
                noise = torch.empty_like(images).uniform_(-radius, radius, generator=generator)
                neighbours += self.gradient(model, x + noise, labels, step, generator)
            variance = neighbours / self.n_samples - grad
            delta = self.project(delta + self.step_size * momentum.sign())
            delta = (images + delta).clamp(0, 1) - images
        if tracker is None:
            return images + delta
        track(tracker, None, model, images + delta)
        return tracker.best
