"""Check every case of a dataset before training, so bad input fails with one clear message.

Each problem raises :class:`~robustseg.errors.DataError` naming the split, case and file: a missing file, an
unreadable or corrupt NIfTI (e.g. a truncated gzip), an image/label shape or affine mismatch, label values
outside ``[0, num_classes)`` or not integers, NaN/inf voxels, a channel count that differs from
``data.in_channels``. Files are read with nibabel directly, never through MONAI, so no deep traceback.

Data that loads but looks wrong (constant images, volumes far smaller than the ROI, extreme anisotropy) gives
warnings instead (:mod:`robustseg.data.suspicious`): :func:`check_dataset` logs them once per case and returns
them by case id.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from lightning.pytorch.utilities import rank_zero_only

from robustseg.data.datalist import Case, read_datalist
from robustseg.data.options import DataOptions
from robustseg.data.suspicious import suspicious_case
from robustseg.errors import DataError

log = logging.getLogger(__name__)

AFFINE_ATOL = 1e-3  # mm; NIfTI stores affines in float32, so exact equality is too strict


def _load(path: str, what: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file fully (so a truncated gzip is caught here); returns (array, 4x4 affine)."""
    if not Path(path).is_file():
        raise DataError(f"{where}: {what} file not found: {path}")
    try:
        image = nib.load(path)
        array = np.asanyarray(image.dataobj)
    except Exception as err:  # nibabel raises ImageFileError, EOFError, zlib.error, OSError, ...
        raise DataError(f"{where}: cannot read {what} {path}: corrupt or not a NIfTI file ({err})") from err
    return array, np.asarray(image.affine, dtype=np.float64)


def check_case(case: Case, options: DataOptions, where: str) -> list[str]:
    """Check one case; ``where`` (e.g. ``"validation case img0001"``) prefixes every message.

    Returns:
        Warnings about data that is usable but suspicious (see :mod:`robustseg.data.suspicious`), may be empty.

    Raises:
        DataError: naming the case, the file and the problem.
    """
    image_paths = case["image"] if isinstance(case["image"], list) else [case["image"]]
    label, label_affine = _load(case["label"], "label", where)
    if label.ndim == 4 and label.shape[-1] == 1:
        label = label[..., 0]
    if label.ndim != 3:
        raise DataError(f"{where}: label {case['label']} has shape {label.shape}; expected a 3D volume")
    channels = 0
    warnings: list[str] = []
    for path in image_paths:
        image, affine = _load(path, "image", where)
        if image.ndim not in (3, 4):
            raise DataError(f"{where}: image {path} has shape {image.shape}; expected 3D (or 4D channel-last)")
        channels += 1 if image.ndim == 3 else image.shape[-1]
        if image.shape[:3] != label.shape:
            raise DataError(
                f"{where}: image {path} has shape {image.shape[:3]} but label {case['label']} has {label.shape}"
            )
        if not np.allclose(affine, label_affine, atol=AFFINE_ATOL):
            raise DataError(
                f"{where}: image {path} and label {case['label']} have different affines (voxel-to-world "
                f"matrices):\n{np.round(affine, 4)}\nvs\n{np.round(label_affine, 4)}"
            )
        if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
            bad = int((~np.isfinite(image)).sum())
            raise DataError(f"{where}: image {path} has {bad} NaN/inf voxels")
        warnings += suspicious_case(image, affine, options, path)
    if channels != options.in_channels:
        raise DataError(f"{where}: image has {channels} channel(s) but data.in_channels={options.in_channels}")
    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all():
            raise DataError(f"{where}: label {case['label']} has {int((~np.isfinite(label)).sum())} NaN/inf voxels")
        if not np.array_equal(label, np.round(label)):
            raise DataError(f"{where}: label {case['label']} has non-integer values; expected class indices")
    outside = (label < 0) | (label >= options.num_classes)
    if outside.any():
        values = np.unique(label[outside])[:5].tolist()
        raise DataError(
            f"{where}: label {case['label']} has values {values} outside [0, {options.num_classes}) "
            f"(data.num_classes={options.num_classes})"
        )
    return warnings


def validate_dataset(options: DataOptions) -> dict[str, list[Case]]:
    """Read the datalist and check every case of every split (warnings are logged, see :func:`check_dataset`).

    Returns:
        ``{"training": [case, ...], "validation": [...]}`` with absolute paths and ``case_id``.

    Raises:
        DataError: the first problem found, naming the datalist or the case and file.
    """
    return check_dataset(options)[0]


def check_dataset(options: DataOptions) -> tuple[dict[str, list[Case]], dict[str, list[str]]]:
    """Read the datalist, check every case of every split, log each suspicious case once (one warning line).

    Returns:
        The splits (as :func:`validate_dataset`) and ``{case_id: [warning, ...]}`` for the cases with warnings.

    Raises:
        DataError: the first problem found, naming the datalist or the case and file.
    """
    splits = read_datalist(options.datalist_path, options.root)
    warnings: dict[str, list[str]] = {}
    for split, cases in splits.items():
        for case in cases:
            where = f"{options.name} {split} case {case['case_id']!r}"
            found = check_case(case, options, where=where)
            if found:
                warnings[str(case["case_id"])] = found
                if rank_zero_only.rank == 0:  # DDP processes check the data too; one of them tells
                    log.warning("suspicious data, %s: %s", where, "; ".join(found))
    log.info(
        "data %s: %s checked (%s)",
        options.name,
        options.datalist_path,
        ", ".join(f"{len(c)} {s}" for s, c in splits.items()),
    )
    return splits, warnings
