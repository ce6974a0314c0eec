"""Network passes and per-prediction scores of an evaluation: counted, always in eval mode, on the real volume.

* :class:`PassCounter` wraps a network to count forward calls, windows and backward passes. It has no training
  mode of its own: ``train(True)`` (which the attack contract and ``SlidingWindowModel`` call to "restore" a
  mode) keeps the wrapper and the network in eval mode, so BatchNorm always uses its running statistics and
  never updates them (a network left in train mode made results depend on the order of cases).
* :class:`SlidingWindow` holds the window settings that shape both the attack and the score (ROI, overlap,
  blending and its Gaussian sigma); :func:`predict` is MONAI's ``sliding_window_inference`` with them.
* :func:`score_prediction` computes the metrics of one (D, H, W) prediction, plus the per-class voxel counts
  ``dice_counts`` (intersection, predicted, true) that pooled Dice and the report's per-class tables need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from robustseg.attacks.volume import SIGMA_SCALE
from robustseg.evaluation.metrics import dice_per_class, segmentation_metrics


class PassCounter(nn.Module):
    """Wraps a network to count its forward calls, the windows they carried and the backward passes through them.

    The wrapper is always in eval mode and keeps the wrapped network there: evaluation scores and attacks a
    fixed function (issue: BatchNorm models in train mode gave order-dependent results).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.forwards = 0
        self.windows = 0
        self.backwards = 0
        self.train(False)

    def train(self, mode: bool = True) -> PassCounter:
        """Ignore ``mode``: wrapper and network stay in eval mode (returns ``self`` as ``nn.Module.train``)."""
        self.training = False
        self.net.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.net.training:  # someone switched the network itself: never score or attack in train mode
            self.net.eval()
        out = self.net(x)
        self.forwards += 1
        self.windows += x.shape[0]
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def _count_backward(self, grad: Tensor) -> None:
        self.backwards += 1

    def counts(self) -> dict[str, int]:
        return {"forwards": self.forwards, "windows": self.windows, "backwards": self.backwards}


@dataclass
class SlidingWindow:
    """Scoring and crafting window settings; ``roi_size`` None means each model's own training ROI.

    ``sigma_scale`` is the Gaussian blending width of MONAI (the attack library's ``SIGMA_SCALE``: crafting
    and scoring blend identically).
    """

    overlap: float = 0.5
    sw_batch_size: int = 2
    blend_mode: str = "gaussian"
    roi_size: tuple[int, int, int] | None = None
    sigma_scale: float = SIGMA_SCALE

    def roi(self, model: Any) -> tuple[int, int, int]:
        return tuple(self.roi_size) if self.roi_size else tuple(model.roi_size)

    def identity(self, model: Any) -> dict[str, Any]:
        """The settings that change what the window computes for ``model`` (part of every result's identity)."""
        return {
            "roi": list(self.roi(model)),
            "overlap": float(self.overlap),
            "blend_mode": str(self.blend_mode),
            "sigma_scale": float(self.sigma_scale) if self.blend_mode == "gaussian" else None,
        }


def predict(window: SlidingWindow, model: Any, counter: nn.Module, image: Tensor) -> Tensor:
    """Sliding-window logits (1, K, D, H, W) of a (1, C, D, H, W) volume, without gradients, in eval mode."""
    counter.eval()
    with torch.no_grad():
        return sliding_window_inference(
            image,
            roi_size=window.roi(model),
            sw_batch_size=window.sw_batch_size,
            predictor=counter,
            overlap=window.overlap,
            mode=window.blend_mode,
            sigma_scale=window.sigma_scale,
            roi_weight_map=roi_weight_map(model),
        )


def roi_weight_map(model: Any) -> Tensor | None:
    """The model's own ``(rd, rh, rw)`` window blending weights (nnU-Net's Gaussian for ``nnunet:`` models), or None."""
    extra = getattr(model, "extra", None) or {}
    return (extra.get("sliding_window") or {}).get("roi_weight_map")


def dice_counts(pred: Tensor, label: Tensor, num_classes: int) -> dict[str, list[int]]:
    """Per-class voxel counts of one case: ``intersection``, ``pred`` and ``label`` sizes, classes 0..K-1.

    Pooled Dice over cases is ``2 sum(intersection) / (sum(pred) + sum(label))``.

    Args:
        pred: (D, H, W) predicted class indices.
        label: (D, H, W) true class indices.
    """
    k = num_classes
    p = torch.bincount(pred.flatten().long(), minlength=k)[:k]  # (K,)
    g = torch.bincount(label.flatten().long(), minlength=k)[:k]  # (K,)
    both = torch.bincount(pred.flatten().long()[pred.flatten() == label.flatten()], minlength=k)[:k]  # (K,)
    return {"intersection": both.tolist(), "pred": p.tolist(), "label": g.tolist()}


def score_prediction(
    pred: Tensor, label: Tensor, num_classes: int, spacing: Sequence[float], nsd_tolerance_mm: float
) -> dict[str, Any]:
    """Dice, HD95, NSD (see ``metrics.segmentation_metrics``) and ``dice_counts`` of a (D, H, W) prediction."""
    metrics = segmentation_metrics(pred, label, num_classes, spacing, nsd_tolerance_mm)
    metrics["dice_counts"] = dice_counts(pred, label, num_classes)
    return metrics


def dice_mean(pred: Tensor, label: Tensor, num_classes: int) -> float:
    """Mean foreground Dice of a (D, H, W) prediction (the frequency-band scores)."""
    dice = dice_per_class(pred, label, num_classes)
    return sum(dice[1:]) / (len(dice) - 1)
