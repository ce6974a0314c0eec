"""Per-case segmentation and perturbation metrics with explicit empty-structure policies.

Segmentation (per class, one case): Dice, HD95 in millimetres from the voxel spacing and NSD (surface Dice,
Nikolov et al. 2021) at a stated tolerance in millimetres. MONAI computes the distances
(``compute_hausdorff_distance``, ``compute_surface_dice``); the empty cases, where MONAI returns NaN or inf
and its mean silently drops them, are decided here, as SPEC's metric section requires:

=====================  ========  ==============================  ======
prediction / ground    Dice      HD95 (mm)                       NSD
truth of a class
=====================  ========  ==============================  ======
both empty             1         0                               1
one of them empty      0         volume diagonal in mm (worst)   0
=====================  ========  ==============================  ======

Both directions of a one-sided empty structure are counted per case under separate names, so a report can say
how many worst values entered the mean and why: ``hd95_empty_pred`` (a present structure predicted empty, the
typical effect of an attack) and ``hd95_empty_truth`` (a structure predicted where the ground truth has none).

NSD's tolerance defaults to the largest voxel spacing of the case (``nsd_tolerance_mm=None``): with a tolerance
below the coarsest spacing (1 mm on BTCV's 1.5 x 1.5 x 2 mm voxels) surface Dice counts only exact boundary
matches, so an explicit smaller tolerance is used but warned about (:func:`nsd_tolerance`).

Perturbation (Hanif et al., MICCAI 2023, report these because VAFA is not L-inf bounded): L-inf and L2 norms of
``adversarial - clean``, SSIM (MONAI, Gaussian window) and PSNR with data range 1. Prediction change: the voxel
flip rate, the fraction of voxels whose predicted class changed.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import torch
from monai.metrics import SSIMMetric, compute_hausdorff_distance, compute_surface_dice
from torch import Tensor

log = logging.getLogger(__name__)


def one_hot(index: Tensor, num_classes: int) -> Tensor:
    """(D, H, W) int class map -> (1, K, D, H, W) float one-hot."""
    oh = torch.nn.functional.one_hot(index.long(), num_classes)  # (D, H, W, K)
    return oh.permute(3, 0, 1, 2).unsqueeze(0).float()  # (1, K, D, H, W)


def volume_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the volume's diagonal in millimetres: the worst possible surface distance."""
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing)))


def dice_per_class(pred: Tensor, label: Tensor, num_classes: int) -> list[float]:
    """Dice of every class 0..K-1 (background included) for one case; both empty counts as 1.

    Args:
        pred: (D, H, W) predicted class indices.
        label: (D, H, W) ground-truth class indices.
    """
    scores = []
    for k in range(num_classes):
        p, g = pred == k, label == k
        denom = int(p.sum()) + int(g.sum())
        scores.append(1.0 if denom == 0 else 2.0 * int((p & g).sum()) / denom)
    return scores


def nsd_tolerance(spacing: Sequence[float], requested: float | None = None) -> float:
    """The NSD tolerance in mm: ``requested``, or the largest voxel spacing when None; warns when it is smaller.

    A tolerance below the coarsest spacing cannot absorb a one-voxel boundary shift along that axis, so surface
    Dice degenerates to counting exact boundary matches.
    """
    largest = max(float(s) for s in spacing)
    if requested is None:
        return largest
    if float(requested) < largest:
        log.warning(
            "metrics.nsd_tolerance_mm=%g is smaller than the largest voxel spacing %g mm: NSD counts only exact "
            "boundary matches along that axis (null = the largest spacing of each case)",
            float(requested),
            largest,
        )
    return float(requested)


