"""Edges of the attack library that the formula tests do not reach: boundaries of every validation, defaults that
must equal the scoring pipeline's, perceptibility figures computed by hand, the random starts' distributions.

Written to kill the mutants `make mutate` found surviving (docs/attacks.md, mutation testing).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import conv_net3d
from monai.losses import DiceLoss
from monai.metrics.regression import compute_ssim_and_cs
from torch import nn

from robustseg.attacks import ATTACKS, LOSSES, SlidingWindowModel, attack_volume, parse_budget, perceptibility
from robustseg.attacks.base import check_positive_int, frozen_parameters, make_generator
from robustseg.attacks.frequency import soft_quantise, soft_round
from robustseg.attacks.ssim import ssim3d
from robustseg.attacks.targets import check_target
from robustseg.errors import ConfigError


@pytest.mark.parametrize("value", [True, False, None, [8, 255], "eight", "8/0", "nan", "inf", -1e-9, float("inf")])
def test_parse_budget_refuses(value):
    with pytest.raises(ConfigError, match=r"PGD\.eps"):
        parse_budget(value, "eps", "PGD")


def test_parse_budget_accepts():
    assert parse_budget(0, "eps") == 0.0 and isinstance(parse_budget(0, "eps"), float)
    assert parse_budget("0", "eps") == 0.0
    assert parse_budget(" 2 / 255 ", "eps") == pytest.approx(2 / 255)
    assert parse_budget(3, "eps") == 3.0  # no maximum unless asked
    assert parse_budget("0.5", "eps", maximum=1.0) == 0.5


@pytest.mark.parametrize(("value", "ok"), [(1, True), (7, True), (0, False), (-1, False), (True, False), (2.0, False)])
def test_check_positive_int(value, ok):
    if ok:
        check_positive_int(value, "steps")
    else:
        with pytest.raises(ConfigError, match=r"attack\.steps: expected an integer >= 1"):
            check_positive_int(value, "steps")
    with pytest.raises(ConfigError, match=">= 3"):
        check_positive_int(2, "steps", minimum=3)
    check_positive_int(3, "steps", minimum=3)


def test_frozen_parameters_restores_each_flag():
    net = nn.Sequential(nn.Conv3d(1, 2, 1), nn.Conv3d(2, 2, 1))
    net[0].bias.requires_grad_(False)
    before = [p.requires_grad for p in net.parameters()]
    with frozen_parameters(net):
        assert not any(p.requires_grad for p in net.parameters())
    assert [p.requires_grad for p in net.parameters()] == before


def test_make_generator():
    assert make_generator(None, torch.device("cpu")) is None
    first = torch.rand(3, generator=make_generator(4, torch.device("cpu")))
    assert torch.equal(first, torch.rand(3, generator=torch.Generator().manual_seed(4)))


def test_explicit_target_shape_and_untargeted_use_are_refused(volume_batch):
    images, labels = volume_batch["image"], volume_batch["label"]
    net = nn.Conv3d(1, 3, 1)
    targeted = ATTACKS.build({"name": "pgd", "steps": 1, "targeted": True, "seed": 0})
    with pytest.raises(ValueError, match="target map shape"):
        targeted(net, images, labels, target=labels[:1])
    with pytest.raises(ValueError, match="not targeted"):
        ATTACKS.build({"name": "pgd", "steps": 1})(net, images, labels, target=torch.zeros_like(labels))
    assert torch.equal(targeted.goal(net, images, labels, target=torch.zeros_like(labels)), torch.zeros_like(labels))
    assert targeted.goal(net, images, labels, target=torch.zeros_like(labels).int()).dtype == torch.long


def test_check_target_allows_a_volume_without_foreground():
    empty = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)
    check_target(empty.clone(), empty)  # background-only: the target equals the truth and that is fine
    with pytest.raises(ValueError, match="shape"):
        check_target(empty[..., :1], empty)
    one = empty.clone()
    one[..., 0, 0, 0] = 1
    with pytest.raises(ValueError, match="equals the true labels"):
        check_target(one.int(), one)


def test_soft_rounding_refuses_a_outside_the_open_interval():
    u = torch.tensor([0.3])
    for a in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="a must be in"):
            soft_round(u, a)
        with pytest.raises(ValueError, match="a must be in"):
            soft_quantise(u, torch.ones(1), a)
    assert soft_round(u, 0.5).isfinite().all() and soft_quantise(u, torch.ones(1), 0.999).isfinite().all()


def test_perceptibility_by_hand():
    clean = torch.full((2, 1, 4, 4, 4), 0.5)
    adversarial = clean.clone()
    adversarial[0, 0, 0, 0, 0] += 0.25  # volume 0: one voxel moved by 0.25; volume 1 unchanged
    adversarial[0, 0, 1, 0, 0] -= 0.125
    stats = perceptibility(clean, adversarial)
    assert stats["linf"] == pytest.approx(0.25 / 2)  # batch mean of (0.25, 0)
    assert stats["l2"] == pytest.approx(math.hypot(0.25, 0.125) / 2)
    assert stats["psnr"] == math.inf  # volume 1 is identical
    mse = (0.25**2 + 0.125**2) / 64
    one = perceptibility(clean[:1], adversarial[:1])
    assert one["psnr"] == pytest.approx(-10 * math.log10(mse))
    expected_ssim = compute_ssim_and_cs(clean[:1], adversarial[:1], 3, [3] * 3, [1.5] * 3)[0].mean()
    assert one["ssim"] == pytest.approx(float(expected_ssim), rel=1e-5)  # the window shrinks to fit 4^3: 3


def test_ssim3d_window_shrinks_to_small_volumes():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 5, 8, 9)  # the first spatial axis is the smallest: window 5
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    expected = compute_ssim_and_cs(x, y, 3, [5] * 3, [1.5] * 3)[0].mean()
    torch.testing.assert_close(ssim3d(x, y), expected[None], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim3d(x, y[..., :-1])


def test_dice_and_masked_ce_losses_by_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 4, 5, 3))
    torch.testing.assert_close(LOSSES["dice"](logits, labels), DiceLoss(to_onehot_y=True, softmax=True)(logits, labels))
    per_voxel = nn.functional.cross_entropy(logits, labels[:, 0], reduction="none")
    correct = logits.argmax(1) == labels[:, 0]
    torch.testing.assert_close(LOSSES["masked_ce"](logits, labels), per_voxel[correct].mean())
    wrong = (labels + 1) % 3
    assert LOSSES["masked_ce"](torch.nn.functional.one_hot(wrong[:, 0], 3).movedim(-1, 1).double() * 9, labels) == 0


def test_pipeline_defaults_are_the_scoring_defaults(volume_batch):
    """attack_volume's defaults (overlap 0.5, Gaussian blending, window batch 2) are those of SlidingWindowModel and
    of scoring; the wrapper takes the wrapped model's mode."""
    image, label = volume_batch["image"][:1], volume_batch["label"][:1]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 3, 3, padding=1)).eval()
    attack = ATTACKS.build({"name": "pgd", "steps": 2, "seed": 0})
    default = attack_volume(attack, net, image, label, roi_size=12)
    explicit = attack(SlidingWindowModel(net, 12, overlap=0.5, sw_batch_size=2, blend_mode="gaussian"), image, label)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    other = attack(SlidingWindowModel(net, 12, overlap=0.25, blend_mode="constant"), image, label)
    assert not torch.equal(default, other)
    assert SlidingWindowModel(net.train(), 12).training and not SlidingWindowModel(net.eval(), 12).training


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "slices"}, "mode"),
        ({"sw_batch_size": 0}, "sw_batch_size"),
        ({"roi_size": 0}, "roi_size"),
        ({"roi_size": (16, 16)}, "roi_size"),
    ],
)
def test_attack_volume_argument_errors(kwargs, match, volume_batch):
    attack = ATTACKS.build({"name": "pgd", "steps": 1})
    kwargs = {"roi_size": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        attack_volume(attack, nn.Conv3d(1, 3, 1), volume_batch["image"][:1], volume_batch["label"][:1], **kwargs)


def test_tiles_take_one_volume(volume_batch):
    attack = ATTACKS.build({"name": "pgd", "steps": 1})
    with pytest.raises(ValueError, match="one volume"):
        attack_volume(
            attack, nn.Conv3d(1, 3, 1), volume_batch["image"], volume_batch["label"], mode="tiles", roi_size=8
        )


def test_random_starts_fill_their_balls():
    """L-inf: uniform in [-eps, eps] (zero steps of size 0 expose the start); L2: radii uniform in [0, eps]."""
    images = torch.full((4, 1, 8, 8, 8), 0.5)
    labels = torch.zeros(4, 1, 8, 8, 8, dtype=torch.long)
    net = nn.Conv3d(1, 2, 1)
    pgd = ATTACKS.build({"name": "pgd", "eps": 0.1, "step_size": 0.0, "steps": 1, "seed": 0})
    delta = pgd(net, images, labels) - images
    assert delta.abs().max() <= 0.1 + 1e-7 and delta.min() < -0.09 and delta.max() > 0.09
    assert abs(float(delta.mean())) < 0.01 and float((delta.abs() > 0.0999).float().mean()) < 0.01
    l2 = ATTACKS.build({"name": "pgd_l2", "eps": 2.0, "step_size": 0.0, "steps": 1, "seed": 0})
    norms = (l2(net, images, labels) - images).flatten(1).norm(dim=1)
    assert (norms <= 2.0 + 1e-5).all() and norms.max() - norms.min() > 0.05 and (norms > 0).all()
    fixed = ATTACKS.build({"name": "pgd", "eps": 0.1, "step_size": 0.0, "steps": 1, "random_start": False})
    assert torch.equal(fixed(net, images, labels), images)


def test_l2_step_is_normalised_per_volume():
    """One L2 step moves each volume by exactly step_size, whatever its gradient's size."""
    images = torch.full((2, 1, 6, 6, 6), 0.5)
    images[1] = 0.4
    labels = torch.ones(2, 1, 6, 6, 6, dtype=torch.long)
    net = nn.Conv3d(1, 2, 1)
    attack = ATTACKS.build({"name": "pgd_l2", "eps": 5.0, "step_size": 0.3, "steps": 1, "random_start": False})
    norms = (attack(net, images, labels) - images).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((2,), 0.3), rtol=1e-5, atol=1e-6)
    far = ATTACKS.build({"name": "pgd_l2", "eps": 0.2, "step_size": 0.3, "steps": 1, "random_start": False})
    torch.testing.assert_close((far(net, images, labels) - images).flatten(1).norm(dim=1), torch.full((2,), 0.2))


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"name": "di_fgsm", "resize_rate": 0.0}, "resize_rate"),
        ({"name": "di_fgsm", "resize_rate": 1.01}, "resize_rate"),
        ({"name": "di_fgsm", "diversity_prob": -0.1}, "diversity_prob"),
        ({"name": "di_fgsm", "diversity_prob": 1.1}, "diversity_prob"),
        ({"name": "vmi_fgsm", "n_samples": 0}, "n_samples"),
        ({"name": "vmi_fgsm", "beta": -1}, "beta"),
        ({"name": "mi_fgsm", "decay": -0.5}, "decay"),
        ({"name": "gn", "seed": 1.5}, "seed"),
        ({"name": "gn", "seed": True}, "seed"),
        ({"name": "pgd", "seed": "0"}, "seed"),
        ({"name": "vafa", "use_ssim": "yes"}, "use_ssim"),
        ({"name": "vafa", "hard_round": 1}, "hard_round"),
        ({"name": "vafa", "init": "jpeg"}, "init"),
        ({"name": "vafa", "q_max": 4}, "q_min/q_max"),  # published q_min 5 > q_max
        ({"name": "vafa", "q_min": 0, "q_max": 10}, "q_min/q_max"),
        ({"name": "vafa", "block_size": 0}, "block_size"),
        ({"name": "vafa", "loss": "hinge"}, "loss"),
        ({"name": "vafa", "targeted": True, "target": "nowhere"}, "target"),
        ({"name": "vafa2d", "steps": 0}, "steps"),
    ],
)
def test_more_bad_values_raise_config_error(cfg, field):
    with pytest.raises(ConfigError, match=field):
        ATTACKS.build(cfg)


