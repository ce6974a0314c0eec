"""The scored region: the case's real voxels, without the padding the evaluation transforms add.

The evaluation transforms pad every volume (``SpatialPadd`` to the training ROI, ``DivisiblePadd`` to a
multiple of ``pad_divisor``; ``ResizeWithPadOrCropd`` when ``crop_size`` is larger than the volume). Scoring
the padded volume counts predicted foreground in padding as false positives, adds padding voxels to the flip
rate and lets the attack perturb voxels that are not part of the image (the LiTS-117 validation slab of
128 x 128 x 48 voxels is padded to 64 slices: 25 % padding).

:func:`real_box` replays the pads and crops MONAI recorded in the MetaTensor's ``applied_operations`` to find
the box of real voxels in the final grid; :func:`real_case` crops image and label to it and shifts the affine,
so the evaluator only ever sees real voxels. MONAI's ``sliding_window_inference`` and ``attack_volume`` pad a
volume smaller than the ROI internally and crop their outputs back, so the perturbation is zero outside the
real extent in both attack modes, metrics and HD95's worst value (the diagonal) are those of the real volume,
and the stored adversarial volumes have the real extent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robustseg.errors import DataError

# MONAI transforms that change the voxel grid without padding or cropping: fine before any padding
_RESAMPLING = ("Orientation", "Spacing", "Flip", "Rotate", "Rotate90", "Resize", "Zoom", "Affine", "Spacingd")


@dataclass(frozen=True)
class Region:
    """Box ``[start, stop)`` of the real voxels along (D, H, W) of the transformed volume."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))


def _info(op: Any, name: str) -> Any:
    return op.get(name) if isinstance(op, Mapping) else None


def _pairs(padded: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """MONAI's ``padded`` ((c0, c1), (d0, d1), ...) -> spatial (before, after) pairs."""
    pairs = [(int(a), int(b)) for a, b in padded]
    return pairs[-3:]


def _apply(box: list[list[int]] | None, op: Mapping[str, Any], where: str) -> list[list[int]] | None:
    """The real box after one recorded transform (``None``: the whole grid, nothing padded yet)."""
    info = _info(op, "extra_info") or {}
    if "crop_info" in info or "pad_info" in info:  # ResizeWithPadOrCrop: crop first, then pad
        for inner in (info.get("crop_info"), info.get("pad_info")):
            if inner:
                box = _apply(box, inner, where)
        return box
    orig = [int(s) for s in _info(op, "orig_size") or []][-3:]
    cropped, padded = info.get("cropped"), info.get("padded")
    if cropped is None and padded is None:
        name = str(_info(op, "class"))
        if box is not None and any(name.startswith(r) for r in _RESAMPLING):
            raise DataError(
                f"{where}: transform {name} resamples the grid after padding; the real voxels cannot be located "
                "(put spatial transforms before padding in the evaluation chain)"
            )
        return box
    if cropped is not None:
        if box is None:
            box = [[0, n] for n in orig]
        before = [int(c) for c in cropped][0::2][-3:]
        after = [int(c) for c in cropped][1::2][-3:]
        size = [n - b - a for n, b, a in zip(orig, before, after)]
        box = [[min(max(lo - b, 0), s), min(max(hi - b, 0), s)] for (lo, hi), b, s in zip(box, before, size)]
    if padded is not None:
        if box is None:
            box = [[0, n] for n in (orig if cropped is None else size)]
        box = [[lo + b, hi + b] for (lo, hi), (b, _a) in zip(box, _pairs(padded))]
    return box


def real_box(volume: Any, where: str = "case") -> Region:
    """The box of real (unpadded) voxels of a transformed (C, D, H, W) MetaTensor.

    A plain tensor (or a MetaTensor without recorded operations) is all real.

    Raises:
        DataError: the transforms resampled the grid after padding, or the box is empty.
    """
    shape = tuple(int(s) for s in volume.shape[-3:])
    box = None
    for op in getattr(volume, "applied_operations", None) or []:
        box = _apply(box, op, where)
    if box is None:
        return Region((0, 0, 0), shape)
    start = tuple(max(lo, 0) for lo, _ in box)
    stop = tuple(min(hi, n) for (_, hi), n in zip(box, shape))
    if any(b <= a for a, b in zip(start, stop)):
        raise DataError(f"{where}: no real voxels left after the transforms' crops ({start} to {stop} of {shape})")
    return Region(start, stop)


def shifted_affine(affine: np.ndarray, start: Sequence[int]) -> np.ndarray:
    """The affine of a sub-volume starting at voxel ``start`` of a volume with ``affine`` (world coords kept)."""
    out = np.array(affine, dtype=np.float64, copy=True)
    out[:3, 3] = affine[:3, :3] @ np.asarray(start, dtype=np.float64) + affine[:3, 3]
    return out


def real_case(case: Mapping[str, Any]) -> tuple[Tensor, Tensor, np.ndarray, list[float], Region]:
    """Image (1, C, d, h, w), label (1, 1, d, h, w), affine, spacing and region of a case's real voxels.

    Args:
        case: an evaluation item: ``image`` (C, D, H, W) and ``label`` (1, D, H, W) MetaTensors, ``case_id``.
    """
    where = f"case {case.get('case_id')!r}"
    region = real_box(case["image"], where)
    affine = _affine(case["image"])
    spacing = _spacing(case["image"], affine)
    crop = (slice(None), *region.slices)
    image = _plain(case["image"])[crop].float()[None].contiguous()  # (1, C, d, h, w)
    label = _plain(case["label"])[crop].long()[None].contiguous()  # (1, 1, d, h, w)
    return image, label, shifted_affine(affine, region.start), spacing, region


def _plain(x: Any) -> Tensor:
    """A plain tensor: MetaTensor's per-op metadata tracking would dominate the cost of scoring."""
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.detach().clone()


def _affine(image: Any) -> np.ndarray:
    affine = getattr(image, "affine", None)
    return np.eye(4) if affine is None else np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)


def _spacing(image: Any, affine: np.ndarray) -> list[float]:
    pixdim = getattr(image, "pixdim", None)
    if pixdim is not None:
        return [float(s) for s in torch.as_tensor(pixdim).flatten()[:3]]
    return [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)]
