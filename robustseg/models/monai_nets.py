"""MONAI architectures at the settings of Malik et al. (BMVC 2024) and Hanif et al. (MICCAI 2023).

Every builder takes keyword-only arguments that are exactly its ``conf/model/<name>.yaml`` keys and returns
a network mapping ``(B, in_channels, D, H, W)`` to logits ``(B, out_channels, D, H, W)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import UNETR, SegResNet, SwinUNETR, UNet
from torch import nn

from robustseg.registry import MODELS


@MODELS.register("unet")
def unet(
    *,
    in_channels: int = 1,
    out_channels: int = 14,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (2, 2, 2, 2),
    num_res_units: int = 2,
    norm: str = "batch",
    dropout: float = 0.0,
) -> nn.Module:
    """Residual UNet (Kerfoot et al., 2018) as MONAI builds it; the paper's 16-256 channels, 2 residual units."""
    if len(strides) != len(channels) - 1:
        raise ValueError(f"unet: strides {list(strides)} must have one entry fewer than channels {list(channels)}")
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        norm=norm,
        dropout=dropout,
    )


@MODELS.register("segresnet")
def segresnet(
    *,
    in_channels: int = 1,
    out_channels: int = 14,
    init_filters: int = 32,
    blocks_down: Sequence[int] = (1, 2, 2, 4),
    blocks_up: Sequence[int] = (1, 1, 1),
    dropout_prob: float | None = None,
) -> nn.Module:
    """SegResNet (Myronenko, BrainLes 2018); GroupNorm(8) needs ``init_filters`` a multiple of 8."""
    if init_filters % 8:
        raise ValueError(f"segresnet: init_filters={init_filters} must be a multiple of 8 (GroupNorm with 8 groups)")
    return SegResNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        init_filters=init_filters,
        blocks_down=tuple(blocks_down),
        blocks_up=tuple(blocks_up),
        dropout_prob=dropout_prob,
    )


@MODELS.register("unetr")
def unetr(
    *,
    in_channels: int = 1,
    out_channels: int = 14,
    img_size: Sequence[int] = (96, 96, 96),
    feature_size: int = 16,
    hidden_size: int = 768,
    mlp_dim: int = 3072,
    num_heads: int = 12,
    norm_name: str = "instance",
    dropout_rate: float = 0.0,
) -> nn.Module:
    """UNETR (Hatamizadeh et al., WACV 2022) with conv and residual blocks; inputs must be ``img_size``."""
    if any(int(s) % 16 for s in img_size):
        raise ValueError(f"unetr: img_size {list(img_size)} must be multiples of the 16^3 patch")
    return UNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        img_size=tuple(int(s) for s in img_size),
        feature_size=feature_size,
        hidden_size=hidden_size,
        mlp_dim=mlp_dim,
        num_heads=num_heads,
        norm_name=norm_name,
        conv_block=True,
        res_block=True,
        dropout_rate=dropout_rate,
    )


@MODELS.register("swin_unetr")
def swin_unetr(
    *,
    in_channels: int = 1,
    out_channels: int = 14,
    feature_size: int = 48,
    depths: Sequence[int] = (2, 2, 2, 2),
    num_heads: Sequence[int] = (3, 6, 12, 24),
    use_checkpoint: bool = True,
    drop_rate: float = 0.0,
    norm_name: str = "instance",
) -> nn.Module:
    """SwinUNETR (Hatamizadeh et al., BrainLes 2021); spatial sizes must be multiples of 32.

    ``use_checkpoint`` is gradient checkpointing (the paper's setting): it trades compute for memory and does
    not change the gradient, so attacks through it are exact.
    """
    if feature_size % 12:
        raise ValueError(f"swin_unetr: feature_size={feature_size} must be a multiple of 12")
    return SwinUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        feature_size=feature_size,
        depths=tuple(depths),
        num_heads=tuple(num_heads),
        use_checkpoint=use_checkpoint,
        drop_rate=drop_rate,
        norm_name=norm_name,
        spatial_dims=3,
    )
