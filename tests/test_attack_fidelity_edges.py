"""Edges of the attack library that the formula tests do not reach: boundaries of every validation, defaults that
must equal the scoring pipeline's, perceptibility figures computed by hand, the random starts' distributions.

Written to kill the mutants `make mutate` found surviving (docs/attacks.md, mutation testing).
"""

from __future__ import annotations

import math

import pytest
import torch
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
    x = torch.rand(1, 1, 7, 8, 9)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    expected = compute_ssim_and_cs(x, y, 3, [7] * 3, [1.5] * 3)[0].mean()
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
