"""Formula tests: DCT, blocks, soft rounding, SSIM, CosPGD / SegPGD weights, VAFA, transfer-family equivalences."""

from __future__ import annotations

import math

import pytest
import scipy.fft
import torch
from monai.metrics.regression import compute_ssim_and_cs
from torch import nn

from robustseg.attacks import ATTACKS, perceptibility, ssim3d
from robustseg.attacks.cospgd import cospgd_weights
from robustseg.attacks.frequency import (
    crop_to,
    dct2,
    dct3,
    dct_matrix,
    from_blocks,
    from_blocks2d,
    idct2,
    idct3,
    pad_to_multiple,
    soft_round,
    to_blocks,
    to_blocks2d,
)
from robustseg.attacks.segpgd import segpgd_lambda, segpgd_loss
from robustseg.attacks.targets import TARGETS
from robustseg.attacks.vafa import rescale_axial_slices


@pytest.mark.parametrize("n", [4, 8, 32])
def test_dct_matrix_is_orthonormal_and_matches_scipy(n):
    m = dct_matrix(n, dtype=torch.float64)
    torch.testing.assert_close(m @ m.T, torch.eye(n, dtype=torch.float64))
    x = torch.rand(3, n, n, n, dtype=torch.float64)
    torch.testing.assert_close(dct3(x, m), torch.from_numpy(scipy.fft.dctn(x.numpy(), axes=(1, 2, 3), norm="ortho")))
    torch.testing.assert_close(dct2(x, m), torch.from_numpy(scipy.fft.dctn(x.numpy(), axes=(2, 3), norm="ortho")))


def test_dct_round_trips():
    m = dct_matrix(8)
    x = torch.rand(2, 1, 16, 24, 8)
    blocks = to_blocks(x, 8)
    torch.testing.assert_close(idct3(dct3(blocks, m), m), blocks, rtol=0, atol=1e-5)
    slices = to_blocks2d(x, 8)
    torch.testing.assert_close(idct2(dct2(slices, m), m), slices, rtol=0, atol=1e-5)


def test_block_split_merge_are_inverse_and_local():
    x = torch.arange(2 * 3 * 16 * 24 * 8, dtype=torch.float32).reshape(2, 3, 16, 24, 8)
    blocks = to_blocks(x, 8)
    assert blocks.shape == (2, 3, 2, 3, 1, 8, 8, 8)
    assert torch.equal(from_blocks(blocks), x)
    assert torch.equal(blocks[1, 2, 1, 2, 0], x[1, 2, 8:16, 16:24, 0:8])  # block (1, 2, 0) is that cube
    slices = to_blocks2d(x, 8)
    assert slices.shape == (2, 3, 8, 2, 3, 8, 8)
    assert torch.equal(from_blocks2d(slices), x)
    assert torch.equal(slices[0, 1, 5, 1, 2], x[0, 1, 8:16, 16:24, 5])  # axial slice 5, block (1, 2)
    with pytest.raises(ValueError, match="pad_to_multiple"):
        to_blocks(torch.zeros(1, 1, 10, 8, 8), 8)


def test_pad_to_multiple_and_crop():
    x = torch.rand(1, 1, 10, 17, 8)
    padded, size = pad_to_multiple(x, 8)
    assert padded.shape == (1, 1, 16, 24, 8) and size == (10, 17, 8)
    assert torch.equal(crop_to(padded, size), x)
    padded2d, _ = pad_to_multiple(x, 8, axes=(0, 1))
    assert padded2d.shape == (1, 1, 16, 24, 8)


def test_soft_rounding_tends_to_hard_rounding():
    u = torch.linspace(-3.4, 3.4, 1001, dtype=torch.float64)
    u = u[(u - u.round()).abs() < 0.3]  # away from the .5 ties, where round itself jumps
    errors = [(soft_round(u, a) - u.round()).abs().max().item() for a in (0.1, 1e-2, 1e-4, 1e-12)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-4  # k = ln(2/a - 1): slow in a
    ints = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)  # continuous at the integers
    torch.testing.assert_close(soft_round(ints - 1e-9, 0.1), soft_round(ints + 1e-9, 0.1), rtol=0, atol=1e-6)
    v = torch.tensor([0.3, 1.7], requires_grad=True)
    (grad,) = torch.autograd.grad(soft_round(v, 0.1).sum(), v)
    assert (grad > 0).all()


