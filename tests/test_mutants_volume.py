"""Tests written from mutation-testing survivors of the whole-volume attacks (robustseg/attacks/volume.py) and the
attack contract (robustseg/attacks/base.py); each checks behaviour against an independent expectation written
plainly here: autograd through MONAI's own ``sliding_window_inference``, the attack run on the whole volume, or a
property stated in the docstring, on inputs where a wrong variant of the code gives a different answer (more than
one image, non-cubic ROIs, volumes smaller than the ROI, three or more tiles per axis, high overlap).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TargetSpy, conv_net3d
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from robustseg.attacks import ATTACKS, Attack, SlidingWindowModel, attack_volume, parse_budget
from robustseg.attacks.base import AttackInputError
from robustseg.attacks.volume import project_l2
from robustseg.errors import ConfigError


def reference_vjp(net: nn.Module, image: Tensor, upstream: Tensor, roi, overlap: float, **kwargs) -> Tensor:
    """``d<upstream, sliding_window_inference(image)>/d image``: plain autograd through MONAI's own inference."""
    x = image.clone().requires_grad_(True)
    out = sliding_window_inference(x, roi, 2, net, overlap, sigma_scale=0.125, **kwargs)
    (grad,) = torch.autograd.grad(out, x, upstream)
    return grad


# (batch, spatial size, roi, overlap, blend mode, own weight map): each case exercises one part of the windowing
WINDOW_CASES = {
    # two images (C = 1 != B): windows of image 1 read and write image 1 only; D = 13 takes 3 windows at stride 4
    "two_images": (2, (13, 11, 17), (8, 8, 8), 0.5, "gaussian", False),
    # the model's own blending weights (as nnU-Net's), not MONAI's Gaussian
    "own_weights": (2, (13, 11, 17), (8, 8, 8), 0.5, "gaussian", True),
    # smaller than a non-cubic ROI along D only: zero-padded per axis, W/H/D not mixed up
    "padded": (1, (5, 9, 7), (8, 6, 4), 0.5, "constant", False),
    # high overlap on a small ROI: stride int(r * 0.25) is 0 or 1, so stride 1
    "stride_one": (1, (6, 7, 5), (3, 4, 2), 0.75, "gaussian", False),
    # one-slice windows: an ROI side of 1 is a valid size
    "slab": (1, (3, 6, 7), (1, 4, 5), 0.5, "gaussian", False),
}


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_window_model_equals_monai_forward_and_vjp(case, bounded):
    batch, size, roi, overlap, blend, own_weights = WINDOW_CASES[case]
    g = torch.Generator().manual_seed(3)
    image = torch.rand(batch, 1, *size, generator=g, dtype=torch.float64)
    upstream = torch.randn(batch, 3, *size, generator=g, dtype=torch.float64)
    weights = torch.rand(roi, generator=g, dtype=torch.float64) + 0.05 if own_weights else None
    net = conv_net3d(width=4, scale=1)
    kwargs = {"mode": blend, "roi_weight_map": weights}
    want = reference_vjp(net, image, upstream, roi, overlap, **kwargs)
    model = SlidingWindowModel(
        net, roi, overlap=overlap, blend_mode=blend, memory_bounded=bounded, roi_weight_map=weights
    )
    x = image.clone().requires_grad_(True)
    logits = model(x)
    with torch.no_grad():
        torch.testing.assert_close(logits, sliding_window_inference(image, roi, 2, net, overlap, **kwargs))
    (got,) = torch.autograd.grad(logits, x, upstream)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if batch == 2:  # image 1's gradient is its own, not image 0's
        assert not torch.allclose(got[1], got[0])


class CountingNet(nn.Module):
    """3x3x3 conv (4 classes) that counts its forwards and, given ``roi``, accepts only ROI-shaped windows
    (as UNETR-like models with a fixed input size do)."""

    def __init__(self, roi: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.roi, self.calls = nn.Conv3d(1, 4, 3, padding=1), roi, 0

    def forward(self, x: Tensor) -> Tensor:
        assert self.roi is None or tuple(x.shape[2:]) == self.roi, f"{tuple(x.shape)} is not ROI-shaped"
        self.calls += 1
        return self.conv(x)


def test_memory_bounded_is_opt_in_and_recomputes_windows_in_backward():
    """Default: plain autograd through the sliding window (a graph into the parameters, nothing re-run).
    ``memory_bounded=True``: no graph in the forward; the backward re-runs every window batch once."""
    image = torch.rand(1, 1, 16, 8, 8)
    net = CountingNet()
    plain = SlidingWindowModel(net, 8, overlap=0.5, sw_batch_size=2)  # 3 windows along D: 2 forwards
    plain(image).sum().backward()
    assert net.calls == 2 and net.conv.weight.grad is not None
    net = CountingNet()
    bounded = SlidingWindowModel(net, 8, overlap=0.5, sw_batch_size=2, memory_bounded=True)
    x = image.clone().requires_grad_(True)
    logits = bounded(x)
    assert net.calls == 2
    logits.sum().backward()
    assert net.calls == 4 and net.conv.weight.grad is None and x.grad is not None


@pytest.mark.parametrize("given", [None, 4])
def test_volume_target_reads_classes_from_one_roi_tile_or_takes_them_given(given):
    """The target map is derived once from the whole volume with K classes: ``num_classes`` when given (then the
    model is never run), else the logit channels of one ROI-shaped tile (one forward)."""
    roi = (4, 5, 6)  # non-cubic: a crop taken along the wrong axis is not ROI-shaped
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 1, 9, 10, 11, generator=g)
    label = torch.randint(0, 4, (1, 1, 9, 10, 11), generator=g)
    net, spy = CountingNet(roi), TargetSpy()
    attack_volume(spy, net, image, label, mode="pipeline", roi_size=roi, num_classes=given)
    (seen,) = spy.seen
    assert torch.equal(seen, torch.where(label > 0, label % 3 + 1, label))  # K = 4: 1 -> 2 -> 3 -> 1
    assert net.calls == (0 if given else 1)


