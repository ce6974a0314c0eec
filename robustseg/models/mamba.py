"""Mamba (selective state-space) layer with a pure-PyTorch parallel selective scan.

Mamba: Gu & Dao, "Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752. The layer keeps
the reference implementation's parameter names and initialisation (``in_proj``, ``conv1d``, ``x_proj``,
``dt_proj``, ``A_log``, ``D``, ``out_proj``), so a ``mamba_ssm.Mamba`` state dict loads here and back.

The selective scan is the recurrence, per batch ``b``, channel ``d`` and state ``n``::

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t          y_t = <C_t, h_t> + D u_t

It runs three ways, chosen per call by ``Mamba.scan``:

* ``"chunked"`` (default without CUDA kernels): :func:`selective_scan`, parallel over the sequence. The sequence
  is cut into chunks of ``chunk_size``; a first pass scans all chunks at once from a zero state (a loop over the
  ``chunk_size`` positions, each step vectorised over every chunk); the chunk-end states are combined by the
  chunk-level recurrence (a whole chunk decays by ``exp(A * sum(delta))``, a cumulative sum of log decay) through
  :func:`linear_scan`, recursively over the much shorter sequence of chunks; a second pass rescans every chunk
  from its true initial state and reads ``<C_t, h_t>`` out as it goes. Every decay is ``exp`` of a non-positive
  number, so nothing can overflow; the work is O(L) like the loop. A segment-sum (attention-like) form would cost
  ``chunk_size`` times more here, because Mamba-1's decay differs per channel and per state.
* ``"sequential"``: :func:`selective_scan_sequential`, a Python loop over time; the reference for tests.
* ``"fused"``: ``mamba_ssm``'s CUDA kernels (``mamba_inner_fn`` when ``causal_conv1d`` is also installed, else
  ``selective_scan_fn``), used by ``"auto"`` when the package imports and the input is on CUDA.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

try:  # optional fused CUDA kernels; never required
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
except ImportError:  # pragma: no cover - depends on the machine
    mamba_inner_fn = selective_scan_fn = None
try:
    from causal_conv1d import causal_conv1d_fn
except ImportError:  # pragma: no cover - depends on the machine
    causal_conv1d_fn = None

SCANS = ("auto", "chunked", "sequential", "fused")


def fused_available() -> bool:
    """True when ``mamba_ssm``'s selective-scan kernel imported (it still needs CUDA inputs)."""
    return selective_scan_fn is not None


