"""Slice images for the experiment logger: image, ground truth and prediction side by side."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from torch import Tensor


def slice_panel(image: Tensor, label: Tensor, pred: Tensor, num_classes: int) -> np.ndarray:
    """RGB uint8 panel (H, 3D, 3), enlarged when small, of the axial slice with the most foreground in ``label``.

    Args:
        image: (D, H, W) intensities in [0, 1].
        label: (D, H, W) ground-truth class indices.
        pred: (D, H, W) predicted class indices.
    """
    z = int((label > 0).sum(dim=(0, 1)).argmax())  # axial index with the most foreground
    gray = image[:, :, z].detach().float().clamp(0, 1).cpu().numpy()  # (D, H)
    cmap = colormaps["tab10"] if num_classes <= 10 else colormaps["tab20"]

    def colour(index: Tensor) -> np.ndarray:
        idx = index[:, :, z].detach().cpu().numpy()  # (D, H)
        rgb = cmap(idx % cmap.N)[..., :3]  # (D, H, 3)
        return np.where(idx[..., None] == 0, gray[..., None], 0.5 * gray[..., None] + 0.5 * rgb)

    parts = [np.repeat(gray[..., None], 3, axis=-1), colour(label), colour(pred)]  # 3 x (D, H, 3)
    panel = np.concatenate([np.rot90(p) for p in parts], axis=1)  # (H, 3D, 3): rotated so anterior is up
    zoom = max(1, 160 // panel.shape[0])  # small volumes get nearest-neighbour enlarged for legibility
    panel = panel.repeat(zoom, axis=0).repeat(zoom, axis=1)
    return (panel * 255).round().astype(np.uint8)