def test_ssim3d_matches_monai_and_is_differentiable():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 20, 24)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    expected = compute_ssim_and_cs(x, y, 3, [11] * 3, [1.5] * 3)[0].flatten(1).mean(1)
    torch.testing.assert_close(ssim3d(x, y), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ssim3d(x, x), torch.ones(2))
    y.requires_grad_(True)
    (grad,) = torch.autograd.grad(ssim3d(x, y).sum(), y)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_cospgd_weights_hand_computed():
    # voxel 0: logits (2, 0), label 0 -> p = (e^2, 1) / (e^2 + 1); voxel 1: logits (0, 1), label 0
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 1, 2)
    labels = torch.zeros(1, 1, 1, 1, 2, dtype=torch.long)
    p0 = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]
    p1 = [1 / (1 + math.e), math.e / (1 + math.e)]
    cos = [p[0] / math.hypot(*p) for p in (p0, p1)]  # cosine with the one-hot (1, 0)
    weights = cospgd_weights(logits, labels).flatten()
    torch.testing.assert_close(weights, torch.tensor(cos), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cospgd_weights(logits, labels, targeted=True).flatten(), 1 - torch.tensor(cos))
    assert not cospgd_weights(logits.requires_grad_(True), labels).requires_grad  # a scale, not a gradient path


def test_segpgd_weights_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 1, 2)
    labels = torch.zeros(1, 1, 1, 1, 2, dtype=torch.long)  # voxel 0 correct, voxel 1 wrong
    ce0, ce1 = math.log(1 + math.exp(-2)), math.log(1 + math.e)
    assert segpgd_lambda(0, 4) == 0 and segpgd_lambda(3, 4) == pytest.approx(3 / 8)
    lam = segpgd_lambda(1, 2)  # 1/4
    expected = ((1 - lam) * ce0 + lam * ce1) / 2
    assert segpgd_loss(logits, labels, lam).item() == pytest.approx(expected, rel=1e-5)
    swapped = (lam * ce0 + (1 - lam) * ce1) / 2  # targeted: voxels not yet at the target come first
    assert segpgd_loss(logits, labels, lam, targeted=True).item() == pytest.approx(swapped, rel=1e-5)


def test_target_rules():
    labels = torch.tensor([0, 1, 2, 3]).view(1, 1, 1, 1, 4)
    assert TARGETS["background"](labels, 4).sum() == 0
    assert TARGETS["foreground_swap"](labels, 4).flatten().tolist() == [0, 2, 3, 1]
    assert TARGETS["foreground_swap"](labels, 5).flatten().tolist() == [0, 2, 3, 4]  # K, not the classes present


def test_target_rules_ignore_which_classes_a_tile_holds():
    """A tile or batch holding only class 1 still maps 1 -> 2 (the old rule used the largest label present and
    returned the truth itself there), and the same class gets the same target everywhere."""
    from robustseg.attacks.targets import derive_target

    whole = torch.tensor([0, 1, 2, 3, 1, 2]).view(1, 1, 1, 1, 6)
    target = derive_target("foreground_swap", whole, 4)
    for part in (slice(0, 2), slice(1, 3), slice(4, 6)):
        assert torch.equal(derive_target("foreground_swap", whole[..., part], 4), target[..., part])
    assert derive_target("foreground_swap", whole[..., :2], 4).flatten().tolist() == [0, 2]


def test_target_errors():
    from robustseg.attacks.targets import check_target, derive_target
    from robustseg.errors import ConfigError

    labels = torch.tensor([0, 1, 1]).view(1, 1, 1, 1, 3)
    with pytest.raises(ConfigError, match="num_classes >= 3"):
        derive_target("foreground_swap", labels, 2)  # one foreground class: it would map to itself
    with pytest.raises(ValueError, match="model has 2 classes"):
        derive_target("background", labels + 1, 2)
    with pytest.raises(ValueError, match="equals the true labels"):
        check_target(labels.clone(), labels)
    check_target(torch.zeros_like(labels), labels)


