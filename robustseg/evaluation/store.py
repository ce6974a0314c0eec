"""Adversarial volumes, crafted once per (source, attack, budget, case) and reused by every target.

Each volume is a float32 NIfTI carrying the affine of the preprocessed image it was crafted from (the published
code writes uint8 with an identity affine), next to a JSON of its provenance: source model and checkpoint
sha256, the attack's name and every field, the threat model (``pipeline`` or ``tiles``), the seed, the shape and
a sha256 of the voxel data. A volume is reused only when its provenance matches what the run would craft and its
data hash checks out; a missing, truncated or otherwise corrupt file is reported and regenerated.

Writes are atomic (temporary file in the same directory, ``fsync``, ``os.replace``); the NIfTI is written before
its JSON, so a volume without provenance is never trusted.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Provenance fields that must match for a stored volume to be reused.
IDENTITY_KEYS = ("identity_sha256", "source", "checkpoint_sha256", "attack", "mode", "seed", "case_id", "shape")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (checkpoints, for provenance)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """Hex sha256 of an array's float32 C-order bytes."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` as the user's umask leaves it for a new file (``tempfile.mkstemp`` would give 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The file gets the permissions of a normally created file (0666 minus the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _safe(part: str) -> str:
    """A path component from a free-form label (``4/255`` -> ``4_255``)."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", str(part)).strip("_") or "_"


def case_slug(case_id: str) -> str:
    """A file name stem unique per exact case id: safe slug + 8 hex digits of its sha256.

    ``肝臓 01`` and ``腎臓 01`` share the slug ``01`` but not the hash, so their files never collide.
    """
    digest = hashlib.sha256(str(case_id).encode("utf-8")).hexdigest()[:8]
    return f"{_safe(case_id)[:80]}-{digest}"


def volume_to_nifti_array(volume: Tensor) -> np.ndarray:
    """(C, D, H, W) tensor -> (D, H, W) for one channel, else (D, H, W, C), float32 (NIfTI's axis order)."""
    array = volume.detach().cpu().float().numpy()
    return array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)


def nifti_array_to_volume(array: np.ndarray) -> Tensor:
    """Inverse of :func:`volume_to_nifti_array`: (D, H, W) or (D, H, W, C) -> (C, D, H, W) float32."""
    array = np.asarray(array, dtype=np.float32)
    array = array[None] if array.ndim == 3 else np.moveaxis(array, -1, 0)
    return torch.from_numpy(np.ascontiguousarray(array))


class AdversarialStore:
    """Directory of crafted volumes: ``<root>/<source>/<attack>/<budget>/<case slug>.nii.gz`` (+ ``.json``).

    The case slug is :func:`case_slug`: unique per exact case id.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.generated = 0  # volumes crafted by this process
        self.reused = 0  # volumes loaded from disk
        self.regenerated = 0  # stored volumes found corrupt or stale and crafted again

    def paths(self, source: str, attack: str, budget: str, case_id: str) -> tuple[Path, Path]:
        """(NIfTI path, provenance JSON path) of one volume."""
        base = self.root / _safe(source) / _safe(attack) / _safe(budget) / case_slug(case_id)
        return base.with_name(base.name + ".nii.gz"), base.with_name(base.name + ".json")

    def save(self, volume: Tensor, affine: np.ndarray | Tensor, provenance: Mapping[str, Any], key: tuple) -> Path:
        """Write a (C, D, H, W) volume as float32 NIfTI with ``affine`` and its provenance JSON."""
        nii_path, json_path = self.paths(*key)
        array = volume_to_nifti_array(volume)
        affine = np.asarray(affine.detach().cpu() if isinstance(affine, Tensor) else affine, dtype=np.float64)
        image = nib.Nifti1Image(array, affine)
        image.header.set_data_dtype(np.float32)
        image.header.set_sform(affine, code=1)
        image.header.set_qform(affine, code=1)
        atomic_write_bytes(nii_path, image.to_bytes() if nii_path.suffix != ".gz" else _gzip(image))
        record = {**provenance, "shape": list(volume.shape), "data_sha256": array_sha256(array)}
        atomic_write_bytes(json_path, json.dumps(record, indent=2, sort_keys=True, default=str).encode())
        return nii_path

    def load(self, key: tuple, expected: Mapping[str, Any]) -> tuple[Tensor, np.ndarray] | None:
        """The stored (C, D, H, W) volume and affine for ``key``, or None when missing, stale or corrupt."""
        nii_path, json_path = self.paths(*key)
        if not nii_path.exists() and not json_path.exists():
            return None
        try:
            provenance = json.loads(json_path.read_text())
            for name in IDENTITY_KEYS:
                if name in expected and _canon(provenance.get(name)) != _canon(expected[name]):
                    what = "settings (its identity differs)" if name == "identity_sha256" else name
                    log.warning("stored volume %s was made with other %s; re-crafting it", nii_path, what)
                    return None
            image = nib.load(str(nii_path))
            array = np.asarray(image.dataobj, dtype=np.float32)
            if array_sha256(array) != provenance["data_sha256"]:
                raise ValueError("voxel data does not match the sha256 in its provenance")
            volume = nifti_array_to_volume(array)
            if list(volume.shape) != list(provenance["shape"]):
                raise ValueError(f"shape {list(volume.shape)} != recorded {provenance['shape']}")
            return volume, np.asarray(image.affine)
        except Exception as err:  # any unreadable file is regenerated, never trusted
            log.warning("stored volume %s is unusable (%s: %s); regenerating", nii_path, type(err).__name__, err)
            return None

    def get_or_create(
        self,
        key: tuple,
        provenance: Mapping[str, Any],
        affine: np.ndarray | Tensor,
        craft: Callable[[], Tensor],
    ) -> Tensor:
        """Load the volume for ``key`` if a matching, intact one is stored; else craft, save and return it.

        Args:
            key: (source, attack, budget, case_id).
            provenance: the fields that describe how the volume is crafted (see ``IDENTITY_KEYS``).
            craft: returns the adversarial (C, D, H, W) volume; called only when nothing usable is stored.
        """
        nii_path, json_path = self.paths(*key)
        existed = nii_path.exists() or json_path.exists()
        loaded = self.load(key, provenance)
        if loaded is not None:
            self.reused += 1
            return loaded[0]
        volume = craft().detach().float().cpu()
        self.save(volume, affine, provenance, key)
        self.generated += 1
        self.regenerated += int(existed)
        return volume

    def stats(self) -> dict[str, int]:
        """Counts of generated, reused and regenerated volumes."""
        return {"generated": self.generated, "reused": self.reused, "regenerated": self.regenerated}


def _gzip(image: nib.Nifti1Image) -> bytes:
    return gzip.compress(image.to_bytes(), compresslevel=1)


def _canon(value: Any) -> str:
    """Compare provenance fields through their JSON form (tuples vs lists, ints vs floats of equal value)."""
    return json.dumps(value, sort_keys=True, default=str)
