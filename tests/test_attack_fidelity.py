"""Attacks against plain references written here from the papers' formulas: MI-FGSM, DI (3D input diversity),
VMI-FGSM; the memory-bounded pipeline gradient against autograd through MONAI's own sliding_window_inference on a
volume smaller than the ROI and on an odd-sized one; tile stitching with a network whose receptive field spans
several voxels (with a 1x1x1 network, overwriting and keeping give the same values).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import conv_net3d
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import Tensor, nn

from robustseg.attacks import ATTACKS, SlidingWindowModel, attack_volume
from robustseg.attacks import transfer as transfer_module

EPS, ALPHA = 8 / 255, 2 / 255


def papers_dice_ce(logits: Tensor, labels: Tensor) -> Tensor:
    return DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)(logits, labels)


def grad_of(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(papers_dice_ce(net(x), y), x)
    return g


def project(x: Tensor, images: Tensor) -> Tensor:
    return torch.min(torch.max(x, images - EPS), images + EPS).clamp(0, 1)


@pytest.fixture
def batch() -> tuple[Tensor, Tensor]:
    """Two (1, 9, 10, 7) float64 volumes in [0, 1], three classes."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 9, 10, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 1, 9, 10, 7), generator=g)
    return x, y


def test_mi_fgsm_matches_dong_et_al(batch):
    """g <- mu g + grad / ||grad||_1 (per volume), x <- clip_eps(x + alpha sign(g)) (Dong et al., CVPR 2018)."""
    images, labels = batch
    net = conv_net3d()
    x, g = images.clone(), torch.zeros_like(images)
    for _ in range(4):
        grad = grad_of(net, x, labels)
        g = 0.7 * g + grad / grad.abs().sum(dim=(1, 2, 3, 4), keepdim=True)
        x = project(x + ALPHA * g.sign(), images)
    attack = ATTACKS.build({"name": "mi_fgsm", "eps": EPS, "step_size": ALPHA, "steps": 4, "decay": 0.7})
    torch.testing.assert_close(attack(net, images, labels), x, rtol=0, atol=1e-12)


def test_vmi_fgsm_matches_wang_and_he(batch):
    """g <- mu g + (grad + v) / ||grad + v||_1; v <- mean_i grad(x + r_i) - grad(x), r_i ~ U[-beta eps, beta eps]
    (Wang and He, CVPR 2021). The neighbours are drawn from the attack's seeded generator, in its order."""
    images, labels = batch
    net = conv_net3d()
    gen = torch.Generator().manual_seed(5)
    x, g, v = images.clone(), torch.zeros_like(images), torch.zeros_like(images)
    for _ in range(3):
        grad = grad_of(net, x, labels)
        tuned = grad + v
        g = 1.0 * g + tuned / tuned.abs().sum(dim=(1, 2, 3, 4), keepdim=True)
        samples = [torch.empty_like(x).uniform_(-1.5 * EPS, 1.5 * EPS, generator=gen) for _ in range(2)]
        v = sum(grad_of(net, x + r, labels) for r in samples) / 2 - grad
        x = project(x + ALPHA * g.sign(), images)
    cfg = {"name": "vmi_fgsm", "eps": EPS, "step_size": ALPHA, "steps": 3, "n_samples": 2, "beta": 1.5, "seed": 5}
    torch.testing.assert_close(ATTACKS.build(cfg)(net, images, labels), x, rtol=0, atol=1e-12)