def test_targeted_attack_reads_num_classes_from_the_model():
    """Without num_classes the rule gets K from the logits (one extra gradient-free forward), not from the batch."""
    seen = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(1, 4, 1)

        def forward(self, x):
            seen.append(x.shape[0])
            return self.conv(x)

    images = torch.rand(2, 1, 4, 4, 4)
    labels = torch.ones(2, 1, 4, 4, 4, dtype=torch.long)  # only class 1 present
    attack = ATTACKS.build({"name": "pgd", "steps": 1, "targeted": True, "target": "foreground_swap", "seed": 0})
    assert torch.equal(attack.goal(Spy(), images, labels), torch.full_like(labels, 2))
    assert seen == [1]  # a probe of one volume
    assert torch.equal(attack.goal(Spy(), images, labels, num_classes=3), torch.full_like(labels, 2))
    assert seen == [1]  # num_classes given: no probe


class Sensitive(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv3d(8, 3, 3, padding=1))
        with torch.no_grad():
            for p in self.net.parameters():
                p.mul_(10)

    def forward(self, x):
        return self.net(x)


def test_vafa_fixed_tables_is_deterministic_quantisation(volume_batch):
    """q_max == q_min: the tables cannot move, so VAFA is the model-independent hard quantisation."""
    images, labels = volume_batch["image"], volume_batch["label"]
    attack = ATTACKS.build({"name": "vafa", "q_max": 10, "q_min": 10, "steps": 2, "block_size": 8})
    first = attack(Sensitive(), images, labels)
    second = attack(nn.Conv3d(1, 3, 1), images, labels)
    assert torch.equal(first, second)
    m = dct_matrix(8)
    coeffs = dct3(to_blocks(255 * images - 128, 8), m)
    soft = soft_round(coeffs / 10, 0.1 * (1 - 1 / 2)) * 10  # the last soft iterate: a at step 1 of 2
    expected = ((from_blocks(idct3(soft, m)) + 128) / 255).clamp(0, 1)
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-5)
    hard = ATTACKS.build({"name": "vafa", "q_max": 10, "q_min": 10, "steps": 2, "block_size": 8, "hard_round": True})
    expected_hard = ((from_blocks(idct3(torch.round(coeffs / 10) * 10, m)) + 128) / 255).clamp(0, 1)
    torch.testing.assert_close(hard(Sensitive(), images, labels), expected_hard, rtol=0, atol=1e-5)


def test_vafa_stats_inits_and_odd_sizes(volume_batch):
    images, labels = volume_batch["image"][..., :12], volume_batch["label"][..., :12]  # 16 x 16 x 12: padded
    net = Sensitive()
    stats = {}
    for init in ("paper", "published"):
        attack = ATTACKS.build({"name": "vafa", "steps": 3, "block_size": 8, "init": init})
        assert f"init={init}" in attack.describe()
        adversarial = attack(net, images, labels)
        assert adversarial.shape == images.shape
        stats[init] = perceptibility(images, adversarial)
        print(attack.describe(), stats[init])  # the perturbation statistics, shown with -s
    assert ATTACKS.build({"name": "vafa", "init": "published"}).q_min == 5
    for s in stats.values():
        assert 0 < s["linf"] < 1 and s["l2"] > 0 and 0 < s["ssim"] < 1 and math.isfinite(s["psnr"])
    assert stats["published"]["l2"] > stats["paper"]["l2"]  # starting at q_max is the coarser quantisation


def test_vafa_more_steps_raise_the_loss_more(volume_batch):
    images, labels = volume_batch["image"], volume_batch["label"]
    net = Sensitive()
    losses = []
    for steps in (1, 5):
        adversarial = ATTACKS.build({"name": "vafa", "steps": steps, "block_size": 8})(net, images, labels)
        with torch.no_grad():
            losses.append(nn.functional.cross_entropy(net(adversarial), labels[:, 0]).item())
    assert losses[1] > losses[0]


