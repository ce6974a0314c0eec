"""U-Mamba (Ma, Li & Wang, "U-Mamba: Enhancing Long-range Dependency for Biomedical Image Segmentation",
arXiv 2401.04722): an nnU-Net residual encoder-decoder with Mamba layers, runnable on any device.

``umamba_bot`` puts one Mamba layer (LayerNorm then Mamba, no residual, as the official code) on the flattened
bottleneck; ``umamba_enc`` puts one after every encoder stage. Module names follow the official
``UMambaBot_3d.py`` / ``UMambaEnc_3d.py`` (``encoder.stem``, ``encoder.stages``, ``encoder.mamba_layers``,
``mamba_layer``, ``decoder.upsample_layers``, ``decoder.stages``, ``decoder.seg_layers``). The official code also
keeps unused deep-supervision heads and nnU-Net's duplicate ``all_modules`` references; without deep
supervision neither exists here, so no parameter goes without a gradient (DDP-safe).

Planning, as nnU-Net's: given ``img_size``, trailing stages whose input is not divisible by their stride or whose
feature map would drop below 2 voxels per axis are removed (logged). With ``img_size``, ``umamba_enc`` also
reproduces the official channel-token rule: a stage whose feature map has no more voxels than channels runs its
Mamba over channels (tokens = channels, width = voxels), which fixes that stage's input size. Without
``img_size`` every stage uses voxel tokens and any input whose sides are multiples of the total stride works.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from robustseg.models.mamba import Mamba
from robustseg.models.resenc import UpsampleLayer, init_he, res_stage
from robustseg.registry import MODELS

logger = logging.getLogger(__name__)


class MambaLayer(nn.Module):
    """LayerNorm + Mamba over the voxels (or, with ``channel_token``, the channels) of a feature map.

    Shapes: (B, C, D, H, W) -> (B, C, D, H, W). Runs in float32 with autocast off, as the official layer.

    Args:
        dim: token width: ``C`` for voxel tokens, ``D * H * W`` for channel tokens.
        channel_token: tokens are the ``C`` channels instead of the ``D * H * W`` voxels.
        **mamba_kwargs: passed to :class:`~robustseg.models.mamba.Mamba` (d_state, d_conv, expand, scan, ...).
    """

    def __init__(self, dim: int, channel_token: bool = False, **mamba_kwargs) -> None:
        super().__init__()
        self.dim, self.channel_token = dim, channel_token
        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba(d_model=dim, **mamba_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        bs, channels, *spatial = x.shape
        width = math.prod(spatial) if self.channel_token else channels
        if width != self.dim:
            kind = "voxels (channel tokens, fixed by img_size)" if self.channel_token else "channels"
            raise ValueError(f"MambaLayer expects {self.dim} {kind}, got input {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            tokens = x.float().flatten(2)  # (B, C, N) with N = D * H * W
            if not self.channel_token:
                tokens = tokens.transpose(1, 2)  # (B, N, C): one token per voxel
            out = self.mamba(self.norm(tokens))  # (B, N, C) or (B, C, N)
            if not self.channel_token:
                out = out.transpose(1, 2)  # (B, C, N)
        return out.reshape(bs, channels, *spatial)  # (B, C, D, H, W)


class ResidualEncoder(nn.Module):
    """Stem plus one residual stage per resolution; optionally a :class:`MambaLayer` after each stage.

    Returns the list of stage outputs (the skips), finest first: ``[(B, f_s, S / stride_s) for s]``.
    """

    def __init__(
        self,
        in_channels: int,
        features: Sequence[int],
        strides: Sequence[int],
        blocks: Sequence[int],
        kernel_size: int,
        mamba_dims: Sequence[tuple[int, bool]] | None,
        mamba_kwargs: dict,
    ) -> None:
        super().__init__()
        self.stem = res_stage(in_channels, features[0], blocks[0], kernel_size)
        chans = [features[0], *features[:-1]]
        self.stages = nn.ModuleList(
            res_stage(c_in, c_out, n, kernel_size, stride)
            for c_in, c_out, n, stride in zip(chans, features, blocks, strides)
        )
        self.mamba_layers = (
            nn.ModuleList(MambaLayer(dim, channel_token, **mamba_kwargs) for dim, channel_token in mamba_dims)
            if mamba_dims is not None
            else None
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        skips = []
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if self.mamba_layers is not None:
                x = self.mamba_layers[s](x)
            skips.append(x)
        return skips


class ResidualDecoder(nn.Module):
    """Upsample (nearest + 1x1 conv), concatenate the skip, one residual stage; a 1x1 head at full resolution.

    Maps the encoder's skips to logits (B, K, S).
    """

    def __init__(
        self,
        features: Sequence[int],
        strides: Sequence[int],
        blocks: Sequence[int],
        kernel_size: int,
        out_channels: int,
    ) -> None:
        super().__init__()
        n = len(features)
        self.upsample_layers = nn.ModuleList(
            UpsampleLayer(features[-s], features[-s - 1], strides[-s]) for s in range(1, n)
        )
        self.stages = nn.ModuleList(
            res_stage(2 * features[-s - 1], features[-s - 1], blocks[s - 1], kernel_size) for s in range(1, n)
        )
        # Only the full-resolution head (no deep supervision); keyed by its index in the official code.
        self.seg_layers = nn.ModuleDict({str(n - 2): nn.Conv3d(features[0], out_channels, kernel_size=1)})

    def forward(self, skips: list[Tensor]) -> Tensor:
        x = skips[-1]
        for s, (up, stage) in enumerate(zip(self.upsample_layers, self.stages)):
            x = stage(torch.cat([up(x), skips[-s - 2]], dim=1))  # (B, 2 f, S) -> (B, f, S)
        (head,) = self.seg_layers.values()
        return head(x)  # (B, K, D, H, W)


class UMamba(nn.Module):
    """U-Mamba network: (B, in_channels, D, H, W) -> logits (B, out_channels, D, H, W).

    Sides must be multiples of ``total_stride`` (the product of ``strides``). Build it through the
    ``umamba_bot`` / ``umamba_enc`` registry builders, which apply the paper's plan.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        features: Sequence[int],
        strides: Sequence[int],
        blocks_per_stage: Sequence[int],
        blocks_per_stage_decoder: Sequence[int],
        kernel_size: int = 3,
        mamba_in: str = "bottleneck",
        channel_tokens: Sequence[int | None] | None = None,
        mamba_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        mamba_kwargs = mamba_kwargs or {}
        self.total_stride = math.prod(strides)
        n = len(features)
        if mamba_in == "encoder":
            tokens = channel_tokens or [None] * n
            mamba_dims = [(t, True) if t else (f, False) for f, t in zip(features, tokens)]
        elif mamba_in == "bottleneck":
            mamba_dims = None
        else:
            raise ValueError(f"UMamba: mamba_in={mamba_in!r}; expected 'bottleneck' or 'encoder'")
        self.encoder = ResidualEncoder(
            in_channels, features, strides, blocks_per_stage, kernel_size, mamba_dims, mamba_kwargs
        )
        self.mamba_layer = MambaLayer(features[-1], **mamba_kwargs) if mamba_in == "bottleneck" else None
        self.decoder = ResidualDecoder(features, strides, blocks_per_stage_decoder, kernel_size, out_channels)
        self.apply(init_he)

    def forward(self, x: Tensor) -> Tensor:
        if any(side % self.total_stride for side in x.shape[2:]):
            raise ValueError(f"UMamba: spatial size {tuple(x.shape[2:])} must be a multiple of {self.total_stride}")
        skips = self.encoder(x)
        if self.mamba_layer is not None:
            skips[-1] = self.mamba_layer(skips[-1])
        return self.decoder(skips)


