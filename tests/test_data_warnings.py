"""Datalist entries that are not file paths fail with a DataError naming the entry; data that loads but looks
wrong (constant images, volumes far smaller than the ROI, extreme anisotropy after resampling) gives warnings,
logged once per case and kept by case id for the evaluation report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from robustseg.cli import train_main
from robustseg.data import build_datamodule, read_datalist
from robustseg.data.checks import check_dataset
from robustseg.data.options import parse_options
from robustseg.data.suspicious import oriented, suspicious_case
from robustseg.errors import DataError


def write_case(root: Path, name: str, image: np.ndarray, spacing=(1.0, 1.0, 1.0), affine=None) -> dict[str, str]:
    """One image/label pair (label: a small cube of class 1 in the middle) with the given voxel spacing."""
    affine = np.diag([*spacing, 1.0]) if affine is None else affine
    label = np.zeros(image.shape[:3], dtype=np.uint8)
    c = [s // 2 for s in label.shape]
    label[c[0] - 1 : c[0] + 1, c[1] - 1 : c[1] + 1, c[2] - 1 : c[2] + 1] = 1
    (root / "img").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "img" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), root / "img" / f"{name}_seg.nii.gz")
    return {"image": f"img/{name}.nii.gz", "label": f"img/{name}_seg.nii.gz"}


def ct(shape=(20, 20, 20), seed=0) -> np.ndarray:
    """Plausible CT: soft tissue around 40 HU with noise, inside the default window."""
    return 40 + 30 * np.random.default_rng(seed).standard_normal(shape)


def options(root: Path, **extra):
    return parse_options(
        {"name": "w", "root": str(root), "modality": "ct", "num_classes": 2, "roi_size": [16, 16, 16], **extra}
    )


def dataset(root: Path, training: list[dict], validation: list[dict]) -> None:
    (root / "dataset.json").write_text(json.dumps({"training": training, "validation": validation}))


# --- datalist entries -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "shown"),
    [(3, "'image'=3"), (None, "'image'=None"), ({"ct": "a.nii.gz"}, "'image'={'ct': 'a.nii.gz'}"), ([], "'image'=[]")],
)
def test_image_that_is_not_a_path_names_the_entry(tmp_path, image, shown):
    good = write_case(tmp_path, "a", ct())
    dataset(tmp_path, [good], [{"image": image, "label": good["label"]}])
    with pytest.raises(DataError, match="expected a file path") as info:
        read_datalist(tmp_path / "dataset.json", tmp_path)
    assert "validation[0]" in str(info.value) and shown in str(info.value)


@pytest.mark.parametrize("label", [None, 7, ["x.nii.gz"], ""])
def test_label_that_is_not_a_path_names_the_entry(tmp_path, label):
    good = write_case(tmp_path, "a", ct())
    dataset(tmp_path, [{"image": good["image"], "label": label}], [good])
    with pytest.raises(DataError, match=r"training\[0\]: 'label'=.*expected a file path"):
        read_datalist(tmp_path / "dataset.json", tmp_path)


def test_list_of_images_with_a_non_path_inside(tmp_path):
    good = write_case(tmp_path, "a", ct())
    dataset(tmp_path, [good], [{"image": [good["image"], None], "label": good["label"]}])
    with pytest.raises(DataError, match=r"validation\[0\].*non-empty list of file paths"):
        read_datalist(tmp_path / "dataset.json", tmp_path)


def test_bad_entry_through_train_cli_is_one_message(tmp_path, capsys):
    good = write_case(tmp_path, "a", ct())
    dataset(tmp_path, [good], [{"image": 12, "label": good["label"]}])
    code = train_main(
        [
            "data=synthetic",
            f"data.root={tmp_path}",
            "data.prepare=null",
            "logger=none",
            f"output_dir={tmp_path / 'runs'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "validation[0]: 'image'=12" in err, err
    assert not (tmp_path / "runs").exists()


# --- suspicious data --------------------------------------------------------------------------------------------


def test_plausible_case_has_no_warning(tmp_path):
    assert suspicious_case(ct(), np.eye(4), options(tmp_path), "x.nii.gz") == []


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (np.zeros((20, 20, 20)), "is all zero"),
        (np.full((20, 20, 20), 5.0), "is constant (5 everywhere)"),
        (np.full((20, 20, 20), -1000.0) + np.random.default_rng(0).random((20, 20, 20)), "outside the HU window"),
        (np.full((20, 20, 20), 3000.0) + np.random.default_rng(0).random((20, 20, 20)), "outside the HU window"),
    ],
)
def test_constant_images(tmp_path, image, expected):
    (warning,) = suspicious_case(image, np.eye(4), options(tmp_path), "x.nii.gz")
    assert expected in warning and "x.nii.gz" in warning


def test_constant_channel_of_a_multichannel_image(tmp_path):
    image = np.stack([ct(), np.zeros((20, 20, 20))], axis=-1)  # (X, Y, Z, C)
    (warning,) = suspicious_case(image, np.eye(4), options(tmp_path, in_channels=2), "x.nii.gz")
    assert "channel 1 is all zero" in warning


def test_volume_much_smaller_than_the_roi(tmp_path):
    """(20, 20, 6) voxels of 1 mm against a 16^3 ROI: axis 2 spans 6 < 8 voxels; (20, 20, 9) does not warn."""
    (warning,) = suspicious_case(ct((20, 20, 6)), np.eye(4), options(tmp_path), "x.nii.gz")
    assert "[20, 20, 6] voxels" in warning and "along axis [2]" in warning
    assert suspicious_case(ct((20, 20, 9)), np.eye(4), options(tmp_path), "x.nii.gz") == []


def test_small_after_resampling_to_a_coarser_grid(tmp_path):
    """20^3 voxels of 1 mm resampled to 4 mm are 5 voxels per axis: far smaller than the 16^3 ROI."""
    (warning,) = suspicious_case(ct(), np.eye(4), options(tmp_path, spacing=[4, 4, 4]), "x.nii.gz")
    assert "[5, 5, 5] voxels" in warning and "axis [0, 1, 2]" in warning


def test_small_axis_follows_reorientation(tmp_path):
    """Array axis 0 runs along S here; after RAS reorientation the short axis is the last one, as MONAI orders it."""
    affine = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)  # i -> S, k -> R
    (warning,) = suspicious_case(ct((6, 20, 20)), affine, options(tmp_path), "x.nii.gz")
    assert "[20, 20, 6] voxels" in warning and "along axis [2]" in warning
    assert list(oriented([6, 20, 30], affine, "RAS")) == [30, 20, 6]
    assert list(oriented([6, 20, 30], affine, None)) == [6, 20, 30]


def test_extreme_anisotropy_after_resampling(tmp_path):
    affine = np.diag([0.05, 0.05, 20.0, 1.0])
    (warning,) = suspicious_case(ct((400, 400, 2)), affine, options(tmp_path, roi_size=[1, 1, 1]), "x.nii.gz")
    assert "0.05 x 0.05 x 20 mm" in warning and "max/min 400" in warning
    # resampled to 1 mm isotropic the anisotropy is gone (the volume is 20 x 20 x 40 voxels then)
    resampled = options(tmp_path, roi_size=[16, 16, 16], spacing=[1, 1, 1])
    assert suspicious_case(ct((400, 400, 2)), affine, resampled, "x.nii.gz") == []


def test_warnings_logged_once_per_case_and_kept_by_case_id(tmp_path, caplog):
    cases = {
        "fine": write_case(tmp_path, "fine", ct()),
        "zeros": write_case(tmp_path, "zeros", np.zeros((20, 20, 20))),
        "flat": write_case(tmp_path, "flat", ct((20, 20, 20)), spacing=(0.5, 0.5, 8.0)),  # 16 x anisotropic
    }
    dataset(tmp_path, [cases["fine"], cases["zeros"]], [cases["flat"]])
    with caplog.at_level(logging.WARNING, logger="robustseg.data.checks"):
        _, warnings = check_dataset(options(tmp_path, roi_size=[8, 8, 8]))
    assert sorted(warnings) == ["flat", "zeros"]
    assert "all zero" in warnings["zeros"][0] and "max/min 16" in " ".join(warnings["flat"])
    lines = [r.getMessage() for r in caplog.records if "suspicious data" in r.getMessage()]
    assert len(lines) == 2 and any("'zeros'" in ln for ln in lines) and any("'flat'" in ln for ln in lines)

    dm = build_datamodule(
        {"name": "w", "root": str(tmp_path), "modality": "ct", "num_classes": 2, "roi_size": [8, 8, 8]}
    )
    assert dm.case_warnings("zeros") == warnings["zeros"] and dm.case_warnings("fine") == []
