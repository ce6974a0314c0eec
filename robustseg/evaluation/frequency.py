"""Band-filtered perturbations in the 3D DCT domain (the frequency analysis of Malik et al., BMVC 2024).

The perturbation ``delta = adversarial - clean`` of a whole (C, D, H, W) volume is transformed with an
orthonormal DCT-II along each spatial axis, coefficients outside a band of normalised frequency are zeroed,
and the result is transformed back. Scoring ``clip(clean + filtered, 0, 1)`` tells whether an attack's effect
lives in low or high frequencies (VAFA's in low ones, PGD's spread over all).

The normalised frequency of coefficient ``(kd, kh, kw)`` is ``r = sqrt(((kd/D)^2 + (kh/H)^2 + (kw/W)^2) / 3)``,
in ``[0, 1)``; a band ``[lo, hi)`` keeps ``lo <= r < hi`` (``hi >= 1`` keeps everything above ``lo``). Bands are
named in the config (``frequency.bands: {low: [0, 0.1], high: [0.1, 1.0]}``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from robustseg.attacks.frequency import dct_matrix


def dct_volume(x: Tensor) -> Tensor:
    """Separable orthonormal 3D DCT of a (..., D, H, W) tensor over its last three axes (float64)."""
    return _separable(x, transpose=False)


def idct_volume(c: Tensor) -> Tensor:
    """Inverse of :func:`dct_volume`."""
    return _separable(c, transpose=True)


def _separable(x: Tensor, transpose: bool) -> Tensor:
    """Apply the 1D DCT matrix (or its transpose) along each of the last three axes, one axis at a time.

    One axis at a time keeps memory at the size of the volume; a single three-matrix einsum may materialise a
    (D, H, W, D, H, W) intermediate.
    """
    out = x.double()
    for axis in (-3, -2, -1):
        m = dct_matrix(out.shape[axis], dtype=torch.float64, device=x.device)  # (n, n)
        m = m.T if transpose else m
        out = torch.movedim(torch.tensordot(out, m, dims=([axis], [1])), -1, axis)  # same shape as x
    return out


def frequency_radius(shape: Sequence[int], device: torch.device | None = None) -> Tensor:
    """(D, H, W) normalised frequency ``r`` in [0, 1) of every DCT coefficient."""
    axes = [torch.arange(n, dtype=torch.float64, device=device) / n for n in shape]
    kd, kh, kw = torch.meshgrid(*axes, indexing="ij")  # each (D, H, W)
    return ((kd**2 + kh**2 + kw**2) / 3).sqrt()


def band_filter(delta: Tensor, low: float, high: float) -> Tensor:
    """Keep the DCT coefficients of a (C, D, H, W) perturbation with ``low <= r < high``; same shape and dtype."""
    if not 0.0 <= low < high:
        raise ValueError(f"frequency band [{low}, {high}) must satisfy 0 <= low < high")
    r = frequency_radius(delta.shape[-3:], delta.device)  # (D, H, W)
    mask = (r >= low) & ((r < high) | (high >= 1.0))
    return idct_volume(dct_volume(delta) * mask).to(delta.dtype)  # (C, D, H, W)


def band_filtered_inputs(clean: Tensor, adversarial: Tensor, bands: Mapping[str, Sequence[float]]) -> dict[str, Tensor]:
    """``{band: clip(clean + band_filter(adversarial - clean), 0, 1)}`` for (C, D, H, W) volumes."""
    delta = adversarial - clean
    return {name: (clean + band_filter(delta, float(lo), float(hi))).clamp(0, 1) for name, (lo, hi) in bands.items()}
