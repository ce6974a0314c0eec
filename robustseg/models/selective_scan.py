"""Mamba's selective scan in pure PyTorch, with memory bounded by a chunk of the sequence (any device).

The selective scan (Gu & Dao, "Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752) is,
per batch ``b``, channel ``d`` and state ``n``::

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t          y_t = <C_t, h_t> + D u_t   (then * silu(z_t))

:func:`selective_scan` follows the fused CUDA kernel's strategy (``mamba_ssm``'s ``selective_scan_fwd_kernel`` /
``selective_scan_bwd_kernel``): the sequence is processed chunk after chunk (``chunk_size`` positions; 512 by
default, measured fastest on CPU, where the chunk's buffers stay in cache), carrying one (b, d, n) state from chunk to
chunk; inside a chunk the states come from a parallel scan; the forward keeps no state tensor, only the state
entering each sub-chunk (1/32 of the positions), and the backward recomputes each chunk's states from them, in
reverse chunk order, next to the adjoint recurrence ``g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}``. Memory is
therefore a few (chunk, b, d, n) tensors whatever the sequence length; work is O(L) as the loop's.

Inside a chunk (:func:`_chunk_states`): the chunk is cut into sub-chunks of ``sub_chunk`` positions laid out
position-major, (T, c, ...); a loop over the T positions, each step vectorised over all c sub-chunks, finds every
sub-chunk's end state from zero; a short loop over the sub-chunks (each decays by ``exp(A * sum delta)``) gives each
one's true initial state; a second loop writes every state in place. Every exponent is ``delta A <= 0``, so nothing
overflows at any length or step size (a cumulative-sum form ``exp(S_t - S_s)`` would, through ``exp(-S_s)``).
Tensors inside are (..., n, d): state before channel, so the sums over n are batched vector-matrix products.

:func:`selective_scan_sequential` is the plain loop over time with autograd: the reference of the tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SUB_CHUNK = 32


def _prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """From ``<C_t, h_t>`` (b, d, l): add ``D u``, gate by ``silu(z)``; returns (b, d, l)."""
    if D is not None:
        y = y + D[None, :, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


def _check(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    b, d, length = u.shape
    n = A.shape[-1]
    expected = {"delta": (b, d, length), "A": (d, n), "B": (b, n, length), "C": (b, n, length)}
    for name, tensor in (("delta", delta), ("A", A), ("B", B), ("C", C)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"selective_scan: {name} has shape {tuple(tensor.shape)}, expected {expected[name]} "
                f"(u is (b, d, l) = {tuple(u.shape)}; B and C input-dependent (b, n, l), as Mamba's)"
            )


def selective_scan_sequential(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Reference selective scan: a Python loop over time (same signature as ``mamba_ssm``'s ``selective_scan_fn``).

    Args:
        u: input (b, d, l).
        delta: step sizes before bias/softplus (b, d, l).
        A: state matrix diagonal (d, n), negative.
        B: input projection (b, n, l).
        C: output projection (b, n, l).
        D: skip weight (d,).
        z: gate (b, d, l); the output is multiplied by ``silu(z)``.
        delta_bias: added to ``delta`` (d,).
        delta_softplus: apply softplus to ``delta`` (after the bias).

    Returns:
        y (b, d, l).
    """
    _check(u, delta, A, B, C)
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, d, n)
    ys = []
    for delta_t, u_t, B_t, C_t in zip(delta.unbind(2), u.unbind(2), B.unbind(2), C.unbind(2)):  # unbind: O(l) backward
        h = torch.exp(delta_t[..., None] * A) * h + (delta_t * u_t)[..., None] * B_t[:, None, :]  # (b, d, n)
        ys.append((h * C_t[:, None, :]).sum(-1))  # (b, d)
    return _finish(torch.stack(ys, dim=-1), u, D, z)


def _layout(length: int, chunk_size: int, sub: int) -> tuple[int, int, int]:
    """Chunks J, sub-chunk length T and sub-chunks per chunk c, balanced so that J * c * T - length < J * T."""
    sub = min(sub, length)
    chunks = math.ceil(length / chunk_size)
    per_chunk = math.ceil(math.ceil(length / chunks) / sub)
    return math.ceil(length / (per_chunk * sub)), sub, per_chunk  # rounding up may leave fewer, all non-empty