def test_boundary_values_are_accepted():
    ATTACKS.build({"name": "di_fgsm", "resize_rate": 1.0, "diversity_prob": 0.0})
    ATTACKS.build({"name": "di_fgsm", "diversity_prob": 1.0})
    ATTACKS.build({"name": "vmi_fgsm", "n_samples": 1, "beta": 0})
    ATTACKS.build({"name": "vafa", "q_max": 5})  # q_min 5 == q_max
    ATTACKS.build({"name": "vafa", "init": "paper", "q_max": 1})
    ATTACKS.build({"name": "gn", "seed": 0, "sigma": "255/256"})


def test_vafa_describe_names_the_variant():
    assert ATTACKS.build({"name": "vafa"}).describe() == (
        "vafa(q_max=20, q_min=5, init=published, block=32^3, steps=20, ssim=on, output=soft, clip_steps=False, "
        "rescale_slices=False)"
    )
    assert ATTACKS.build({"name": "vafa2d", "init": "paper", "q_max": 8, "hard_round": True}).describe() == (
        "vafa2d(q_max=8, q_min=1, init=paper, block=8^2, steps=10, ssim=off, output=hard, clip_steps=False, "
        "rescale_slices=True)"
    )
    assert ATTACKS.build({"name": "vafa", "init": "paper", "q_min": 3, "q_max": 9}).start == 3.0


