"""VAFA: the volumetric adversarial frequency attack (Hanif et al., MICCAI 2023), in 3D and per axial slice."""

from __future__ import annotations

import logging
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
from robustseg.attacks.ssim import block_ssim, block_ssim_reference
from robustseg.attacks.targets import TARGETS
from robustseg.errors import ConfigError
from robustseg.registry import ATTACKS

log = logging.getLogger(__name__)

# init -> default q_min. "published": the authors' code starts every entry at q_max with q_min 5 (the only start
# under which the paper's q_max sweep changes anything); "paper": Algorithm 1 starts at 1 with q_min 1.
INITS: dict[str, float] = {"published": 5.0, "paper": 1.0}
A_START = 0.1  # soft-rounding softness at the first step, annealed linearly towards 0 (published: 0.1 -> 1e-20)


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
    Volumetric Medical Segmentation", MICCAI 2023), as published.

    Each ``b^3`` block ``x`` of the volume becomes ``c = DCT3(255 x - 128)``, quantised with its own learnable
    table ``q`` (one ``b^3`` table per block) as ``c' = R_a(c / q) q`` with the soft rounding ``R_a``
    (:func:`~robustseg.attacks.frequency.soft_round`, fused in ``soft_quantise``; ``a = 0.1 (1 - t / T)`` at step
    ``t`` of ``T``), and ``x' = (IDCT3(c') + 128) / 255``. Each step maximises
    ``L(M(x'), y) - (1 - SSIM(x, x'))`` by ``q <- clip(q + sign(grad_q), q_min, q_max)``, with the published
    per-block SSIM (:func:`~robustseg.attacks.ssim.block_ssim`: window 3, data range 1, each block's SSIM clipped
    at 0, mean over blocks). The result is the last ``x'`` of the loop (soft rounding, the tables before the final
    update: what the published code and Algorithm 1 return), clipped to ``[0, 1]``. The final update would be
    discarded, so the last step runs no model pass: ``steps - 1`` forwards and backwards (``steps`` with
    ``hard_round``). Not norm-bounded: report :func:`~robustseg.attacks.ssim.perceptibility`.

    Volumes whose sizes are not multiples of ``block_size`` are replicate-padded to the next multiple, attacked,
    and cropped back (the SSIM term sees the padded blocks).

    Args:
        q_max: upper bound of the quantisation tables (paper: 10, 20, 30); larger is stronger and more visible.
        q_min: lower bound; ``None`` takes the default of ``init``.
        steps: optimisation steps (tables updated ``steps - 1`` times; the last step only reconstructs).
        block_size: DCT block edge ``b`` (paper: 32 for 3D; 8 for the 2D variant).
        use_ssim: subtract the ``1 - SSIM(x, x')`` term from the objective.
        init: ``"published"`` (q starts at q_max, q_min 5: the authors' code, the default) or ``"paper"``
            (Algorithm 1: q starts at 1, q_min 1; q can then reach only ``1 + steps``, so larger q_max do nothing:
            a warning says so).
        hard_round: return the hard-rounded reconstruction from the tables after the final update instead (the
            model never saw that point).
        clip_steps: clip ``x'`` to ``[0, 1]`` inside the steps (the published code does not; clipping zeroes the
            gradient of every clipped voxel).
        rescale_slices: min-max rescale each axial slice of ``x'`` as the published code does (safe on constant
            slices here); off by default in 3D.
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
    init: str = "published"
    hard_round: bool = False
    clip_steps: bool = False
    rescale_slices: bool = False
    loss: str = "dice_ce"
    targeted: bool = False
    target: str = "background"

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.init not in INITS:
            raise ConfigError(f"{name}.init: expected one of {sorted(INITS)}, got {self.init!r}")
        if self.q_min is None:
            object.__setattr__(self, "q_min", INITS[self.init])
        object.__setattr__(self, "q_min", parse_budget(self.q_min, "q_min", name))
        object.__setattr__(self, "q_max", parse_budget(self.q_max, "q_max", name))
        if not 0 < self.q_min <= self.q_max:
            raise ConfigError(f"{name}.q_min/q_max: need 0 < q_min <= q_max, got {self.q_min} and {self.q_max}")
        check_positive_int(self.steps, "steps", name)
        check_positive_int(self.block_size, "block_size", name)
        for flag in ("use_ssim", "hard_round", "clip_steps", "rescale_slices", "targeted"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{name}.{flag}: expected true or false, got {getattr(self, flag)!r}")
        check_loss(self.loss, name, targeted=self.targeted)
        if self.targeted:
            TARGETS[self.target]  # noqa: B018  (raises ConfigError naming the known rules)
        if self.init == "paper" and self.q_max > self.start + self.steps:
            log.warning(
                "%s: init=paper starts q at %g and moves it by 1 per step, so after %d steps q <= %g: q_max=%g acts "
                "as q_max=%g and a q_max sweep above it changes nothing; use init=published (the authors' code)",
                name,
                self.start,
                self.steps,
                self.start + self.steps,
                self.q_max,
                self.start + self.steps,
            )

    @property
    def start(self) -> float:
        """The value every table entry starts at."""
        value = self.q_max if self.init == "published" else 1.0
        return min(max(value, self.q_min), self.q_max)  # type: ignore[type-var]

    def describe(self) -> str:
        """One line naming the settings that matter for a report, including which variant ran."""
        return (
            f"{type(self).__name__.lower()}(q_max={self.q_max:g}, q_min={self.q_min:g}, init={self.init}, "
            f"block={self.block_size}^{self.dims}, steps={self.steps}, ssim={'on' if self.use_ssim else 'off'}, "
            f"output={'hard' if self.hard_round else 'soft'}, clip_steps={self.clip_steps}, "
            f"rescale_slices={self.rescale_slices})"
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
    def reconstruct(self, coeffs: Tensor, q: Tensor, m: Tensor, a: float | None) -> Tensor:
        """``x'`` as blocks (the layout of ``coeffs``) from the tables ``q``; ``a=None`` rounds hard."""
        quantised = torch.round(coeffs / q) * q if a is None else soft_quantise(coeffs, q, a)
        blocks = (self.idct(quantised, m) + 128.0) / 255.0  # back in [0, 1] units, unclipped
        return blocks.clamp(0.0, 1.0) if self.clip_steps else blocks

    def to_volume(self, blocks: Tensor, size: tuple[int, int, int]) -> Tensor:
        """Blocks of ``x'`` -> the volume ``(B, C, D, H, W)`` the model sees."""
        x = crop_to(self.merge(blocks), size)  # (B, C, D, H, W)
        return rescale_axial_slices(x) if self.rescale_slices else x

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        padded, size = pad_to_multiple(images, self.block_size, self.block_axes)  # (B, C, D', H', W')
        m = dct_matrix(self.block_size, dtype=images.dtype, device=images.device)
        clean = self.split(padded)  # blocks of x, a view
        coeffs = self.dct(255.0 * clean - 128.0, m)  # per-block coefficients, fixed
        q = torch.full_like(coeffs, self.start)  # one table per block
        loss_fn = LOSSES[self.loss]
        reference = block_ssim_reference(clean, self.dims) if self.use_ssim else None  # the clean side, once
        for step in range(self.steps):
            a = A_START * (1.0 - step / self.steps)  # 0.1 -> 0.1 / steps
            if step == self.steps - 1 and not self.hard_round:  # the final update would be discarded: skip it
                with torch.no_grad():
                    return self.to_volume(self.reconstruct(coeffs, q, m, a), size).clamp(0.0, 1.0)
            q.requires_grad_(True)
            blocks = self.reconstruct(coeffs, q, m, a)
            adversarial = self.to_volume(blocks, size)
            objective = loss_fn(model(adversarial), labels)
            if self.targeted:
                objective = -objective
            if self.use_ssim:
                # the blocks of what the model saw: ``blocks`` itself unless the slices were rescaled after merging
                seen = (
                    self.split(pad_to_multiple(adversarial, self.block_size, self.block_axes)[0])
                    if self.rescale_slices
                    else blocks
                )
                objective = objective - (1.0 - block_ssim(clean, seen, self.dims, reference=reference))
            (grad,) = torch.autograd.grad(objective, q)
            q = (q.detach() + grad.sign()).clamp(self.q_min, self.q_max)
        with torch.no_grad():  # hard_round: the tables after the final update, rounded hard
            return self.to_volume(self.reconstruct(coeffs, q, m, None), size).clamp(0.0, 1.0)


@ATTACKS.register("vafa2d")
@dataclass(frozen=True)
class VAFA2D(VAFA):
    """VAFA with a 2D DCT on ``b x b`` blocks of each axial slice (last axis), as published in the VAFA repository
    (an AdvDrop adaptation): one table per slice and block, no SSIM term, per-slice min-max rescaling (safe on
    constant slices here), 10 steps, 8 x 8 blocks.

    Malik et al. (BMVC 2024) use it to compare the 3D attack with its slice-wise counterpart.
    """

    dims: ClassVar[int] = 2
    block_axes: ClassVar[tuple[int, ...]] = (0, 1)  # D and H of each axial slice

    steps: int = 10
    block_size: int = 8
    use_ssim: bool = False
    rescale_slices: bool = True

    def split(self, x: Tensor) -> Tensor:
        return to_blocks2d(x, self.block_size)  # (B, C, W, nd, nh, b, b)

    def merge(self, blocks: Tensor) -> Tensor:
        return from_blocks2d(blocks)  # (B, C, D, H, W)

    def dct(self, blocks: Tensor, m: Tensor) -> Tensor:
        return dct2(blocks, m)

    def idct(self, coeffs: Tensor, m: Tensor) -> Tensor:
        return idct2(coeffs, m)