def plan(
    features: Sequence[int],
    strides: Sequence[int],
    blocks_per_stage: Sequence[int] | None,
    blocks_per_stage_decoder: Sequence[int] | None,
    img_size: Sequence[int] | None,
    name: str,
) -> tuple[list[int], list[int], list[int], list[int], list[list[int]] | None]:
    """Trim stages to ``img_size`` and fill in U-Mamba's block counts.

    Returns features, strides, encoder blocks, decoder blocks (deepest first) and the feature-map size of every
    stage (or None without ``img_size``). U-Mamba's rule for absent block counts: 2 residual blocks per stage,
    1 in the deeper half of the encoder (stages >= ceil(n / 2)) and in decoder stages >= ceil(n / 2) (deepest
    first), as ``UMambaBot_3d.py``.
    """
    features, strides = list(features), list(strides)
    if len(features) != len(strides):
        raise ValueError(f"{name}: features {features} and strides {strides} need one entry per stage")
    if strides[0] != 1:
        raise ValueError(f"{name}: strides[0] must be 1 (the segmentation head works at stage 0's resolution)")
    n_full = len(features)
    sizes = None
    if img_size is not None:
        sizes, size = [], [int(v) for v in img_size]
        for stride in strides:
            if any(v % stride or v // stride < 2 for v in size):
                break
            size = [v // stride for v in size]
            sizes.append(size)
        if len(sizes) < 2:
            raise ValueError(f"{name}: img_size {list(img_size)} is too small for strides {strides}")
        if len(sizes) < n_full:
            logger.warning(
                "%s: img_size %s fits %d of %d stages (feature maps >= 2 voxels, divisible strides); using %d",
                name, list(img_size), len(sizes), n_full, len(sizes),
            )  # fmt: skip
    n = len(sizes) if sizes is not None else n_full
    if blocks_per_stage is None:
        blocks_per_stage = [2 if s < math.ceil(n / 2) else 1 for s in range(n)]
    if blocks_per_stage_decoder is None:
        blocks_per_stage_decoder = [2 if s < math.ceil((n - 1) / 2 + 0.5) else 1 for s in range(n - 1)]
    blocks, blocks_dec = list(blocks_per_stage)[:n], list(blocks_per_stage_decoder)[-(n - 1) :]
    if len(blocks) != n or len(blocks_dec) != n - 1 or min(blocks + blocks_dec) < 1:
        raise ValueError(
            f"{name}: need >= 1 block in each of {n} encoder and {n - 1} decoder stages, "
            f"got {list(blocks_per_stage)} and {list(blocks_per_stage_decoder)}"
        )
    return features[:n], strides[:n], blocks, blocks_dec, sizes


def _build(mamba_in: str, name: str, **kw) -> UMamba:
    features, strides, blocks, blocks_dec, sizes = plan(
        kw.pop("features"), kw.pop("strides"), kw.pop("blocks_per_stage"), kw.pop("blocks_per_stage_decoder"),
        kw.pop("img_size"), name,
    )  # fmt: skip
    channel_tokens = None
    if mamba_in == "encoder" and sizes is not None:  # official rule: voxels <= channels -> channel tokens
        channel_tokens = [math.prod(size) if math.prod(size) <= f else None for size, f in zip(sizes, features)]
    mamba_kwargs = {k: kw.pop(k) for k in ("d_state", "d_conv", "expand", "scan", "chunk_size")}
    return UMamba(
        features=features, strides=strides, blocks_per_stage=blocks, blocks_per_stage_decoder=blocks_dec,
        mamba_in=mamba_in, channel_tokens=channel_tokens, mamba_kwargs=mamba_kwargs, **kw,
    )  # fmt: skip


@MODELS.register("umamba_bot")
def umamba_bot(
    *,
    in_channels: int = 1,
    out_channels: int = 14,
    features: Sequence[int] = (32, 64, 128, 256, 320, 320),
    strides: Sequence[int] = (1, 2, 2, 2, 2, 2),
    kernel_size: int = 3,
    blocks_per_stage: Sequence[int] | None = None,
    blocks_per_stage_decoder: Sequence[int] | None = None,
    img_size: Sequence[int] | None = None,
    d_state: int = 16,
    d_conv: int = 4,
    expand: int = 2,
    scan: str = "auto",
    chunk_size: int = 512,
) -> nn.Module:
    """U-Mamba_Bot: residual U-Net with LayerNorm + Mamba on the flattened bottleneck (Ma et al., 2024).

    Defaults are the 3D nnU-Net plan of the papers (6 stages, 32-320 features, d_state 16, d_conv 4, expand 2);
    block counts ``None`` follow U-Mamba's rule (see :func:`plan`); ``img_size`` trims stages that would not fit.
    """
    return _build("bottleneck", "umamba_bot", **locals())


@MODELS.register("umamba_enc")
def umamba_enc(
    *,
    in_channels: int = 1,
    out_channels: int = 14,
    features: Sequence[int] = (32, 64, 128, 256, 320, 320),
    strides: Sequence[int] = (1, 2, 2, 2, 2, 2),
    kernel_size: int = 3,
    blocks_per_stage: Sequence[int] | None = None,
    blocks_per_stage_decoder: Sequence[int] | None = None,
    img_size: Sequence[int] | None = None,
    d_state: int = 16,
    d_conv: int = 4,
    expand: int = 2,
    scan: str = "auto",
    chunk_size: int = 512,
) -> nn.Module:
    """U-Mamba_Enc: a LayerNorm + Mamba layer after every residual encoder stage (Ma et al., 2024).

    As :func:`umamba_bot`; with ``img_size`` the deep stages whose feature map has no more voxels than channels
    use channel tokens (official rule), and inputs must then be ``img_size``.
    """
    return _build("encoder", "umamba_enc", **locals())
