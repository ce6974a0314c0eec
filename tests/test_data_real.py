"""Real anatomy shipped in installed packages: LiTS-117 CT and the MNI152 brain template."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from robustseg.data import build_datamodule

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"


def conf_dm(name: str, root: Path):
    cfg = OmegaConf.create({"data": OmegaConf.load(CONF_DATA / f"{name}.yaml")})
    cfg.data.root = str(root)
    return build_datamodule(cfg.data)


@pytest.fixture(scope="session")
def lits(tmp_path_factory):
    dm = conf_dm("lits117", tmp_path_factory.mktemp("lits117"))
    dm.validate()
    return dm


@pytest.fixture(scope="session")
def mni(tmp_path_factory):
    dm = conf_dm("mni152", tmp_path_factory.mktemp("mni152"))
    dm.validate()
    return dm


def world_range(path: str, axis: int) -> tuple[float, float]:
    """Min and max world coordinate (mm) along ``axis`` of the voxel centres of a NIfTI file."""
    image = nib.load(path)
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in image.shape[:3]], indexing="ij")).reshape(3, -1)
    world = image.affine[:3, :3] @ corners + image.affine[:3, 3:4]
    return world[axis].min(), world[axis].max()


def test_lits117_volumes_and_labels(lits):
    train = lits.eval_dataset("training")[0]
    val = lits.eval_dataset("validation")[0]

    # RAS: x, y full 128 mm; z: 80 superior slices (padded to 96) and 48 inferior ones (padded to 64)
    assert train["image"].shape == (1, 128, 128, 96) and val["image"].shape == (1, 128, 128, 64)
    assert torch.allclose(train["image"].pixdim.float(), torch.ones(3))  # assumed 1 mm isotropic
    for item in (train, val):
        assert set(item["label"].unique().tolist()) == {0, 1, 2}  # background, liver, tumour
        assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
    # liver is brighter than the window minimum and occupies a large part of this liver-centred crop
    assert 0.1 < (train["label"] > 0).float().mean() < 0.6


def test_lits117_splits_are_disjoint_axial_slabs(lits):
    cases = lits.validate()
    train_z = world_range(cases["training"][0]["image"], axis=2)
    val_z = world_range(cases["validation"][0]["image"], axis=2)
    assert val_z[1] < train_z[0], "validation slab must lie entirely inferior to the training slab"
    assert train_z[1] - train_z[0] == 79 and val_z[1] - val_z[0] == 47


def test_lits117_anatomy_is_oriented(lits):
    """RAS: the liver lies on the patient's right (high x) of the liver-centred crop; its dome is superior."""
    label = lits.eval_dataset("training")[0]["label"][0]  # (X, Y, Z)
    liver = (label > 0).float()
    x = torch.arange(label.shape[0], dtype=torch.float32)
    centre_x = (liver.sum((1, 2)) * x).sum() / liver.sum()
    assert centre_x > label.shape[0] / 2


def test_lits117_conversion_is_cached(lits):
    cases = lits.validate()
    files = [Path(cases[s][0][k]) for s in cases for k in ("image", "label")]
    stamps = [p.stat().st_mtime_ns for p in files]

    again = conf_dm("lits117", lits.options.root)
    again.validate()

    assert [p.stat().st_mtime_ns for p in files] == stamps, "a second run must reuse the converted NIfTI"


def test_lits117_train_batch(lits):
    lits.setup("fit")
    batch = next(iter(lits.train_dataloader()))
    assert batch["image"].shape == (2, 1, 64, 64, 64) and batch["label"].dtype == torch.int64
    assert len(lits.train_dataset) == 8  # one volume, repeats 8


def test_mni152_labels_and_hemispheres(mni):
    cases = mni.validate()
    for split in ("training", "validation"):
        item = mni.eval_dataset(split)[0]
        labels, counts = item["label"].unique(return_counts=True)
        assert labels.tolist() == [0, 1, 2, 3]  # background, CSF, grey matter, white matter
        assert counts[2] > counts[1] and counts[3] > counts[1]  # more GM and WM than CSF
        assert torch.allclose(item["image"].pixdim.float(), torch.full((3,), 1.5))
        assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
    right = world_range(cases["training"][0]["image"], axis=0)
    left = world_range(cases["validation"][0]["image"], axis=0)
    assert right[0] > 0 > left[1], "training = right hemisphere (x > 0), validation = left (x < 0)"