def test_tiles_stitch_three_tiles_per_axis_on_a_wide_volume():
    """Tiles mode with a per-voxel model and a voxel-mean CE is the whole-volume FGSM: the sign of a voxel's
    gradient ignores the tiling. Three and four tiles per axis (a middle tile kept whole) and W > H > D."""
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 1, 9, 10, 13, generator=g)
    label = torch.randint(0, 3, (1, 1, 9, 10, 13), generator=g)
    torch.manual_seed(0)
    net = nn.Conv3d(1, 3, kernel_size=1)
    cfg = {"name": "pgd", "eps": "8/255", "step_size": "8/255", "steps": 1, "random_start": False, "loss": "ce"}
    fgsm = ATTACKS.build(cfg)
    tiled = attack_volume(fgsm, net, image, label, mode="tiles", roi_size=(3, 4, 4), sw_batch_size=5)
    whole = fgsm(net, image, label)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-6)
    assert (tiled != image).float().mean() > 0.9  # nearly every voxel moved, by its own tile


def test_project_l2_leaves_a_point_on_the_sphere_unchanged():
    """The projection onto the L2 ball is the identity on the ball, its boundary included (bit for bit)."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, 5, 6, 7, generator=g)
    adversarial = torch.rand(image.shape, generator=g) ** 8  # many voxels near 0: image + (adv - image) != adv
    eps = float((adversarial - image).norm())  # exactly on the sphere
    assert torch.equal(project_l2(image, adversarial, eps), adversarial)
    inside = project_l2(image, adversarial, 2 * eps)
    assert torch.equal(inside, adversarial)
    shrunk = project_l2(image, adversarial, eps / 2)
    torch.testing.assert_close(shrunk, image + (adversarial - image) / 2)


def test_attack_volume_refuses_bad_inputs_itself_naming_the_attack():
    """attack_volume checks its own inputs before any tiling or forward, and names itself and the attack."""
    g = torch.Generator().manual_seed(4)
    image = torch.rand(1, 1, 6, 7, 8, generator=g)
    label = torch.randint(0, 3, (1, 1, 6, 7, 8), generator=g)
    pgd = ATTACKS.build({"name": "pgd", "steps": 1, "random_start": False})
    net = CountingNet()
    with pytest.raises(ValueError, match=r"attack_volume: expected image \(1, C, D, H, W\) and label"):
        attack_volume(pgd, net, image, label[0], mode="tiles", roi_size=4)  # 5-D image, 4-D label
    with pytest.raises(AttackInputError, match=r"attack_volume\(PGD\): images must lie in \[0, 1\]"):
        attack_volume(pgd, net, image * 2, label, roi_size=4)
    targeted = ATTACKS.build({"name": "pgd", "steps": 1, "targeted": True})
    with pytest.raises(ValueError, match=r"attack_volume\(PGD\): the target map equals the true labels"):
        attack_volume(targeted, net, image, label, roi_size=4, target=label)
    assert net.calls == 0


@dataclasses.dataclass(frozen=True)
class ProbeAttack(Attack):
    """Returns its input; records the logits its model gives and the forwards of one forward + backward."""

    net: nn.Module = dataclasses.field(default_factory=CountingNet)
    seen: list = dataclasses.field(default_factory=list, compare=False)

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        x = images.clone().requires_grad_(True)
        before = self.net.calls
        logits = model(x)
        forward = self.net.calls - before
        torch.autograd.grad(logits.sum(), x)
        self.seen.append((logits.detach(), forward, self.net.calls - before))
        return images


@pytest.mark.parametrize("bounded", [False, True])
def test_pipeline_attacks_the_configured_sliding_window(bounded):
    """In pipeline mode the attacked model is MONAI's sliding window with the given overlap, blend mode, own
    window weights and windows per forward; memory-bounded re-runs each window batch in the backward."""
    g = torch.Generator().manual_seed(6)
    image = torch.rand(1, 1, 11, 9, 10, generator=g)
    label = torch.randint(0, 4, image.shape, generator=g)
    weights = torch.rand(6, 6, 6, generator=g) + 0.05
    # stride 1 (overlap 0.75): 6 * 4 * 5 = 120 windows; stride 4 (overlap 0.25): 3 * 2 * 2 = 12; 3 per forward
    cases = [({"overlap": 0.75, "blend_mode": "constant"}, 40), ({"overlap": 0.25, "roi_weight_map": weights}, 4)]
    for kwargs, forwards in cases:
        probe = ProbeAttack()
        attack_volume(probe, probe.net, image, label, roi_size=6, sw_batch_size=3, memory_bounded=bounded, **kwargs)
        ((logits, forward, total),) = probe.seen
        monai = {"mode": kwargs.get("blend_mode", "gaussian"), "roi_weight_map": kwargs.get("roi_weight_map")}
        want = sliding_window_inference(image, 6, 3, probe.net, kwargs["overlap"], **monai)
        torch.testing.assert_close(logits, want)
        assert forward == forwards
        assert total == (2 * forward if bounded else forward)


# --- base.py: budget parsing messages and the attack contract ---


def test_budget_messages_name_the_attack_the_field_and_the_escape_only_where_it_exists():
    """A refused budget names ``<attack>.<field>`` (``attack`` when no attack is given); the hint to set
    ``allow_large_budget`` is added only for an attack that has that field, and nothing else is appended."""
    with pytest.raises(ConfigError, match=r"^attack\.eps: expected a number or a fraction"):
        parse_budget("eight", "eps")
    with pytest.raises(ConfigError, match=r"^PGD\.eps: 2 is >= 1, the whole \[0, 1\] intensity range") as plain:
        parse_budget(2, "eps", "PGD", maximum=1.0)
    assert str(plain.value).endswith("write e.g. '8/255' (not 8)")
    with pytest.raises(ConfigError, match=r"^PGD\.eps: 2 is >= 1") as no_field:
        ATTACKS.build({"name": "pgd", "eps": 2})
    assert str(no_field.value).endswith("(not 8)")
    with pytest.raises(ConfigError, match=r"^GN\.sigma: 2 is >= 1.*\(not 8\); set GN\.allow_large_budget=true if"):
        ATTACKS.build({"name": "gn", "sigma": 2})


@dataclasses.dataclass(frozen=True)
class Wild(Attack):
    """Returns float64 values far outside [0, 1], still attached to a graph."""

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
        return images.double() * scale - 1.5


def test_attack_result_is_detached_in_unit_range_and_in_the_input_dtype():
    """The contract: whatever ``perturb`` returns, the caller gets a detached tensor of the input's dtype in [0, 1]."""
    images = torch.rand(2, 1, 4, 5, 6, generator=torch.Generator().manual_seed(7))
    labels = torch.zeros(2, 1, 4, 5, 6, dtype=torch.long)
    out = Wild()(nn.Conv3d(1, 3, 1), images, labels)
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, (images.double() * 4 - 1.5).clamp(0, 1).float())
    assert out.min() == 0 and out.max() == 1


