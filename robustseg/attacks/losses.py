"""Segmentation losses an attack can maximise, selected by name with the attack's ``loss`` field.

Each maps logits ``(B, K, D, H, W)`` and labels ``(B, 1, D, H, W)`` int64 to a scalar.

``dice_ce`` is the papers' DiceCE (Malik et al., BMVC 2024; Hanif et al., MICCAI 2023; both seed repositories):
MONAI ``DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0, smooth_dr=1e-6)``, the loss their
attacks maximise and their training minimises. ``dice_ce_monai`` is the same loss at MONAI's defaults
(``squared_pred=False``, ``smooth_nr = smooth_dr = 1e-5``), kept for comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor

from robustseg.attacks.sea_losses import SEA_LOSSES, UNTARGETED_ONLY
from robustseg.errors import ConfigError

LossFn = Callable[[Tensor, Tensor], Tensor]

_DICE = DiceLoss(to_onehot_y=True, softmax=True)

# (squared_pred, smooth_nr, smooth_dr) of the two DiceCE variants
PAPER_DICE = (True, 0.0, 1e-6)
MONAI_DICE = (False, 1e-5, 1e-5)


def ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Voxel-averaged cross-entropy."""
    return F.cross_entropy(logits, labels[:, 0])


class _DiceCE(torch.autograd.Function):
    """MONAI ``DiceCELoss(to_onehot_y=True, softmax=True, squared_pred, smooth_nr, smooth_dr)`` with a hand-written
    backward that keeps few volumes.

    Per batch item and class ``k``: ``dice_k = 1 - (2 I_k + s_nr) / (P_k + G_k + s_dr)`` with ``I_k = sum_v p g``,
    ``G_k = sum_v g``, ``P_k = sum_v p^2`` (squared) or ``sum_v p``; the loss is the mean over ``(B, K)`` plus the
    voxel-averaged CE. Autograd through MONAI's loss saves softmax, one-hot, log-softmax and products, each
    ``(B, K, D, H, W)``; on a whole volume (pipeline attacks) those dominate memory. This saves only the logits and
    per-class sums and recomputes the softmax in the backward, working in place. Value and gradient equal MONAI's
    (tested against MONAI itself).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, squared: bool, smooth_nr: float, smooth_dr: float) -> Tensor:  # type: ignore[override]
        bs, k = logits.shape[:2]
        flat_labels = labels.reshape(bs, 1, -1)  # (B, 1, V)
        log_probs = logits.reshape(bs, k, -1).log_softmax(dim=1)  # (B, K, V)
        ce = -log_probs.gather(1, flat_labels).mean()
        probs = log_probs.exp_()  # in place: (B, K, V)
        pred = (probs * probs).sum(dim=2) if squared else probs.sum(dim=2)  # (B, K)
        inter = torch.zeros_like(pred).scatter_add_(1, flat_labels[:, 0], probs.gather(1, flat_labels)[:, 0])
        ground = torch.zeros_like(pred).scatter_add_(1, flat_labels[:, 0], torch.ones_like(probs[:, 0]))
        denominator = pred + ground + smooth_dr  # (B, K)
        dice = (1.0 - (2.0 * inter + smooth_nr) / denominator).mean()
        ctx.save_for_backward(logits, labels, inter, denominator)
        ctx.squared, ctx.smooth_nr = squared, smooth_nr
        return dice + ce

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[override]
        logits, labels, inter, denominator = ctx.saved_tensors
        bs, k = logits.shape[:2]
        flat_labels = labels.reshape(bs, 1, -1)  # (B, 1, V)
        probs = logits.reshape(bs, k, -1).softmax(dim=1)  # (B, K, V)
        voxels = probs.shape[2]
        # d dice_k / d p_v = (2 I + s_nr) / den^2 * dP/dp_v - 2 g_v / den, all over (B K); dP/dp_v = 2 p_v or 1
        a = ((2.0 * inter + ctx.smooth_nr) / denominator**2 / (bs * k))[..., None]  # (B, K, 1)
        b = (2.0 / denominator / (bs * k))[..., None]  # (B, K, 1)
        d = probs * (2.0 * a) if ctx.squared else a.expand_as(probs).clone()  # (B, K, V)
        d.scatter_add_(1, flat_labels, -b.expand(-1, -1, voxels).gather(1, flat_labels))  # -2 / den at the label
        # through the softmax: p * (d - sum_k p_k d_k); CE adds (p - onehot) / (B V)
        d.sub_(torch.einsum("bkv,bkv->bv", probs, d)[:, None]).mul_(probs)
        d.add_(probs, alpha=1.0 / (bs * voxels))
        d.scatter_add_(1, flat_labels, torch.full_like(flat_labels, -1.0 / (bs * voxels), dtype=d.dtype))
        return (d.mul_(grad_out)).reshape(logits.shape), None, None, None, None


def _fused_dice_ce(logits: Tensor, labels: Tensor, variant: tuple[bool, float, float]) -> Tensor:
    # fp32 at least: under autocast the per-class sums over ~10^6 voxels overflow fp16 (MONAI's sums run in fp32)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return _DiceCE.apply(logits.to(dtype), labels.long(), *variant)


def dice_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """The papers' DiceCE: MONAI ``DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0,
    smooth_dr=1e-6)``, soft Dice with squared denominators plus cross-entropy.

    Computed by a memory-light fused function with the same value and input gradient (``_DiceCE``).
    """
    return _fused_dice_ce(logits, labels, PAPER_DICE)


def dice_ce_monai(logits: Tensor, labels: Tensor) -> Tensor:
    """MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)`` at MONAI's defaults (plain denominators, smooth 1e-5)."""
    return _fused_dice_ce(logits, labels, MONAI_DICE)