def _chunk(x: Tensor, layout: tuple[int, int, int], j: int, dtype: torch.dtype, fn=None) -> Tensor:
    """Chunk j of x (b, k, l) as (T, c, b, k), position-major, zero-padded at the sequence end (after ``fn``)."""
    _, sub, per_chunk = layout
    size = per_chunk * sub
    piece = x[:, :, j * size : (j + 1) * size].to(dtype)  # (b, k, <= c * T)
    if fn is not None:
        piece = fn(piece)
    piece = F.pad(piece, (0, size - piece.shape[2]))  # (b, k, c * T)
    return piece.reshape(x.shape[0], x.shape[1], per_chunk, sub).permute(3, 2, 0, 1).contiguous()  # (T, c, b, k)


def _unchunk(piece: Tensor, out: Tensor, j: int) -> None:
    """Write chunk j, (T, c, b, k), into its positions of out (b, k, l)."""
    sub, per_chunk, b, k = piece.shape
    size = per_chunk * sub
    stop = min((j + 1) * size, out.shape[2])
    out[:, :, j * size : stop] = piece.permute(2, 3, 1, 0).reshape(b, k, size)[..., : stop - j * size]


def _chunk_states(
    delta: Tensor, du: Tensor, B: Tensor, A_t: Tensor, h0: Tensor, decay: Tensor, states: Tensor
) -> Tensor:
    """All states of one chunk, written into the buffers ``decay`` and ``states``.

    Args:
        delta: (T, c, b, d) step sizes, position-major (see :func:`_chunk`).
        du: (T, c, b, d) ``delta * u``.
        B: (T, c, b, n).
        A_t: (n, d), A transposed: the state index comes before the channel in every (..., n, d) tensor here.
        h0: (b, n, d) state entering the chunk, or (c, b, n, d) the state entering every sub-chunk (known from the
            forward: the first pass is skipped).
        decay: (T, c, b, n, d) buffer; receives ``exp(delta A)``, in (0, 1].
        states: (T, c, b, n, d) buffer; receives the states h.

    Returns:
        the state entering every sub-chunk (c, b, n, d).
    """
    torch.mul(delta[:, :, :, None, :], A_t, out=decay).exp_()  # (T, c, b, n, d)
    torch.mul(du[:, :, :, None, :], B[..., None], out=states)  # drive delta B u (T, c, b, n, d), becomes the states
    starts = h0 if h0.dim() == 4 else _sub_chunk_starts(delta, A_t, h0, decay, states)  # (c, b, n, d)
    prev = starts
    for s in range(delta.shape[0]):  # pass 2: every state, written over the drive
        prev = states[s].addcmul_(decay[s], prev)  # (c, b, n, d)
    return starts


def _sub_chunk_starts(delta: Tensor, A_t: Tensor, h0: Tensor, decay: Tensor, drive: Tensor) -> Tensor:
    """The state entering every sub-chunk (c, b, n, d), from the state h0 (b, n, d) entering the chunk."""
    sub, chunks = delta.shape[:2]
    starts = [h0]
    if chunks > 1:
        h = drive[0].clone()  # (c, b, n, d)
        for s in range(1, sub):  # pass 1: every sub-chunk's end state from a zero start, all sub-chunks at once
            torch.addcmul(drive[s], decay[s], h, out=h)
        sub_decay = torch.exp(delta.sum(0)[:, :, None, :] * A_t)  # a whole sub-chunk's decay (c, b, n, d)
        for k in range(chunks - 1):  # the short recurrence over sub-chunks: true initial states
            starts.append(torch.addcmul(h[k], sub_decay[k], starts[-1]))  # (b, n, d)
    return torch.stack(starts)  # (c, b, n, d)