def test_attack_refuses_bad_shapes_dtypes_and_ranges_naming_itself():
    g = torch.Generator().manual_seed(8)
    images, labels = torch.rand(2, 1, 4, 5, 6, generator=g), torch.randint(0, 3, (2, 1, 4, 5, 6), generator=g)
    pgd, net = ATTACKS.build({"name": "pgd", "steps": 1, "random_start": False}), nn.Conv3d(1, 3, 1)
    with pytest.raises(ValueError, match=r"^PGD: expected images \(B, C, D, H, W\) and labels \(B, 1, D, H, W\)"):
        pgd(net, images, labels[:, 0])  # 5-D images, 4-D labels
    with pytest.raises(ValueError, match=r"^PGD: expected float images and integer labels"):
        pgd(net, images, labels.float())
    with pytest.raises(AttackInputError, match=r"^PGD: images must lie in \[0, 1\]"):
        pgd(net, images + 1, labels)


def test_given_num_classes_sets_the_target_rule_without_a_forward():
    """``num_classes`` given: the rule uses it and the model is not run; else one forward reads K."""
    g = torch.Generator().manual_seed(9)
    images, labels = torch.rand(2, 1, 4, 5, 6, generator=g), torch.randint(0, 4, (2, 1, 4, 5, 6), generator=g)
    expected = torch.where(labels > 0, labels % 3 + 1, labels)  # foreground_swap with K = 4
    for given, forwards in ((4, 0), (None, 1)):
        net, spy = CountingNet(), TargetSpy()
        spy(net, images, labels, num_classes=given)
        assert torch.equal(spy.seen[0], expected) and net.calls == forwards
