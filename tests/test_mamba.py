"""The Mamba layer against an independent forward, and its scan choice (Gu & Dao, 2023); the scan itself is
tested in tests/test_selective_scan.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_selective_scan import naive_scan, scan_inputs

from robustseg.models import mamba as mamba_mod
from robustseg.models.mamba import Mamba, selective_scan


def reference_mamba_forward(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """Mamba forward written independently of the layer's code path (explicit conv padding, F.linear)."""
    length = x.shape[1]
    xz = F.linear(x, m.in_proj.weight, m.in_proj.bias)  # (b, l, 2 d_inner)
    xs, z = xz.chunk(2, dim=-1)
    xs = F.pad(xs.transpose(1, 2), (m.d_conv - 1, 0))  # causal: pad the past only
    xs = F.silu(F.conv1d(xs, m.conv1d.weight, m.conv1d.bias, groups=m.d_inner))  # (b, d_inner, l)
    dt, B, C = F.linear(xs.transpose(1, 2), m.x_proj.weight).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = F.linear(dt, m.dt_proj.weight, m.dt_proj.bias).transpose(1, 2)  # (b, d_inner, l)
    y = naive_scan(
        xs, delta, -torch.exp(m.A_log), B.transpose(1, 2), C.transpose(1, 2), m.D, z.transpose(1, 2),
        torch.zeros_like(m.D),
    )  # fmt: skip
    assert y.shape[-1] == length
    return F.linear(y.transpose(1, 2), m.out_proj.weight, m.out_proj.bias)


@pytest.mark.parametrize("scan", ["chunked", "sequential"])
def test_mamba_layer_matches_reference_forward_and_gradients(scan):
    torch.manual_seed(0)
    m = Mamba(d_model=12, d_state=4, d_conv=4, expand=2, scan=scan, chunk_size=8).double()
    x = torch.randn(2, 45, 12, dtype=torch.float64, requires_grad=True)
    y, y_ref = m(x), reference_mamba_forward(m, x)
    torch.testing.assert_close(y, y_ref)
    weight = torch.randn_like(y)
    params = [x, *m.parameters()]
    for got, ref in zip(
        torch.autograd.grad((y * weight).sum(), params), torch.autograd.grad((y_ref * weight).sum(), params)
    ):
        torch.testing.assert_close(got, ref)


def test_mamba_is_causal():
    torch.manual_seed(0)
    m = Mamba(d_model=8, d_state=4, chunk_size=4)
    x = torch.randn(1, 30, 8)
    x2 = x.clone()
    x2[:, 20:] += 1.0
    torch.testing.assert_close(m(x)[:, :20], m(x2)[:, :20])


def test_mamba_parameter_names_shapes_and_init_match_reference():
    torch.manual_seed(0)
    m = Mamba(d_model=40, d_state=16, d_conv=4, expand=2, dt_min=0.001, dt_max=0.1)
    d_inner, dt_rank = 80, math.ceil(40 / 16)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "A_log": (d_inner, 16),
        "D": (d_inner,),
        "in_proj.weight": (2 * d_inner, 40),
        "conv1d.weight": (d_inner, 1, 4),
        "conv1d.bias": (d_inner,),
        "x_proj.weight": (dt_rank + 32, d_inner),
        "dt_proj.weight": (d_inner, dt_rank),
        "dt_proj.bias": (d_inner,),
        "out_proj.weight": (40, d_inner),
    }
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1, 17.0)).expand(d_inner, 16))
    torch.testing.assert_close(m.D, torch.ones(d_inner))
    dt = F.softplus(m.dt_proj.bias)  # inverse-softplus init: dt in [dt_min, dt_max]
    assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert m.dt_proj.weight.abs().max() <= dt_rank**-0.5
    assert m.A_log._no_weight_decay and m.D._no_weight_decay


def test_state_dict_round_trip_between_scans():
    torch.manual_seed(0)
    a, b = Mamba(16, scan="chunked"), Mamba(16, scan="sequential")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 40, 16)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def test_fused_scan_refused_without_kernels_or_cuda():
    m = Mamba(8, scan="fused")
    if mamba_mod.fused_available() and torch.cuda.is_available():
        pytest.skip("kernels present: covered by test_fused_kernel_matches_pure_torch")
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        m(torch.randn(1, 5, 8))


def test_bad_scan_name_and_chunk_size_are_rejected():
    with pytest.raises(ValueError, match="scan"):
        Mamba(8, scan="magic")
    with pytest.raises(ValueError, match="chunk_size=0"):
        Mamba(8, chunk_size=0)


def test_auto_picks_the_pure_scan_without_kernels_or_cuda(monkeypatch):
    m = Mamba(8)
    assert m._scan_kind(torch.zeros(1)) == "chunked"  # CPU input: pure PyTorch even with kernels installed
    monkeypatch.setattr(mamba_mod, "selective_scan_fn", None)
    assert not mamba_mod.fused_available()
    assert m._scan_kind(torch.zeros(1)) == "chunked"


@pytest.mark.gpu
@pytest.mark.skipif(not (mamba_mod.fused_available() and torch.cuda.is_available()), reason="needs mamba_ssm and CUDA")
def test_fused_kernel_matches_pure_torch():  # pragma: no cover - needs CUDA kernels
    args = {k: v.detach().float().cuda().requires_grad_() for k, v in scan_inputs(2, 16, 8, 500, seed=9).items()}
    y_fused = mamba_mod.selective_scan_fn(*args.values(), True)
    y_ours = selective_scan(**args, delta_softplus=True)
    torch.testing.assert_close(y_fused, y_ours, rtol=1e-3, atol=1e-3)
    torch.manual_seed(0)
    fused, ours = Mamba(32, scan="fused").cuda(), Mamba(32, scan="chunked").cuda()
    ours.load_state_dict(fused.state_dict())
    x = torch.randn(2, 300, 32, device="cuda")
    torch.testing.assert_close(fused(x), ours(x), rtol=1e-3, atol=1e-3)
