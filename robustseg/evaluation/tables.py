"""Summary rows as a CSV and as markdown tables (white-box, transfer matrix, threat model, worst case, per class).

Columns of attacks are ordered by attack and then budget *value* (``2/255, 8/255, 16/255``), never by text, and
every table names the threat model of each of its columns (:func:`threat_text`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robustseg.evaluation.store import atomic_write_bytes
from robustseg.evaluation.summary import CLEAN, CSV_FIELDS, THREAT_SECTIONS, WORST, budget_sort_key

THREAT_PREFIXES = tuple(THREAT_SECTIONS.values())
PER_CLASS_PREFIXES = ("dice_", "hd95_", "nsd_", "pooled_dice_", "sea_pooled_dice_")


def flat_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row with its DCT-band Dice expanded to ``freq_dice_<band>`` columns."""
    out = {k: v for k, v in row.items() if k != "freq_dice"}
    out.update({f"freq_dice_{b}": v for b, v in (row.get("freq_dice") or {}).items()})
    return out


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """All columns: :data:`CSV_FIELDS`, the threat-model fields, the per-class columns, then the DCT bands."""
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(flat_row(r)))
    extra = [c for c in seen if c not in CSV_FIELDS]
    threat = sorted(c for c in extra if c.startswith(THREAT_PREFIXES))
    per_class = [c for p in PER_CLASS_PREFIXES for c in extra if c.startswith(p) and c not in threat]
    per_class = list(dict.fromkeys(per_class))
    bands = sorted(c for c in extra if c.startswith("freq_dice_"))
    rest = [c for c in extra if c not in {*threat, *per_class, *bands}]
    return [*CSV_FIELDS, *threat, *per_class, *rest, *bands]


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """``summary.csv``: one line per row, every column of :func:`columns` (per class: ``dice_<class>`` ...)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(rows), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        flat = flat_row(r)
        writer.writerow({k: _fmt(flat.get(k)) for k in writer.fieldnames})
    atomic_write_bytes(path, buffer.getvalue().encode())
    return path


def cell(value: Any, digits: int = 4) -> str:
    """A markdown cell: ``-`` for missing, fixed digits for floats."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def col(row: Mapping[str, Any]) -> str:
    """``attack@budget``: how tables name a row's attack."""
    return f"{row['attack']}@{row['budget']}"


def threat_text(row: Mapping[str, Any]) -> str:
    """The full threat model of a row in one line: attack fields, budget (value, HU), mode, window, seed."""
    if row["attack"] == CLEAN:
        parts = ["no attack"]
    elif str(row["attack"]).startswith(WORST):
        parts = [f"per-case worst over {row.get('attack_name') or '?'}"]
    else:
        fields = ", ".join(
            f"{k[len('attack.') :]}={v}" for k, v in sorted(row.items()) if k.startswith("attack.") and v is not None
        )
        parts = [f"{row.get('attack_name') or row['attack']}({fields})"]
    if row["attack"] != CLEAN and row.get("budget_value") is not None:
        budget = f"budget {row['budget']} = {row['budget_value']:.6g}"
        budget += f" (~{row['budget_hu']:.1f} HU)" if row.get("budget_hu") is not None else ""
        parts.append(budget)
    parts.append(f"mode {row.get('mode') or '-'}")
    window = ", ".join(f"{k[3:]}={v}" for k, v in sorted(row.items()) if k.startswith("sw.") and v is not None)
    if window:
        parts.append(f"window {window}")
    intensity = ", ".join(
        f"{k[10:]}={v}" for k, v in sorted(row.items()) if k.startswith("intensity.") and v is not None
    )
    if intensity:
        parts.append(f"intensity {intensity}")
    parts.append(f"seed {row.get('seed') if row.get('seed') is not None else '-'}")
    return "; ".join(parts)


def _attack_order(row: Mapping[str, Any]) -> tuple:
    attack = str(row["attack"])
    return (attack.startswith(WORST), attack, budget_sort_key(row))


