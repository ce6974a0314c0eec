"""Mamba (selective state-space) layer that runs on any device, with the fused CUDA kernels when present.

Mamba: Gu & Dao, "Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752. The layer keeps
the reference implementation's parameter names and initialisation (``in_proj``, ``conv1d``, ``x_proj``,
``dt_proj``, ``A_log``, ``D``, ``out_proj``), so a ``mamba_ssm.Mamba`` state dict loads here and back.

The selective scan runs one of these ways, chosen per call by ``Mamba.scan``:

* ``"chunked"`` (``"auto"`` without CUDA kernels): :func:`~robustseg.models.selective_scan.selective_scan`, pure
  PyTorch on any device, memory bounded by ``chunk_size`` positions whatever the sequence length (chunk after
  chunk, a parallel scan inside each, a backward that recomputes each chunk's states: the fused kernel's strategy).
* ``"sequential"``: :func:`~robustseg.models.selective_scan.selective_scan_sequential`, a Python loop over time;
  the reference for tests.
* ``"fused"``: ``mamba_ssm``'s CUDA kernels (``mamba_inner_fn`` when ``causal_conv1d`` is also installed, else
  ``selective_scan_fn``); ``"auto"`` picks it when the package imports and the input is on CUDA.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustseg.models.selective_scan import selective_scan, selective_scan_sequential

__all__ = ["SCANS", "Mamba", "fused_available", "selective_scan", "selective_scan_sequential"]

logger = logging.getLogger(__name__)

try:  # optional fused CUDA kernels; never required
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
except ImportError:  # pragma: no cover - depends on the machine
    mamba_inner_fn = selective_scan_fn = None
try:
    from causal_conv1d import causal_conv1d_fn
except ImportError:  # pragma: no cover - depends on the machine
    causal_conv1d_fn = None

PURE_SCANS = {"chunked": selective_scan, "sequential": selective_scan_sequential}  # name -> scan, any device
SCANS = ("auto", "fused", *PURE_SCANS)


def fused_available() -> bool:
    """True when ``mamba_ssm``'s selective-scan kernel imported (it still needs CUDA inputs)."""
    return selective_scan_fn is not None


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
        chunk_size: positions the chunked scan holds in memory at once; its memory is a few
            (chunk_size, batch, d_inner, d_state) tensors whatever the sequence length.
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
        chunk_size: int = 512,
    ) -> None:
        super().__init__()
        if scan not in SCANS:
            raise ValueError(f"Mamba: scan={scan!r}; expected one of {SCANS}")
        if chunk_size < 1:
            raise ValueError(f"Mamba: chunk_size={chunk_size}; expected a positive number of positions")
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
        elif kind == "chunked":
            y = selective_scan(*args, chunk_size=self.chunk_size)
        else:
            y = PURE_SCANS[kind](*args)
        return self.out_proj(y.transpose(1, 2))  # (b, l, d_model)
