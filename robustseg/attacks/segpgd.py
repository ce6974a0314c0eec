"""SegPGD: PGD with a correct/wrong voxel split whose weight shifts over the steps (Gu et al., ECCV 2022)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from robustseg.attacks.pgd import GradientAttack
from robustseg.registry import ATTACKS


def segpgd_lambda(step: int, steps: int) -> float:
    """``lambda_t = t / (2T)`` for the 0-based step ``t`` of ``T`` (the paper's ``(t - 1) / (2T)``, 1-based)."""
    return step / (2 * steps)


def segpgd_loss(logits: Tensor, labels: Tensor, lam: float, *, targeted: bool = False) -> Tensor:
    """``sum[(1 - lam) CE on correct + lam CE on wrong voxels] / N`` over all ``N`` voxels.

    Untargeted, "correct" means predicted as the label; targeted, the roles swap: voxels not yet at the target
    get ``1 - lam`` so the budget first goes to those still to be moved.

    Args:
        logits: ``(B, K, D, H, W)``; labels ``(B, 1, D, H, W)`` (the target map when targeted).
    """
    per_voxel = F.cross_entropy(logits, labels[:, 0], reduction="none")  # (B, D, H, W)
    at_label = logits.detach().argmax(dim=1) == labels[:, 0]  # (B, D, H, W)
    first = ~at_label if targeted else at_label
    weight = first.to(per_voxel.dtype) * (1.0 - lam) + (~first).to(per_voxel.dtype) * lam
    return (weight * per_voxel).sum() / per_voxel.numel()


@ATTACKS.register("segpgd")
@dataclass(frozen=True)
class SegPGD(GradientAttack):
    """SegPGD (Gu et al., "SegPGD: An Effective and Efficient Adversarial Attack for Evaluating and Boosting
    Segmentation Robustness", ECCV 2022): per-voxel CE weighted ``1 - lambda_t`` on correctly and ``lambda_t``
    on wrongly predicted voxels, ``lambda_t = t / (2T)``, summed over all voxels and divided by their count.
    L-inf budget as :class:`PGD`; ``track_best`` as :class:`PGD`.
    """

    eps: float = 8 / 255
    step_size: float = 0.01
    steps: int = 20
    random_start: bool = True
    targeted: bool = False
    target: str = "background"
    seed: int | None = None
    track_best: bool = False

    def objective(self, model: nn.Module, x: Tensor, labels: Tensor, step: int) -> Tensor:
        return segpgd_loss(model(x), labels, segpgd_lambda(step, self.steps), targeted=self.targeted)
