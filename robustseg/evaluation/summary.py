"""Per-case records -> summary rows: one per (source, target, attack, budget), clean and worst-case rows included.

Every row carries its full threat model (issue 9): the attack's registered name and every field of its resolved
config (``attack.steps``, ``attack.step_size``, ``attack.random_start``, ``attack.loss``, ``attack.targeted``,
VAFA's ``attack.block_size`` / ``attack.q_max`` / ``attack.init`` / ``attack.use_ssim``, ...), the budget as text,
as a number (``budget_value``: eps in [0, 1] or VAFA's q_max) and in HU where the CT intensity window is known
(``budget_hu``), the threat model ``mode``, the sliding-window settings (``sw.*``), the intensity window
(``intensity.*``) and the seed. Per-class columns are named ``dice_<class>`` (background included),
``hd95_<class>`` and ``nsd_<class>`` (foreground classes), means over the cases; ``pooled_dice_<class>`` is
Dice from the voxel counts summed over the cases where records carry them.

Worst-case rows (``attack=worst``, and ``worst[<group>]`` per attack group) are built by :mod:`.worst`. Records
that a cascade skipped (``skipped``: the case was already broken by an earlier attack) have no metrics: they are
left out of their attack's means (counted in ``n_skipped``) and never chosen as a worst case.
Rows are sorted by budget value, never by budget text (``16/255`` after ``8/255``).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CLEAN = "clean"
WORST = "worst"
MEAN_FIELDS = ("dice_mean", "dice_mean_bg", "hd95_mean", "nsd_mean", "flip_rate", "l2", "ssim", "psnr")
# nested record fields flattened into threat-model columns: record key -> column prefix
THREAT_SECTIONS = {"attack_config": "attack.", "window": "sw.", "intensity": "intensity."}
CSV_FIELDS = (
    "source",
    "target",
    "kind",
    "attack",
    "group",
    "attack_name",
    "budget",
    "budget_value",
    "eps",
    "budget_hu",
    "mode",
    "seed",
    "n_cases",
    "n_skipped",
    "dice_mean",
    "dice_mean_bg",
    "pooled_dice_mean",
    "hd95_mean",
    "hd95_empty_pred",
    "hd95_empty_truth",
    "nsd_mean",
    "nsd_tolerance_mm",
    "flip_rate",
    "linf_max",
    "l2",
    "ssim",
    "psnr",
    "budget_ok",
    "selected_by",
    "worst_dice_attacks",
    "worst_hd95_attacks",
    "worst_nsd_attacks",
    "sea_pooled_dice_mean",
    "sea_attacks",
)
_Q_MAX = re.compile(r"^q_max=([-+0-9.eE]+)$")


def class_slug(name: str) -> str:
    """A column-safe class name: ``"Left kidney"`` -> ``left_kidney``."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_") or "class"


def class_columns(class_names: Sequence[str]) -> list[str]:
    """``dice_<c>`` for every class, then ``hd95_<c>``, ``nsd_<c>``, ``pooled_dice_<c>`` for the foreground."""
    slugs = [class_slug(c) for c in class_names]
    fg = slugs[1:]
    return [f"dice_{c}" for c in slugs] + [f"{m}_{c}" for m in ("hd95", "nsd", "pooled_dice") for c in fg]


def budget_value(row: Mapping[str, Any]) -> float | None:
    """The budget as a number: ``budget_value``, else ``eps``, else the ``q_max=`` of the text; None if none."""
    for key in ("budget_value", "eps"):
        if row.get(key) is not None:
            return float(row[key])
    match = _Q_MAX.match(str(row.get("budget", "")))
    return float(match[1]) if match else None


def budget_sort_key(row: Mapping[str, Any]) -> tuple:
    """Sort budgets by value (``all``/unknown last, text as a tie-break): 2/255 < 8/255 < 16/255 < all."""
    value = budget_value(row)
    return (value is None, value if value is not None else 0.0, str(row.get("budget", "")))


def _mean(values: Iterable[Any]) -> float | None:
    """Mean of the finite numbers; ``inf`` when all are +inf (identical volumes' PSNR); None when empty."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else values[0]


def _flat(section: Mapping[str, Any] | None, prefix: str) -> dict[str, Any]:
    """A nested dict as prefixed columns; lists and dicts become compact text so a column keeps one type."""
    out = {}
    for key, value in (section or {}).items():
        if isinstance(value, (list, tuple, dict)):
            value = str(list(value) if isinstance(value, tuple) else value)
        out[f"{prefix}{key}"] = value
    return out


def threat_model(first: Mapping[str, Any], context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The threat-model columns of a row from its first record (every record of a row shares them).

    Args:
        first: a per-case record.
        context: run-level fallbacks for fields a record lacks: ``intensity`` ({a_min, a_max}), ``modality``,
            ``window`` (sliding-window settings), ``seed``.
    """
    context = context or {}
    config = first.get("attack_config") or {}
    row: dict[str, Any] = {
        "group": first.get("group") or "",
        "attack_name": config.get("name", ""),
        "mode": first.get("mode", ""),
        "seed": first.get("run_seed", context.get("seed")),
    }
    for key, prefix in THREAT_SECTIONS.items():
        row |= _flat(first.get(key) if first.get(key) is not None else context.get(key), prefix)
    row.pop("attack.name", None)
    value = budget_value(first)
    row["budget_value"] = value
    intensity = first.get("intensity") or context.get("intensity") or {}
    modality = first.get("modality") or context.get("modality")
    ct = modality is None or str(modality).lower().startswith("ct")  # ct, ct_pet: the window is in HU
    is_eps = first.get("eps") is not None and first.get("attack") != CLEAN
    if is_eps and ct and {"a_min", "a_max"} <= set(intensity):
        row["budget_hu"] = float(first["eps"]) * (float(intensity["a_max"]) - float(intensity["a_min"]))
    else:
        row["budget_hu"] = None
    return row


