"""LightningModules: the segmentation system and its adversarial-training objectives."""

from __future__ import annotations

from robustseg.systems.segmentation import Batch, SegmentationSystem

__all__ = ["Batch", "SegmentationSystem"]
