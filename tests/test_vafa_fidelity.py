"""VAFA against a plain reference written here from the paper's formulas and the published code (Hanif et al.,
MICCAI 2023): one step with the published initialisation, the SSIM term, what is returned, the q_max sweep, VAFA-2D.

The reference uses no robustseg code: a DCT matrix from the cosine formula, Python loops over blocks, the soft
rounding formula, MONAI's own DiceCELoss and a 3x3x3 Gaussian ``conv3d`` for SSIM. A wrong update direction,
annealing direction, SSIM sign or DCT shift each changes the result.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import conv_net3d
from monai.losses import DiceCELoss
from torch import Tensor, nn

from robustseg.attacks import ATTACKS
from robustseg.attacks.ssim import block_ssim

B = 4  # block edge used throughout


def dct_1d(n: int) -> Tensor:
    """Orthonormal DCT-II matrix from its definition, float64."""
    out = torch.empty(n, n, dtype=torch.float64)
    for k in range(n):
        for i in range(n):
            scale = math.sqrt(1 / n) if k == 0 else math.sqrt(2 / n)
            out[k, i] = scale * math.cos(math.pi * (2 * i + 1) * k / (2 * n))
    return out


def soft_round(u: Tensor, a: float) -> Tensor:
    k = math.log(2 / a - 1)
    f = torch.floor(u).detach()
    return f + 0.5 * (1 + torch.tanh(k * (u - f - 0.5)) / (1 - a))


def gaussian_ssim_blocks(x: Tensor, y: Tensor) -> Tensor:
    """pytorch_msssim.ssim(blocks, data_range=1, win_size=3, nonnegative_ssim=True) on (N, 1, b, b, b) blocks."""
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=x.dtype) / (2 * 1.5**2))
    g = g / g.sum()
    w = (g[:, None, None] * g[None, :, None] * g[None, None, :])[None, None]  # (1, 1, 3, 3, 3)
    mu_x, mu_y = F.conv3d(x, w), F.conv3d(y, w)
    sxx = F.conv3d(x * x, w) - mu_x**2
    syy = F.conv3d(y * y, w) - mu_y**2
    sxy = F.conv3d(x * y, w) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * (2 * sxy + c2) / (sxx + syy + c2)
    return torch.relu(ssim_map.flatten(1).mean(1)).mean()


def blocks_of(x: Tensor) -> list[tuple[slice, slice, slice]]:
    d, h, w = x.shape[2:]
    return [
        (slice(i, i + B), slice(j, j + B), slice(k, k + B))
        for i in range(0, d, B)
        for j in range(0, h, B)
        for k in range(0, w, B)
    ]


def reference_reconstruct(x: Tensor, q: list[Tensor], a: float | None) -> Tensor:
    """x' of a (1, 1, D, H, W) volume, block by block: (IDCT3(R(DCT3(255 x - 128) / q) q) + 128) / 255."""
    m = dct_1d(B)
    m3 = torch.kron(torch.kron(m, m), m)  # the 3D DCT of a flattened b^3 block (C order)
    out = torch.zeros_like(x)
    for (sd, sh, sw), table in zip(blocks_of(x), q):
        c = m3 @ (255 * x[0, 0, sd, sh, sw] - 128).reshape(-1)
        t = table.reshape(-1)
        quantised = (torch.round(c / t) if a is None else soft_round(c / t, a)) * t
        out[0, 0, sd, sh, sw] = ((m3.T @ quantised + 128) / 255).reshape(B, B, B)
    return out


def reference_vafa(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    q_max: float,
    steps: int,
    ssim: bool = True,
    targeted: bool = False,
    size: tuple[int, int, int] | None = None,
) -> Tensor:
    """The published loop (q from q_max, q_min 5; a = 0.1 (1 - t / T); x' unclipped; return the last x')."""
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    q = [torch.full((B, B, B), float(q_max), dtype=x.dtype) for _ in blocks_of(x)]
    for t in range(steps):
        a = 0.1 * (1 - t / steps)
        for table in q:
            table.requires_grad_(True)
        adv = reference_reconstruct(x, q, a)
        seen = adv if size is None else adv[:, :, : size[0], : size[1], : size[2]]  # the model sees the crop
        objective = -loss_fn(net(seen), y) if targeted else loss_fn(net(seen), y)
        if ssim:
            pairs = [(x[0, 0, s[0], s[1], s[2]], adv[0, 0, s[0], s[1], s[2]]) for s in blocks_of(x)]
            xb = torch.stack([p[0] for p in pairs])[:, None]  # (N, 1, b, b, b)
            yb = torch.stack([p[1] for p in pairs])[:, None]
            objective = objective - (1 - gaussian_ssim_blocks(xb, yb))
        grads = torch.autograd.grad(objective, q)
        q = [(table.detach() + g.sign()).clamp(5.0, q_max) for table, g in zip(q, grads)]
    adv = adv if size is None else adv[:, :, : size[0], : size[1], : size[2]]
    return adv.detach().clamp(0, 1)