def test_diversity_on_an_axis_of_one_voxel(monkeypatch):
    """A size-1 axis stays one voxel wide after the shrink (never 0, never 2)."""
    from robustseg.attacks import transfer

    draws = iter([0.0, 0.0, 0.5, 0.5, 0.5])
    monkeypatch.setattr(transfer, "_uniform", lambda *_: next(draws))
    net = nn.Conv3d(1, 3, 3, padding=1)
    x = torch.rand(1, 1, 10, 1, 6)
    assert transfer.diverse_logits(net, x, None, 0.5, 1.0).shape == (1, 3, 10, 1, 6)


def test_gn_is_x_plus_sigma_times_seeded_normal_noise():
    """Malik et al.'s baseline, x + sigma N(0, 1), clipped: the seeded noise drawn in the input's dtype."""
    images = torch.full((2, 1, 5, 6, 7), 0.5, dtype=torch.float64)
    gn = ATTACKS.build({"name": "gn", "sigma": "16/255", "seed": 3})
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = (images + 16 / 255 * noise).clamp(0, 1)
    torch.testing.assert_close(gn(nn.Conv3d(1, 2, 1), images, torch.zeros(2, 1, 5, 6, 7, dtype=torch.long)), expected)
    one = ATTACKS.build({"name": "gn", "sigma": 0.999, "seed": 3})(
        nn.Conv3d(1, 2, 1), images, torch.zeros_like(images).long()
    )
    assert not torch.equal(one, images)


