"""Evaluation metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from robustseg.evaluation.metrics import (
    dice_per_class,
    flip_rate,
    nsd_tolerance,
    perturbation_metrics,
    psnr,
    segmentation_metrics,
    ssim,
    volume_diagonal_mm,
)


def test_dice_with_and_without_background():
    label = torch.zeros(4, 4, 4, dtype=torch.long)
    label[0, 0, :2] = 1  # 2 voxels of class 1
    pred = torch.zeros_like(label)
    pred[0, 0, 1:3] = 1  # 2 voxels, 1 overlapping
    out = segmentation_metrics(pred, label, 2, spacing=(1, 1, 1))
    # class 1: 2*1/(2+2) = 0.5; background: 61 common of 62 + 62 voxels
    assert out["dice"][1] == pytest.approx(0.5)
    assert out["dice"][0] == pytest.approx(2 * 61 / 124)
    assert out["dice_mean"] == pytest.approx(0.5)
    assert out["dice_mean_bg"] == pytest.approx((0.5 + 2 * 61 / 124) / 2)


def test_dice_both_empty_counts_as_one():
    z = torch.zeros(3, 3, 3, dtype=torch.long)
    assert dice_per_class(z, z, 3) == [1.0, 1.0, 1.0]


def test_hd95_in_mm_with_anisotropic_spacing():
    label = torch.zeros(8, 8, 8, dtype=torch.long)
    pred = torch.zeros_like(label)
    label[2, 2, 2] = 1
    pred[5, 2, 2] = 1  # 3 voxels along D at 2 mm
    label[2, 6, 6] = 2
    pred[2, 4, 6] = 2  # 2 voxels along H at 0.5 mm
    out = segmentation_metrics(pred, label, 3, spacing=(2.0, 0.5, 1.0))
    assert out["hd95"] == pytest.approx([6.0, 1.0])
    assert out["hd95_empty_pred"] == 0


def test_empty_prediction_policy_and_count():
    label = torch.zeros(6, 8, 10, dtype=torch.long)
    label[1:3, 1:3, 1:3] = 1  # class 1 present, predicted empty
    pred = torch.zeros_like(label)
    pred[4, 4, 4] = 3  # class 3 predicted where ground truth is empty; class 2 empty in both
    out = segmentation_metrics(pred, label, 4, spacing=(3.0, 1.0, 2.0))
    diag = math.sqrt(18**2 + 8**2 + 20**2)
    assert volume_diagonal_mm((6, 8, 10), (3.0, 1.0, 2.0)) == pytest.approx(diag)
    assert out["hd95"] == pytest.approx([diag, 0.0, diag])
    assert out["nsd"] == pytest.approx([0.0, 1.0, 0.0])
    assert out["dice"][1:] == pytest.approx([0.0, 1.0, 0.0])
    assert out["hd95_empty_pred"] == 1  # only class 1: empty prediction, non-empty ground truth
    assert out["hd95_empty_truth"] == 1  # only class 3: predicted where the ground truth is empty
    assert not any(math.isnan(v) for v in out["hd95"] + out["nsd"])


def test_nsd_tolerance():
    label = torch.zeros(10, 10, 10, dtype=torch.long)
    label[2:8, 2:8, 2:8] = 1
    assert segmentation_metrics(label, label, 2, (1, 1, 1))["nsd"] == pytest.approx([1.0])
    shifted = torch.roll(label, 1, dims=0)  # whole boundary moves by 2 mm along D
    tight = segmentation_metrics(shifted, label, 2, (2, 1, 1), nsd_tolerance_mm=1.0)["nsd"][0]
    loose = segmentation_metrics(shifted, label, 2, (2, 1, 1), nsd_tolerance_mm=2.0)["nsd"][0]
    assert tight < 1.0 and loose == pytest.approx(1.0)


def test_nsd_tolerance_defaults_to_the_largest_spacing_and_warns_when_smaller(caplog):
    """BTCV-like 1.5 x 1.5 x 2 mm voxels: the default tolerance is 2 mm; 1 mm is used but warned about."""
    label = torch.zeros(10, 10, 10, dtype=torch.long)
    label[2:8, 2:8, 2:8] = 1
    shifted = torch.roll(label, 1, dims=2)  # the boundary moves one voxel (2 mm) along W
    default = segmentation_metrics(shifted, label, 2, (1.5, 1.5, 2.0))
    assert default["nsd_tolerance_mm"] == 2.0 and default["nsd"][0] == pytest.approx(1.0)
    assert nsd_tolerance((1.5, 1.5, 2.0)) == 2.0 and not caplog.records
    with caplog.at_level("WARNING"):
        tight = segmentation_metrics(shifted, label, 2, (1.5, 1.5, 2.0), nsd_tolerance_mm=1.0)
    assert tight["nsd_tolerance_mm"] == 1.0 and tight["nsd"][0] < 1.0
    assert "smaller than the largest voxel spacing 2 mm" in caplog.text


def test_psnr_ssim_and_norms():
    torch.manual_seed(0)
    clean = torch.rand(1, 12, 12, 12)
    adv = clean.clone()
    adv[0, 0, 0, 0] += 0.5
    adv[0, 1, 1, 1] -= 0.25
    mse = (0.25 + 0.0625) / clean.numel()
    assert psnr(clean, adv) == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)
    assert psnr(clean, clean) == math.inf
    assert ssim(clean, clean) == pytest.approx(1.0, abs=1e-5)
    m = perturbation_metrics(clean, adv)
    assert m["linf"] == pytest.approx(0.5)
    assert m["l2"] == pytest.approx(math.sqrt(0.3125))
    assert m["ssim"] == pytest.approx(1.0, abs=1e-3)  # two corner voxels barely touch the Gaussian window
    assert ssim(clean, (clean + 0.2 * torch.randn_like(clean)).clamp(0, 1)) < 0.9


def test_flip_rate():
    a = torch.zeros(2, 2, 2, dtype=torch.long)
    b = a.clone()
    b[0, 0, :] = 1
    assert flip_rate(a, b) == pytest.approx(2 / 8)


def test_hd95_empty_counts_each_direction_separately():
    """Two classes predicted where the truth is empty, one present class predicted empty: 2 and 1, not swapped."""
    label = torch.zeros(6, 6, 6, dtype=torch.long)
    label[1:3, 1:3, 1:3] = 1  # class 1 present, predicted empty
    pred = torch.zeros_like(label)
    pred[4, 4, 4] = 2  # classes 2 and 3 predicted, absent from the truth
    pred[4, 4, 5] = 3
    out = segmentation_metrics(pred, label, 4, spacing=(1.0, 1.0, 1.0))
    assert (out["hd95_empty_pred"], out["hd95_empty_truth"]) == (1, 2)
