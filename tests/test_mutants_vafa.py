"""Tests written from mutation-testing survivors of VAFA, its block DCT machinery and SSIM (issue 10).

Each test checks behaviour against an independent expectation written plainly here: the DCT from its cosine formula
or scipy, the soft-rounding formula, min-max rescaling by hand, MONAI's SSIM, MONAI's DiceCE, a Gaussian ``conv3d``.
"""

from __future__ import annotations

import math
import re

import pytest
import scipy.fft
import torch
import torch.nn.functional as F
from conftest import conv_net3d
from monai.losses import DiceCELoss
from monai.metrics.regression import compute_ssim_and_cs
from torch import Tensor, nn

from robustseg.attacks import ATTACKS, ssim3d
from robustseg.attacks.frequency import pad_to_multiple, soft_quantise
from robustseg.attacks.ssim import block_ssim
from robustseg.attacks.vafa import rescale_axial_slices
from robustseg.errors import ConfigError

B = 4  # block edge used throughout


def soft_round(u: Tensor, a: float) -> Tensor:
    """R_a(u) = floor(u) + 0.5 (1 + tanh(k (u - floor(u) - 0.5)) / (1 - a)), k = ln(2/a - 1)."""
    k = math.log(2 / a - 1)
    f = torch.floor(u).detach()
    return f + 0.5 * (1 + torch.tanh(k * (u - f - 0.5)) / (1 - a))


def x_prime_fixed(x: Tensor, q: float, a: float | None) -> Tensor:
    """x' of (D, H, W) with one constant table q, block by block with scipy's orthonormal DCT, unclipped."""
    out = torch.empty_like(x)
    for i in range(0, x.shape[0], B):
        for j in range(0, x.shape[1], B):
            for k in range(0, x.shape[2], B):
                block = (255 * x[i : i + B, j : j + B, k : k + B] - 128).numpy()
                c = torch.from_numpy(scipy.fft.dctn(block, norm="ortho")) / q
                c = (torch.round(c) if a is None else soft_round(c, a)) * q
                out[i : i + B, j : j + B, k : k + B] = (
                    torch.from_numpy(scipy.fft.idctn(c.numpy(), norm="ortho")) + 128
                ) / 255
    return out


def test_fixed_tables_output_and_clip_steps_are_the_clamped_reconstruction():
    """With q_min = q_max the tables cannot move. A random 0/1 volume with coarse tables overshoots [0, 1] on both
    sides: the result (soft and hard) is the reconstruction clamped to [0, 1], and clip_steps makes every step's
    model input that clamp too."""
    x = (torch.rand(8, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) > 0.5).double()
    raw_soft, raw_hard = x_prime_fixed(x, 100.0, 0.05), x_prime_fixed(x, 100.0, None)  # a at step 1 of 2: 0.05
    for raw in (raw_soft, raw_hard):
        assert raw.min() < -0.05 and raw.max() > 1.05  # the clamp has work to do on both sides
    images, labels = x[None, None], torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    cfg = {"name": "vafa", "q_max": 100, "q_min": 100, "steps": 2, "block_size": B}
    for extra, raw in (({}, raw_soft), ({"hard_round": True}, raw_hard)):
        out = ATTACKS.build({**cfg, **extra})(conv_net3d(scale=8), images, labels)[0, 0]
        torch.testing.assert_close(out, raw.clamp(0, 1), rtol=0, atol=1e-9)
    for clip in (False, True):
        net, seen = conv_net3d(scale=8), []
        net.register_forward_pre_hook(lambda _, args, seen=seen: seen.append(args[0].detach()))
        ATTACKS.build({**cfg, "clip_steps": clip})(net, images, labels)
        step0 = x_prime_fixed(x, 100.0, 0.1)  # a = 0.1 at step 0
        torch.testing.assert_close(seen[0][0, 0], step0.clamp(0, 1) if clip else step0, rtol=0, atol=1e-9)