@pytest.fixture
def volume() -> tuple[Tensor, Tensor]:
    """(1, 1, 8, 8, 8) float64 in [0, 1] (8 blocks of 4^3) and three-class labels."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 8, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (1, 1, 8, 8, 8), generator=g)
    return x, y


@pytest.mark.parametrize("steps", [2, 3])
def test_vafa_matches_the_published_loop(volume, steps):
    """q moves by +sign(grad of DiceCE - (1 - SSIM)) from q_max, a anneals down, x' = IDCT(...) + 128."""
    x, y = volume
    net = conv_net3d(scale=8)
    attack = ATTACKS.build({"name": "vafa", "q_max": 20, "steps": steps, "block_size": B})
    expected = reference_vafa(net, x, y, 20.0, steps)
    torch.testing.assert_close(attack(net, x, y), expected, rtol=0, atol=1e-9)
    # the update moved something: a frozen table (q_min = q_max) gives another volume
    frozen = ATTACKS.build({"name": "vafa", "q_max": 20, "q_min": 20, "steps": steps, "block_size": B})
    assert (frozen(net, x, y) - expected).abs().max() > 1e-3


def test_vafa_without_ssim_matches_the_published_loop(volume):
    x, y = volume
    net = conv_net3d(scale=8)
    attack = ATTACKS.build({"name": "vafa", "q_max": 12, "steps": 3, "block_size": B, "use_ssim": False})
    torch.testing.assert_close(attack(net, x, y), reference_vafa(net, x, y, 12.0, 3, ssim=False), rtol=0, atol=1e-9)


def test_returns_the_last_point_the_model_saw(volume):
    """Default: the soft x' of the last step (tables before the final update), which the published loop feeds to the
    model last; hard_round returns another point."""
    x, y = volume
    net = conv_net3d(scale=8)
    seen: list[Tensor] = []
    hook = net.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    cfg = {"name": "vafa", "q_max": 20, "steps": 3, "block_size": B}
    hard = ATTACKS.build({**cfg, "hard_round": True})(net, x, y)  # runs all 3 model passes
    hook.remove()
    soft = ATTACKS.build(cfg)(net, x, y)
    assert len(seen) == 3
    torch.testing.assert_close(soft, seen[-1].clamp(0, 1), rtol=0, atol=1e-12)
    assert (hard - soft).abs().max() > 1e-3


def test_steps_see_x_prime_unclipped_unless_asked(volume):
    x, y = volume
    net = conv_net3d(scale=8)
    for clip, outside in ((False, True), (True, False)):
        seen: list[Tensor] = []
        hook = net.register_forward_pre_hook(lambda _, args, seen=seen: seen.append(args[0].detach()))
        ATTACKS.build({"name": "vafa", "q_max": 30, "steps": 3, "block_size": B, "clip_steps": clip})(net, x, y)
        hook.remove()
        beyond = any(bool(((s < 0) | (s > 1)).any()) for s in seen)
        assert beyond == outside


def test_q_max_sweep_changes_the_volume(volume):
    """Issue 10: under the paper's start q_max 21, 30 and 60 gave bit-identical volumes; the published start does
    not. The paper start warns when the sweep cannot matter."""
    x, y = volume
    net = conv_net3d(scale=8)
    out = {
        qm: ATTACKS.build({"name": "vafa", "q_max": qm, "steps": 4, "block_size": B})(net, x, y) for qm in (10, 20, 30)
    }
    assert not torch.equal(out[10], out[20]) and not torch.equal(out[20], out[30]) and not torch.equal(out[10], out[30])
    paper = {
        qm: ATTACKS.build({"name": "vafa", "q_max": qm, "steps": 4, "block_size": B, "init": "paper"})(net, x, y)
        for qm in (6, 9)
    }
    assert torch.equal(paper[6], paper[9])  # q <= 1 + 4 = 5 either way: the sweep does nothing


def test_paper_init_warns_when_q_max_cannot_be_reached(caplog):
    with caplog.at_level(logging.WARNING, logger="robustseg.attacks.vafa"):
        ATTACKS.build({"name": "vafa", "q_max": 30, "steps": 20, "init": "paper"})
    assert "q_max=30 acts as q_max=21" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="robustseg.attacks.vafa"):
        ATTACKS.build({"name": "vafa", "q_max": 21, "steps": 20, "init": "paper"})
        ATTACKS.build({"name": "vafa", "q_max": 30, "steps": 20})  # published start: no warning
    assert caplog.text == ""


