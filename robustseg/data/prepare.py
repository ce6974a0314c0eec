"""Datasets that materialise their own files: a registry of preparers and atomic NIfTI writing.

``data.prepare: {name: lits117, ...}`` names a function registered in :data:`PREPARERS`; it is called as
``fn(root, datalist=..., **kwargs)`` and writes NIfTI files plus the datalist under ``root``. A stamp file
``root/.prepared.json`` records the preparer and its arguments: the work is redone only when the datalist is
missing or the arguments changed. Every file is written to a temporary name and renamed, so an interrupted or
concurrent preparation never leaves a half-written volume behind.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from robustseg.data.options import DataOptions
from robustseg.errors import ConfigError
from robustseg.registry import Registry

log = logging.getLogger(__name__)

PREPARERS: Registry = Registry("dataset preparer")
STAMP = ".prepared.json"


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``array`` (D, H, W) with the 4x4 voxel-to-world ``affine`` (mm) to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")  # keeps the .nii.gz suffix nibabel needs
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, tmp)
    os.replace(tmp, path)


def prepare_dataset(options: DataOptions) -> None:
    """Run ``data.prepare`` unless ``root`` already holds its output for the same arguments.

    Raises:
        ConfigError: unknown preparer name or arguments it does not take.
    """
    if options.prepare is None:
        return
    kwargs = dict(options.prepare)
    name = kwargs.pop("name")
    wanted = json.loads(json.dumps({"name": name, "datalist": options.datalist, **kwargs}))
    stamp = options.root / STAMP
    if options.datalist_path.is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == wanted:
                return
        except (OSError, json.JSONDecodeError):
            pass  # a damaged stamp: prepare again
    try:
        preparer = PREPARERS.get(name)
    except KeyError as err:
        raise ConfigError(f"data.prepare.name: {err.args[0]}") from err
    log.info("preparing dataset %s (%s) in %s", options.name, name, options.root)
    try:
        inspect.signature(preparer).bind(options.root, datalist=options.datalist, **kwargs)
    except TypeError as err:
        raise ConfigError(f"data.prepare: bad arguments for preparer {name!r}: {err}") from err
    preparer(options.root, datalist=options.datalist, **kwargs)
    tmp = stamp.with_name(f"{STAMP}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(wanted, indent=2))
    os.replace(tmp, stamp)
