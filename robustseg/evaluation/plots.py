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


def budget_curves(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], dict[tuple[str, str], list]]:
    """``{(axis, target): {(source, attack): [(budget, Dice), ...]}}`` of every attack with a numeric budget.

    ``axis`` is ``eps`` (x 255 on the plot) or ``q_max`` (VAFA); each curve starts at the target's clean Dice
    at budget 0 and is sorted by budget value.
    """
    clean = {r["target"]: r["dice_mean"] for r in rows if r["attack"] == CLEAN}
    out: dict[tuple[str, str], dict[tuple[str, str], list]] = {}
    for r in rows:
        if r["attack"] == CLEAN or str(r["attack"]).startswith(WORST) or None in (budget_value(r), r.get("dice_mean")):
            continue
        curve = out.setdefault((budget_axis(r), r["target"]), {}).setdefault((r["source"], r["attack"]), [])
        curve.append((budget_value(r), r["dice_mean"]))
    for (_, target), curves in out.items():
        for key, points in curves.items():
            start = [(0.0, clean[target])] if target in clean else []
            curves[key] = start + sorted(points)
    return out


def plot_dice_vs_budget(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Panels (budget axis x target): mean Dice against the budget for every attack and source; clean at 0."""
    curves = budget_curves(rows)
    if not curves:
        return None
    targets = sorted({t for _, t in curves})
    axes_used = [a for a in AXIS_LABEL if any(axis == a for axis, _ in curves)]
    fig, axes = plt.subplots(
        len(axes_used), len(targets), figsize=(4.5 * len(targets), 3.6 * len(axes_used)), squeeze=False
    )
    for i, axis in enumerate(axes_used):
        _, scale, xlabel = AXIS_LABEL[axis]
        for ax, t in zip(axes[i], targets):
            for (source, attack), points in sorted(curves.get((axis, t), {}).items()):
                xs, ys = zip(*[(x * scale, y) for x, y in points])
                style = "-o" if source == t else "--s"
                ax.plot(xs, ys, style, label=f"{attack}" + ("" if source == t else f" from {source}"))
            ax.set(title=f"target {t}", xlabel=xlabel, ylabel="mean Dice (no background)", ylim=(0, 1))
            ax.grid(alpha=0.3)
            if curves.get((axis, t)):
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
