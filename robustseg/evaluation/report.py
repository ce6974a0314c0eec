"""Evaluation outputs: ``summary.csv``, ``summary.json``, ``report.md``, the plots and the W&B run.

The pieces live by concern: :mod:`.tables` (CSV and markdown tables), :mod:`.plots` (figures),
:mod:`.wandb_log` (the W&B run). This module assembles the report and writes the files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from robustseg.evaluation.plots import plot_dice_vs_budget, plot_transfer_heatmap, save_montage
from robustseg.evaluation.store import atomic_write_bytes
from robustseg.evaluation.tables import (
    all_rows_table,
    per_class_table,
    threat_table,
    transfer_matrices,
    transfer_table,
    whitebox_table,
    worst_table,
    write_csv,
)
from robustseg.evaluation.wandb_log import log_wandb, wandb_payload

__all__ = ["log_wandb", "markdown_report", "save_montage", "wandb_payload", "write_csv", "write_outputs"]


def _status(flag: Mapping[str, Any]) -> str:
    return "**RAISED**" if flag["raised"] else "ok" if flag.get("checked", True) else "*not checked*"


def _nsd_statement(rows: Sequence[Mapping[str, Any]]) -> str:
    tolerances = sorted({str(r["nsd_tolerance_mm"]) for r in rows if r.get("nsd_tolerance_mm") is not None})
    used = ", ".join(tolerances) if tolerances else "not recorded"
    return (
        f"NSD (surface Dice) tolerance: {used} mm (default: the largest voxel spacing of each case; a smaller "
        "tolerance counts only exact boundary matches and raises the `nsd_tolerance` flag)."
    )


def markdown_report(
    rows: Sequence[Mapping[str, Any]],
    flags: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
    stats: Mapping[str, Any],
    images: Sequence[str],
    class_names: Sequence[str] | None = None,
) -> str:
    """The report: settings, flags, threat models, white-box, transfer, worst case, per class, costs, all rows."""
    raised = [f for f in flags if f["raised"]]
    unchecked = [f for f in flags if not f["raised"] and not f.get("checked", True)]
    out = ["# robustseg evaluation report", ""]
    out += ["Dice is the mean over foreground classes (background excluded); `dice_mean_bg` in the CSV includes it,"]
    out += ["as the papers do. HD95 is in mm; a structure predicted empty while present, or predicted while absent,"]
    out += ["scores the volume diagonal (`hd95_empty_pred`, `hd95_empty_truth` count each direction)."]
    out += [_nsd_statement(rows), "", "## Settings", ""]
    out += [f"- **{k}**: {v}" for k, v in settings.items()]
    out += ["", f"## Sanity flags ({len(raised)} raised, {len(unchecked)} not checked, of {len(flags)})", ""]
    out += [f"- {_status(f)} `{f['name']}`: {f['detail']}" for f in flags]
    out += ["", "## Threat model of every column", "", threat_table(rows)]
    out += ["## White-box (mean Dice, each target attacked through its own gradients)", "", whitebox_table(rows)]
    matrices = transfer_matrices(rows)
    if any(len(s) > 1 or s != t for s, t, _ in matrices.values()):
        out += ["## Transfer matrix (mean Dice; rows: source that crafted the attack, columns: target)", ""]
        out.append(transfer_table(rows))
    out += ["## Worst case per metric (per case: lowest Dice, largest HD95, smallest NSD over the attacks)", ""]
    out.append(worst_table(rows))
    out += ["## Per class: Dice / HD95 (mm) / NSD, clean and worst case over all budgets", ""]
    out.append(per_class_table(rows, class_names))
    out += ["## Cost", ""]
    out += [f"- **{k}**: {v}" for k, v in stats.items()]
    out += ["", "## All rows", "", all_rows_table(rows)]
    if images:
        out += ["## Figures", ""]
        out += [f"![{Path(p).stem}]({p})" for p in images]
    return "\n".join(out) + "\n"


def write_outputs(
    out_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    flags: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
    stats: Mapping[str, Any],
    class_names: Sequence[str] | None = None,
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
    relative = [p.relative_to(out_dir).as_posix() for p in images]
    text = markdown_report(rows, flags, settings, stats, relative, class_names)
    paths["report"] = out_dir / "report.md"
    atomic_write_bytes(paths["report"], text.encode())
    return paths
