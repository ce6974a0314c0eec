"""Adversarial training objectives: the papers' AT, a clean/adversarial mix, and VAFT.

References: Madry et al., ICLR 2018 (adversarial training); Hanif et al., MICCAI 2023 (VAFT).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from robustseg.attacks.frequency import dct_matrix

if TYPE_CHECKING:
    from robustseg.systems.segmentation import SegmentationSystem

log = logging.getLogger(__name__)


class _ScaleGrad(torch.autograd.Function):
    """Casts to float32 on the way forward; on the way back multiplies the float32 gradient by ``scale`` *before*
    casting it to the (possibly float16) dtype of the logits, so small gradients survive the cast."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        ctx.dtype = x.dtype
        return x.float()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return (grad.float() * ctx.scale).to(ctx.dtype), None


class AttackView(nn.Module):
    """The plain network as a training-time attack sees it.

    * ``grad_scale`` multiplies the gradient flowing back from the logits: under fp16 autocast small input
      gradients underflow to zero (which looks like gradient masking); every attack here uses only the
      gradient's direction (sign, L1 or L2 normalised), so a power-of-two scale changes nothing but the
      underflow.
    * The fraction of exactly-zero input-gradient entries of every backward is recorded
      (AutoAttack's zero-gradient check) and read with :meth:`zero_grad_fraction`.
    """

    def __init__(self, net: nn.Module, grad_scale: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.grad_scale = grad_scale
        self.train(net.training)  # so the attack restores the network's own mode
        self._zero_fractions: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad:
            x = x.view_as(x)  # a fresh node per call, so a reused leaf does not collect one hook per call
            x.register_hook(self._record)
        logits = self.net(x)
        return _ScaleGrad.apply(logits, self.grad_scale) if self.grad_scale != 1.0 else logits

    def _record(self, grad: Tensor) -> None:
        self._zero_fractions.append((grad == 0).float().mean().detach())

    def zero_grad_fraction(self) -> Tensor:
        """Mean fraction of zero input-gradient entries over the attack's backward passes (0 if none)."""
        if not self._zero_fractions:
            return torch.zeros(())
        return torch.stack(self._zero_fractions).mean()


def frequency_consistency(logits: Tensor, logits_adv: Tensor) -> Tensor:
    """VAFT's L_fr = sum |DCT3(z) - DCT3(z')| / sum |DCT3(z)| over whole logit volumes (Hanif et al., 2023).

    Args:
        logits: z = M(X), (B, K, D, H, W).
        logits_adv: z' = M(X'), same shape.
    """
    d, h, w = logits.shape[-3:]
    md, mh, mw = (dct_matrix(n, dtype=logits.dtype, device=logits.device) for n in (d, h, w))
    coeffs = torch.einsum("ai,bj,ck,...ijk->...abc", md, mh, mw, logits)  # (B, K, D, H, W)
    coeffs_adv = torch.einsum("ai,bj,ck,...ijk->...abc", md, mh, mw, logits_adv)  # (B, K, D, H, W)
    return (coeffs - coeffs_adv).abs().sum() / coeffs.abs().sum().clamp_min(torch.finfo(logits.dtype).tiny)


@dataclass(frozen=True)
class AdversarialOnly:
    """The papers' adversarial training: the loss on adversarial crops only (Madry et al., ICLR 2018)."""

    def check(self, attack: object | None) -> None:
        pass

    def losses(self, system: SegmentationSystem, images: Tensor, adversarial: Tensor, labels: Tensor) -> dict:
        loss_adv = system.loss(system.net(adversarial), labels)
        return {"adv": loss_adv, "total": loss_adv}


@dataclass(frozen=True)
class Mix:
    """``(1 - adv_weight) * clean + adv_weight * adversarial``."""

    def check(self, attack: object | None) -> None:
        pass

    def losses(self, system: SegmentationSystem, images: Tensor, adversarial: Tensor, labels: Tensor) -> dict:
        w = system.hparams.adv_weight
        loss_clean = system.loss(system.net(images), labels)
        loss_adv = system.loss(system.net(adversarial), labels)
        return {"clean": loss_clean, "adv": loss_adv, "total": (1 - w) * loss_clean + w * loss_adv}


@dataclass(frozen=True)
class VAFT:
    """VAFT (Hanif et al., MICCAI 2023): DiceCE(M(X)) + DiceCE(M(X')) + freq_weight * L_fr, X' = VAFA(X)."""

    def check(self, attack: object | None) -> None:
        if attack is None:
            raise ValueError("system.adv_mode=vaft needs an attack: use --adv vaft (VAFA) or attack=vafa")
        if type(attack).__name__ != "VAFA":
            log.warning(
                "VAFT with attack %s instead of VAFA: training on clean + %s-adversarial DiceCE + frequency "
                "consistency of the logits (Hanif et al. use VAFA)",
                type(attack).__name__,
                type(attack).__name__,
            )

    def losses(self, system: SegmentationSystem, images: Tensor, adversarial: Tensor, labels: Tensor) -> dict:
        logits = system.net(images)
        logits_adv = system.net(adversarial)
        loss_clean = system.loss(logits, labels)
        loss_adv = system.loss(logits_adv, labels)
        loss_fr = frequency_consistency(logits, logits_adv)
        total = loss_clean + loss_adv + system.hparams.freq_weight * loss_fr
        return {"clean": loss_clean, "adv": loss_adv, "freq": loss_fr, "total": total}


ADV_MODES = {"adversarial": AdversarialOnly(), "mix": Mix(), "vaft": VAFT()}
