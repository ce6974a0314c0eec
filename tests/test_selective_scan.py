"""The chunked selective scan (custom autograd, chunk-bounded memory) against references (Gu & Dao, 2023)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from robustseg.models.selective_scan import selective_scan, selective_scan_sequential

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_inputs(b: int, d: int, n: int, length: int, seed: int = 0, dt_scale: float = 1.0, dtype=torch.float64):
    """Random selective-scan arguments in ``selective_scan_fn`` layout, all requiring grad."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()

    A = (-torch.rand(d, n, generator=g, dtype=torch.float64) * 16 - 0.01).to(dtype).requires_grad_()  # negative
    return {
        "u": rand(b, d, length),
        "delta": rand(b, d, length, scale=dt_scale),
        "A": A,
        "B": rand(b, n, length),
        "C": rand(b, n, length),
        "D": rand(d),
        "z": rand(b, d, length),
        "delta_bias": rand(d),
    }


def naive_scan(u, delta, A, B, C, D, z, delta_bias):
    """The recurrence written out with explicit indices, independent of the library: h_t = e^{dA} h + d B u."""
    delta = F.softplus(delta + delta_bias[None, :, None])
    b, d, length = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, dim=-1) * F.silu(z)


def values_and_grads(fn, args, weight, **kw):
    y = fn(**args, delta_softplus=True, **kw)
    return y, torch.autograd.grad((y * weight).sum(), list(args.values()))


@pytest.mark.parametrize(
    ("length", "chunk_size", "sub_chunk", "dt_scale"),
    [
        (1, 4, 2, 1.0),
        (37, 8, 4, 1.0),  # ragged: 37 is no multiple of anything here
        (64, 16, 4, 1.0),  # chunk boundaries fall exactly on the sequence
        (65, 16, 4, 1.0),  # one position past a boundary
        (300, 64, 8, 1.0),
        (1999, 128, 16, 1.0),  # long, odd, 16 chunks
        (100, 30, 7, 1.0),  # chunk no multiple of the sub-chunk
        (40, 4096, 32, 1.0),  # one chunk, shorter than the default
        (200, 16, 4, 30.0),  # large steps: decays underflow to 0
        (200, 16, 4, 1e-3),  # tiny steps: decays near 1 over many chunks
    ],
)
def test_chunked_matches_sequential_values_and_all_gradients(length, chunk_size, sub_chunk, dt_scale):
    args = scan_inputs(2, 5, 3, length, seed=length, dt_scale=dt_scale)
    weight = torch.randn(2, 5, length, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, grads = values_and_grads(selective_scan, args, weight, chunk_size=chunk_size, sub_chunk=sub_chunk)
    y_ref, grads_ref = values_and_grads(selective_scan_sequential, args, weight)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name, got, ref in zip(NAMES, grads, grads_ref):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize(
    "absent", [("D",), ("z",), ("delta_bias",), ("D", "z", "delta_bias")], ids=lambda a: "no-" + "-".join(a)
)
@pytest.mark.parametrize("softplus", [True, False])
def test_optional_skip_gate_bias_and_softplus(absent, softplus):
    """The skip D, the gate z, the bias and the softplus are optional, as in selective_scan_fn."""
    args = scan_inputs(2, 3, 2, 50, seed=9)
    if not softplus:  # step sizes must then be positive by themselves
        args["delta"] = args["delta"].detach().abs().requires_grad_()
        args["delta_bias"] = args["delta_bias"].detach().abs().requires_grad_()
    kept = {k: v for k, v in args.items() if k not in absent}
    weight = torch.randn(2, 3, 50, dtype=torch.float64)
    y = selective_scan(**kept, delta_softplus=softplus, chunk_size=16, sub_chunk=4)
    y_ref = selective_scan_sequential(**kept, delta_softplus=softplus)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((y * weight).sum(), list(kept.values()))
    grads_ref = torch.autograd.grad((y_ref * weight).sum(), list(kept.values()))
    for name, got, ref in zip(kept, grads, grads_ref):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"grad {name}: {m}")


def test_sequential_reference_matches_the_written_out_recurrence():
    args = scan_inputs(2, 4, 3, 25, seed=3)
    torch.testing.assert_close(selective_scan_sequential(**args, delta_softplus=True), naive_scan(**args))
    torch.testing.assert_close(
        selective_scan(**args, delta_softplus=True, chunk_size=8, sub_chunk=3), naive_scan(**args)
    )