def threat_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: each attack@budget (and its source) with its full threat model."""
    seen: dict[tuple, Mapping[str, Any]] = {}
    for r in sorted(rows, key=_attack_order):
        if r["attack"] != CLEAN and not str(r["attack"]).startswith(WORST):
            seen.setdefault((col(r), r["source"]), r)
    if not seen:
        return "_no attacks_\n"
    lines = ["| column | source | group | threat model |", "|---|---|---|---|"]
    lines += [f"| {c} | {s} | {cell(r.get('group'))} | {threat_text(r)} |" for (c, s), r in seen.items()]
    return "\n".join(lines) + "\n"


def whitebox_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: per target, clean Dice and Dice under each white-box attack and the worst cases."""
    white = [r for r in rows if r["attack"] == CLEAN or r["source"] == r["target"]]
    targets = sorted({r["target"] for r in white})
    if not targets:
        return "_no white-box results_\n"
    cols = list(dict.fromkeys(col(r) for r in sorted(white, key=_attack_order) if r["attack"] != CLEAN))
    lines = ["| target | clean | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for t in targets:
        cells = {(col(r) if r["attack"] != CLEAN else CLEAN): r["dice_mean"] for r in white if r["target"] == t}
        lines.append(f"| {t} | {cell(cells.get(CLEAN))} | " + " | ".join(cell(cells.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def transfer_matrices(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[str], list[str], np.ndarray]]:
    """``{attack@budget: (sources, targets, Dice matrix)}``, ordered by attack and budget value."""
    attacked = sorted((r for r in rows if r["attack"] != CLEAN and r["source"]), key=_attack_order)
    out = {}
    for name in dict.fromkeys(col(r) for r in attacked):
        group = [r for r in attacked if col(r) == name]
        sources = sorted({r["source"] for r in group})
        targets = sorted({r["target"] for r in group})
        matrix = np.full((len(sources), len(targets)), np.nan)
        for r in group:
            value = r.get("dice_mean")
            matrix[sources.index(r["source"]), targets.index(r["target"])] = np.nan if value is None else value
        out[name] = (sources, targets, matrix)
    return out


def transfer_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one source x target Dice matrix per attack@budget, each headed by its threat model."""
    matrices = transfer_matrices(rows)
    by_col = {col(r): r for r in rows if r["attack"] != CLEAN and r["source"]}
    out = []
    for name, (sources, targets, matrix) in matrices.items():
        out += [f"**{name}** ({threat_text(by_col[name])})", "", "| source \\ target | " + " | ".join(targets) + " |"]
        out.append("|---" * (len(targets) + 1) + "|")
        for i, s in enumerate(sources):
            out.append(f"| {s} | " + " | ".join(cell(None if np.isnan(v) else float(v)) for v in matrix[i]) + " |")
        out.append("")
    return "\n".join(out) + "\n"


def worst_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: each worst-case row with the attacks that Dice, HD95 and NSD chose (and SEA's pooled Dice)."""
    worst = [r for r in rows if str(r["attack"]).startswith(WORST)]
    if not worst:
        return "_no worst-case rows (a single attack per budget)_\n"
    head = "| source | target | scope | budget | Dice | chosen by Dice | HD95 | chosen by HD95 | NSD | chosen by NSD"
    lines = [head + " | SEA pooled Dice | SEA's choice |", "|---" * 12 + "|"]
    for r in worst:
        cells = [r["source"], r["target"], r["attack"], r["budget"], cell(r.get("dice_mean"))]
        cells += [r.get("worst_dice_attacks"), cell(r.get("hd95_mean"), 2), r.get("worst_hd95_attacks")]
        cells += [cell(r.get("nsd_mean")), r.get("worst_nsd_attacks"), cell(r.get("sea_pooled_dice_mean"))]
        cells.append(r.get("sea_attacks"))
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def per_class_table(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str] | None = None) -> str:
    """Markdown: per class, Dice / HD95 (mm) / NSD of the clean rows and of the worst case over all budgets."""
    chosen = [r for r in rows if r["attack"] == CLEAN or (str(r["attack"]).startswith(WORST) and r["budget"] == "all")]
    if not chosen:
        return "_no clean or worst-case rows_\n"
    dice_cols = [k for k in columns(chosen) if k.startswith("dice_") and k not in ("dice_mean", "dice_mean_bg")]
    slugs = [k[len("dice_") :] for k in dice_cols]
    names = list(class_names) if class_names and len(class_names) == len(slugs) else slugs
    lines = ["| target | source | row | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]
    for r in chosen:
        cells = []
        for j, slug in enumerate(slugs):
            parts = [cell(r.get(f"dice_{slug}"), 3)]
            if j > 0:
                parts += [cell(r.get(f"hd95_{slug}"), 1), cell(r.get(f"nsd_{slug}"), 3)]
            cells.append(" / ".join(parts))
        lines.append(f"| {r['target']} | {r['source'] or '-'} | {col(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def all_rows_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: every summary row with its main metrics and its threat model."""
    keys = ["source", "target", "attack", "budget", "n_cases", "n_skipped", "dice_mean", "hd95_mean", "hd95_empty_pred"]
    keys += ["hd95_empty_truth", "nsd_mean", "flip_rate", "linf_max", "ssim", "psnr", "budget_ok"]
    lines = ["| " + " | ".join(keys) + " | threat model |", "|---" * (len(keys) + 1) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(k), 3) for k in keys) + f" | {threat_text(r)} |")
    return "\n".join(lines) + "\n"
