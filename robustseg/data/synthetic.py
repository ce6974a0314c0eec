"""Synthetic CT-like phantoms written as real NIfTI files plus a datalist, for tests and CPU smoke runs.

Each case is an ellipsoidal "body" of soft tissue (about 40 HU) in air (-1000 HU) holding ``num_classes - 1``
ellipsoidal "organs"; organ ``k`` has mean intensity ``40 + 60 k`` HU, so the CT window path is exercised and
the classes are learnable. Gaussian noise (sd 20 HU), int16 storage like scanner output. The affine has
1.5 mm spacing and flipped x/y axes (LPS-like storage), so orientation handling is exercised too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from robustseg.data.datalist import write_datalist
from robustseg.data.prepare import PREPARERS, save_nifti

log = logging.getLogger(__name__)

SPACING_MM = 1.5
AFFINE = np.diag([-SPACING_MM, -SPACING_MM, SPACING_MM, 1.0])  # voxel (i, j, k) -> world (mm), LPS-like
AFFINE[:3, 3] = [30.0, 30.0, -30.0]


def phantom(size: tuple[int, int, int], num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: (image int16 HU (D, H, W), label uint8 (D, H, W)) with every class present."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in size], indexing="ij"))  # (3, D, H, W)
    body = ((grid / np.array([0.9, 0.8, 0.9])[:, None, None, None]) ** 2).sum(0) < 1
    label = np.zeros(size, dtype=np.uint8)
    for k in range(1, num_classes):
        for _ in range(100):  # redraw until the organ is visible, inside the body and not fully hidden
            centre = rng.uniform(-0.45, 0.45, size=3)[:, None, None, None]
            radii = rng.uniform(0.15, 0.3, size=3)[:, None, None, None]
            organ = (((grid - centre) / radii) ** 2).sum(0) < 1
            if organ.sum() >= 8 and (organ & body).sum() == organ.sum():
                break
        label[organ] = k
    image = np.where(body, 40.0, -1000.0) + 60.0 * label + rng.normal(0.0, 20.0, size)
    return image.round().astype(np.int16), label


def write_synthetic_dataset(
    root: str | Path,
    num_cases: int = 4,
    size: int | tuple[int, int, int] = (48, 48, 48),
    num_classes: int = 3,
    seed: int = 0,
    num_validation: int | None = None,
    datalist: str = "dataset.json",
) -> Path:
    """Write ``num_cases`` phantoms to ``root/imagesTr`` and ``root/labelsTr`` and a decathlon datalist.

    Args:
        root: output folder (created).
        num_cases: total cases, at least 2.
        size: volume size in voxels ``(D, H, W)``, or one int for a cube.
        num_classes: label classes including background (0).
        seed: seeds the phantom geometry and noise.
        num_validation: validation cases (the last ones); default a quarter, at least one.
        datalist: datalist file name under ``root``.

    Returns:
        The datalist path.
    """
    root = Path(root)
    size = (size,) * 3 if isinstance(size, int) else tuple(size)
    if num_cases < 2:
        raise ValueError(f"num_cases={num_cases}: need at least one training and one validation case")
    if num_classes < 2 or num_classes > 20:
        raise ValueError(f"num_classes={num_classes}: expected 2..20")
    num_validation = max(1, num_cases // 4) if num_validation is None else num_validation
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(num_cases):
        image, label = phantom(size, num_classes, rng)
        name = f"phantom{i:03d}.nii.gz"
        save_nifti(image, AFFINE, root / "imagesTr" / name)
        save_nifti(label, AFFINE, root / "labelsTr" / name)
        entries.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    path = root / datalist
    write_datalist(path, entries[: num_cases - num_validation], entries[num_cases - num_validation :])
    log.info("wrote %d synthetic cases of size %s to %s", num_cases, size, root)
    return path


PREPARERS.register("synthetic")(write_synthetic_dataset)