def segmentation_metrics(
    pred: Tensor,
    label: Tensor,
    num_classes: int,
    spacing: Sequence[float],
    nsd_tolerance_mm: float | None = None,
) -> dict[str, float | int | list[float]]:
    """Dice, HD95 (mm) and NSD of one case, with the module's empty-structure policy.

    Args:
        pred: (D, H, W) predicted class indices.
        label: (D, H, W) ground-truth class indices.
        spacing: voxel size in millimetres along (D, H, W).
        nsd_tolerance_mm: boundary tolerance of the surface Dice; None: the largest voxel spacing.

    Returns:
        ``dice`` (per class 0..K-1), ``dice_mean`` (foreground classes 1..K-1), ``dice_mean_bg`` (all classes,
        the papers' convention), ``hd95`` and ``nsd`` (per foreground class), their means ``hd95_mean`` and
        ``nsd_mean``, ``hd95_empty_pred`` (foreground classes with an empty prediction and a non-empty
        ground truth), ``hd95_empty_truth`` (a prediction where the ground truth is empty) and the
        ``nsd_tolerance_mm`` used.
    """
    if pred.shape != label.shape or pred.ndim != 3:
        raise ValueError(f"expected (D, H, W) prediction and label, got {tuple(pred.shape)} and {tuple(label.shape)}")
    if num_classes < 2:
        raise ValueError(f"need a background and at least one foreground class, got num_classes={num_classes}")
    spacing = [float(s) for s in spacing]
    tolerance = nsd_tolerance(spacing, nsd_tolerance_mm)
    dice = dice_per_class(pred, label, num_classes)
    p_oh = one_hot(pred, num_classes)[:, 1:]  # (1, K-1, D, H, W) foreground channels
    g_oh = one_hot(label, num_classes)[:, 1:]  # (1, K-1, D, H, W)
    p_any = p_oh.flatten(2).any(-1)[0]  # (K-1,)
    g_any = g_oh.flatten(2).any(-1)[0]  # (K-1,)
    both = p_any & g_any
    worst = volume_diagonal_mm(pred.shape, spacing)
    hd95 = [0.0 if not (p or g) else worst for p, g in zip(p_any.tolist(), g_any.tolist())]
    nsd = [1.0 if not (p or g) else 0.0 for p, g in zip(p_any.tolist(), g_any.tolist())]
    if both.any():
        idx = both.nonzero()[:, 0]  # (M,) classes present in both
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns about the empty channels we never pass it
            hd = compute_hausdorff_distance(
                p_oh[:, idx], g_oh[:, idx], include_background=True, percentile=95, spacing=spacing
            )[0]  # (M,)
            sd = compute_surface_dice(
                p_oh[:, idx], g_oh[:, idx], [tolerance] * len(idx), include_background=True, spacing=spacing
            )[0]  # (M,)
        for j, k in enumerate(idx.tolist()):
            hd95[k], nsd[k] = float(hd[j]), float(sd[j])
    return {
        "dice": dice,
        "dice_mean": sum(dice[1:]) / (num_classes - 1),
        "dice_mean_bg": sum(dice) / num_classes,
        "hd95": hd95,
        "hd95_mean": sum(hd95) / len(hd95),
        "hd95_empty_pred": int((~p_any & g_any).sum()),
        "hd95_empty_truth": int((p_any & ~g_any).sum()),
        "nsd": nsd,
        "nsd_mean": sum(nsd) / len(nsd),
        "nsd_tolerance_mm": tolerance,
    }


def psnr(clean: Tensor, adversarial: Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical volumes."""
    mse = float(((adversarial.double() - clean.double()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(clean: Tensor, adversarial: Tensor, data_range: float = 1.0) -> float:
    """Mean 3D SSIM (Wang et al. 2004, Gaussian 11^3 window, shrunk for small volumes) of (C, D, H, W) volumes."""
    win = min(11, *clean.shape[1:])
    win = win if win % 2 else win - 1  # MONAI wants an odd window that fits the volume
    metric = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=win, kernel_sigma=1.5 * win / 11)
    return float(metric(adversarial[None].float(), clean[None].float()).mean())


def perturbation_metrics(clean: Tensor, adversarial: Tensor) -> dict[str, float]:
    """L-inf, L2 (over the whole volume), SSIM and PSNR of a perturbation; inputs (C, D, H, W) in [0, 1]."""
    delta = (adversarial.double() - clean.double()).flatten()
    return {
        "linf": float(delta.abs().max()) if delta.numel() else 0.0,
        "l2": float(delta.norm()),
        "ssim": ssim(clean, adversarial),
        "psnr": psnr(clean, adversarial),
    }


def flip_rate(pred_clean: Tensor, pred_adversarial: Tensor) -> float:
    """Fraction of voxels whose predicted class differs between two (D, H, W) class maps."""
    return float((pred_clean != pred_adversarial).float().mean())