def pooled_dice(counts: Sequence[Mapping[str, Sequence[int]]]) -> list[float] | None:
    """Per-class Dice of voxel counts summed over cases (both empty = 1); None without counts."""
    if not counts or any(c is None for c in counts):
        return None
    k = len(counts[0]["intersection"])
    inter = [sum(c["intersection"][j] for c in counts) for j in range(k)]
    denom = [sum(c["pred"][j] + c["label"][j] for c in counts) for j in range(k)]
    return [1.0 if d == 0 else 2.0 * i / d for i, d in zip(inter, denom)]


def aggregate(group: Sequence[Mapping[str, Any]], class_names: Sequence[str] | None) -> dict[str, Any]:
    """Metric columns of a set of per-case records: means, counts, per-class columns and the budget audit."""
    row: dict[str, Any] = {"n_cases": len(group)}
    for name in MEAN_FIELDS:
        row[name] = _mean(r.get(name) for r in group)
    row["hd95_empty_pred"] = sum(int(r.get("hd95_empty_pred", 0)) for r in group)
    row["hd95_empty_truth"] = sum(int(r.get("hd95_empty_truth", 0)) for r in group)
    tolerances = sorted({float(r["nsd_tolerance_mm"]) for r in group if r.get("nsd_tolerance_mm") is not None})
    row["nsd_tolerance_mm"] = tolerances[0] if len(tolerances) == 1 else (str(tolerances) if tolerances else None)
    linf = [r["linf"] for r in group if r.get("linf") is not None]
    row["linf_max"] = max(linf) if linf else None
    audited = [r["budget_ok"] for r in group if r.get("budget_ok") is not None]
    row["budget_ok"] = all(audited) if audited else None
    names = names_of(group, class_names)
    slugs = [class_slug(c) for c in names]
    for metric, offset in (("dice", 0), ("hd95", 1), ("nsd", 1)):
        per_case = [r[metric] for r in group if r.get(metric)]
        if per_case:
            for j, column in enumerate(zip(*per_case)):
                row[f"{metric}_{slugs[j + offset]}"] = _mean(column)
    pooled = pooled_dice([r.get("dice_counts") for r in group])
    if pooled is not None:
        for j, value in enumerate(pooled[1:], start=1):
            row[f"pooled_dice_{slugs[j]}"] = value
        row["pooled_dice_mean"] = sum(pooled[1:]) / max(1, len(pooled) - 1)
    else:
        row["pooled_dice_mean"] = None
    bands = defaultdict(list)
    for r in group:
        for band, value in (r.get("freq_dice") or {}).items():
            bands[band].append(value)
    if bands:
        row["freq_dice"] = {band: _mean(values) for band, values in bands.items()}
    return row


def names_of(group: Sequence[Mapping[str, Any]], class_names: Sequence[str] | None) -> list[str]:
    """The class names of the records (background first): ``class_names`` when it fits, else generic names."""
    k = max((len(r["dice"]) for r in group if r.get("dice")), default=len(class_names or []))
    names = list(class_names or group[0].get("class_names") or [])
    if len(names) != k:
        names = ["background", *[f"class{j}" for j in range(1, k)]]
    return names


def make_row(
    group: Sequence[Mapping[str, Any]],
    class_names: Sequence[str] | None = None,
    context: Mapping[str, Any] | None = None,
    **fixed: Any,
) -> dict[str, Any]:
    """One summary row of the records of one (source, target, attack, budget)."""
    first = group[0]
    row: dict[str, Any] = {
        "source": first["source"],
        "target": first["target"],
        "kind": first.get("kind", ""),
        "attack": first["attack"],
        "budget": first["budget"],
        "eps": first.get("eps"),
    }
    row |= threat_model(first, context)
    row |= aggregate(group, class_names)
    row.update(fixed)
    return row


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(target, source, clean first, attacks, worst rows last, budget by value)."""

    def key(r: Mapping[str, Any]) -> tuple:
        attack = str(r["attack"])
        order = 0 if attack == CLEAN else 2 if attack.startswith(WORST) else 1
        return (r["target"], r["source"], order, attack, budget_sort_key(r))

    return sorted(rows, key=key)


def summarise(
    records: Iterable[Mapping[str, Any]],
    class_names: Sequence[str] | None = None,
    context: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Summary rows of exactly ``records`` (this run's), plus the worst-case rows, sorted (:func:`sort_rows`).

    Args:
        records: per-case records of one run.
        class_names: the data's class names (background first) for the per-class columns.
        context: run-level settings used where a record lacks them (see :func:`threat_model`).
    """
    from robustseg.evaluation.worst import worst_rows

    records = list(records)
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    skipped: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        key = (r["source"], r["target"], r["attack"], r["budget"])
        if r.get("skipped"):  # a cascade skipped this attack on this case (already broken): no metrics
            skipped[key].append(r)
        else:
            groups[key].append(r)
    rows = []
    for key in dict.fromkeys([*groups, *skipped]):
        members = groups.get(key, [])
        row = make_row(members or skipped[key], class_names, context, n_skipped=len(skipped.get(key, [])))
        row["n_cases"] = len(members)
        rows.append(row)
    rows += worst_rows(records, class_names, context)
    return sort_rows(rows)
