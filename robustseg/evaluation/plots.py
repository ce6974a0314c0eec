"""Evaluation figures (matplotlib, Agg backend): Dice vs budget, the transfer heat-map and slice montages.

Dice vs budget has one panel per (budget axis, target): eps x 255 for norm-bounded and noise attacks, ``q_max``
for VAFA (its budget axis), each curve starting at the clean score; white-box solid, transfer dashed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402

from robustseg.evaluation.checks import budget_axis  # noqa: E402
from robustseg.evaluation.summary import CLEAN, WORST, budget_value  # noqa: E402
from robustseg.evaluation.tables import transfer_matrices  # noqa: E402

AXIS_LABEL = {"eps": ("eps", 255.0, "budget eps x 255"), "q_max": ("q_max", 1.0, "VAFA budget q_max")}


def plot_dice_vs_budget(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Panels (budget axis x target): mean Dice against the budget for every attack and source; clean at 0."""
    curves = [r for r in rows if r["attack"] not in (CLEAN, WORST) and budget_value(r) is not None]
    curves = [r for r in curves if not str(r["attack"]).startswith(WORST)]
    if not curves:
        return None
    targets = sorted({r["target"] for r in curves})
    axes_used = [a for a in AXIS_LABEL if any(budget_axis(r) == a for r in curves)]
    fig, axes = plt.subplots(
        len(axes_used), len(targets), figsize=(4.5 * len(targets), 3.6 * len(axes_used)), squeeze=False
    )
    for i, axis in enumerate(axes_used):
        _, scale, xlabel = AXIS_LABEL[axis]
        for ax, t in zip(axes[i], targets):
            clean = next((r["dice_mean"] for r in rows if r["target"] == t and r["attack"] == CLEAN), None)
            mine = [r for r in curves if r["target"] == t and budget_axis(r) == axis]
            for source, attack in sorted({(r["source"], r["attack"]) for r in mine}):
                pts = sorted(
                    (budget_value(r) * scale, r["dice_mean"])
                    for r in mine
                    if (r["source"], r["attack"]) == (source, attack)
                )
                if clean is not None:
                    pts = [(0.0, clean), *pts]
                xs, ys = zip(*pts)
                style = "-o" if source == t else "--s"
                ax.plot(xs, ys, style, label=f"{attack}" + ("" if source == t else f" from {source}"))
            ax.set(title=f"target {t}", xlabel=xlabel, ylabel="mean Dice (no background)", ylim=(0, 1))
            ax.grid(alpha=0.3)
            if mine:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_transfer_heatmap(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Heat-maps of mean Dice, source x target, one per attack and budget."""
    matrices = transfer_matrices(rows)
    if not matrices:
        return None
    n = len(matrices)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.8 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (col, (sources, targets, matrix)) in zip(axes.flat, matrices.items()):
        im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(targets)), targets, rotation=30, fontsize=7)
        ax.set_yticks(range(len(sources)), sources, fontsize=7)
        ax.set(title=col, xlabel="target", ylabel="source")
        for (i, j), v in np.ndenumerate(matrix):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.5 else "k", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_montage(
    path: Path, image: Tensor, adversarial: Tensor, label: Tensor, clean: Tensor, pred: Tensor, title: str
) -> Path:
    """Axial slice (last axis, most foreground): image, amplified perturbation, truth, clean and attacked prediction.

    Args:
        image, adversarial: (C, D, H, W) in [0, 1]; label: (1, D, H, W); clean, pred: (D, H, W) class maps.
    """
    lab = label[0].cpu()  # (D, H, W)
    z = int((lab > 0).sum(dim=(0, 1)).argmax())  # axial index with the most foreground
    delta = (adversarial[0] - image[0])[:, :, z].cpu().numpy()  # (D, H)
    amp = float(np.abs(delta).max()) or 1.0
    k = int(max(lab.max(), clean.max(), pred.max())) + 1
    gray = image[0, :, :, z].cpu().numpy()  # (D, H)
    maps = [None, None, lab[:, :, z].numpy(), clean[:, :, z].cpu().numpy(), pred[:, :, z].cpu().numpy()]
    names = ["image", f"perturbation x{1 / amp:.0f} (L-inf {amp:.3g})", "ground truth", "clean prediction"]
    names.append("adversarial prediction")
    fig, axes = plt.subplots(1, 5, figsize=(15, 3.4))
    for i, (ax, name) in enumerate(zip(axes, names)):
        if i == 1:
            ax.imshow(np.rot90(delta / amp), cmap="seismic", vmin=-1, vmax=1, interpolation="nearest")
        else:
            ax.imshow(np.rot90(gray), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if maps[i] is not None:  # classes over the image; background left transparent
            overlay = np.ma.masked_where(maps[i] == 0, maps[i])
            cmap, top = ("tab10", 9) if k <= 10 else ("tab20", 19)
            ax.imshow(np.rot90(overlay), cmap=cmap, vmin=0, vmax=top, alpha=0.55, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
