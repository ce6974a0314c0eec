"""Evaluation outputs: summary CSV/JSON, a markdown report, PNG plots and a W&B run.

Plots (matplotlib, Agg backend): Dice vs budget per target model, the transfer heat-map (source x target per
attack and budget) and slice montages (image, amplified perturbation, ground truth, clean and adversarial
prediction). W&B lives only here: the run is ``offline`` unless an API key is configured, ``WANDB_MODE=disabled``
turns it off, nothing ever prompts, and the run is finished before returning.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402

from robustseg.evaluation.store import atomic_write_bytes  # noqa: E402
from robustseg.evaluation.summary import CLEAN, CSV_FIELDS, WORST  # noqa: E402

log = logging.getLogger(__name__)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Summary CSV with :data:`CSV_FIELDS` columns plus one ``dice_<class>`` column per class and DCT band."""
    extra = sorted({f"freq_dice_{b}" for r in rows for b in (r.get("freq_dice") or {})})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*CSV_FIELDS, *extra], extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        flat = {**r, **{f"freq_dice_{b}": v for b, v in (r.get("freq_dice") or {}).items()}}
        writer.writerow({k: _fmt(flat.get(k)) for k in writer.fieldnames})
    atomic_write_bytes(path, buffer.getvalue().encode())
    return path


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def _col(row: Mapping[str, Any]) -> str:
    return f"{row['attack']}@{row['budget']}"