def test_cospgd_loss_by_hand():
    """Voxel mean of cos(softmax, onehot) x CE per voxel (targeted: 1 - cos), and the attack's objective uses the
    targeted form when targeted."""
    from robustseg.attacks.cospgd import cospgd_loss

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).T.reshape(1, 2, 1, 1, 3).double()
    labels = torch.tensor([0, 0, 1]).view(1, 1, 1, 1, 3)
    probs = logits.softmax(1)[0, :, 0, 0].T  # (3, 2)
    onehot = torch.eye(2, dtype=torch.float64)[labels.flatten()]
    cos = (probs * onehot).sum(1) / probs.norm(dim=1)
    ce = -probs[torch.arange(3), labels.flatten()].log()
    assert cospgd_loss(logits, labels).item() == pytest.approx(float((cos * ce).mean()))
    assert cospgd_loss(logits, labels, targeted=True).item() == pytest.approx(float(((1 - cos) * ce).mean()))
    net = nn.Identity()
    for targeted in (False, True):
        attack = ATTACKS.build({"name": "cospgd", "steps": 1, "targeted": targeted})
        value = attack.objective(net, logits, labels, 0)
        assert value.item() == pytest.approx(float(cospgd_loss(logits, labels, targeted=targeted)))


def test_segpgd_objective_follows_targeted():
    from robustseg.attacks.segpgd import segpgd_lambda, segpgd_loss

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 1, 2).double()
    labels = torch.zeros(1, 1, 1, 1, 2, dtype=torch.long)
    for targeted in (False, True):
        attack = ATTACKS.build({"name": "segpgd", "steps": 4, "targeted": targeted})
        expected = segpgd_loss(logits, labels, segpgd_lambda(3, 4), targeted=targeted)
        assert attack.objective(nn.Identity(), logits, labels, 3).item() == pytest.approx(expected.item())


def test_blocks2d_refuses_either_axis_not_divisible():
    from robustseg.attacks.frequency import to_blocks, to_blocks2d

    for shape in ((1, 1, 8, 10, 3), (1, 1, 10, 8, 3)):
        with pytest.raises(ValueError, match="pad_to_multiple"):
            to_blocks2d(torch.zeros(shape), 4)
    for shape in ((1, 1, 8, 8, 6), (1, 1, 8, 6, 8), (1, 1, 6, 8, 8)):
        with pytest.raises(ValueError, match="pad_to_multiple"):
            to_blocks(torch.zeros(shape), 4)


