"""Block DCT machinery for frequency attacks, vectorised: reshapes and einsums, no Python loops over blocks.

3D blocks tile ``(D, H, W)`` into ``b^3`` cubes; 2D blocks tile each axial slice. Axial slices are taken along the
last spatial axis ``W``: MONAI loads NIfTI in RAS order ``(x, y, z)``, so ``z`` (superior-inferior) comes last.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def dct_matrix(n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """Orthonormal DCT-II matrix ``M`` (n, n): coefficients are ``M @ x``, the inverse is ``M.T``."""
    k = torch.arange(n, dtype=torch.float64, device=device)[:, None]  # frequency index (n, 1)
    i = torch.arange(n, dtype=torch.float64, device=device)[None, :]  # sample index (1, n)
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)  # (n, n)
    m[0] /= math.sqrt(2.0)
    return m.to(dtype)


def pad_to_multiple(x: Tensor, b: int, axes: tuple[int, ...] = (0, 1, 2)) -> tuple[Tensor, tuple[int, int, int]]:
    """Replicate-pad the spatial ``axes`` (0 = D, 1 = H, 2 = W) of ``(B, C, D, H, W)`` at their ends up to
    multiples of ``b``.

    Returns the padded volume and the original ``(D, H, W)`` to crop back to with :func:`crop_to`.
    Replicate padding keeps the edge blocks natural images; the padded voxels are cropped away.
    """
    size = tuple(x.shape[2:])
    pads = [(-n) % b if axis in axes else 0 for axis, n in enumerate(size)]  # per (D, H, W)
    if any(pads):
        x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")  # (B, C, D', H', W')
    return x, size  # type: ignore[return-value]


def crop_to(x: Tensor, size: tuple[int, int, int]) -> Tensor:
    """Undo :func:`pad_to_multiple`: ``(B, C, D', H', W')`` -> ``(B, C, D, H, W)``."""
    return x[:, :, : size[0], : size[1], : size[2]]


def to_blocks(x: Tensor, b: int) -> Tensor:
    """(B, C, D, H, W) -> (B, C, D/b, H/b, W/b, b, b, b). Spatial sizes must be multiples of ``b``."""
    bs, c, d, h, w = x.shape
    if d % b or h % b or w % b:
        raise ValueError(f"volume {(d, h, w)} is not divisible into {b}^3 blocks: pad with pad_to_multiple first")
    x = x.reshape(bs, c, d // b, b, h // b, b, w // b, b)  # (B, C, nd, b, nh, b, nw, b)
    return x.permute(0, 1, 2, 4, 6, 3, 5, 7)  # (B, C, nd, nh, nw, b, b, b)


def from_blocks(blocks: Tensor) -> Tensor:
    """Inverse of :func:`to_blocks`: (B, C, nd, nh, nw, b, b, b) -> (B, C, nd*b, nh*b, nw*b)."""
    bs, c, nd, nh, nw, b, _, _ = blocks.shape
    x = blocks.permute(0, 1, 2, 5, 3, 6, 4, 7)  # (B, C, nd, b, nh, b, nw, b)
    return x.reshape(bs, c, nd * b, nh * b, nw * b)


def to_blocks2d(x: Tensor, b: int) -> Tensor:
    """Axial-slice blocks: (B, C, D, H, W) -> (B, C, W, D/b, H/b, b, b); ``D`` and ``H`` multiples of ``b``."""
    bs, c, d, h, w = x.shape
    if d % b or h % b:
        raise ValueError(f"slices {(d, h)} are not divisible into {b}x{b} blocks: pad with pad_to_multiple first")
    x = x.reshape(bs, c, d // b, b, h // b, b, w)  # (B, C, nd, b, nh, b, W)
    return x.permute(0, 1, 6, 2, 4, 3, 5)  # (B, C, W, nd, nh, b, b)


def from_blocks2d(blocks: Tensor) -> Tensor:
    """Inverse of :func:`to_blocks2d`: (B, C, W, nd, nh, b, b) -> (B, C, nd*b, nh*b, W)."""
    bs, c, w, nd, nh, b, _ = blocks.shape
    x = blocks.permute(0, 1, 3, 5, 4, 6, 2)  # (B, C, nd, b, nh, b, W)
    return x.reshape(bs, c, nd * b, nh * b, w)


def dct3(blocks: Tensor, m: Tensor) -> Tensor:
    """3D DCT over the last three dims of (..., b, b, b), one matrix product per axis."""
    x = torch.einsum("ai,...ijk->...ajk", m, blocks)  # (..., b, b, b) along the first block axis
    x = torch.einsum("bj,...ajk->...abk", m, x)  # second block axis
    return torch.einsum("ck,...abk->...abc", m, x)  # third block axis


def idct3(coeffs: Tensor, m: Tensor) -> Tensor:
    """Inverse of :func:`dct3`; ``m`` is orthonormal, so the inverse uses its transpose."""
    x = torch.einsum("ai,...abc->...ibc", m, coeffs)  # (..., b, b, b)
    x = torch.einsum("bj,...ibc->...ijc", m, x)
    return torch.einsum("ck,...ijc->...ijk", m, x)


def dct2(blocks: Tensor, m: Tensor) -> Tensor:
    """2D DCT over the last two dims of (..., b, b)."""
    return m @ blocks @ m.T  # (..., b, b)


def idct2(coeffs: Tensor, m: Tensor) -> Tensor:
    """Inverse of :func:`dct2`."""
    return m.T @ coeffs @ m  # (..., b, b)


def soft_round(u: Tensor, a: float) -> Tensor:
    """Differentiable rounding (Agustsson and Theis, NeurIPS 2020), as used by VAFA (Hanif et al., MICCAI 2023).

    ``R_a(u) = floor(u) + 0.5 (1 + tanh(k (u - floor(u) - 0.5)) / (1 - a))`` with ``k = ln(2/a - 1)``; since
    ``tanh(k / 2) = 1 - a``, ``R_a`` is continuous at the integers, and ``R_a -> round`` as ``a -> 0``.

    Args:
        a: softness in ``(0, 1)``; 0.1 is soft, 1e-3 nearly hard.
    """
    if not 0 < a < 1:
        raise ValueError(f"soft_round: a must be in (0, 1), got {a}")
    k = math.log(2.0 / a - 1.0)
    floor = torch.floor(u).detach()  # piecewise constant: no gradient
    return floor + 0.5 * (1.0 + torch.tanh(k * (u - floor - 0.5)) / (1.0 - a))


class _SoftQuantise(torch.autograd.Function):
    """``R_a(c / q) q`` with an analytic backward: one fused pass instead of autograd through eight elementwise ops."""

    @staticmethod
    def forward(ctx, coeffs: Tensor, q: Tensor, a: float) -> Tensor:  # type: ignore[override]
        k = math.log(2.0 / a - 1.0)
        u = coeffs / q
        floor = torch.floor(u)
        t = torch.tanh((u - floor - 0.5).mul_(k))
        ctx.save_for_backward(u, t, floor)
        ctx.k, ctx.a = k, a
        return (t / (1.0 - a)).add_(1.0).mul_(0.5).add_(floor).mul_(q)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        u, t, floor = ctx.saved_tensors
        k, a = ctx.k, ctx.a
        slope = (1.0 - t * t).mul_(0.5 * k / (1.0 - a))  # R_a'(u)
        grad_c = grad * slope if ctx.needs_input_grad[0] else None  # d/dc [R(c/q) q] = R'(u)
        rounded = (t / (1.0 - a)).add_(1.0).mul_(0.5).add_(floor)  # R_a(u)
        grad_q = rounded.sub_(slope.mul_(u)).mul_(grad) if ctx.needs_input_grad[1] else None  # R(u) - u R'(u)
        return grad_c, grad_q, None


def soft_quantise(coeffs: Tensor, q: Tensor, a: float) -> Tensor:
    """``soft_round(coeffs / q, a) * q``, differentiable in ``coeffs`` and ``q``, with a fused backward."""
    if not 0 < a < 1:
        raise ValueError(f"soft_quantise: a must be in (0, 1), got {a}")
    return _SoftQuantise.apply(coeffs, q, a)
