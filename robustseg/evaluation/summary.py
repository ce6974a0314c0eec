"""Per-case records -> summary rows: one per (source, target, attack, budget), clean and worst-case rows included.

The worst case follows AutoAttack (Croce and Hein, ICML 2020): per case, the attack with the lowest Dice among
all attacks of the suite (at one budget, and over every budget as ``budget="all"``); a case counts only when
every attack in the group has a record for it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CLEAN = "clean"
WORST = "worst"
MEAN_FIELDS = ("dice_mean", "dice_mean_bg", "hd95_mean", "nsd_mean", "flip_rate", "l2", "ssim", "psnr")
CSV_FIELDS = (
    "source",
    "target",
    "kind",
    "attack",
    "budget",
    "eps",
    "mode",
    "n_cases",
    "dice_mean",
    "dice_mean_bg",
    "hd95_mean",
    "hd95_empty_pred",
    "nsd_mean",
    "flip_rate",
    "linf_max",
    "l2",
    "ssim",
    "psnr",
    "budget_ok",
    "worst_attacks",
)


def _mean(values: Iterable[Any]) -> float | None:
    """Mean of the finite numbers; ``inf`` when all are +inf (identical volumes' PSNR); None when empty."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else values[0]


def _row(group: Sequence[Mapping[str, Any]], **fixed: Any) -> dict[str, Any]:
    first = group[0]
    row: dict[str, Any] = {
        "source": first["source"],
        "target": first["target"],
        "kind": first.get("kind", ""),
        "attack": first["attack"],
        "budget": first["budget"],
        "eps": first.get("eps"),
        "mode": first.get("mode", ""),
        "n_cases": len(group),
    }
    for name in MEAN_FIELDS:
        row[name] = _mean(r.get(name) for r in group)
    row["hd95_empty_pred"] = sum(int(r.get("hd95_empty_pred", 0)) for r in group)
    linf = [r["linf"] for r in group if r.get("linf") is not None]
    row["linf_max"] = max(linf) if linf else None
    audited = [r["budget_ok"] for r in group if "budget_ok" in r]
    row["budget_ok"] = all(audited) if audited else None
    dice = [r["dice"] for r in group if r.get("dice")]
    if dice:
        row["dice_per_class"] = [sum(col) / len(col) for col in zip(*dice)]
    bands = defaultdict(list)
    for r in group:
        for band, value in (r.get("freq_dice") or {}).items():
            bands[band].append(value)
    if bands:
        row["freq_dice"] = {band: _mean(values) for band, values in bands.items()}
    row.update(fixed)
    return row


def summarise(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Summary rows sorted as (target, source, clean first, attack, budget), plus the worst-case rows."""
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["source"], r["target"], r["attack"], r["budget"])].append(r)
    rows = [_row(g) for g in groups.values()]
    rows += worst_rows(records)
    order = {CLEAN: 0, WORST: 2}
    rows.sort(key=lambda r: (r["target"], r["source"], order.get(r["attack"], 1), r["attack"], str(r["budget"])))
    return rows


def worst_rows(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (source, target): the per-case worst over attacks at each budget, and over all attacks and budgets."""
    by_pair: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        if r["attack"] not in (CLEAN, WORST):
            by_pair[(r["source"], r["target"])].append(r)
    rows = []
    for _pair, group in sorted(by_pair.items()):
        budgets = sorted({str(r["budget"]) for r in group})
        for budget in [*budgets, "all"]:
            members = [r for r in group if budget == "all" or str(r["budget"]) == budget]
            attacks = {(r["attack"], str(r["budget"])) for r in members}
            if budget != "all" and len({a for a, _ in attacks}) < 2:
                continue  # a single attack at this budget: its own row already is the worst case
            per_case: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
            for r in members:
                per_case[r["case_id"]].append(r)
            chosen = [
                min(rs, key=lambda r: float(r["dice_mean"]))
                for rs in per_case.values()
                if {(r["attack"], str(r["budget"])) for r in rs} == attacks
            ]
            if not chosen:
                continue
            counts = defaultdict(int)
            for r in chosen:
                counts[f"{r['attack']}@{r['budget']}"] += 1
            worst = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
            eps = chosen[0].get("eps") if budget != "all" else None
            rows.append(_row(chosen, attack=WORST, budget=budget, eps=eps, worst_attacks=worst))
    return rows
