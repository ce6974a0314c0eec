"""Bad input fails before training with a DataError naming the case/file and the problem."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from robustseg.data import build_datamodule, write_synthetic_dataset
from robustseg.errors import DataError


def cfg(root: Path) -> dict:
    return {"name": "bad", "root": str(root), "modality": "ct", "num_classes": 3, "roi_size": 16, "num_workers": 0}


@pytest.fixture
def root(tmp_path) -> Path:
    """Two tiny valid cases (one training, one validation) written afresh for each test."""
    write_synthetic_dataset(tmp_path, num_cases=2, size=16, num_classes=3, seed=1)
    return tmp_path


IMAGE = "imagesTr/phantom001.nii.gz"  # the validation case
LABEL = "labelsTr/phantom001.nii.gz"


def rewrite(path: Path, edit: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    image = nib.load(path)
    array, affine = edit(np.asanyarray(image.dataobj), image.affine.copy())
    nib.save(nib.Nifti1Image(array, affine), path)


def truncate(root: Path) -> None:
    data = (root / IMAGE).read_bytes()
    (root / IMAGE).write_bytes(data[: len(data) // 2])


def not_nifti(root: Path) -> None:
    (root / IMAGE).write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))


def shape_mismatch(root: Path) -> None:
    rewrite(root / LABEL, lambda a, aff: (a[:-2], aff))


def affine_mismatch(root: Path) -> None:
    def shift(a, aff):
        aff[0, 3] += 5.0
        return a, aff

    rewrite(root / LABEL, shift)


def label_out_of_range(root: Path) -> None:
    def bump(a, aff):
        a = a.copy()
        a[0, 0, 0] = 7
        return a, aff

    rewrite(root / LABEL, bump)


def nan_voxel(root: Path) -> None:
    def nan(a, aff):
        a = a.astype(np.float32)
        a[1, 2, 3] = np.nan
        return a, aff

    rewrite(root / IMAGE, nan)


def inf_label(root: Path) -> None:
    def inf(a, aff):
        a = a.astype(np.float32)
        a[1, 2, 3] = np.inf
        return a, aff

    rewrite(root / LABEL, inf)


def missing_image(root: Path) -> None:
    (root / IMAGE).unlink()


def empty_split(root: Path) -> None:
    path = root / "dataset.json"
    content = json.loads(path.read_text())
    content["validation"] = []
    path.write_text(json.dumps(content))


def broken_json(root: Path) -> None:
    (root / "dataset.json").write_text("{not json")


CASES = {  # corruption -> words the message must contain
    "truncated_gzip": (truncate, ["phantom001", IMAGE, "corrupt"]),
    "not_nifti": (not_nifti, ["phantom001", IMAGE, "cannot read"]),
    "shape_mismatch": (shape_mismatch, ["phantom001", "shape", LABEL]),
    "affine_mismatch": (affine_mismatch, ["phantom001", "affine", LABEL]),
    "label_out_of_range": (label_out_of_range, ["phantom001", "[7]", "outside [0, 3)"]),
    "nan_voxel": (nan_voxel, ["phantom001", IMAGE, "NaN/inf"]),
    "inf_label": (inf_label, ["phantom001", LABEL, "NaN/inf"]),
    "missing_image": (missing_image, ["phantom001", IMAGE, "not found"]),
    "empty_split": (empty_split, ["dataset.json", "'validation' split is empty"]),
    "broken_json": (broken_json, ["dataset.json", "not readable JSON"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_a_named_data_error(root, name):
    corrupt, words = CASES[name]
    corrupt(root)
    dm = build_datamodule(cfg(root))

    with pytest.raises(DataError) as info:
        dm.validate()

    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"
    assert "Traceback" not in message


def test_setup_validates_first(root):
    missing_image(root)
    with pytest.raises(DataError, match="not found"):
        build_datamodule(cfg(root)).setup("fit")


def test_missing_datalist_names_its_full_path(tmp_path):
    dm = build_datamodule({**cfg(tmp_path / "nowhere"), "datalist": "lists/split.json"})
    with pytest.raises(DataError, match="datalist not found: " + str(tmp_path / "nowhere" / "lists" / "split.json")):
        dm.validate()


def test_wrong_channel_count(root):
    dm = build_datamodule({**cfg(root), "in_channels": 2})
    with pytest.raises(DataError, match="1 channel"):
        dm.validate()


def test_valid_dataset_passes(root):
    cases = build_datamodule(cfg(root)).validate()
    assert [c["case_id"] for c in cases["training"]] == ["phantom000"]
    assert Path(cases["validation"][0]["label"]) == root / LABEL
