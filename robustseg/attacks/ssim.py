"""Differentiable 3D SSIM with a separable Gaussian window, and perceptibility statistics of a perturbation.

Matches MONAI's ``compute_ssim_and_cs`` (Gaussian window 11, sigma 1.5, valid convolution, k1 0.01, k2 0.03)
but filters one axis at a time (3 x 11 taps instead of 11^3), so the SSIM term of VAFA is cheap next to a model
pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _gaussian_1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    dist = torch.arange((1 - size) / 2, (1 + size) / 2, 1.0, dtype=dtype, device=device)  # (size,)
    gauss = torch.exp(-((dist / sigma) ** 2) / 2)
    return gauss / gauss.sum()


def ssim3d(
    x: Tensor,
    y: Tensor,
    *,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Mean SSIM per volume of ``x`` and ``y`` ``(B, C, D, H, W)`` -> ``(B,)`` (Wang et al., IEEE TIP 2004).

    The window shrinks to the largest odd size that fits volumes smaller than ``win_size``.
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim3d: shapes differ, {tuple(x.shape)} and {tuple(y.shape)}")
    bs, c = x.shape[:2]
    win = min(win_size, *x.shape[2:])
    win -= 1 - win % 2  # odd
    kernel = _gaussian_1d(win, sigma, x.dtype, x.device)
    maps = torch.stack([x, y, x * x, y * y, x * y])  # (5, B, C, D, H, W)
    maps = maps.reshape(5 * bs * c, 1, *x.shape[2:])  # (5BC, 1, D, H, W)
    for axis in range(3):  # separable: filter D, then H, then W (valid)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = win
        maps = F.conv3d(maps, kernel.view(shape))
    mu_x, mu_y, mu_xx, mu_yy, mu_xy = maps.reshape(5, bs, c, *maps.shape[2:])  # each (B, C, d, h, w)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    sigma_x, sigma_y, sigma_xy = mu_xx - mu_x**2, mu_yy - mu_y**2, mu_xy - mu_x * mu_y
    cs = (2 * sigma_xy + c2) / (sigma_x + sigma_y + c2)
    ssim = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs  # (B, C, d, h, w)
    return ssim.flatten(1).mean(dim=1)


@torch.no_grad()
def perceptibility(clean: Tensor, adversarial: Tensor) -> dict[str, float]:
    """Batch means of the per-volume L-inf, L2, SSIM and PSNR (dB, data range 1) of a perturbation.

    Args:
        clean, adversarial: ``(B, C, D, H, W)`` in ``[0, 1]``.
    """
    delta = (adversarial - clean).flatten(1)  # (B, N)
    mse = delta.pow(2).mean(dim=1)  # (B,)
    psnr = torch.where(mse > 0, -10 * torch.log10(mse.clamp_min(1e-30)), torch.full_like(mse, math.inf))
    return {
        "linf": float(delta.abs().amax(dim=1).mean()),
        "l2": float(delta.norm(dim=1).mean()),
        "ssim": float(ssim3d(clean, adversarial).mean()),
        "psnr": float(psnr.mean()),
    }
