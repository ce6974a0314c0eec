"""MNI152 (ICBM 2009a symmetric) T1 brain template with tissue labels, from the files nilearn ships.

Sources (``nilearn/datasets/data``, read from disk; no nilearn fetcher, no network):
``mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``: 197 x 233 x 189 voxels at 1 mm, RAS, the T1
skull-stripped (uint8), GM and WM as probability maps scaled to 0..255.

Labels: 0 background, 1 CSF, 2 grey matter, 3 white matter.

* brain = T1 > 0 (the template is skull-stripped; this is nilearn's own ``load_mni152_brain_mask`` rule);
* inside the brain, with p_gm = GM / 255 and p_wm = WM / 255, p_csf = max(0, 1 - p_gm - p_wm), i.e. CSF is the
  brain minus grey and white matter; each brain voxel takes the tissue of highest probability.

Train and validation are DISJOINT hemispheres: training = right hemisphere (x > 0 mm), validation = left
hemisphere (x < 0 mm); the midline plane x = 0 is in neither. Each half is cropped to its brain bounding box
plus a 2-voxel margin (the affine keeps world coordinates).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from robustseg.data.datalist import write_datalist
from robustseg.data.prepare import PREPARERS, save_nifti
from robustseg.errors import DataError

log = logging.getLogger(__name__)

FILES = {tissue: f"mni_icbm152_{tissue}_tal_nlin_sym_09a_converted.nii.gz" for tissue in ("t1", "gm", "wm")}
MARGIN = 2  # voxels kept around the brain bounding box


def source_folder() -> Path:
    """``nilearn/datasets/data`` of the installed nilearn, located without importing nilearn.

    Raises:
        DataError: nilearn is not installed or lacks the template files.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mni152 needs the 'nilearn' package (it ships the MNI152 template): pip install nilearn")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    for name in FILES.values():
        if not (folder / name).is_file():
            raise DataError(f"mni152: {folder / name} is missing from the installed nilearn")
    return folder


def tissue_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Labels uint8 (X, Y, Z): 0 outside the brain (T1 == 0), else 1 + argmax(p_csf, p_gm, p_wm)."""
    p_gm, p_wm = gm / 255.0, wm / 255.0
    p_csf = np.clip(1.0 - p_gm - p_wm, 0.0, None)
    tissue = np.argmax(np.stack([p_csf, p_gm, p_wm]), axis=0) + 1  # (X, Y, Z) in 1..3
    return np.where(t1 > 0, tissue, 0).astype(np.uint8)


def _crop(image: np.ndarray, label: np.ndarray, affine: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """Crop to the voxel box [lo, hi) and shift the affine so world coordinates are unchanged."""
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return image[box], label[box], shifted


def prepare_mni152(root: str | Path, datalist: str = "dataset.json") -> Path:
    """Write the right-hemisphere (training) and left-hemisphere (validation) volumes and a datalist.

    Returns:
        The datalist path.
    """
    root = Path(root)
    folder = source_folder()
    images = {tissue: nib.load(folder / name) for tissue, name in FILES.items()}
    affine = images["t1"].affine
    t1, gm, wm = (np.asarray(images[t].dataobj) for t in ("t1", "gm", "wm"))
    label = tissue_labels(t1, gm, wm)
    # world x of every voxel index along axis 0 (the template is RAS with an axis-aligned affine)
    x_mm = affine[0, 0] * np.arange(t1.shape[0]) + affine[0, 3]
    halves = {"mni152_right": x_mm > 0, "mni152_left": x_mm < 0}
    entries = {}
    for name, keep in halves.items():
        in_half = np.zeros(t1.shape, dtype=bool)
        in_half[keep] = True
        brain = np.argwhere((label > 0) & in_half)
        lo = np.maximum(brain.min(0) - MARGIN, 0)
        hi = np.minimum(brain.max(0) + 1 + MARGIN, t1.shape)
        lo[0], hi[0] = max(lo[0], np.flatnonzero(keep)[0]), min(hi[0], np.flatnonzero(keep)[-1] + 1)  # stay in half
        image_half, label_half, affine_half = _crop(t1.astype(np.float32), label, affine, lo, hi)
        save_nifti(image_half, affine_half, root / "images" / f"{name}.nii.gz")
        save_nifti(label_half, affine_half, root / "labels" / f"{name}.nii.gz")
        entries[name] = {"image": f"images/{name}.nii.gz", "label": f"labels/{name}.nii.gz"}
    path = root / datalist
    write_datalist(path, [entries["mni152_right"]], [entries["mni152_left"]])
    log.info("mni152: wrote right (training) and left (validation) hemispheres to %s", root)
    return path


PREPARERS.register("mni152")(prepare_mni152)