def test_rescale_axial_slices_is_safe_on_constant_slices():
    x = torch.rand(1, 1, 4, 4, 3) * 0.5 + 0.2
    x[..., 1] = 0.7  # a constant slice: the published code divides by zero here
    out = rescale_axial_slices(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out[..., 1], x[..., 1])
    assert out[..., 0].min() == 0 and out[..., 0].max() == 1
    vafa = ATTACKS.build({"name": "vafa", "steps": 1, "block_size": 4, "rescale_slices": True})
    assert torch.isfinite(vafa(nn.Conv3d(1, 2, 1), x, torch.zeros(1, 1, 4, 4, 3, dtype=torch.long))).all()


def test_mi_fgsm_without_momentum_is_bim(tiny_net, volume_batch):
    images, labels = volume_batch["image"], volume_batch["label"]
    common = {"eps": "8/255", "step_size": "2/255", "steps": 3, "random_start": False}
    mi = ATTACKS.build({"name": "mi_fgsm", "decay": 0.0, **common})
    bim = ATTACKS.build({"name": "bim", **common})
    torch.testing.assert_close(mi(tiny_net, images, labels), bim(tiny_net, images, labels), rtol=0, atol=1e-6)


def test_di_fgsm_without_diversity_is_bim_and_seeded(tiny_net, volume_batch):
    images, labels = volume_batch["image"], volume_batch["label"]
    common = {"eps": "8/255", "step_size": "2/255", "steps": 3, "random_start": False}
    plain = ATTACKS.build({"name": "di_fgsm", "diversity_prob": 0.0, **common})
    bim = ATTACKS.build({"name": "bim", **common})
    torch.testing.assert_close(plain(tiny_net, images, labels), bim(tiny_net, images, labels), rtol=0, atol=1e-6)
    diverse = ATTACKS.build({"name": "di_fgsm", "diversity_prob": 1.0, "resize_rate": 0.7, "seed": 3, **common})
    first = diverse(tiny_net, images, labels)
    assert torch.equal(first, diverse(tiny_net, images, labels))
    assert not torch.equal(first, bim(tiny_net, images, labels))


def test_vmi_fgsm_forward_count(volume_batch):
    calls = []
    net = nn.Conv3d(1, 3, 1)
    net.register_forward_hook(lambda *_: calls.append(1))
    attack = ATTACKS.build({"name": "vmi_fgsm", "steps": 3, "n_samples": 4, "seed": 0})
    attack(net, volume_batch["image"], volume_batch["label"])
    assert len(calls) == 3 * (1 + 4)


@pytest.mark.parametrize("shape", [(2, 3, 6, 5, 4), (1, 14, 4, 4, 4)])
@pytest.mark.parametrize(
    ("name", "monai_kwargs"),
    [
        ("dice_ce", {"squared_pred": True, "smooth_nr": 0.0, "smooth_dr": 1e-6}),  # the papers' DiceCE
        ("dice_ce_monai", {}),  # MONAI's defaults
    ],
)
def test_fused_dice_ce_equals_monai(shape, name, monai_kwargs):
    """The memory-light DiceCE variants have MONAI DiceCELoss's value and input gradient (absent classes too)."""
    from monai.losses import DiceCELoss

    from robustseg.attacks.losses import LOSSES

    torch.manual_seed(0)
    logits = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]))
    expected = DiceCELoss(to_onehot_y=True, softmax=True, **monai_kwargs)(logits, labels)
    value = LOSSES[name](logits, labels)
    torch.testing.assert_close(value, expected)
    (grad,) = torch.autograd.grad(value, logits)
    (grad_ref,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, grad_ref)


def test_papers_dice_ce_is_not_monais_default():
    """squared_pred / smooth change the input gradient (the issue saw its sign differ on 2 % of voxels)."""
    from robustseg.attacks.losses import dice_ce, dice_ce_monai

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 6, 5, 4))
    (paper,) = torch.autograd.grad(dice_ce(logits, labels), logits)
    (monai,) = torch.autograd.grad(dice_ce_monai(logits, labels), logits)
    assert (paper - monai).abs().max() > 1e-4


