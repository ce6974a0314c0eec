"""MONAI transform chains for training crops and whole-volume evaluation, keyed by modality.

Intensity normalisation is looked up in :data:`INTENSITY` by ``data.modality``: CT uses a HU window mapped to
``[0, 1]`` and clipped (``ScaleIntensityRanged``); MRI uses per-volume percentiles mapped to ``[0, 1]`` and
clipped, never a CT window; ``ct_pet`` windows channel 0 (CT, HU) and maps channel 1 (PET, SUV) from
``[0, suv_max]``. A new modality is one function and one entry.

Chains (``d`` = dictionary transforms on ``{"image", "label"}``):

* deterministic: load (channel first) -> orientation -> spacing (image bilinear, label nearest) -> intensity
  -> optional foreground crop -> optional centre crop/pad to ``crop_size`` -> pad to at least ``roi_size``;
* train: deterministic (cached, then plain tensors) -> ``num_samples`` random ROI crops, centres positive/negative
  1:1 (RandCropByPosNegLabeld) or per class by ``crop_ratios`` (RandCropByLabelClassesd) -> flips / 90-degree
  rotations / intensity scale and shift -> clip to [0, 1];
* eval: deterministic -> pad to a multiple of ``pad_divisor``; MetaTensors (affine, pixdim) kept on request.

Outputs: image float32 ``(C, D, H, W)`` in [0, 1]; label int64 ``(1, D, H, W)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from monai.transforms import (
    CastToTyped,
    Compose,
    CropForegroundd,
    DivisiblePadd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ResizeWithPadOrCropd,
    ScaleIntensityRange,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

from robustseg.errors import ConfigError

if TYPE_CHECKING:  # options.py imports INTENSITY from here
    from robustseg.data.options import DataOptions

KEYS = ("image", "label")
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # NIfTI world axes (explicit: MONAI warns otherwise)


def ct_window(a_min: float = -175.0, a_max: float = 250.0) -> list[MapTransform]:
    """CT: clip Hounsfield units to ``[a_min, a_max]`` and map linearly to ``[0, 1]`` (BTCV: -175..250 HU)."""
    if a_max <= a_min:
        raise ConfigError(f"data.intensity: a_max={a_max} must exceed a_min={a_min} (HU window)")
    return [ScaleIntensityRanged("image", a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)]


def mri_percentiles(lower: float = 0.5, upper: float = 99.5) -> list[MapTransform]:
    """MRI: map each volume's (per channel) ``lower``..``upper`` percentiles to ``[0, 1]`` and clip."""
    if not 0 <= lower < upper <= 100:
        raise ConfigError(f"data.intensity: need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
    return [
        ScaleIntensityRangePercentilesd(
            "image", lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
        )
    ]


class ChannelIntensityd(MapTransform):
    """Normalise each channel of ``image`` with its own array transform, e.g. CT window + PET SUV range."""

    def __init__(self, keys: str, per_channel: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        super().__init__(keys)
        self.per_channel = list(per_channel)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]  # (C, D, H, W)
            if image.shape[0] != len(self.per_channel):
                raise ValueError(f"{key}: expected {len(self.per_channel)} channels, got {image.shape[0]}")
            d[key] = torch.cat([t(image[c : c + 1]) for c, t in enumerate(self.per_channel)])  # (C, D, H, W)
        return d


def ct_pet(a_min: float = -250.0, a_max: float = 250.0, suv_max: float = 10.0) -> list[MapTransform]:
    """CT + PET (channels 0 and 1): CT HU window to [0, 1]; PET SUV clipped to ``[0, suv_max]`` to [0, 1]."""
    if a_max <= a_min or suv_max <= 0:
        raise ConfigError(f"data.intensity: need a_min < a_max and suv_max > 0, got {a_min}, {a_max}, {suv_max}")
    return [
        ChannelIntensityd(
            "image",
            [
                ScaleIntensityRange(a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True),
                ScaleIntensityRange(a_min=0.0, a_max=suv_max, b_min=0.0, b_max=1.0, clip=True),
            ],
        )
    ]


INTENSITY: dict[str, Callable[..., list[MapTransform]]] = {"ct": ct_window, "mri": mri_percentiles, "ct_pet": ct_pet}


def intensity_transforms(options: DataOptions) -> list[MapTransform]:
    """The modality's normalisation with ``data.intensity`` as keyword arguments (checked against its signature)."""
    builder = INTENSITY[options.modality]
    allowed = list(inspect.signature(builder).parameters)
    for key in options.intensity:
        if key not in allowed:
            raise ConfigError(f"data.intensity.{key}: not a setting of modality {options.modality!r}; use {allowed}")
    return builder(**options.intensity)


def clip_unit(x: torch.Tensor) -> torch.Tensor:
    """Clip intensities to [0, 1] after random intensity augmentation (module level: picklable for workers)."""
    return x.clamp(0.0, 1.0)


def deterministic_transforms(options: DataOptions) -> list[MapTransform]:
    """Loading and preprocessing shared by training (cached) and evaluation."""
    chain: list[MapTransform] = [LoadImaged(KEYS, ensure_channel_first=True, image_only=True)]
    if options.orientation:
        chain.append(Orientationd(KEYS, axcodes=options.orientation.upper(), labels=RAS_LABELS))
    if options.spacing:
        chain.append(Spacingd(KEYS, pixdim=options.spacing, mode=("bilinear", "nearest")))
    chain += intensity_transforms(options)
    if options.crop_foreground:
        chain.append(CropForegroundd(KEYS, source_key="image", allow_smaller=True))
    if options.crop_size:
        chain.append(ResizeWithPadOrCropd(KEYS, spatial_size=options.crop_size))
    chain.append(SpatialPadd(KEYS, spatial_size=options.roi_size))  # every ROI crop / sliding window fits
    return chain


def _crop(options: DataOptions) -> RandCropByPosNegLabeld | RandCropByLabelClassesd:
    """``num_samples`` random ``roi_size`` crops: centres positive/negative 1:1, or per class by ``crop_ratios``.

    Class-weighted centres (nnU-Net's foreground oversampling, finer) help small structures such as a tumour that
    a positive/negative draw, where any foreground voxel counts as positive, rarely centres on.
    """
    if options.crop_ratios is not None:
        return RandCropByLabelClassesd(
            KEYS,
            label_key="label",
            spatial_size=options.roi_size,
            ratios=list(options.crop_ratios),
            num_classes=options.num_classes,
            num_samples=options.num_samples,
            image_key="image",
            image_threshold=0,
            warn=False,  # a class absent from a volume (ratio renormalised by MONAI) is not an error
        )
    return RandCropByPosNegLabeld(
        KEYS,
        label_key="label",
        spatial_size=options.roi_size,
        pos=1,
        neg=1,
        num_samples=options.num_samples,
        image_key="image",
        image_threshold=0,
    )


def train_transforms(options: DataOptions) -> Compose:
    """Deterministic part, then ``num_samples`` random crops of ``roi_size`` per volume and augmentation.

    The cached deterministic output is converted to plain tensors (``track_meta=False``) so the random part
    runs without metadata bookkeeping. One volume yields a list of ``num_samples`` dicts; MONAI's
    ``list_data_collate`` flattens them into a batch of ``batch_size * num_samples`` crops.
    """
    aug = options.augment
    chain = deterministic_transforms(options)
    chain += [
        EnsureTyped(KEYS, track_meta=False),
        _crop(options),
    ]
    if aug.get("flip", 0) > 0:
        chain += [RandFlipd(KEYS, prob=aug["flip"], spatial_axis=axis) for axis in range(3)]
    if aug.get("rot90", 0) > 0:
        chain.append(RandRotate90d(KEYS, prob=aug["rot90"], max_k=3, spatial_axes=(0, 1)))
    if aug.get("scale_intensity", 0) > 0:
        chain.append(RandScaleIntensityd("image", factors=0.1, prob=aug["scale_intensity"]))
    if aug.get("shift_intensity", 0) > 0:
        chain.append(RandShiftIntensityd("image", offsets=0.1, prob=aug["shift_intensity"]))
    chain += [
        Lambdad("image", clip_unit),
        CastToTyped(KEYS, dtype=(torch.float32, torch.int64)),
        EnsureTyped(KEYS, track_meta=False),  # random transforms re-wrap MetaTensors: plain tensors again
    ]
    return Compose(chain)


def eval_transforms(options: DataOptions, *, track_meta: bool) -> Compose:
    """Whole preprocessed volumes, padded to a multiple of ``pad_divisor`` (padding is label 0, intensity 0).

    Args:
        track_meta: keep MONAI MetaTensors (affine, pixdim, source file) for evaluation; plain tensors for the
            validation loader.
    """
    chain = deterministic_transforms(options)
    if options.pad_divisor and options.pad_divisor > 1:
        chain.append(DivisiblePadd(KEYS, k=options.pad_divisor))
    chain += [
        CastToTyped(KEYS, dtype=(torch.float32, torch.int64)),
        EnsureTyped(KEYS, track_meta=track_meta),
    ]
    return Compose(chain)