def _gate(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Position-major ``(y + D u) * silu(z)`` (..., d); also returns ``y + D u`` when there is a gate."""
    pre = y if D is None else torch.addcmul(y, u, D)
    return (pre, None) if z is None else (pre * F.silu(z), pre)


class _SelectiveScan(torch.autograd.Function):
    """``(<C_t, h_t> + D u_t) * silu(z_t)`` (b, d, l) with chunk-bounded memory, as ``selective_scan_fn``.

    Saves only its inputs and every sub-chunk's initial state; the backward recomputes each chunk's states, the
    discretised step sizes and the pre-gate output. Chunk-sized buffers are allocated once per call and reused:
    fresh multi-megabyte allocations on CPU cost page faults that outweigh the arithmetic.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool, chunk_size: int, sub: int):  # noqa: D102
        dtype = torch.float64 if torch.float64 in (u.dtype, delta.dtype, A.dtype, B.dtype) else torch.float32
        b, d, length = u.shape
        n = A.shape[1]
        layout = _layout(length, chunk_size, sub)
        _, sub_len, per_chunk = layout
        rows = sub_len * per_chunk * b
        A_t = A.to(dtype).T.contiguous()  # (n, d)
        D_c = None if D is None else D.to(dtype)
        out = torch.empty_like(u)  # (b, d, l)
        decay, states = (u.new_empty(sub_len, per_chunk, b, n, d, dtype=dtype) for _ in range(2))
        h = u.new_zeros(b, n, d, dtype=dtype)
        entering = []
        for j in range(layout[0]):
            delta_j = _chunk(delta, layout, j, dtype, lambda x: _prepare_delta(x, delta_bias, softplus))  # (T, c, b, d)
            u_j = _chunk(u, layout, j, dtype)  # (T, c, b, d)
            B_j, C_j = _chunk(B, layout, j, dtype), _chunk(C, layout, j, dtype)  # (T, c, b, n)
            entering.append(_chunk_states(delta_j, delta_j * u_j, B_j, A_t, h, decay, states))  # (c, b, n, d)
            y = torch.bmm(C_j.view(rows, 1, n), states.view(rows, n, d)).view(sub_len, per_chunk, b, d)  # <C, h>
            z_j = None if z is None else _chunk(z, layout, j, dtype)
            _unchunk(_gate(y, u_j, D_c, z_j)[0], out, j)
            h = states[-1, -1].clone()  # padded steps keep the state: the last sub-chunk's last is the chunk's end
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, torch.stack(entering))
        ctx.layout, ctx.dtype, ctx.softplus = layout, dtype, softplus
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102 - see the class docstring
        u, delta, A, B, C, D, z, delta_bias, entering = ctx.saved_tensors  # entering: (J, c, b, n, d)
        layout, dtype, softplus = ctx.layout, ctx.dtype, ctx.softplus
        need = dict(zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), ctx.needs_input_grad[:8]))
        b, d, length = u.shape
        n = A.shape[1]
        n_chunks, sub_len, per_chunk = layout
        rows = sub_len * per_chunk * b
        A_t = A.to(dtype).T.contiguous()  # (n, d)
        D_c = None if D is None else D.to(dtype)
        grad_u, grad_delta = torch.empty_like(u), torch.empty_like(delta)  # (b, d, l)
        grad_z = None if z is None else torch.empty_like(z)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)  # (b, n, l)
        grad_A = torch.zeros_like(A_t)  # (n, d)
        grad_D = u.new_zeros(d, dtype=dtype)
        grad_bias = u.new_zeros(d, dtype=dtype)
        decay, states, g = (u.new_empty(sub_len, per_chunk, b, n, d, dtype=dtype) for _ in range(3))
        carry = torch.zeros_like(entering[0, 0])  # exp(delta A) g at the next chunk's first position (b, n, d)
        for j in range(n_chunks - 1, -1, -1):
            raw = _chunk(delta, layout, j, dtype, lambda x: _prepare_delta(x, delta_bias, False))  # (T, c, b, d)
            delta_j = F.softplus(raw) if softplus else raw  # padded positions: softplus(0) but u = 0 and grad = 0
            u_j = _chunk(u, layout, j, dtype)  # (T, c, b, d)
            B_j, C_j = _chunk(B, layout, j, dtype), _chunk(C, layout, j, dtype)  # (T, c, b, n)
            du_j = delta_j * u_j
            starts = _chunk_states(delta_j, du_j, B_j, A_t, entering[j], decay, states)

            # Through the gate and the skip: gy = dL/d<C_t, h_t>.
            gy = _chunk(grad_out, layout, j, dtype)  # (T, c, b, d)
            if z is not None:
                z_j = _chunk(z, layout, j, dtype)
                y = torch.bmm(C_j.view(rows, 1, n), states.view(rows, n, d)).view(sub_len, per_chunk, b, d)
                pre = _gate(y, u_j, D_c, None)[0]  # y + D u
                sig = torch.sigmoid(z_j)
                _unchunk(gy * pre * (sig * (1 + z_j * (1 - sig))), grad_z, j)  # silu'(z) = s (1 + z (1 - s))
                gy = gy * (z_j * sig)  # gout * silu(z)
            if D_c is not None:
                grad_D += (gy * u_j).sum((0, 1, 2))

            # Adjoint g_t = dL/dh_t: g_t = C_t gy_t + decay_{t+1} g_{t+1}, in reverse, written over its drive.
            torch.mul(gy[:, :, :, None, :], C_j[..., None], out=g)  # (T, c, b, n, d)
            ends = [carry]  # decay * g flowing into each sub-chunk's last position from the right, last first
            if per_chunk > 1:
                local = g[-1].clone()  # (c, b, n, d)
                for s in range(sub_len - 2, -1, -1):  # pass 1: each sub-chunk's g at its start from zero
                    torch.addcmul(g[s], decay[s + 1], local, out=local)
                local.mul_(decay[0])
                sub_decay = torch.exp(delta_j.sum(0)[:, :, None, :] * A_t)  # (c, b, n, d)
                for k in range(per_chunk - 1, 0, -1):
                    ends.append(torch.addcmul(local[k], sub_decay[k], ends[-1]))  # (b, n, d)
            incoming = torch.stack(ends[::-1])  # (c, b, n, d)
            for s in range(sub_len - 1, -1, -1):  # pass 2: every g
                g[s] += incoming
                torch.mul(decay[s], g[s], out=incoming)  # (c, b, n, d)
            carry = incoming[0].clone()  # sub-chunk 0 reaches back into the previous chunk

            decay[1:] *= states[:-1]  # decay_t h_{t-1}
            decay[0] *= starts
            if need["C"]:  # sum_d gy h, then the states buffer is scratch
                _unchunk(torch.mul(states, gy[:, :, :, None, :], out=states).sum(-1), grad_C, j)
            grad_dA = decay.mul_(g)  # dL/d(delta A)_t = g_t decay_t h_{t-1} (T, c, b, n, d)
            g_B = torch.bmm(B_j.view(rows, 1, n), g.view(rows, n, d)).view(sub_len, per_chunk, b, d)  # sum_n g B
            grad_u_j = g_B * delta_j
            if D_c is not None:
                grad_u_j.addcmul_(gy, D_c)
            _unchunk(grad_u_j, grad_u, j)
            if need["B"]:  # sum_d g delta u, then g is scratch
                _unchunk(torch.mul(g, du_j[:, :, :, None, :], out=g).sum(-1), grad_B, j)
            grad_delta_j = g_B.mul_(u_j).add_(torch.mul(grad_dA, A_t, out=states).sum(-2))  # dL/d(delta)
            if softplus:
                grad_delta_j.mul_(torch.sigmoid(raw))  # through the softplus
            grad_bias += grad_delta_j.sum((0, 1, 2))
            _unchunk(grad_delta_j, grad_delta, j)
            if need["A"]:
                grad_A += torch.mul(grad_dA, delta_j[:, :, :, None, :], out=states).view(rows, n, d).sum(0)
        return (
            grad_u,
            grad_delta,
            grad_A.T.to(A.dtype) if need["A"] else None,
            grad_B if need["B"] else None,
            grad_C if need["C"] else None,
            grad_D.to(D.dtype) if need["D"] else None,
            grad_z if need["z"] else None,
            grad_bias.to(delta_bias.dtype) if need["delta_bias"] else None,
            None,
            None,
            None,
        )


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int = 512,
    sub_chunk: int = SUB_CHUNK,
) -> Tensor:
    """Chunked selective scan in pure PyTorch; arguments and result as :func:`selective_scan_sequential`.

    Memory is bounded by the chunk: three (chunk, b, d, n) buffers in the backward (two in the forward) plus the
    position-major copies of the (b, d, l) inputs, and one (b, d, n) state per sub-chunk kept from the forward
    (l / sub_chunk of them); nothing of size (l, b, d, n) is ever made. Computes in float32 (float64 when an input
    is float64) whatever the input dtype, as the fused kernel does; returns u's dtype. Like the kernel, it applies
    ``delta_bias``, the softplus, ``D`` and the ``silu(z)`` gate inside and keeps none of their intermediates: the
    backward recomputes them with the states. Gradients flow to all eight inputs; double backward is not supported.

    Args:
        chunk_size: positions held in memory at once; the sequence is cut into ``ceil(l / chunk_size)`` chunks of
            equal length (rounded up to a multiple of ``sub_chunk``).
        sub_chunk: positions scanned one after another inside a chunk, each step vectorised over the chunk's
            sub-chunks.

    Raises:
        ValueError: a shape that is not ``selective_scan_fn``'s, or a chunk or sub-chunk size below 1.
    """
    _check(u, delta, A, B, C)
    if chunk_size < 1 or sub_chunk < 1:
        raise ValueError(f"selective_scan: chunk_size={chunk_size} and sub_chunk={sub_chunk} must be >= 1")
    sub = min(sub_chunk, chunk_size)
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size, sub)  # (b, d, l)