def test_defaults_are_the_published_variant():
    vafa = ATTACKS.build({"name": "vafa"})
    assert (vafa.init, vafa.q_min, vafa.start, vafa.use_ssim, vafa.hard_round, vafa.clip_steps) == (
        "published",
        5.0,
        20.0,
        True,
        False,
        False,
    )
    paper = ATTACKS.build({"name": "vafa", "init": "paper", "q_max": 10})
    assert (paper.q_min, paper.start) == (1.0, 1.0)
    two = ATTACKS.build({"name": "vafa2d"})
    assert (two.steps, two.use_ssim, two.rescale_slices, two.block_size, two.start) == (10, False, True, 8, 20.0)
    assert "init=published" in vafa.describe() and "output=soft" in vafa.describe()


def test_block_ssim_matches_plain_conv_reference():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8, 8, dtype=torch.float64)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    y[0, 0, :4, :4, :4] = 1 - x[0, 0, :4, :4, :4]  # an anti-correlated block: its SSIM is negative, clipped to 0
    from robustseg.attacks.frequency import to_blocks

    xb, yb = to_blocks(x, 4), to_blocks(y, 4)  # (2, 1, 2, 2, 2, 4, 4, 4)
    expected = gaussian_ssim_blocks(xb.reshape(-1, 1, 4, 4, 4), yb.reshape(-1, 1, 4, 4, 4))
    torch.testing.assert_close(block_ssim(xb, yb, 3), expected)
    yg = yb.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(block_ssim(xb, yg, 3), yg)
    yr = yb.reshape(-1, 1, 4, 4, 4).clone().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(gaussian_ssim_blocks(xb.reshape(-1, 1, 4, 4, 4), yr), yr)
    torch.testing.assert_close(grad.reshape(grad_ref.shape), grad_ref)
    assert grad[0, 0, 0, 0, 0].abs().max() == 0  # the clipped block gets no gradient


def test_block_ssim_2d_matches_plain_conv_reference():
    torch.manual_seed(1)
    x = torch.rand(6, 8, 8, dtype=torch.float64)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=x.dtype) / (2 * 1.5**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :])[None, None]  # (1, 1, 3, 3)
    xs, ys = x[:, None], y[:, None]
    mx, my = F.conv2d(xs, w), F.conv2d(ys, w)
    sxx, syy = F.conv2d(xs * xs, w) - mx**2, F.conv2d(ys * ys, w) - my**2
    sxy = F.conv2d(xs * ys, w) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    smap = (2 * mx * my + c1) / (mx**2 + my**2 + c1) * (2 * sxy + c2) / (sxx + syy + c2)
    torch.testing.assert_close(block_ssim(x, y, 2), torch.relu(smap.flatten(1).mean(1)).mean())


def test_vafa2d_is_safe_on_constant_slices_and_changes_the_volume():
    x = torch.rand(1, 1, 16, 16, 4)
    x[..., 2] = 0.4  # a constant axial slice: the published min-max divides by zero there
    y = torch.randint(0, 3, (1, 1, 16, 16, 4))
    net = conv_net3d(scale=8).float()
    out = ATTACKS.build({"name": "vafa2d", "steps": 3})(net, x, y)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().max() > 0


@pytest.mark.parametrize("dims", [2, 3])
def test_block_ssim_gradient_is_exact(dims):
    torch.manual_seed(2)
    x = torch.rand(3, *([5] * dims), dtype=torch.float64)
    y = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: block_ssim(x, t, dims), (y,))


def test_targeted_vafa_descends_towards_the_target(volume):
    """Targeted (published): minimise DiceCE to the target map (plus 1 - SSIM)."""
    x, y = volume
    net = conv_net3d(scale=8)
    target = torch.zeros_like(y)
    attack = ATTACKS.build({"name": "vafa", "q_max": 20, "steps": 3, "block_size": B, "targeted": True})
    expected = reference_vafa(net, x, target, 20.0, 3, targeted=True)
    torch.testing.assert_close(attack(net, x, y, target=target), expected, rtol=0, atol=1e-9)


def test_vafa_pads_by_replicating_the_edge(volume):
    """A 6 x 8 x 7 volume with 4^3 blocks: replicate-padded to 8^3 (the SSIM term sees the padded blocks, the model
    the crop), attacked, cropped back."""
    x, y = volume
    x, y = x[:, :, :6, :, :7], y[:, :, :6, :, :7]
    net = conv_net3d(scale=8)
    padded = F.pad(x, (0, 1, 0, 0, 0, 2), mode="replicate")
    expected = reference_vafa(net, padded, y, 20.0, 3, size=(6, 8, 7))
    attack = ATTACKS.build({"name": "vafa", "q_max": 20, "steps": 3, "block_size": B})
    torch.testing.assert_close(attack(net, x, y), expected, rtol=0, atol=1e-9)