def test_rescale_axial_slices_clips_constant_slices_out_of_range():
    from robustseg.attacks.vafa import rescale_axial_slices

    x = torch.rand(1, 1, 3, 3, 3)
    x[..., 0], x[..., 1] = 1.3, -0.2  # constant slices outside [0, 1] (x' is unclipped during the steps)
    out = rescale_axial_slices(x)
    assert torch.equal(out[..., 0], torch.ones(1, 1, 3, 3)) and torch.equal(out[..., 1], torch.zeros(1, 1, 3, 3))


def test_tile_starts_exact():
    from robustseg.attacks.volume import tile_starts

    assert tile_starts(16, 16) == [(0, 0, 16)]
    assert tile_starts(31, 16) == [(0, 0, 16), (15, 16, 31)]
    assert tile_starts(32, 16) == [(0, 0, 16), (16, 16, 32)]
    assert tile_starts(40, 16) == [(0, 0, 16), (16, 16, 32), (24, 32, 40)]


def test_tiles_of_a_volume_smaller_than_the_roi_are_zero_padded_at_the_end():
    g = torch.Generator().manual_seed(4)
    image = torch.rand(1, 1, 11, 13, 9, generator=g, dtype=torch.float64)
    label = torch.randint(0, 3, (1, 1, 11, 13, 9), generator=g)
    net = conv_net3d(width=4)
    fgsm = ATTACKS.build({"name": "pgd", "eps": 8 / 255, "step_size": 8 / 255, "steps": 1, "random_start": False})
    pad = (0, 7, 0, 3, 0, 5)  # W, H, D up to 16
    expected = fgsm(net, nn.functional.pad(image, pad), nn.functional.pad(label, pad))[:, :, :11, :13, :9]
    tiled = attack_volume(fgsm, net, image, label, mode="tiles", roi_size=16)
    torch.testing.assert_close(tiled, expected, rtol=0, atol=1e-12)


def test_l2_tiles_project_the_stitched_perturbation():
    """Each 16^3 tile attacked alone at the full radius, stitched, then the volume's delta scaled onto the ball."""
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 1, 32, 16, 16, generator=g, dtype=torch.float64) * 0.5 + 0.25
    label = torch.randint(0, 3, (1, 1, 32, 16, 16), generator=g)
    net = conv_net3d(width=4)
    attack = ATTACKS.build({"name": "pgd_l2", "eps": 0.5, "step_size": 0.5, "steps": 1, "random_start": False})
    stitched = torch.cat(
        [attack(net, image[:, :, :16], label[:, :, :16]), attack(net, image[:, :, 16:], label[:, :, 16:])], 2
    )
    delta = stitched - image
    expected = image + delta * (0.5 / delta.norm())
    tiled = attack_volume(attack, net, image, label, mode="tiles", roi_size=16, sw_batch_size=1)
    torch.testing.assert_close(tiled, expected, rtol=0, atol=1e-12)
    small = ATTACKS.build({"name": "pgd_l2", "eps": 5.0, "step_size": 0.5, "steps": 1, "random_start": False})
    tiled_small = attack_volume(small, net, image, label, mode="tiles", roi_size=16, sw_batch_size=2)
    stitched_small = torch.cat(
        [small(net, image[:, :, :16], label[:, :, :16]), small(net, image[:, :, 16:], label[:, :, 16:])], 2
    )
    torch.testing.assert_close(tiled_small, stitched_small, rtol=0, atol=1e-12)  # inside the ball: untouched


def test_explicit_target_reaches_each_tile_as_its_crop():
    from test_attack_volume import TargetSpy

    label = torch.zeros(1, 1, 16, 8, 8, dtype=torch.long)
    label[:, :, 2:6] = 1
    target = torch.randint(0, 3, (1, 1, 16, 8, 8), generator=torch.Generator().manual_seed(0))
    spy = TargetSpy()
    attack_volume(spy, nn.Conv3d(1, 3, 1), torch.rand(1, 1, 16, 8, 8), label, mode="tiles", roi_size=8, target=target)
    (tiles,) = spy.seen
    assert torch.equal(tiles[0:1], target[:, :, :8]) and torch.equal(tiles[1:2], target[:, :, 8:])
