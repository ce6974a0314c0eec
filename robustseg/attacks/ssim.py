"""Differentiable 3D SSIM with a separable Gaussian window, and perceptibility statistics of a perturbation.

Matches MONAI's ``compute_ssim_and_cs`` (Gaussian window 11, sigma 1.5, valid convolution, k1 0.01, k2 0.03)
but filters one axis at a time (separable, as banded matrix products), so the SSIM term of VAFA is cheap next to a model
pass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _gaussian_1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    dist = torch.arange((1 - size) / 2, (1 + size) / 2, 1.0, dtype=dtype, device=device)  # (size,)
    gauss = torch.exp(-((dist / sigma) ** 2) / 2)
    return gauss / gauss.sum()


def _band(kernel: Tensor, n: int) -> Tensor:
    """(n - k + 1, n) matrix whose product with a length-``n`` signal is its valid correlation with ``kernel``."""
    k = kernel.numel()
    band = kernel.new_zeros(n - k + 1, n)
    rows = torch.arange(n - k + 1, device=kernel.device)[:, None]  # (n-k+1, 1)
    band[rows, rows + torch.arange(k, device=kernel.device)[None, :]] = kernel  # each row: the kernel, shifted
    return band


def _window(shape: tuple[int, ...], win_size: int) -> int:
    """The window edge: ``win_size``, shrunk to the largest odd size that fits a smaller volume."""
    win = min(win_size, *shape)
    return win - (1 - win % 2)


def _filter(maps: Tensor, kernel: Tensor) -> Tensor:
    """Separable valid Gaussian filtering of ``(N, D, H, W)`` as three banded matrix products (GEMMs), far faster
    on CPU than a 1-channel ``conv3d``. Returns ``(N, D - k + 1, H - k + 1, W - k + 1)``."""
    n, d, h, w = maps.shape
    k = kernel.numel()
    maps = (maps.reshape(n * d * h, w) @ _band(kernel, w).T).reshape(n, d, h, w - k + 1)  # along W
    maps = _band(kernel, h) @ maps  # along H: (N, D, H', W')
    return (_band(kernel, d) @ maps.reshape(n, d, -1)).reshape(n, d - k + 1, h - k + 1, w - k + 1)  # along D


@torch.no_grad()
def ssim_reference(x: Tensor, *, win_size: int = 11, sigma: float = 1.5) -> tuple[Tensor, Tensor]:
    """Local means of ``x`` and ``x^2`` ``(B, C, d, h, w)``: pass as ``reference`` when ``x`` is fixed (VAFA's clean
    volume), so each step filters three maps instead of five."""
    bs, c = x.shape[:2]
    kernel = _gaussian_1d(_window(tuple(x.shape[2:]), win_size), sigma, x.dtype, x.device)
    maps = _filter(torch.stack([x, x * x]).reshape(2 * bs * c, *x.shape[2:]), kernel)  # (2BC, d, h, w)
    mu_x, mu_xx = maps.reshape(2, bs, c, *maps.shape[1:])
    return mu_x, mu_xx


def ssim3d(
    x: Tensor,
    y: Tensor,
    *,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    reference: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Mean SSIM per volume of ``x`` and ``y`` ``(B, C, D, H, W)`` -> ``(B,)`` (Wang et al., IEEE TIP 2004).

    The window shrinks to the largest odd size that fits volumes smaller than ``win_size``.

    Args:
        reference: :func:`ssim_reference` of ``x`` (same window settings), when ``x`` does not change.
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim3d: shapes differ, {tuple(x.shape)} and {tuple(y.shape)}")
    bs, c = x.shape[:2]
    kernel = _gaussian_1d(_window(tuple(x.shape[2:]), win_size), sigma, x.dtype, x.device)
    if reference is None:
        maps = _filter(torch.stack([x, y, x * x, y * y, x * y]).reshape(5 * bs * c, *x.shape[2:]), kernel)
        mu_x, mu_y, mu_xx, mu_yy, mu_xy = maps.reshape(5, bs, c, *maps.shape[1:])  # each (B, C, d, h, w)
    else:
        mu_x, mu_xx = reference
        maps = _filter(torch.stack([y, y * y, x * y]).reshape(3 * bs * c, *x.shape[2:]), kernel)
        mu_y, mu_yy, mu_xy = maps.reshape(3, bs, c, *maps.shape[1:])  # each (B, C, d, h, w)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x2, mu_y2, mu_x_y = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    cs = (2 * (mu_xy - mu_x_y) + c2) / (mu_xx - mu_x2 + mu_yy - mu_y2 + c2)
    ssim = (2 * mu_x_y + c1) / (mu_x2 + mu_y2 + c1) * cs  # (B, C, d, h, w)
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