def test_dice_ce_runs_in_fp32_under_low_precision_logits():
    """bf16 logits (AMP training) are summed in fp32, as MONAI's loss is under autocast; the gradient keeps bf16."""
    from monai.losses import DiceCELoss

    from robustseg.attacks.losses import dice_ce

    torch.manual_seed(0)
    logits = torch.randn(1, 3, 8, 8, 8).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 3, (1, 1, 8, 8, 8))
    value = dice_ce(logits, labels)
    assert value.dtype == torch.float32
    expected = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)(
        logits.float(), labels
    )
    torch.testing.assert_close(value, expected)
    (grad,) = torch.autograd.grad(value, logits)
    assert grad.dtype == torch.bfloat16


def test_ssim_reference_gives_the_same_value():
    from robustseg.attacks.ssim import ssim_reference

    torch.manual_seed(0)
    x, y = torch.rand(2, 1, 14, 16, 12), torch.rand(2, 1, 14, 16, 12)
    torch.testing.assert_close(ssim3d(x, y, reference=ssim_reference(x)), ssim3d(x, y))


def test_soft_quantise_matches_autograd_through_soft_round():
    from robustseg.attacks.frequency import soft_quantise

    torch.manual_seed(0)
    coeffs = (torch.randn(50, dtype=torch.float64) * 40).requires_grad_(True)
    q = (torch.rand(50, dtype=torch.float64) * 19 + 1).requires_grad_(True)
    expected = soft_round(coeffs / q, 0.07) * q
    value = soft_quantise(coeffs, q, 0.07)
    torch.testing.assert_close(value, expected)
    grads = torch.autograd.grad(value.sum(), (coeffs, q))
    torch.testing.assert_close(grads, torch.autograd.grad(expected.sum(), (coeffs, q)))
    assert torch.autograd.gradcheck(lambda c, t: soft_quantise(c, t, 0.07), (coeffs, q))


def test_ssim_fused_backward_matches_autograd():
    """With a fixed clean side (``reference``) ssim3d takes the fused backward; without one, plain autograd: both
    give MONAI's value and the same gradient."""
    from robustseg.attacks.ssim import ssim_reference

    torch.manual_seed(0)
    x = torch.rand(2, 1, 12, 13, 14, dtype=torch.float64)
    y = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    expected = compute_ssim_and_cs(x, y.detach(), 3, [11] * 3, [1.5] * 3)[0].flatten(1).mean(1)
    fused_value, plain_value = ssim3d(x, y, reference=ssim_reference(x)), ssim3d(x, y)
    assert "SSIMMean" in type(fused_value.grad_fn).__name__ and "SSIMMean" not in type(plain_value.grad_fn).__name__
    torch.testing.assert_close(fused_value, expected.to(fused_value.dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain_value, expected.to(plain_value.dtype), rtol=1e-5, atol=1e-6)
    (fused,) = torch.autograd.grad(fused_value.sum(), y)
    (plain,) = torch.autograd.grad(plain_value.sum(), y)
    torch.testing.assert_close(fused, plain)
    small_x = torch.rand(1, 1, 5, 6, 7, dtype=torch.float64)  # gradcheck is quadratic in the size: keep it small
    small_y = (small_x + 0.1 * torch.randn_like(small_x)).requires_grad_(True)
    reference = ssim_reference(small_x, win_size=3)
    assert torch.autograd.gradcheck(lambda t: ssim3d(small_x, t, win_size=3, reference=reference), (small_y,))
    assert torch.autograd.gradcheck(lambda t: ssim3d(small_x, t, win_size=3), (small_y,))


def test_training_system_minimises_the_papers_dice_ce():
    """SPEC: training uses the papers' DiceCE (squared_pred, smooth_nr 0, smooth_dr 1e-6), as the attacks do."""
    from monai.losses import DiceCELoss

    from robustseg.models import TINY
    from robustseg.systems import SegmentationSystem

    system = SegmentationSystem(
        model={"name": "unet", "in_channels": 1, "out_channels": 3, **TINY["unet"]}, num_classes=3
    )
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 6, 5, 4))
    papers = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    torch.testing.assert_close(system.loss(logits, labels), papers(logits, labels))
