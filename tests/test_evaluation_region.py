"""The scored region is the case's real voxels (issue 9): padding added by the transforms is never scored,
never attacked, and never stored."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import (
    CastToTyped,
    Compose,
    DivisiblePadd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    ResizeWithPadOrCropd,
    SpatialPadd,
)
from torch import nn

from robustseg.config import CONF_DIR
from robustseg.evaluation.records import CaseLog
from robustseg.evaluation.region import Region, real_box, real_case
from robustseg.evaluation.resolve import LoadedModel
from robustseg.evaluation.runner import Evaluator, SlidingWindow
from robustseg.evaluation.store import AdversarialStore
from robustseg.evaluation.suite import build_suite

KEYS = ["image", "label"]


def write_case(tmp_path, shape=(20, 13, 9), spacing=(1.5, 1.5, 2.0)):
    rng = np.random.default_rng(0)
    image = rng.random(shape, dtype=np.float32) * 0.8 + 0.1  # no real voxel is 0: padding is recognisable
    label = (image > 0.6).astype(np.uint8) + (image > 0.8).astype(np.uint8)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS-like: RAS reorientation flips two axes
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "label.nii.gz")
    return image, label


def transformed(tmp_path, chain):
    base = [LoadImaged(KEYS, ensure_channel_first=True, image_only=True), Orientationd(KEYS, axcodes="RAS")]
    tail = [CastToTyped(KEYS, dtype=(torch.float32, torch.int64)), EnsureTyped(KEYS, track_meta=True)]
    files = {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")}
    item = Compose(base + chain + tail)(files)
    return {**item, "case_id": "case"}


def test_real_box_replays_crops_and_pads(tmp_path):
    image, _ = write_case(tmp_path)
    chain = [ResizeWithPadOrCropd(KEYS, (16, 16, 16)), SpatialPadd(KEYS, (18, 18, 18)), DivisiblePadd(KEYS, k=8)]
    item = transformed(tmp_path, chain)
    assert tuple(item["image"].shape[1:]) == (24, 24, 24)
    # by hand: RAS flips axes 0 and 1; crop 20 -> 16 (2 each side); pad 13 -> 16 (1, 2), 9 -> 16 (3, 4);
    # then +1 each side (18) and +3 each side (24)
    assert real_box(item["image"]) == Region((4, 5, 7), (20, 18, 16))
    x, y, affine, spacing, region = real_case(item)
    reference = image[::-1, ::-1, :][2:18]  # RAS orientation, then the centre crop along axis 0
    assert tuple(x.shape) == (1, 1, 16, 13, 9) and np.array_equal(x[0, 0].numpy(), reference)
    assert y.shape == (1, 1, 16, 13, 9) and spacing == [1.5, 1.5, 2.0]
    # the shifted affine maps the cropped grid to the same world points as the padded one
    full = np.asarray(item["image"].affine)
    assert np.allclose(affine @ np.array([0, 0, 0, 1.0]), full @ np.array([*region.start, 1.0]))


def test_plain_tensors_are_all_real():
    assert real_box(torch.zeros(1, 5, 6, 7)) == Region((0, 0, 0), (5, 6, 7))


class Constant(nn.Module):
    """Predicts ``cls`` everywhere, with a weak input dependence so that attacks have a gradient."""

    def __init__(self, cls: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.01, 0.03, -0.02]).view(3, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
            self.conv.bias[cls] = 5.0

    def forward(self, x):
        return self.conv(x)


def model(cls: int) -> LoadedModel:
    net = Constant(cls).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return LoadedModel(f"c{cls}", net, "const", 3, 1, (8, 8, 8), f"c{cls}.ckpt", str(cls) * 64)


@pytest.mark.parametrize("mode", ["pipeline", "tiles"])
def test_padding_is_neither_scored_nor_attacked_nor_stored(tmp_path, mode):
    image, label = write_case(tmp_path)
    item = transformed(tmp_path, [SpatialPadd(KEYS, (24, 16, 16)), DivisiblePadd(KEYS, k=8)])  # 20x13x9 -> 24x16x16
    assert tuple(item["image"].shape[1:]) == (24, 16, 16)
    suite = build_suite(["fgsm"], ["8/255"], None, CONF_DIR)
    everywhere_fg, everywhere_bg = model(1), model(0)
    ev = Evaluator(
        [everywhere_fg, everywhere_bg],
        None,
        suite,
        AdversarialStore(tmp_path / "adv"),
        CaseLog(tmp_path / "cases.jsonl"),
        window=SlidingWindow(overlap=0.25),
        mode=mode,
        nsd_tolerance_mm=2.0,
    )
    ev.run([item])
    real = 20 * 13 * 9
    truth = np.bincount(label.flatten(), minlength=3)
    records = {(r["target"], r["attack"]): r for r in ev.log.records.values()}
    fg = records[("c1", "clean")]
    assert fg["dice_counts"]["pred"] == [0, real, 0]  # the padded volume has 24 * 16 * 16 = 6144 voxels
    assert fg["dice_counts"]["label"] == truth.tolist()
    assert fg["dice"][1] == pytest.approx(2 * truth[1] / (real + truth[1]))
    bg = records[("c0", "clean")]  # empty prediction of present classes: HD95 = the real volume's diagonal
    assert bg["hd95"][0] == pytest.approx(math.sqrt((20 * 1.5) ** 2 + (13 * 1.5) ** 2 + (9 * 2.0) ** 2))
    assert bg["shape"] == [20, 13, 9] and bg["region_start"] == [2, 1, 3]
    for target in ("c0", "c1"):
        attacked = records[(target, "fgsm")]
        assert attacked["linf"] <= 8 / 255 + 1e-6
        # FGSM moves the real voxels by eps (none is clipped); padding would add 6144 - 2340 more voxels
        assert 0.9 * 8 / 255 * math.sqrt(real) < attacked["l2"] <= 8 / 255 * math.sqrt(real) * (1 + 1e-6)
        nii = ev.store.paths(target, "fgsm", "8/255", "case")[0]
        stored = nib.load(str(nii))
        assert stored.shape == (20, 13, 9)  # the real extent, not the padded one
        assert np.allclose(stored.affine, real_case(item)[2])


@pytest.mark.slow
def test_lits117_validation_slab_is_scored_without_its_padding():
    """The LiTS-117 validation slab (128 x 128 x 48) is padded to 64 slices: 25 % padding."""
    from robustseg.config import load_config
    from robustseg.data import build_datamodule

    cfg = load_config("evaluate", ["data=lits117"])
    try:
        datamodule = build_datamodule(cfg.data)
        item = datamodule.eval_dataset("validation")[0]
    except Exception as err:  # the CT ships with an optional package; without it there is nothing to check
        pytest.skip(f"LiTS-117 unavailable: {err}")
    assert int(np.prod(item["image"].shape[1:])) == 128 * 128 * 64
    image, label, _, _, region = real_case(item)
    assert region.shape == (128, 128, 48) and tuple(image.shape[2:]) == (128, 128, 48)
    assert int(label.numel()) == 128 * 128 * 48
