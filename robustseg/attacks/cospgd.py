"""CosPGD: PGD with a per-voxel cosine-similarity weighting of the cross-entropy (Agnihotri et al., ICML 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from robustseg.attacks.losses import one_hot
from robustseg.attacks.pgd import GradientAttack
from robustseg.registry import ATTACKS


def cospgd_weights(logits: Tensor, labels: Tensor, *, targeted: bool = False) -> Tensor:
    """Per-voxel weights ``cos(softmax(z), onehot(y))`` (or ``1 - cos`` when targeted), detached.

    Args:
        logits: ``(B, K, D, H, W)``.
        labels: ``(B, 1, D, H, W)`` int64 (the target map when targeted).

    Returns:
        ``(B, D, H, W)`` weights in ``[0, 1]``: a scale on each voxel's loss, not a gradient path.
    """
    probs = logits.detach().softmax(dim=1)  # (B, K, D, H, W)
    cos = F.cosine_similarity(probs, one_hot(labels, logits.shape[1]), dim=1)  # (B, D, H, W)
    return 1.0 - cos if targeted else cos


def cospgd_loss(logits: Tensor, labels: Tensor, *, targeted: bool = False) -> Tensor:
    """Voxel-mean of ``weight * CE``: voxels already far from their label (low cosine) count less, so the
    budget goes to voxels still predicted confidently right (untargeted)."""
    per_voxel = F.cross_entropy(logits, labels[:, 0], reduction="none")  # (B, D, H, W)
    return (cospgd_weights(logits, labels, targeted=targeted) * per_voxel).mean()


@ATTACKS.register("cospgd")
@dataclass(frozen=True)
class CosPGD(GradientAttack):
    """CosPGD (Agnihotri et al., "CosPGD: an efficient white-box adversarial attack for pixel-wise prediction
    tasks", ICML 2024), generalised to 3D: each voxel's CE is weighted by the cosine similarity between the
    softmax prediction and the one-hot label at that voxel (per voxel, not one scalar per volume). Targeted:
    ``1 - cos`` and the loss is minimised towards the target map. L-inf budget as :class:`PGD`; ``track_best``
    as :class:`PGD`.
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
        return cospgd_loss(model(x), labels, targeted=self.targeted)
