"""Threat models of one target from an evaluation's summary rows: the ``threat_models`` section of a card.

Every (kind, source, budget) a target was attacked under is one threat model; its attacks are the summary rows of
that budget, and its worst case is the evaluation's per-case worst row (AutoAttack's point-wise rule, Croce and
Hein, ICML 2020) when two or more attacks ran at that budget, else the single attack's row.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf

CLEAN = "clean"
WORST = "worst"
RELIABLE_GROUP = "reliable"  # records' ``group`` of the reliable suite (conf/suite/reliable.yaml)
_COUNT = re.compile(r"([^,:]+):\s*(\d+)")


def as_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_") or "class"


def metrics_of(row: Mapping[str, Any], class_names: Sequence[str] | None) -> dict[str, Any]:
    """Card metrics from a summary row (old rows: ``dice_per_class`` list; new rows: ``dice_<class>`` columns)."""
    per_class = None
    if class_names:
        listed = row.get("dice_per_class")
        if isinstance(listed, (list, tuple)) and len(listed) == len(class_names):
            per_class = {n: float(v) for n, v in zip(class_names, listed)}
        elif all(row.get(f"dice_{_slug(n)}") is not None for n in class_names):
            per_class = {n: float(row[f"dice_{_slug(n)}"]) for n in class_names}
    return {
        "dice": min(1.0, max(0.0, float(row["dice_mean"]))),
        "hd95": as_float(row.get("hd95_mean")),
        "nsd": as_float(row.get("nsd_mean")),
        "dice_with_bg": as_float(row.get("dice_mean_bg")),
        "dice_per_class": per_class,
        "n_cases": int(row.get("n_cases") or 0),
    }


def norm_of(row: Mapping[str, Any]) -> str:
    """The norm of a row's budget: ``linf``/``l2`` for eps attacks, ``noise`` (sigma), ``frequency`` (VAFA's q_max)."""
    if row.get("norm"):
        return str(row["norm"])
    name = str(row.get("attack_name") or row.get("attack", ""))
    budget = str(row.get("budget", ""))
    if "attack.sigma" in row or name == "gn":
        return "noise"
    if "attack.q_max" in row or budget.startswith("q_max") or name.startswith("vafa"):
        return "frequency"
    if row.get("eps") is not None:
        return "l2" if "l2" in name else "linf"
    return _preset_norm(str(row.get("attack", "")))


def _preset_norm(preset: str) -> str:
    """Norm of a ``conf/attack`` preset read from its fields (rows of older evaluations carry only the name)."""
    from robustseg.config import CONF_DIR

    path = CONF_DIR / "attack" / f"{preset}.yaml"
    if not path.is_file():
        return "unknown"
    fields = OmegaConf.load(path)
    if "eps" in fields:
        return "l2" if "l2" in str(fields.get("name", preset)) else "linf"
    return "noise" if "sigma" in fields else "frequency" if "q_max" in fields else "unknown"


def _kind(row: Mapping[str, Any]) -> str:
    return "white-box" if row["source"] == row["target"] else "transfer"


def _counts(text: Any) -> dict[str, int]:
    """``"pgd@8/255: 2, fgsm@8/255: 1"`` -> ``{"pgd": 2, "fgsm": 1}`` (the budget is the threat model's)."""
    out: dict[str, int] = {}
    for name, count in _COUNT.findall(str(text or "")):
        attack = name.strip().rsplit("@", 1)[0]
        out[attack] = out.get(attack, 0) + int(count)
    return out


def threat_models(
    rows: Sequence[Mapping[str, Any]],
    target: str,
    class_names: Sequence[str] | None,
    records: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Every threat model ``target`` was evaluated under, from the summary rows (see the module docstring).

    ``records`` (the evaluation's per-case records, optional) give each threat model its crafting passes: the sum
    over the records of its source and budget, so a transfer volume crafted once counts once, for every target."""
    mine = [r for r in rows if r["target"] == target and r["attack"] != CLEAN and str(r["budget"]) != "all"]
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in mine:
        groups.setdefault((_kind(r), str(r["source"]), str(r["budget"])), []).append(r)
    out = []
    for (kind, source, budget), group in groups.items():
        attacks = [r for r in group if not str(r["attack"]).startswith(WORST)]
        attacks = [r for r in attacks if r.get("dice_mean") is not None]  # every case skipped by the cascade
        if not attacks:
            continue
        worst_row = next((r for r in group if r["attack"] == WORST), None)
        norm = norm_of(attacks[0])
        results = [{"attack": str(r["attack"]), "metrics": metrics_of(r, class_names)} for r in attacks]
        if worst_row is not None:
            counts = _counts(worst_row.get("worst_dice_attacks") or worst_row.get("worst_attacks"))
            reliable = any(str(r.get("group") or "") == RELIABLE_GROUP for r in attacks)
            worst = {
                "metrics": metrics_of(worst_row, class_names),
                "attacks": counts,
                "suite": "reliable" if reliable else "standard",
            }
            robust = worst["metrics"]["dice"]
            worst_attack = max(counts, key=lambda a: (counts[a], a)) if counts else "?"
        else:
            worst = None
            weakest = min(results, key=lambda a: a["metrics"]["dice"])
            robust, worst_attack = weakest["metrics"]["dice"], weakest["attack"]
        prefix = "white-box" if kind == "white-box" else f"transfer from {source}"
        out.append(
            {
                "id": f"{prefix} {norm} {budget}",
                "kind": kind,
                "source": None if kind == "white-box" else source,
                "norm": norm,
                "budget": budget,
                "eps": as_float(attacks[0].get("eps")),
                "attacks": results,
                "worst": worst,
                "robust_dice": robust,
                "worst_attack": worst_attack,
                **_passes(records, source, budget),
            }
        )
    return sorted(out, key=lambda t: (t["kind"] != "white-box", t["source"] or "", t["norm"], t["eps"] or 0.0))


def _passes(records: Sequence[Mapping[str, Any]], source: str, budget: str) -> dict[str, int | None]:
    """Crafting passes of one threat model (records of that source and budget), None without per-record costs."""
    parts = [r.get("cost") for r in records if str(r["source"]) == source and str(r["budget"]) == budget]
    if not parts or any(c is None for c in parts):
        return {"attack_forwards": None, "attack_backwards": None}
    return {k: sum(int(c.get(k, 0)) for c in parts) for k in ("attack_forwards", "attack_backwards")}
