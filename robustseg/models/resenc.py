"""nnU-Net-style residual building blocks, as U-Mamba (Ma et al., arXiv 2401.04722) assembles them.

Isensee et al., "nnU-Net", Nature Methods 2021, and its ``dynamic-network-architectures`` package provide the
blocks; U-Mamba adds its own ``BasicResBlock`` and a nearest-neighbour ``UpsampleLayer``. Written here (about a
hundred lines) instead of depending on that package. Module and parameter names follow U-Mamba's code, so its
checkpoints map onto these modules (see :func:`robustseg.models.umamba.convert_official_state_dict`).

All blocks are 3D: (B, C, D, H, W) in, (B, C', D', H', W') out. Norm is instance norm (eps 1e-5, affine), the
non-linearity LeakyReLU(0.01), as U-Mamba's 3D plans.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm3d(channels, eps=1e-5, affine=True)


def _act() -> nn.Module:
    return nn.LeakyReLU(negative_slope=1e-2, inplace=True)


class BasicResBlock(nn.Module):
    """U-Mamba's residual block: conv-norm-act, conv-norm, plus a (strided) 1x1 conv shortcut, then act.

    Shapes: (B, C_in, S) -> (B, C_out, S / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=pad)
        self.norm1 = _norm(out_channels)
        self.act1 = _act()
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size, padding=pad)
        self.norm2 = _norm(out_channels)
        self.act2 = _act()
        self.conv3 = nn.Conv3d(in_channels, out_channels, kernel_size=1, stride=stride)  # U-Mamba: use_1x1conv=True

    def forward(self, x: Tensor) -> Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act2(y + self.conv3(x))


class ConvNormAct(nn.Module):
    """``dynamic_network_architectures``' ConvDropoutNormReLU without dropout: conv, norm, optional act."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)
        self.norm = _norm(out_channels)
        self.nonlin = _act() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlin(self.norm(self.conv(x)))


class BasicBlockD(nn.Module):
    """nnU-Net's ``BasicBlockD`` with stride 1 and equal widths (the only way U-Mamba uses it): identity shortcut.

    Shapes: (B, C, S) -> (B, C, S).
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels, kernel_size)
        self.conv2 = ConvNormAct(channels, channels, kernel_size, act=False)
        self.nonlin2 = _act()

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlin2(self.conv2(self.conv1(x)) + x)


def res_stage(in_channels: int, out_channels: int, blocks: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    """One resolution stage: a (strided) ``BasicResBlock`` then ``blocks - 1`` ``BasicBlockD``."""
    return nn.Sequential(
        BasicResBlock(in_channels, out_channels, kernel_size, stride),
        *[BasicBlockD(out_channels, kernel_size) for _ in range(blocks - 1)],
    )


class UpsampleLayer(nn.Module):
    """Nearest-neighbour upsampling by ``scale`` then a 1x1 conv: (B, C_in, S) -> (B, C_out, S * scale)."""

    def __init__(self, in_channels: int, out_channels: int, scale: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        if self.scale != 1:
            x = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return self.conv(x)


def init_he(module: nn.Module) -> None:
    """nnU-Net's ``InitWeights_He(1e-2)``: Kaiming-normal 3D conv weights (a = 0.01), zero biases."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