def dice(logits: Tensor, labels: Tensor) -> Tensor:
    """MONAI ``DiceLoss(to_onehot_y=True, softmax=True)``."""
    return _DICE(logits, labels)


def masked_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy averaged over the voxels still predicted correctly (0 when none is).

    Spends the whole budget on voxels not yet flipped instead of pushing wrong voxels further.
    """
    per_voxel = F.cross_entropy(logits, labels[:, 0], reduction="none")  # (B, D, H, W)
    correct = (logits.detach().max(dim=1).indices == labels[:, 0]).to(per_voxel.dtype)  # argmax, 3x faster
    return (per_voxel * correct).sum() / correct.sum().clamp_min(1.0)


class _Losses(dict):
    """``dict`` whose missing keys raise ``ConfigError`` listing the known losses."""

    def __missing__(self, name: str) -> LossFn:
        raise ConfigError(f"attack.loss: unknown loss {name!r}; known: {sorted(self)}")


LOSSES: Mapping[str, LossFn] = _Losses(
    ce=ce, dice_ce=dice_ce, dice_ce_monai=dice_ce_monai, dice=dice, masked_ce=masked_ce, **SEA_LOSSES
)


def check_loss(name: str, attack: str, *, targeted: bool = False) -> None:
    """Raise ``ConfigError`` for an unknown loss, or for a masked loss in targeted mode (its mask needs the true
    labels: ``masked_ce`` and SEA's ``masked_balanced_ce`` / ``masked_spherical``)."""
    if name not in LOSSES:
        raise ConfigError(f"{attack}.loss: unknown loss {name!r}; known: {sorted(LOSSES)}")
    if targeted and name in UNTARGETED_ONLY:
        raise ConfigError(
            f"{attack}.loss: {name} is untargeted only (its mask needs the true labels); use ce, dice or dice_ce "
            "with targeted=true"
        )


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """Labels ``(B, 1, D, H, W)`` to a float one-hot ``(B, K, D, H, W)``."""
    return F.one_hot(labels[:, 0], num_classes).movedim(-1, 1).float()  # (B, K, D, H, W)


__all__ = ["LOSSES", "ce", "check_loss", "dice", "dice_ce", "dice_ce_monai", "masked_ce", "one_hot"]