def test_rescale_axial_slices_threshold_is_strictly_below_eps():
    """Docstring: a slice whose range is *below* eps is only clipped; a range of exactly eps is still rescaled."""
    x = torch.zeros(1, 1, 2, 2, 3, dtype=torch.float64)
    x[0, 0, 0, 0, 0] = 1e-6  # range exactly eps = 1e-6: rescaled to [0, 1]
    x[0, 0, 0, 0, 1] = 5e-7  # range below eps: left as it is (inside [0, 1])
    x[..., 2] = torch.tensor([[0.2, 0.4], [0.6, 0.3]], dtype=torch.float64)  # an ordinary slice
    out = rescale_axial_slices(x, eps=1e-6)
    assert torch.equal(out[0, 0, :, :, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(out[..., 1], x[..., 1])
    torch.testing.assert_close(out[..., 2], (x[..., 2] - 0.2) / 0.4)


def test_vafa2d_ssim_on_sizes_off_the_block_grid_rescales_every_slice():
    """VAFA-2D cuts only D and H into blocks: W of any size is kept, D and H are padded and cropped back, and the
    SSIM term (on when asked) compares blocks of the same slices. Each axial slice of the result is min-max rescaled
    (the published per-slice rescaling), so it spans exactly [0, 1]."""
    g = torch.Generator().manual_seed(3)
    x = 0.3 + 0.4 * torch.rand(1, 1, 6, 7, 3, generator=g, dtype=torch.float64)  # inside [0.3, 0.7]
    y = torch.randint(0, 3, (1, 1, 6, 7, 3), generator=g)
    attack = ATTACKS.build({"name": "vafa2d", "steps": 2, "block_size": B, "use_ssim": True, "q_max": 20})
    out = attack(conv_net3d(scale=8), x, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    lows, highs = out.amin(dim=(2, 3)), out.amax(dim=(2, 3))  # per axial slice
    torch.testing.assert_close(lows, torch.zeros_like(lows), rtol=0, atol=1e-12)
    torch.testing.assert_close(highs, torch.ones_like(highs), rtol=0, atol=1e-12)


def test_pad_to_multiple_pads_only_the_named_axes():
    x = torch.rand(1, 2, 5, 6, 3)
    padded, size = pad_to_multiple(x, 4, axes=(0, 1))  # D and H only: W = 3 stays
    assert padded.shape == (1, 2, 8, 8, 3) and size == (5, 6, 3)
    assert torch.equal(padded[:, :, 5:, :6], x[:, :, 4:5].expand(-1, -1, 3, -1, -1))  # replicated last D slice
    padded_w, _ = pad_to_multiple(x, 4, axes=(2,))
    assert padded_w.shape == (1, 2, 5, 6, 4) and torch.equal(padded_w[..., 3], x[..., 2])


def test_soft_quantise_gradient_to_the_coefficients_alone():
    """Only coeffs needs a gradient (q fixed): d/dc [R_a(c / q) q] = R_a'(c / q), from the formula by autograd."""
    torch.manual_seed(0)
    coeffs = (torch.randn(40, dtype=torch.float64) * 30).requires_grad_(True)
    q = torch.rand(40, dtype=torch.float64) * 9 + 1
    (grad,) = torch.autograd.grad(soft_quantise(coeffs, q, 0.08).sum(), coeffs)
    (expected,) = torch.autograd.grad((soft_round(coeffs / q, 0.08) * q).sum(), coeffs)
    torch.testing.assert_close(grad, expected)
    assert (grad > 0).all()


def monai_ssim(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    ssim_map = compute_ssim_and_cs(x, y, 3, [11] * 3, [1.5] * 3, data_range=data_range)[0]
    return ssim_map.flatten(1).mean(1).to(x.dtype)


def test_ssim3d_matches_monai_with_channels_data_range_and_dark_volumes():
    """Several channels, a data range other than 1 (c1 = (k1 L)^2, c2 = (k2 L)^2), and a dark volume whose local
    means are near 0, where the luminance constant c1 decides the value."""
    torch.manual_seed(0)
    tol = {"rtol": 1e-5, "atol": 1e-6}  # MONAI computes in float32
    x = torch.rand(2, 2, 12, 13, 14, dtype=torch.float64)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    torch.testing.assert_close(ssim3d(x, y), monai_ssim(x, y), **tol)
    torch.testing.assert_close(ssim3d(4 * x, 4 * y, data_range=4.0), monai_ssim(4 * x, 4 * y, 4.0), **tol)
    torch.testing.assert_close(ssim3d(x / 4, y / 4, data_range=0.25), monai_ssim(x / 4, y / 4, 0.25), **tol)
    dark_x, dark_y = 0.01 * x, 0.01 * y.flip(-1)
    torch.testing.assert_close(ssim3d(dark_x, dark_y), monai_ssim(dark_x, dark_y), **tol)
    for data_range in (4.0, 0.25):  # dark for its range: c1 = (k1 L)^2 shapes the luminance term
        dark_x, dark_y = 0.01 * data_range * x, 0.01 * data_range * y.flip(-1)
        torch.testing.assert_close(
            ssim3d(dark_x, dark_y, data_range=data_range), monai_ssim(dark_x, dark_y, data_range), **tol
        )


# VAFA with per-slice rescaling and the SSIM term: the SSIM compares x with the rescaled x' the model saw -------------


def dct_1d(n: int) -> Tensor:
    out = torch.empty(n, n, dtype=torch.float64)
    for k in range(n):
        for i in range(n):
            out[k, i] = math.sqrt((1 if k == 0 else 2) / n) * math.cos(math.pi * (2 * i + 1) * k / (2 * n))
    return out


CORNERS = [(i, j, k) for i in (0, B) for j in (0, B) for k in (0, B)]  # the 8 blocks of an 8^3 volume


def rescale_slices(v: Tensor) -> Tensor:
    """Min-max rescale each axial slice v[..., k] by hand (no constant slices here)."""
    slices = [(v[..., k] - v[..., k].min()) / (v[..., k].max() - v[..., k].min()) for k in range(v.shape[-1])]
    return torch.stack(slices, dim=-1)


def gaussian_block_ssim(x: Tensor, y: Tensor) -> Tensor:
    """Mean over (N, 1, b, b, b) blocks of each block's SSIM (3-tap Gaussian, sigma 1.5, valid), clipped at 0."""
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=x.dtype) / (2 * 1.5**2))
    g = g / g.sum()
    w = (g[:, None, None] * g[None, :, None] * g[None, None, :])[None, None]
    mx, my = F.conv3d(x, w), F.conv3d(y, w)
    sxx, syy, sxy = F.conv3d(x * x, w) - mx**2, F.conv3d(y * y, w) - my**2, F.conv3d(x * y, w) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    smap = (2 * mx * my + c1) / (mx**2 + my**2 + c1) * (2 * sxy + c2) / (sxx + syy + c2)
    return torch.relu(smap.flatten(1).mean(1)).mean()


def reference_rescaled_vafa(net: nn.Module, x: Tensor, y: Tensor, steps: int, ssim_on_seen: bool = True) -> Tensor:
    """The published loop on an (1, 1, 8, 8, 8) volume with per-slice rescaling: q from 20, q_min 5."""
    m = dct_1d(B)
    m3 = torch.kron(torch.kron(m, m), m)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    clean = torch.stack([x[0, 0, i : i + B, j : j + B, k : k + B] for i, j, k in CORNERS])[:, None]
    q = [torch.full((B**3,), 20.0, dtype=x.dtype) for _ in CORNERS]
    for t in range(steps):
        a = 0.1 * (1 - t / steps)
        for table in q:
            table.requires_grad_(True)
        adv = torch.zeros_like(x)
        for (i, j, k), table in zip(CORNERS, q):
            c = m3 @ (255 * x[0, 0, i : i + B, j : j + B, k : k + B] - 128).reshape(-1)
            adv[0, 0, i : i + B, j : j + B, k : k + B] = (
                (m3.T @ (soft_round(c / table, a) * table) + 128) / 255
            ).reshape(B, B, B)
        seen = rescale_slices(adv)
        if t == steps - 1:
            return seen.detach().clamp(0, 1)
        compared = seen if ssim_on_seen else adv
        blocks = torch.stack([compared[0, 0, i : i + B, j : j + B, k : k + B] for i, j, k in CORNERS])[:, None]
        objective = loss_fn(net(seen), y) - (1 - gaussian_block_ssim(clean, blocks))
        grads = torch.autograd.grad(objective, q)
        q = [(table.detach() + grad.sign()).clamp(5.0, 20.0) for table, grad in zip(q, grads)]
    raise AssertionError("unreachable")


def test_vafa_rescaled_slices_ssim_compares_what_the_model_saw():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 8, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (1, 1, 8, 8, 8), generator=g)
    net = conv_net3d(scale=8)
    attack = ATTACKS.build({"name": "vafa", "q_max": 20, "steps": 2, "block_size": B, "rescale_slices": True})
    expected = reference_rescaled_vafa(net, x, y, 2)
    torch.testing.assert_close(attack(net, x, y), expected, rtol=0, atol=1e-9)
    # the SSIM of x' before rescaling leads elsewhere: the check above can tell them apart
    assert (reference_rescaled_vafa(net, x, y, 2, ssim_on_seen=False) - expected).abs().max() > 1e-3


def test_vafa_settings_parse_fractions_and_errors_name_class_and_field():
    """q_min and q_max accept fraction strings like every budget; a bad value is reported as ``Class.field``, with
    the class that was built (VAFA2D, not VAFA)."""
    vafa = ATTACKS.build({"name": "vafa", "q_min": "9/2", "q_max": "21/2"})
    assert (vafa.q_min, vafa.q_max, vafa.start) == (4.5, 10.5, 10.5)
    for cfg, message in (
        ({"name": "vafa2d", "init": "jpeg"}, "VAFA2D.init: expected one of"),
        ({"name": "vafa", "q_min": "half"}, "VAFA.q_min: expected a number"),
        ({"name": "vafa2d", "q_max": "-1"}, "VAFA2D.q_max: must be a finite number"),
        ({"name": "vafa2d", "q_min": 9, "q_max": 8}, "VAFA2D.q_min/q_max"),
        ({"name": "vafa2d", "steps": 0}, "VAFA2D.steps: expected an integer"),
        ({"name": "vafa2d", "block_size": 0}, "VAFA2D.block_size: expected an integer"),
        ({"name": "vafa2d", "loss": "hinge"}, "VAFA2D.loss: unknown loss"),
        ({"name": "vafa", "loss": "masked_ce", "targeted": True}, "VAFA.loss: masked_ce is untargeted only"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            ATTACKS.build(cfg)


def plain_block_ssim(x: Tensor, y: Tensor, win: int, sigma: float, data_range: float) -> Tensor:
    """block_ssim written out for (N, b, b, b) blocks: a Gaussian conv3d window, each block's mean clipped at 0."""
    d = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(d**2) / (2 * sigma**2))
    g = g / g.sum()
    w = (g[:, None, None] * g[None, :, None] * g[None, None, :])[None, None]
    xs, ys = x[:, None], y[:, None]
    mx, my = F.conv3d(xs, w), F.conv3d(ys, w)
    sxx, syy, sxy = F.conv3d(xs * xs, w) - mx**2, F.conv3d(ys * ys, w) - my**2, F.conv3d(xs * ys, w) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    smap = (2 * mx * my + c1) / (mx**2 + my**2 + c1) * (2 * sxy + c2) / (sxx + syy + c2)
    return torch.relu(smap.flatten(1).mean(1)).mean()


def test_block_ssim_window_sigma_and_data_range_are_honoured():
    """A 5-voxel window with sigma 0.8 on 6^3 blocks, and a data range of 4 on dark blocks (c1 = (k1 L)^2 and
    c2 = (k2 L)^2 shape the value there), against the plain conv3d formula in float64."""
    torch.manual_seed(4)
    x = torch.rand(5, 6, 6, 6, dtype=torch.float64)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    value = block_ssim(x, y, 3, win_size=5, sigma=0.8)
    torch.testing.assert_close(value, plain_block_ssim(x, y, 5, 0.8, 1.0), rtol=0, atol=1e-13)
    dark_x, dark_y = 0.04 * x, 0.04 * y
    value = block_ssim(dark_x, dark_y, 3, data_range=4.0)
    torch.testing.assert_close(value, plain_block_ssim(dark_x, dark_y, 3, 1.5, 4.0), rtol=0, atol=1e-13)


@pytest.mark.parametrize("dims", [2, 3])
def test_separable_filter_backward_is_the_adjoint_for_any_weights(dims):
    """The fused backward (full correlation with the flipped kernel) is the exact gradient of the valid correlation,
    also for an asymmetric kernel, where flipping matters."""
    from robustseg.attacks.ssim import _SeparableFilter

    torch.manual_seed(5)
    maps = torch.rand(2, *([5] * dims), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _SeparableFilter.apply(t, (0.2, 0.5, 0.3), dims), (maps,))