def _prepare(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, delta_bias: Tensor | None, delta_softplus: bool
) -> tuple[Tensor, Tensor]:
    """Discretise, time first: log decay ``delta A`` and drive ``delta B u``, both (l, b, d, n)."""
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    delta_t = delta.permute(2, 0, 1)  # (l, b, d)
    log_decay = delta_t[..., None] * A  # (l, b, d, n), <= 0 for A < 0
    drive = (delta_t * u.permute(2, 0, 1))[..., None] * B.permute(2, 0, 1)[:, :, None, :]  # (l, b, d, n)
    return log_decay, drive


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """From ``<C_t, h_t>`` (b, d, l): add ``D u``, gate by ``silu(z)``; returns (b, d, l)."""
    if D is not None:
        y = y + D[None, :, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


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
    log_decay, drive = _prepare(u, delta, A, B, delta_bias, delta_softplus)
    h = torch.zeros_like(drive[0])  # (b, d, n)
    ys = []
    for log_decay_t, drive_t, c_t in zip(log_decay.unbind(0), drive.unbind(0), C.unbind(2)):  # unbind: O(l) backward
        h = torch.exp(log_decay_t) * h + drive_t  # (b, d, n)
        ys.append((h * c_t[:, None, :]).sum(-1))  # (b, d)
    return _finish(torch.stack(ys, dim=-1), u, D, z)


def linear_scan(decay: Tensor, drive: Tensor, chunk_size: int = 32) -> Tensor:
    """All states of ``h_t = decay_t h_{t-1} + drive_t`` (``h_0 = 0``) along dim 0, chunked and recursive.

    Args:
        decay: (l, ...) in [0, 1] (``exp`` of a non-positive log decay): every product of them stays in [0, 1].
        drive: (l, ...), same shape.
        chunk_size: positions scanned one after another inside a chunk; all chunks run at once.

    Returns:
        states h (l, ...).
    """
    length, *rest = drive.shape
    if length <= chunk_size:
        return _loop_scan(decay, drive)[0]
    chunks = math.ceil(length / chunk_size)
    pad = chunks * chunk_size - length
    if pad:  # padded steps come after the data: they cannot change any real state
        decay = torch.cat([decay, decay.new_ones(pad, *rest)])
        drive = torch.cat([drive, drive.new_zeros(pad, *rest)])
    decay = decay.reshape(chunks, chunk_size, *rest)  # (c, T, ...)
    drive = drive.reshape(chunks, chunk_size, *rest)  # (c, T, ...)

    # All chunks at once: states from a zero start, and each position's decay since its chunk start.
    local, decay_since_start = _loop_scan(decay, drive, dim=1)  # (c, T, ...) each
    # The true state at each chunk's end obeys the same recurrence, one step per chunk: recurse over chunks.
    ends = linear_scan(decay_since_start[:, -1], local[:, -1], chunk_size)  # (c, ...)
    carry_in = torch.cat([torch.zeros_like(ends[:1]), ends[:-1]])  # state entering each chunk (c, ...)
    states = torch.addcmul(local, decay_since_start, carry_in[:, None])  # (c, T, ...)
    return states.reshape(chunks * chunk_size, *rest)[:length]  # (l, ...)


def _loop_scan(decay: Tensor, drive: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    """Loop along the (short) ``dim``, all else vectorised: states ``h_t = decay_t h_{t-1} + drive_t`` from
    ``h_0 = 0`` and the running products ``decay_1 ... decay_t``; both shaped like ``drive``."""
    h = torch.zeros_like(drive.select(dim, 0))
    product = torch.ones_like(h)
    states, products = [], []
    for decay_t, drive_t in zip(decay.unbind(dim), drive.unbind(dim)):
        h = torch.addcmul(drive_t, decay_t, h)
        product = product * decay_t
        states.append(h)
        products.append(product)
    return torch.stack(states, dim=dim), torch.stack(products, dim=dim)


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
    chunk_size: int = 32,
) -> Tensor:
    """Parallel selective scan in pure PyTorch; arguments and result as :func:`selective_scan_sequential`.

    Two passes over chunks of ``chunk_size`` positions, each a loop over the positions of a chunk vectorised over
    all chunks: the first finds every chunk's end state from a zero start; the chunk-level recurrence (decay of a
    whole chunk ``exp(A sum(delta))``, from the small (c, b, d) sums of ``delta``) gives each chunk's true initial
    state through :func:`linear_scan`; the second pass rescans from those states and reads ``<C_t, h_t>`` out as
    it goes, so no (l, b, d, n) state tensor is stacked.
    """
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    bs, d, length = u.shape
    chunks = math.ceil(length / chunk_size)
    pad = chunks * chunk_size - length  # padded steps come last, with delta = 0 and u = 0: no real state changes

    def by_position(x: Tensor) -> Tensor:
        """(b, k, l) -> (T, c, b, k): position in the chunk first, so every loop step reads contiguous memory."""
        x = F.pad(x, (0, pad)).reshape(bs, x.shape[1], chunks, chunk_size)  # (b, k, c, T)
        return x.permute(3, 2, 0, 1).contiguous()  # (T, c, b, k); small (no state dim) so the copy is cheap

    delta_p = by_position(delta)  # (T, c, b, d)
    decay = torch.exp(delta_p[..., None] * A)  # (T, c, b, d, n), in [0, 1]
    drive = (delta_p * by_position(u))[..., None] * by_position(B)[:, :, :, None, :]  # delta B u (T, c, b, d, n)
    steps = list(zip(decay.unbind(0), drive.unbind(0)))  # per position in the chunk: (c, b, d, n) each

    h = torch.zeros_like(drive[0])  # (c, b, d, n)
    if chunks > 1:
        for decay_s, drive_s in steps:  # pass 1: chunk-end states from a zero start
            h = torch.addcmul(drive_s, decay_s, h)
        chunk_decay = torch.exp(delta_p.sum(0)[..., None] * A)  # a whole chunk's decay (c, b, d, n)
        ends = linear_scan(chunk_decay, h, chunk_size)  # true state at each chunk's end (c, b, d, n)
        h = torch.cat([torch.zeros_like(ends[:1]), ends[:-1]])  # state entering each chunk (c, b, d, n)
    ys = []
    for (decay_s, drive_s), c_s in zip(steps, by_position(C)[:, :, :, None, :].unbind(0)):  # pass 2: read out
        h = torch.addcmul(drive_s, decay_s, h)
        ys.append((h * c_s).sum(-1))  # (c, b, d)
    y = torch.stack(ys).permute(2, 3, 1, 0).reshape(bs, d, chunks * chunk_size)[..., :length]  # (b, d, l)
    return _finish(y, u, D, z)


class Mamba(nn.Module):
    """Mamba block (Gu & Dao, 2023) mapping (b, l, d_model) to (b, l, d_model).

    Parameter names, shapes and initialisation follow ``mamba_ssm.modules.mamba_simple.Mamba``.

    Args:
        d_model: token width.
        d_state: SSM state size ``n``.
        d_conv: causal depthwise convolution width.
        expand: inner width ``d_inner = expand * d_model``.
        dt_rank: rank of the ``delta`` projection; ``"auto"`` is ``ceil(d_model / 16)``.
        dt_min, dt_max: range of the initial ``softplus(dt_proj.bias)`` (log-uniform).
        dt_init: ``"random"`` (uniform) or ``"constant"`` ``dt_proj.weight`` init at scale ``dt_rank**-0.5``.
        dt_scale: multiplies that scale.
        dt_init_floor: lower clamp of the initial ``delta``.
        conv_bias: bias of ``conv1d``.
        bias: bias of ``in_proj`` and ``out_proj``.
        scan: ``"auto"`` (fused kernels on CUDA when ``mamba_ssm`` imports, else chunked), ``"chunked"``,
            ``"sequential"`` or ``"fused"``.
        chunk_size: chunk length of the parallel scan.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        scan: str = "auto",
        chunk_size: int = 32,
    ) -> None:
        super().__init__()
        if scan not in SCANS:
            raise ValueError(f"Mamba: scan={scan!r}; expected one of {SCANS}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"Mamba: dt_init={dt_init!r}; expected 'random' or 'constant'")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan, self.chunk_size = scan, chunk_size

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

        dt_init_std = self.dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, dt_init_std)
            else:
                nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
            # softplus(bias) log-uniform in [dt_min, dt_max]: bias = dt + log(1 - exp(-dt)), the inverse softplus
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True

        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)  # (d_inner, n): 1..n per row
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D._no_weight_decay = True

    def _scan_kind(self, x: Tensor) -> str:
        if self.scan == "auto":
            return "fused" if fused_available() and x.is_cuda else "chunked"
        if self.scan == "fused" and not (fused_available() and x.is_cuda):
            raise RuntimeError("Mamba: scan='fused' needs mamba_ssm installed and CUDA inputs")
        return self.scan

    def forward(self, hidden_states: Tensor) -> Tensor:
        """(b, l, d_model) -> (b, l, d_model)."""
        _, length, _ = hidden_states.shape
        kind = self._scan_kind(hidden_states)
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (b, 2 d_inner, l)
        A = -torch.exp(self.A_log.float())  # (d_inner, n)
        if kind == "fused" and causal_conv1d_fn is not None:  # pragma: no cover - needs CUDA kernels
            return mamba_inner_fn(
                xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.out_proj.weight, self.out_proj.bias, A, None, None, self.D.float(),
                delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            )  # fmt: skip
        x, z = xz.chunk(2, dim=1)  # (b, d_inner, l) each
        x = F.silu(self.conv1d(x)[..., :length])  # causal: drop the right padding (b, d_inner, l)
        x_dbl = self.x_proj(x.transpose(1, 2))  # (b, l, dt_rank + 2 n)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.T).transpose(1, 2)  # (b, d_inner, l); the bias goes in as delta_bias
        B, C = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (b, n, l) each
        args = (x, dt, A, B, C, self.D.float(), z, self.dt_proj.bias.float(), True)
        if kind == "fused":  # pragma: no cover - needs CUDA kernels
            y = selective_scan_fn(*args)
        elif kind == "sequential":
            y = selective_scan_sequential(*args)
        else:
            y = selective_scan(*args, chunk_size=self.chunk_size)
        return self.out_proj(y.transpose(1, 2))  # (b, l, d_model)
