"""Differentiable adapters between robustseg's [0, 1] volumes and a model trained elsewhere.

The threat model stays robustseg's: attacks, budgets and metrics live on the ``[0, 1]`` volume that robustseg's
data pipeline produces. A model trained elsewhere expects its own input (z-scores, another window, a fixed grid,
another axis order) and returns its own output (logits, probabilities, per-region sigmoids). :class:`AdaptedModel`
wraps it so that, seen from robustseg, it maps ``(B, C, D, H, W)`` in ``[0, 1]`` to per-label scores
``(B, K, D, H, W)`` whose softmax is the model's class probabilities and whose argmax is the model's label map:

    x01 --intensity--> model units --axes, grid--> net (mirror TTA: mean over flips) --grid, axes back--> output map

Everything is differentiable, so a white-box attack differentiates through the whole chain, including the average
over mirrored passes (expectation over transformations, Athalye et al., ICML 2018): what is attacked is exactly
what is scored.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

ZSCORE_MODES = ("frozen", "adaptive")
OUTPUT_KINDS = ("logits", "probabilities", "regions")
# Probabilities are floored at the smallest normal float before the log: log(0) would give -inf scores and NaN
# gradients; a larger floor would zero the gradient of every voxel whose probabilities are merely small.
_ABSENT = -1e4  # score of a label no region maps to: never the argmax, exp() underflows to 0 in a softmax


class IntensityMap(nn.Module):
    """``x01 -> x01 * scale + shift``, optionally followed by a z-score; per channel.

    Args:
        scale, shift: one value, or one per channel: the affine map from robustseg's [0, 1] to the model's units
            (a CT window [a, b] back to HU is ``scale = b - a, shift = a``).
        zscore: ``None``; ``"frozen"``: subtract the mean and divide by the std of the *clean* volume, observed with
            :meth:`observe` before the case is attacked (an affine map, so the threat model is fixed);
            ``"adaptive"``: recompute the statistics from the input the model receives (attacked included).
        mask_nonzero: statistics over voxels whose model-unit value is nonzero (nnU-Net's ``use_mask_for_norm``).
    """

    def __init__(
        self,
        scale: float | Sequence[float] = 1.0,
        shift: float | Sequence[float] = 0.0,
        zscore: str | None = None,
        mask_nonzero: bool = False,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if zscore is not None and zscore not in ZSCORE_MODES:
            raise ValueError(f"zscore={zscore!r}: expected one of {ZSCORE_MODES} or null")
        self.register_buffer("scale", _per_channel(scale))
        self.register_buffer("shift", _per_channel(shift))
        self.zscore = zscore
        self.mask_nonzero = mask_nonzero
        self.eps = eps
        self.frozen: tuple[Tensor, Tensor] | None = None  # (mean, std) of the observed clean volume, (1, C, 1, 1, 1)
        self._warned = False

    def affine(self, x: Tensor) -> Tensor:
        return x * self.scale.to(x) + self.shift.to(x)  # (B, C, D, H, W)

    def statistics(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample, per-channel mean and (biased, as numpy) std of ``y`` (B, C, ...), each (B, C, 1, 1, 1)."""
        flat = y.flatten(2)  # (B, C, N)
        if self.mask_nonzero:
            weight = (flat != 0).to(flat)  # (B, C, N)
            count = weight.sum(-1, keepdim=True).clamp_min(1.0)
            mean = (flat * weight).sum(-1, keepdim=True) / count
            var = (((flat - mean) ** 2) * weight).sum(-1, keepdim=True) / count
        else:
            mean = flat.mean(-1, keepdim=True)
            var = flat.var(-1, unbiased=False, keepdim=True)
        shape = (*y.shape[:2], 1, 1, 1)
        return mean.reshape(shape), var.sqrt().clamp_min(self.eps).reshape(shape)  # (B, C, 1, 1, 1)

    def observe(self, volume: Tensor) -> None:
        """Freeze the z-score statistics at those of a clean ``(1, C, D, H, W)`` volume (no-op unless frozen)."""
        if self.zscore == "frozen":
            with torch.no_grad():
                self.frozen = tuple(s.detach() for s in self.statistics(self.affine(volume)))

    def forward(self, x: Tensor) -> Tensor:
        y = self.affine(x)  # (B, C, D, H, W) in model units
        if self.zscore is None:
            return y
        if self.zscore == "frozen" and self.frozen is not None:
            mean, std = (s.to(y) for s in self.frozen)
        else:
            if self.zscore == "frozen" and not self._warned:
                log.warning("z-score 'frozen' without an observed clean volume: using the input's own statistics")
                self._warned = True
            mean, std = self.statistics(y)
        z = (y - mean) / std
        if self.mask_nonzero:  # nnU-Net leaves voxels outside the nonzero mask at zero
            z = torch.where(y != 0, z, torch.zeros_like(z))
        return z

    def units(self) -> dict[str, Any]:
        """How one unit of robustseg's [0, 1] scale reads in the model's input units (per channel)."""
        scale = [float(s) for s in self.scale.flatten()]
        if self.zscore == "frozen" and self.frozen is not None:
            return {"scale": [s / float(d) for s, d in zip(scale, self.frozen[1].flatten())], "per_volume": True}
        if self.zscore is not None:
            return {"scale": scale, "note": "before the per-volume z-score (divide by each volume's std)"}
        return {"scale": scale}


class SpatialMap(nn.Module):
    """Permute the spatial axes into the model's order and resize to its fixed grid; and back for outputs.

    Args:
        axes: the model's spatial axis ``i`` is robustseg's axis ``axes[i]`` (e.g. ``(2, 1, 0)`` reverses them).
        size: the fixed grid the model needs (trilinear resize of the window there and of its outputs back).
    """

    def __init__(self, axes: Sequence[int] | None = None, size: Sequence[int] | None = None) -> None:
        super().__init__()
        axes = tuple(int(a) for a in axes) if axes is not None else (0, 1, 2)
        if sorted(axes) != [0, 1, 2]:
            raise ValueError(f"axes={list(axes)}: expected a permutation of [0, 1, 2]")
        self.axes = axes
        self.inverse = tuple(axes.index(i) for i in range(3))
        self.size = tuple(int(s) for s in size) if size is not None else None

    def to_model(self, x: Tensor) -> Tensor:
        x = x.permute(0, 1, *(a + 2 for a in self.axes))  # (B, C, *model axes)
        if self.size is not None and tuple(x.shape[2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="trilinear", align_corners=False)  # (B, C, *size)
        return x

    def from_model(self, y: Tensor, window: Sequence[int]) -> Tensor:
        """``y`` (B, K, *model grid) back to robustseg's axes and the window's spatial size ``window``."""
        permuted = tuple(window[a] for a in self.axes)
        if tuple(y.shape[2:]) != permuted:
            y = F.interpolate(y, size=permuted, mode="trilinear", align_corners=False)  # (B, K, *permuted)
        return y.permute(0, 1, *(a + 2 for a in self.inverse))  # (B, K, D, H, W)


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty subset of the spatial ``axes`` (0-based), as tensor dims: nnU-Net's mirroring set."""
    dims = [int(a) + 2 for a in axes]
    return [c for r in range(1, len(dims) + 1) for c in itertools.combinations(dims, r)]


def region_scores(region_logits: Tensor, order: Sequence[int], num_labels: int) -> Tensor:
    """Per-label scores ``(B, K, ...)`` from per-region logits ``(B, R, ...)`` under nnU-Net's region rule.

    The rule (nnU-Net ``convert_probabilities_to_segmentation`` with ``regions_class_order``): start from
    background; for each region ``r`` in order, voxels with ``sigmoid(z_r) > 0.5`` (``z_r > 0``) take label
    ``order[r]``; later regions overwrite earlier ones. The label chosen is thus the last region with ``z > 0``.
    Scores: ``S[order[r]] = min(z_r, -z_{r+1}, ..., -z_{R-1})`` and ``S[0] = min(-z_0, ..., -z_{R-1})``. The
    chosen label has ``S >= 0`` and every other ``S <= 0`` (strictly at non-zero logits), so ``argmax S`` is exactly
    the rule, and ``S`` is a piecewise-linear, differentiable function of the logits for the attack.
    """
    shape = region_logits.shape
    neg = -region_logits  # (B, R, ...)
    # suffix minimum of -z over regions r+1..R-1: S[order[r]] = min(z_r, suffix[r+1])
    suffix = [None] * (len(order) + 1)
    for r in range(len(order) - 1, -1, -1):
        nxt = suffix[r + 1]
        suffix[r] = neg[:, r] if nxt is None else torch.minimum(neg[:, r], nxt)  # (B, ...)
    scores = region_logits.new_full((shape[0], num_labels, *shape[2:]), _ABSENT)  # (B, K, ...)
    scores[:, 0] = suffix[0]
    for r, label in enumerate(order):
        own = region_logits[:, r]  # (B, ...)
        scores[:, int(label)] = own if suffix[r + 1] is None else torch.minimum(own, suffix[r + 1])
    return scores


class AdaptedModel(nn.Module):
    """A model trained elsewhere, seen from robustseg: ``(B, C, D, H, W)`` in [0, 1] -> label scores (B, K, ...).

    Args:
        net: the model as it was trained (any callable module: eager, TorchScript, ``torch.export``).
        num_classes: ``K``, the labels scored (background included).
        in_channels: the channels the model reads; another count fails with a clear message.
        intensity: map from [0, 1] to the model's input units (identity when None).
        spatial: axis order and fixed grid of the model (identity when None).
        mirror_axes: test-time mirroring over these model axes: the output is the mean over all flips.
        output: ``logits``; ``probabilities`` (softmax already applied: returned as log-probabilities, so the
            attack's softmax does not apply a second softmax); ``regions`` (per-region sigmoid logits, turned into
            label scores by :func:`region_scores`; ``region_outputs: probabilities`` if the model applies the sigmoid).
        regions_class_order: the label each region output stands for (``output: regions``).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        in_channels: int = 1,
        intensity: IntensityMap | None = None,
        spatial: SpatialMap | None = None,
        mirror_axes: Sequence[int] = (),
        output: str = "logits",
        regions_class_order: Sequence[int] | None = None,
        region_outputs: str = "logits",
    ) -> None:
        super().__init__()
        if output not in OUTPUT_KINDS:
            raise ValueError(f"output={output!r}: expected one of {OUTPUT_KINDS}")
        if output == "regions" and not regions_class_order:
            raise ValueError("output 'regions' needs regions_class_order (the label of each region output)")
        self.net = net
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.intensity = intensity if intensity is not None else IntensityMap()
        self.spatial = spatial if spatial is not None else SpatialMap()
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        self.output = output
        self.regions_class_order = [int(c) for c in regions_class_order or []]
        self.region_outputs = region_outputs
        self.blocks_gradients = False  # set when the model's output was found cut off from its input

    def train(self, mode: bool = True) -> AdaptedModel:
        """Follow the wrapped network's mode; ``torch.export`` programs refuse a mode switch and keep theirs."""
        self.training = mode
        for module in (self.intensity, self.spatial):
            module.train(mode)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            self.net.train(mode)
        return self

    def observe(self, volume: Tensor) -> None:
        """Called with each clean volume before it is scored or attacked (frozen per-volume statistics)."""
        self.intensity.observe(volume)

    def _run(self, x: Tensor) -> Tensor:
        out = self.net(x)
        if isinstance(out, (list, tuple)):  # deep supervision: the full-resolution head comes first
            out = out[0]
        if isinstance(out, dict):
            raise TypeError(f"the model returned a dict with keys {sorted(out)}; return a tensor of scores")
        return out

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"the model reads {self.in_channels} input channel(s), the data has {x.shape[1]}: "
                "set in_channels in the model spec or evaluate it on data with that many channels"
            )
        window = tuple(x.shape[2:])
        y = self.spatial.to_model(self.intensity(x))  # (B, C, *model grid) in model units
        out = self._run(y)
        combos = mirror_combinations(self.mirror_axes)
        for dims in combos:  # expectation over the flips, as nnU-Net's mirroring: mean of the raw outputs
            out = out + torch.flip(self._run(torch.flip(y, dims)), dims)
        out = out / (len(combos) + 1)
        out = self.spatial.from_model(out, window)  # (B, K or R, D, H, W)
        if self.output == "probabilities":
            out = out.clamp_min(torch.finfo(out.dtype).tiny).log()
        elif self.output == "regions":
            if self.region_outputs == "probabilities":
                out = torch.logit(out, eps=torch.finfo(out.dtype).eps)
            out = region_scores(out, self.regions_class_order, self.num_classes)
        if x.requires_grad and torch.is_grad_enabled() and not out.requires_grad:
            # The model cuts the graph (a detach, no_grad inside, a non-differentiable export). A zero path keeps
            # the evaluation running: attacks get zero gradients and the 'gradients' flag reports the masking.
            if not self.blocks_gradients:
                log.warning("the model's output does not depend differentiably on its input: gradients are zero")
            self.blocks_gradients = True
            out = out + 0.0 * x.sum()
        return out

    def describe(self) -> dict[str, Any]:
        """What the adapter does, for the report."""
        return {
            "output": self.output,
            "mirror_axes": list(self.mirror_axes),
            "zscore": self.intensity.zscore,
            "axes": list(self.spatial.axes),
            "grid": list(self.spatial.size) if self.spatial.size else None,
        }


def budget_in_units(input_units: dict[str, Any] | None, eps: float) -> str | None:
    """A budget ``eps`` in [0, 1] units stated in the model's input units (``LoadedModel.extra["input_units"]``).

    ``"0.1660 nnU-Net CTNormalization z-units (6.0 HU)"``; None when the scale is per volume or unknown.
    """
    if not input_units or not input_units.get("scale"):
        return None
    values = sorted({round(eps * float(s), 4) for s in input_units["scale"]})
    text = "/".join(f"{v:.4g}" for v in values) + f" {input_units.get('unit', 'model input units')}"
    if input_units.get("hu_per_unit"):
        text += f" ({eps * float(input_units['hu_per_unit']):.1f} HU)"
    return text + (" of this volume" if input_units.get("per_volume") else "")


def model_sha256(file_sha256: str, adapter: AdaptedModel) -> str:
    """The model's identity: its weights' hash and every adapter setting (another adapter is another model).

    Evaluation records are keyed by ``checkpoint_sha256``: with the file hash alone, a rerun with mirroring on, or
    another input map, would reuse results computed without.
    """
    intensity = adapter.intensity
    settings = {
        **adapter.describe(),
        "scale": [round(float(v), 9) for v in intensity.scale.flatten()],
        "shift": [round(float(v), 9) for v in intensity.shift.flatten()],
        "mask_nonzero": intensity.mask_nonzero,
        "regions_class_order": adapter.regions_class_order,
        "region_outputs": adapter.region_outputs,
        "in_channels": adapter.in_channels,
        "num_classes": adapter.num_classes,
    }
    return hashlib.sha256(json.dumps([file_sha256, settings], sort_keys=True).encode()).hexdigest()


def observe_volume(net: nn.Module, volume: Tensor) -> None:
    """Tell every adapter inside ``net`` the clean ``(1, C, D, H, W)`` volume of the case about to be evaluated."""
    for module in net.modules():
        if isinstance(module, AdaptedModel):
            module.observe(volume)


def _per_channel(value: float | Sequence[float]) -> Tensor:
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    return torch.tensor(values, dtype=torch.float32).reshape(1, -1, 1, 1, 1)  # (1, C or 1, 1, 1, 1)