def test_input_diversity_matches_xie_et_al(batch, monkeypatch):
    """Shrink by s in [r, 1], zero-pad at a random offset, and read the logits of the placed region back at full
    size. Random draws fixed: apply (0.0 < p), scale u = 0.5 -> s = 0.6 + 0.4 * 0.5 = 0.8, offsets from (0.7, 0.9,
    0.5): sizes (9, 10, 7) -> (7, 8, 6), offsets int(u * (n - m + 1)) = (2, 2, 1)."""
    images, labels = batch
    net = conv_net3d()
    draws = iter([0.0, 0.5, 0.7, 0.9, 0.5])
    monkeypatch.setattr(transfer_module, "_uniform", lambda *_: next(draws))
    x = images.clone().requires_grad_(True)
    logits = transfer_module.diverse_logits(net, x, None, 0.6, 0.5)

    small = F.interpolate(images, size=(7, 8, 6), mode="trilinear", align_corners=False)
    canvas = torch.zeros_like(images)
    canvas[:, :, 2:9, 2:10, 1:7] = small
    expected = F.interpolate(net(canvas)[:, :, 2:9, 2:10, 1:7], size=(9, 10, 7), mode="trilinear", align_corners=False)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)

    # one DI-FGSM step from those draws: x + alpha sign(grad of the loss on the diverse logits)
    draws = iter([0.0, 0.5, 0.7, 0.9, 0.5])
    xr = images.clone().requires_grad_(True)
    sr = F.interpolate(xr, size=(7, 8, 6), mode="trilinear", align_corners=False)
    cr = F.pad(sr, (1, 0, 2, 0, 2, 0))  # offsets (2, 2, 1) at the start; the ends stay open
    cr = F.pad(cr, (0, 7 - cr.shape[4], 0, 10 - cr.shape[3], 0, 9 - cr.shape[2]))
    lr = F.interpolate(net(cr)[:, :, 2:9, 2:10, 1:7], size=(9, 10, 7), mode="trilinear", align_corners=False)
    (grad,) = torch.autograd.grad(papers_dice_ce(lr, labels), xr)
    attack = ATTACKS.build({"name": "di_fgsm", "eps": EPS, "step_size": ALPHA, "steps": 1, "resize_rate": 0.6})
    torch.testing.assert_close(attack(net, images, labels), project(images + ALPHA * grad.sign(), images))


@pytest.mark.parametrize(
    "size",
    [(11, 13, 9), (20, 10, 23)],  # smaller than the 16^3 ROI on every axis (odd padding); odd, partly smaller
)
@pytest.mark.parametrize("bounded", [False, True])
def test_pipeline_gradient_equals_autograd_through_monai(size, bounded):
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 1, *size, generator=g, dtype=torch.float64)
    label = torch.randint(0, 3, (1, 1, *size), generator=g)
    net = conv_net3d()
    x = image.clone().requires_grad_(True)
    reference = sliding_window_inference(x, (16, 16, 16), 2, net, overlap=0.5, mode="gaussian", sigma_scale=0.125)
    (expected,) = torch.autograd.grad(papers_dice_ce(reference, label), x)
    model = SlidingWindowModel(net, 16, overlap=0.5, sw_batch_size=2, memory_bounded=bounded)
    x = image.clone().requires_grad_(True)
    logits = model(x)
    torch.testing.assert_close(logits.detach(), reference.detach(), rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(papers_dice_ce(logits, label), x)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-15)


def test_tiles_stitch_each_tile_attacked_alone_with_a_wide_receptive_field():
    """24 x 20 x 18 with 16^3 tiles: the last tile on each axis is shifted back and keeps only the voxels the
    previous tile did not cover. With a 3x3x3 net a voxel's gradient depends on its tile's context, so writing the
    whole shifted tile over its neighbour gives other values than keeping."""
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 1, 24, 20, 18, generator=g, dtype=torch.float64)
    label = torch.randint(0, 3, (1, 1, 24, 20, 18), generator=g)
    net = conv_net3d()
    fgsm = ATTACKS.build({"name": "pgd", "eps": EPS, "step_size": EPS, "steps": 1, "random_start": False})
    expected = torch.empty_like(image)
    axes = [[(0, 0, 16), (8, 16, 24)], [(0, 0, 16), (4, 16, 20)], [(0, 0, 16), (2, 16, 18)]]  # (start, keep, stop)
    for d0, dk, d1 in axes[0]:
        for h0, hk, h1 in axes[1]:
            for w0, wk, w1 in axes[2]:
                tile = fgsm(net, image[:, :, d0:d1, h0:h1, w0:w1], label[:, :, d0:d1, h0:h1, w0:w1])
                expected[:, :, dk:d1, hk:h1, wk:w1] = tile[:, :, dk - d0 :, hk - h0 :, wk - w0 :]
    for batch in (1, 3):
        tiled = attack_volume(fgsm, net, image, label, mode="tiles", roi_size=16, sw_batch_size=batch)
        torch.testing.assert_close(tiled, expected, rtol=0, atol=1e-12)
    whole = fgsm(net, image, label)  # the context matters: attacking the whole volume at once differs
    assert (whole - expected).abs().max() > 1e-3
