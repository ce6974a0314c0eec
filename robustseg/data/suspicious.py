"""Warnings, not errors, for data that loads fine but is probably not what the user meant to train or evaluate on.

Three findings per case, computed from the arrays :mod:`robustseg.data.checks` has already read:

* a constant image (all zero, or one value everywhere), or, for CT, every voxel outside the HU window, so the
  network sees a constant ``[0, 1]`` volume;
* a volume much smaller than the ROI: after resampling (``data.spacing``) and ``data.crop_size`` it spans less
  than :data:`SMALL_FRACTION` of ``data.roi_size`` along some axis, so sliding windows are mostly padding;
* extreme anisotropy after resampling: the largest voxel spacing exceeds :data:`MAX_ANISOTROPY` times the
  smallest (e.g. 0.05 x 0.05 x 20 mm), which 3D kernels and the mm-based metrics handle badly.

:func:`suspicious_case` returns the messages; the datamodule logs them once per case and keeps them by case id
(``SegmentationDataModule.case_warnings``) so an evaluation report can list them.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np

from robustseg.data.options import DataOptions

SMALL_FRACTION = 0.5  # a volume spanning less than half the ROI along an axis is "much smaller"
MAX_ANISOTROPY = 10.0  # max / min voxel spacing after resampling


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes in mm per array axis: the lengths of the affine's first three columns. (3,)"""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def oriented(values: Sequence[float], affine: np.ndarray, orientation: str | None) -> np.ndarray:
    """Reorder per-array-axis ``values`` into the axis order after reorientation to ``orientation`` (e.g. RAS).

    ``nib.io_orientation`` gives, per array axis, the world axis (R/L, A/P, S/I) it runs along; MONAI's
    Orientationd puts array axes in the order of the axcodes' world axes.
    """
    values = np.asarray(values, dtype=np.float64)
    if orientation is None:
        return values
    world = nib.io_orientation(affine)[:, 0].astype(int)  # (3,) world axis of each array axis
    target = nib.orientations.axcodes2ornt(orientation.upper(), labels=(("L", "R"), ("P", "A"), ("I", "S")))
    order = target[:, 0].astype(int)  # (3,) world axis of each output axis
    return np.array([values[int(np.flatnonzero(world == w)[0])] for w in order])


def suspicious_case(image: np.ndarray, affine: np.ndarray, options: DataOptions, path: str) -> list[str]:
    """The warnings for one image file of a case (empty when nothing looks wrong).

    Args:
        image: the file's voxels as stored, ``(X, Y, Z)`` or channel-last ``(X, Y, Z, C)``.
        affine: its 4x4 voxel-to-world matrix (mm).
        path: the file, named in every message.
    """
    found: list[str] = []
    channels = image[..., None] if image.ndim == 3 else image  # (X, Y, Z, C)
    for c in range(channels.shape[-1]):
        lo, hi = float(np.min(channels[..., c])), float(np.max(channels[..., c]))
        which = f" channel {c}" if channels.shape[-1] > 1 else ""
        if lo == hi:
            what = "all zero" if lo == 0 else f"constant ({lo:g} everywhere)"
            found.append(f"image {path}{which} is {what}: nothing to segment (a failed conversion or an empty scan?)")
        elif options.modality == "ct" and c == 0:
            a_min, a_max = float(options.intensity.get("a_min", -175.0)), float(options.intensity.get("a_max", 250.0))
            if hi <= a_min or lo >= a_max:
                found.append(
                    f"image {path} lies entirely outside the HU window [{a_min:g}, {a_max:g}] (values {lo:g}..{hi:g}): "
                    "after windowing the network sees a constant volume (not in Hounsfield units?)"
                )

    spacing = voxel_spacing(affine)  # (3,) mm per array axis as stored
    shape = np.asarray(image.shape[:3], dtype=np.float64)
    target = np.asarray(options.spacing, dtype=np.float64) if options.spacing else None
    spacing_after = target if target is not None else oriented(spacing, affine, options.orientation)
    extent_mm = oriented(shape * spacing, affine, options.orientation)  # (3,) mm along the output axes
    size_after = extent_mm / spacing_after  # (3,) voxels after resampling
    if options.crop_size:
        size_after = np.minimum(size_after, np.asarray(options.crop_size, dtype=np.float64))
    roi = np.asarray(options.roi_size, dtype=np.float64)
    small = [k for k in range(3) if size_after[k] < SMALL_FRACTION * roi[k]]
    if small:
        found.append(
            f"image {path} spans {[int(round(s)) for s in size_after]} voxels after resampling, less than "
            f"{SMALL_FRACTION:g} x data.roi_size={[int(r) for r in roi]} along axis {small}: the sliding window "
            "is mostly padding"
        )
    ratio = float(spacing_after.max() / spacing_after.min()) if spacing_after.min() > 0 else float("inf")
    if ratio > MAX_ANISOTROPY:
        shown = " x ".join(f"{s:g}" for s in np.round(spacing_after, 4))
        found.append(
            f"image {path} has voxel spacing {shown} mm after resampling (max/min {ratio:.0f} > {MAX_ANISOTROPY:g}): "
            "extreme anisotropy; set data.spacing to resample, or check the header's pixdim"
        )
    return found
