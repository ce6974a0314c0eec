"""VAFA: the volumetric adversarial frequency attack (Hanif et al., MICCAI 2023), in 3D and per axial slice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from robustseg.attacks.base import Attack, check_positive_int, parse_budget
from robustseg.attacks.frequency import (
    crop_to,
    dct2,
    dct3,
    dct_matrix,
    from_blocks,
    from_blocks2d,
    idct2,
    idct3,
    pad_to_multiple,
    soft_quantise,
    to_blocks,
    to_blocks2d,
)
from robustseg.attacks.losses import LOSSES, check_loss
from robustseg.attacks.ssim import ssim3d, ssim_reference
from robustseg.attacks.targets import TARGETS
from robustseg.errors import ConfigError
from robustseg.registry import ATTACKS

# init -> (starting value of q, default q_min): the paper starts at 1 with q_min 1, the published code at
# q_max with q_min 5.
INITS: dict[str, tuple[str, float]] = {"paper": ("one", 1.0), "published": ("q_max", 5.0)}
A_START = 0.1  # soft-rounding softness at the first step, annealed linearly towards 0


def rescale_axial_slices(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Min-max rescale every axial slice ``x[..., k]`` of ``(B, C, D, H, W)`` to ``[0, 1]``.

    The published code does this unguarded and divides by zero on constant slices; here a slice whose range is
    below ``eps`` is only clipped to ``[0, 1]``.
    """
    low = x.amin(dim=(2, 3), keepdim=True)  # (B, C, 1, 1, W)
    span = x.amax(dim=(2, 3), keepdim=True) - low  # (B, C, 1, 1, W)
    flat = span < eps
    scaled = (x - low) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, x.clamp(0, 1), scaled)


