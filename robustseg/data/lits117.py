"""LiTS case 117: the real abdominal CT shipped inside ``liver-ct-segmentation-package``, as NIfTI.

The package stores ``data/img_117.mrc`` (float32 Hounsfield units) and ``data/lab_117.mrc`` (0 background,
1 liver, 2 tumour), a 128^3 crop around the liver. Facts and assumptions:

* Voxel spacing is not stored (the MRC voxel size is 0): we ASSUME 1 mm isotropic.
* Axes, read from the anatomy (liver on the patient's right, vertebrae posterior, liver dome superior): array
  axis 0 runs anterior -> posterior, axis 1 patient right -> left, axis 2 inferior -> superior. The affine
  written here encodes that (axcodes ``PLS``), so ``Orientationd("RAS")`` yields x = right, y = anterior,
  z = superior; the volume is centred on the world origin.
* Train and validation come from DISJOINT axial slabs: validation = the inferior 48 slices (axis 2 index
  0..47, liver tip: about 69k liver and 5k tumour voxels), training = the superior 80 slices (index 48..127, most of the
  liver and tumour). Both contain all three classes.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from robustseg.data.datalist import write_datalist
from robustseg.data.prepare import PREPARERS, save_nifti
from robustseg.errors import DataError

log = logging.getLogger(__name__)

PACKAGE = "liver_ct_segmentation_package"
SPACING_MM = 1.0  # assumed: the MRC header stores no voxel size
VALIDATION_SLICES = 48  # inferior slices (axis 2) for validation; the rest trains
# voxel (i, j, k) -> world (x, y, z) mm in RAS: x = -j (axis 1 runs to the patient's left), y = -i (axis 0 runs
# posterior), z = k (axis 2 runs superior)
AXES = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) * SPACING_MM


def source_files() -> tuple[Path, Path]:
    """Paths of the shipped (image, label) MRC files.

    Raises:
        DataError: the package is not installed or lacks its data files.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"lits117 needs the {PACKAGE!r} package: pip install liver-ct-segmentation-package")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    image, label = folder / "img_117.mrc", folder / "lab_117.mrc"
    for path in (image, label):
        if not path.is_file():
            raise DataError(f"lits117: {path} is missing from the installed {PACKAGE} package")
    return image, label


def read_volumes() -> tuple[np.ndarray, np.ndarray]:
    """(image float32 HU (128, 128, 128), label uint8 (128, 128, 128)) in the package's array order."""
    import mrcfile  # local: only this dataset needs it

    image_path, label_path = source_files()
    with mrcfile.open(image_path, permissive=True) as mrc:
        image = np.asarray(mrc.data, dtype=np.float32).copy()
    with mrcfile.open(label_path, permissive=True) as mrc:
        label = np.asarray(mrc.data).astype(np.uint8)
    return image, label


def slab_affine(shape: tuple[int, int, int], k_start: int) -> np.ndarray:
    """Affine of the slab starting at axis-2 index ``k_start`` of a volume of ``shape`` centred at the origin."""
    affine = np.eye(4)
    affine[:3, :3] = AXES
    centre = (np.array(shape) - 1) / 2
    affine[:3, 3] = -AXES @ (centre - np.array([0, 0, k_start]))
    return affine


def prepare_lits117(
    root: str | Path, datalist: str = "dataset.json", validation_slices: int = VALIDATION_SLICES
) -> Path:
    """Convert the shipped CT into a training slab and a validation slab (NIfTI) plus a datalist in ``root``.

    Args:
        root: output folder (created).
        datalist: datalist file name under ``root``.
        validation_slices: inferior axial slices used for validation; the remaining superior ones train.

    Returns:
        The datalist path.
    """
    root = Path(root)
    image, label = read_volumes()
    depth = image.shape[2]
    if not 0 < validation_slices < depth:
        raise ValueError(f"validation_slices={validation_slices}: expected 1..{depth - 1}")
    slabs = {"lits117_val": (0, validation_slices), "lits117_train": (validation_slices, depth)}
    entries = {}
    for name, (start, stop) in slabs.items():
        affine = slab_affine(image.shape, start)
        save_nifti(image[:, :, start:stop], affine, root / "images" / f"{name}.nii.gz")
        save_nifti(label[:, :, start:stop], affine, root / "labels" / f"{name}.nii.gz")
        entries[name] = {"image": f"images/{name}.nii.gz", "label": f"labels/{name}.nii.gz"}
    path = root / datalist
    write_datalist(path, [entries["lits117_train"]], [entries["lits117_val"]])
    log.info(
        "lits117: wrote training slab (axial %d..%d) and validation slab (0..%d) to %s",
        validation_slices,
        depth - 1,
        validation_slices - 1,
        root,
    )
    return path


PREPARERS.register("lits117")(prepare_lits117)