def test_gradcheck_float64_against_finite_differences():
    """An independent reference for the custom backward: numerical derivatives of every input."""
    args = scan_inputs(1, 3, 2, 11, seed=4)
    inputs = tuple(args[k].detach().requires_grad_() for k in NAMES)

    def fn(*xs):
        return selective_scan(**dict(zip(NAMES, xs)), delta_softplus=True, chunk_size=4, sub_chunk=2)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_only_requested_gradients_are_computed_and_they_are_unchanged():
    """Frozen parameters (an attack's bare pass): A needs no gradient; the others must not change."""
    args = scan_inputs(1, 4, 3, 50, seed=6)
    weight = torch.randn(1, 4, 50, dtype=torch.float64)
    _, full = values_and_grads(selective_scan, args, weight, chunk_size=16, sub_chunk=4)
    args["A"] = args["A"].detach()
    y = selective_scan(**args, delta_softplus=True, chunk_size=16, sub_chunk=4)
    partial = torch.autograd.grad((y * weight).sum(), [args[k] for k in ("u", "delta", "B", "C")])
    for got, ref in zip(partial, (full[0], full[1], full[3], full[4])):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_float32_long_sequence_extreme_decay_is_finite_and_close():
    """No overflow: log decays near -500 per step over 4096 steps (8 chunks) in float32, forward and backward."""
    args = scan_inputs(1, 4, 4, 4096, seed=5, dt_scale=40.0, dtype=torch.float32)
    args64 = {k: v.detach().double().requires_grad_() for k, v in args.items()}
    weight = torch.randn(1, 4, 4096, dtype=torch.float64)
    y, grads = values_and_grads(selective_scan, args, weight.float(), chunk_size=512)
    y_ref, grads_ref = values_and_grads(selective_scan_sequential, args64, weight)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    for name, got, ref in zip(NAMES, grads, grads_ref):
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), name
        scale = ref.abs().max().item()
        torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-4 * scale, msg=lambda m, n=name: f"{n}: {m}")


def test_bfloat16_inputs_compute_in_float32_and_match_float64_loosely():
    """bfloat16 in and out (CPU supports it); the scan accumulates in float32 as the fused kernel does."""
    args = scan_inputs(2, 4, 3, 300, seed=7, dtype=torch.bfloat16)
    args64 = {k: v.detach().double().requires_grad_() for k, v in args.items()}
    weight = torch.randn(2, 4, 300, dtype=torch.float64)
    y, grads = values_and_grads(selective_scan, args, weight.bfloat16(), chunk_size=64, sub_chunk=8)
    y_ref, grads_ref = values_and_grads(selective_scan_sequential, args64, weight.bfloat16().double())
    assert y.dtype == torch.bfloat16
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y.double(), y_ref, rtol=0.05, atol=0.02 * scale)
    for name, got, ref in zip(NAMES, grads, grads_ref):
        assert got.dtype == torch.bfloat16, name
        rel = (got.double() - ref).norm() / ref.norm()
        assert rel < 0.03, f"grad {name}: relative error {rel:.3g}"


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("length", [2048, 8192])
def test_memory_is_bounded_by_the_chunk_not_the_sequence(length):
    """No tensor of size l x d x d_state is ever made: the largest is input-sized ((b, d, l) or (b, n, l)) or a
    (chunk, b, d, n) buffer."""
    b, d, n, chunk = 1, 8, 16, 256
    args = scan_inputs(b, d, n, length, seed=8, dtype=torch.float32)
    with _LargestTensor() as mode:
        y = selective_scan(**args, delta_softplus=True, chunk_size=chunk)
        torch.autograd.grad(y.sum(), list(args.values()))
    assert mode.largest <= max(b * max(d, n) * length, chunk * b * d * n), mode.largest
    assert mode.largest < b * d * n * length // 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"chunk_size": 0}, "chunk_size=0"), ({"sub_chunk": 0}, "sub_chunk=0")],
)
def test_bad_chunk_sizes_are_rejected(kwargs, match):
    args = scan_inputs(1, 2, 2, 5)
    with pytest.raises(ValueError, match=match):
        selective_scan(**args, **kwargs)


def test_wrong_shapes_are_rejected_with_the_expected_shape():
    args = scan_inputs(1, 2, 2, 5)
    args["B"] = args["B"][:, :, :4]
    with pytest.raises(ValueError, match=r"B has shape \(1, 2, 4\), expected \(1, 2, 5\)"):
        selective_scan(**args)