def whitebox_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: per target, clean Dice and Dice under each white-box attack and the worst case."""
    white = [r for r in rows if r["attack"] == CLEAN or r["source"] == r["target"]]
    targets = sorted({r["target"] for r in white})
    columns = sorted({_col(r) for r in white if r["attack"] not in (CLEAN, WORST)}) + sorted(
        {_col(r) for r in white if r["attack"] == WORST}
    )
    if not targets:
        return "_no white-box results_\n"
    lines = ["| target | clean | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for t in targets:
        cells = {(_col(r) if r["attack"] != CLEAN else CLEAN): r["dice_mean"] for r in white if r["target"] == t}
        lines.append(f"| {t} | {_cell(cells.get(CLEAN))} | " + " | ".join(_cell(cells.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def transfer_matrices(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[str], list[str], np.ndarray]]:
    """``{attack@budget: (sources, targets, Dice matrix)}`` over every (source, target) pair with results."""
    attacked = [r for r in rows if r["attack"] not in (CLEAN,) and r["source"]]
    out = {}
    for col in sorted({_col(r) for r in attacked}):
        group = [r for r in attacked if _col(r) == col]
        sources = sorted({r["source"] for r in group})
        targets = sorted({r["target"] for r in group})
        matrix = np.full((len(sources), len(targets)), np.nan)
        for r in group:
            matrix[sources.index(r["source"]), targets.index(r["target"])] = r["dice_mean"]
        out[col] = (sources, targets, matrix)
    return out


def markdown_report(
    rows: Sequence[Mapping[str, Any]],
    flags: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
    stats: Mapping[str, Any],
    images: Sequence[str],
) -> str:
    """The report: settings, flags, white-box table, transfer matrices, costs, full summary and figures."""
    raised = [f for f in flags if f["raised"]]
    out = ["# robustseg evaluation report", ""]
    out += ["Dice is the mean over foreground classes (background excluded); `dice_mean_bg` in the CSV includes it,"]
    out += ["as the papers do. HD95 is in mm; an empty prediction of a present structure scores the volume diagonal."]
    out += ["", "## Settings", ""]
    out += [f"- **{k}**: {v}" for k, v in settings.items()]
    out += ["", f"## Sanity flags ({len(raised)} raised of {len(flags)})", ""]
    for f in flags:
        out.append(f"- {'**RAISED**' if f['raised'] else 'ok'} `{f['name']}`: {f['detail']}")
    out += ["", "## White-box (mean Dice, each target attacked through its own gradients)", ""]
    out.append(whitebox_table(rows))
    matrices = transfer_matrices(rows)
    if any(len(s) > 1 or s != t for s, t, _ in matrices.values()):
        out += ["## Transfer matrix (mean Dice; rows: source that crafted the attack, columns: target)", ""]
        for col, (sources, targets, matrix) in matrices.items():
            out += [f"**{col}**", "", "| source \\ target | " + " | ".join(targets) + " |"]
            out.append("|---" * (len(targets) + 1) + "|")
            for i, s in enumerate(sources):
                out.append(f"| {s} | " + " | ".join(_cell(None if np.isnan(v) else float(v)) for v in matrix[i]) + " |")
            out.append("")
    out += ["## Cost", ""]
    out += [f"- **{k}**: {v}" for k, v in stats.items()]
    out += ["", "## All rows", ""]
    keys = ["source", "target", "attack", "budget", "n_cases", "dice_mean", "hd95_mean", "hd95_empty_pred"]
    keys += ["nsd_mean", "flip_rate", "linf_max", "ssim", "psnr", "budget_ok"]
    out += ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_cell(r.get(k), 3) if r.get(k) != "" else "-" for k in keys) + " |")
    if images:
        out += ["", "## Figures", ""]
        out += [f"![{Path(p).stem}]({Path(p).name})" for p in images]
    return "\n".join(out) + "\n"


def plot_dice_vs_budget(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """One panel per target: mean Dice against eps (x 255) for every attack and source; clean at 0."""
    curves = [r for r in rows if r["attack"] not in (CLEAN, WORST) and r.get("eps") is not None]
    if not curves:
        return None
    targets = sorted({r["target"] for r in curves})
    fig, axes = plt.subplots(1, len(targets), figsize=(4.5 * len(targets), 3.6), squeeze=False)
    for ax, t in zip(axes[0], targets):
        clean = next((r["dice_mean"] for r in rows if r["target"] == t and r["attack"] == CLEAN), None)
        for source, attack in sorted({(r["source"], r["attack"]) for r in curves if r["target"] == t}):
            pts = sorted(
                (r["eps"] * 255, r["dice_mean"])
                for r in curves
                if (r["source"], r["attack"], r["target"]) == (source, attack, t)
            )
            if clean is not None:
                pts = [(0.0, clean), *pts]
            xs, ys = zip(*pts)
            style = "-o" if source == t else "--s"
            ax.plot(xs, ys, style, label=f"{attack}" + ("" if source == t else f" from {source}"))
        ax.set(title=f"target {t}", xlabel="budget eps x 255", ylabel="mean Dice (no background)", ylim=(0, 1))
        ax.grid(alpha=0.3)
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


def wandb_payload(
    rows: Sequence[Mapping[str, Any]], flags: Sequence[Mapping[str, Any]], stats: Mapping[str, Any]
) -> dict[str, Any]:
    """What goes to W&B: ``eval/dice/<attack>@<budget>[@<source>]/<target>`` scalars, flags and costs."""
    payload: dict[str, Any] = {}
    for r in rows:
        name = CLEAN if r["attack"] == CLEAN else _col(r)
        if r["attack"] != CLEAN and r["source"] != r["target"]:
            name += f"@{r['source']}"  # transfer from surrogate, as ``eval/dice/pgd@unetr`` in ARCHITECTURE 2.5
        payload[f"eval/dice/{name}/{r['target']}"] = r["dice_mean"]
    for f in flags:
        key = f"flags/{f['name']}"
        payload[key] = bool(payload.get(key, False) or f["raised"])
    payload.update({f"cost/{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
    return payload


def log_wandb(
    logger_cfg: Mapping[str, Any] | None,
    out_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    flags: Sequence[Mapping[str, Any]],
    stats: Mapping[str, Any],
    images: Sequence[Path],
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """Log the payload, the summary table and the images to a W&B run (if the logger is wandb); returns the payload."""
    payload = wandb_payload(rows, flags, stats)
    if not logger_cfg or logger_cfg.get("name") != "wandb":
        return payload
    from robustseg.loggers import wandb_mode

    mode = wandb_mode(str(logger_cfg.get("mode", "auto")))
    if mode == "disabled":
        return payload
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        project=logger_cfg.get("project", "robustseg"),
        entity=logger_cfg.get("entity"),
        name=f"evaluate-{out_dir.name}",
        job_type="evaluate",
        dir=str(out_dir),
        mode=mode,
        config=dict(config),
        tags=list(logger_cfg.get("tags") or []),
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
    )
    try:
        columns = list(CSV_FIELDS)
        table = wandb.Table(columns=columns, data=[[_fmt(r.get(c)) for c in columns] for r in rows])
        run.log({"eval/summary": table, **{f"eval/plots/{p.stem}": wandb.Image(str(p)) for p in images}})
        for key, value in payload.items():
            run.summary[key] = value
    finally:
        run.finish()
        wandb.teardown()
    return payload


def write_outputs(
    out_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    flags: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
    stats: Mapping[str, Any],
) -> dict[str, Path]:
    """summary.csv, summary.json, dice_vs_budget.png, transfer_heatmap.png and report.md in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": write_csv(rows, out_dir / "summary.csv")}
    summary = {"rows": list(rows), "flags": list(flags), "settings": dict(settings), "stats": dict(stats)}
    paths["json"] = out_dir / "summary.json"
    atomic_write_bytes(paths["json"], json.dumps(summary, indent=1, default=str).encode())
    images = [
        p
        for p in (
            plot_dice_vs_budget(rows, out_dir / "dice_vs_budget.png"),
            plot_transfer_heatmap(rows, out_dir / "transfer_heatmap.png"),
        )
        if p is not None
    ]
    images += sorted((out_dir / "montages").glob("*.png"))
    for p in images:
        paths[p.stem] = p
    text = markdown_report(rows, flags, settings, stats, [str(p.relative_to(out_dir)) for p in images])
    paths["report"] = out_dir / "report.md"
    atomic_write_bytes(paths["report"], text.encode())
    return paths