@ATTACKS.register("vafa")
@dataclass(frozen=True)
class VAFA(Attack):
    """Volumetric Adversarial Frequency Attack (Hanif et al., "Frequency Domain Adversarial Training for Robust
    Volumetric Medical Segmentation", MICCAI 2023).

    Each ``b^3`` block ``x`` of the volume becomes ``c = DCT3(255 x - 128)``, quantised with its own learnable
    table ``q`` (one ``b^3`` table per block) as ``c' = R_a(c / q) q`` with the soft rounding ``R_a``
    (:func:`~robustseg.attacks.frequency.soft_round`, fused in ``soft_quantise``; ``a`` annealed linearly from
    0.1 towards 0), and
    ``x' = (IDCT3(c') + 128) / 255``. Each of ``steps`` steps maximises ``L(M(x'), y) - (1 - SSIM(x, x'))``
    by ``q <- clip(q + sign(grad_q), q_min, q_max)``. The result is ``x'`` from the final tables with hard
    rounding, clipped to ``[0, 1]``. Not norm-bounded: report :func:`~robustseg.attacks.ssim.perceptibility`.

    Volumes whose sizes are not multiples of ``block_size`` are replicate-padded to the next multiple, attacked,
    and cropped back.

    Args:
        q_max: upper bound of the quantisation tables (paper: 10, 20, 30); larger is stronger and more visible.
        q_min: lower bound; ``None`` takes the default of ``init``.
        steps: optimisation steps (= model forwards).
        block_size: DCT block edge ``b`` (paper: 32 for 3D; 8 for the 2D variant).
        use_ssim: subtract the ``1 - SSIM(x, x')`` term from the objective.
        init: ``"paper"`` (q starts at 1, q_min 1) or ``"published"`` (q starts at q_max, q_min 5, as the code).
        rescale_slices: min-max rescale each axial slice of ``x'`` as the published code does (safe on constant
            slices here); off by default.
        loss: key into ``LOSSES``.
        targeted, target: move towards a target map instead (see :class:`~robustseg.attacks.base.Attack`).
    """

    dims: ClassVar[int] = 3
    block_axes: ClassVar[tuple[int, ...]] = (0, 1, 2)  # spatial axes cut into blocks

    q_max: float = 20.0
    q_min: float | None = None
    steps: int = 20
    block_size: int = 32
    use_ssim: bool = True
    init: str = "paper"
    rescale_slices: bool = False
    loss: str = "dice_ce"
    targeted: bool = False
    target: str = "background"

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.init not in INITS:
            raise ConfigError(f"{name}.init: expected one of {sorted(INITS)}, got {self.init!r}")
        if self.q_min is None:
            object.__setattr__(self, "q_min", INITS[self.init][1])
        object.__setattr__(self, "q_min", parse_budget(self.q_min, "q_min", name))
        object.__setattr__(self, "q_max", parse_budget(self.q_max, "q_max", name))
        if not 0 < self.q_min <= self.q_max:
            raise ConfigError(f"{name}.q_min/q_max: need 0 < q_min <= q_max, got {self.q_min} and {self.q_max}")
        check_positive_int(self.steps, "steps", name)
        check_positive_int(self.block_size, "block_size", name)
        check_loss(self.loss, name, targeted=self.targeted)
        if self.targeted:
            TARGETS[self.target]  # noqa: B018  (raises ConfigError naming the known rules)

    def describe(self) -> str:
        """One line naming the settings that matter for a report, including which initialisation ran."""
        return (
            f"{type(self).__name__.lower()}(q_max={self.q_max:g}, q_min={self.q_min:g}, init={self.init}, "
            f"block={self.block_size}^{self.dims}, steps={self.steps}, ssim={'on' if self.use_ssim else 'off'})"
        )

    # block transform: the 2D variant overrides these four -------------------------------------------------------
    def split(self, x: Tensor) -> Tensor:
        return to_blocks(x, self.block_size)  # (B, C, nd, nh, nw, b, b, b)

    def merge(self, blocks: Tensor) -> Tensor:
        return from_blocks(blocks)  # (B, C, D, H, W)

    def dct(self, blocks: Tensor, m: Tensor) -> Tensor:
        return dct3(blocks, m)

    def idct(self, coeffs: Tensor, m: Tensor) -> Tensor:
        return idct3(coeffs, m)

    # attack -----------------------------------------------------------------------------------------------------
    def reconstruct(self, coeffs: Tensor, q: Tensor, m: Tensor, size: tuple[int, int, int], a: float | None) -> Tensor:
        """``x'`` ``(B, C, D, H, W)`` from block coefficients and tables; ``a=None`` rounds hard."""
        quantised = torch.round(coeffs / q) * q if a is None else soft_quantise(coeffs, q, a)
        x = (self.idct(quantised, m) + 128.0) / 255.0  # blocks, back in [0, 1] units
        x = crop_to(self.merge(x), size)  # (B, C, D, H, W)
        if self.rescale_slices:
            x = rescale_axial_slices(x)
        return x.clamp(0.0, 1.0)

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        padded, size = pad_to_multiple(images, self.block_size, self.block_axes)  # (B, C, D', H', W')
        m = dct_matrix(self.block_size, dtype=images.dtype, device=images.device)
        coeffs = self.dct(self.split(255.0 * padded - 128.0), m)  # per-block coefficients, fixed
        start = 1.0 if INITS[self.init][0] == "one" else self.q_max
        q = torch.full_like(coeffs, min(max(start, self.q_min), self.q_max))  # one table per block
        loss_fn = LOSSES[self.loss]
        reference = ssim_reference(images) if self.use_ssim else None  # the clean side of SSIM, once
        for step in range(self.steps):
            a = A_START * (1.0 - step / self.steps)  # 0.1 -> 0.1 / steps
            q.requires_grad_(True)
            adversarial = self.reconstruct(coeffs, q, m, size, a)
            objective = loss_fn(model(adversarial), labels)
            if self.targeted:
                objective = -objective
            if self.use_ssim:
                objective = objective - (1.0 - ssim3d(images, adversarial, reference=reference)).mean()
            (grad,) = torch.autograd.grad(objective, q)
            q = (q.detach() + grad.sign()).clamp(self.q_min, self.q_max)
        with torch.no_grad():
            return self.reconstruct(coeffs, q, m, size, None)


@ATTACKS.register("vafa2d")
@dataclass(frozen=True)
class VAFA2D(VAFA):
    """VAFA with a 2D DCT on ``b x b`` blocks of each axial slice (last axis); the paper's setting is 8 x 8.

    Malik et al. (BMVC 2024) use it to compare the 3D attack with its slice-wise counterpart.
    """

    dims: ClassVar[int] = 2
    block_axes: ClassVar[tuple[int, ...]] = (0, 1)  # D and H of each axial slice

    block_size: int = 8

    def split(self, x: Tensor) -> Tensor:
        return to_blocks2d(x, self.block_size)  # (B, C, W, nd, nh, b, b)

    def merge(self, blocks: Tensor) -> Tensor:
        return from_blocks2d(blocks)  # (B, C, D, H, W)

    def dct(self, blocks: Tensor, m: Tensor) -> Tensor:
        return dct2(blocks, m)

    def idct(self, coeffs: Tensor, m: Tensor) -> Tensor:
        return idct2(coeffs, m)
