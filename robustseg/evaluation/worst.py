"""Worst case over an attack suite, per metric (AutoAttack's point-wise rule; Croce and Hein, ICML 2020).

For every (source, target) pair and every budget (each budget with at least two attacks, and ``all`` budgets
together), each case takes, independently per metric, the attack with the lowest Dice, the one with the largest
HD95 and the one with the smallest NSD. A row therefore never copies the HD95 of the attack that Dice chose: its
``dice*`` / flip / perturbation columns come from the Dice choice, ``hd95*`` columns (incl. ``hd95_empty_*``)
from the HD95 choice, ``nsd*`` columns from the NSD choice, and ``worst_<metric>_attacks`` counts which attack
won how many cases for each metric (``selected_by`` says so in words). A case counts only when every attack of
the scope has a record for it.

Scopes: ``worst`` is the whole suite; ``worst[<group>]`` is an attack group with at least two members (records'
``group``, e.g. the ``reliable`` suite). For every worst row whose records carry voxel counts, the pooled
per-class Dice under SEA's greedy per-case assignment (Croce et al., ECCV 2024; see ``RELIABLE_EVAL.md``) is
added: ``sea_pooled_dice_mean`` and ``sea_pooled_dice_<class>``, with ``sea_attacks`` the chosen attacks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from robustseg.evaluation.summary import (
    CLEAN,
    WORST,
    aggregate,
    budget_sort_key,
    class_slug,
    make_row,
    names_of,
    pooled_dice,
)

SELECTED_BY = (
    "per case: dice*/flip/perturbation columns from the lowest-Dice attack, hd95* from the largest-HD95 attack, "
    "nsd* from the smallest-NSD attack"
)
# (metric, choose the worst of a case's records, column prefixes taken from that choice)
CHOICES: tuple[tuple[str, Callable, tuple[str, ...]], ...] = (
    ("hd95", max, ("hd95_",)),
    ("nsd", min, ("nsd_",)),
)


def _label(r: Mapping[str, Any]) -> str:
    return f"{r['attack']}@{r['budget']}"


def _counts(chosen: Iterable[Mapping[str, Any]]) -> str:
    tally: dict[str, int] = defaultdict(int)
    for r in chosen:
        tally[_label(r)] += 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(tally.items()))


def _metric(r: Mapping[str, Any], name: str, worst: Callable) -> float:
    value = r.get(f"{name}_mean")
    if value is None:  # a record without the metric never wins
        return float("-inf") if worst is max else float("inf")
    return float(value)


def _scopes(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[Mapping[str, Any]]]]:
    """(worst-row attack label, member records): the whole suite, then each group of >= 2 attack presets."""
    scopes = [(WORST, list(records))]
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("group"):
            groups[str(r["group"])].append(r)
    for name, members in sorted(groups.items()):
        if len({r["attack"] for r in members}) >= 2:
            scopes.append((f"{WORST}[{name}]", members))
    return scopes


def worst_rows(
    records: Iterable[Mapping[str, Any]],
    class_names: Sequence[str] | None = None,
    context: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Worst-case rows of every (source, target) pair, scope and budget; see the module docstring."""
    by_pair: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        if r["attack"] != CLEAN and not str(r["attack"]).startswith(WORST):
            by_pair[(r["source"], r["target"])].append(r)
    rows = []
    for _pair, pair_records in sorted(by_pair.items()):
        for label, scope in _scopes(pair_records):
            budgets = sorted({r["budget"] for r in scope}, key=lambda b: _budget_key(scope, b))
            for budget in [*budgets, "all"]:
                members = [r for r in scope if budget == "all" or r["budget"] == budget]
                row = _worst_row(members, label, budget, class_names, context)
                if row is not None:
                    rows.append(row)
    return rows


def _budget_key(records: Sequence[Mapping[str, Any]], budget: str) -> tuple:
    return budget_sort_key(next(r for r in records if r["budget"] == budget))


def _worst_row(
    members: Sequence[Mapping[str, Any]],
    label: str,
    budget: str,
    class_names: Sequence[str] | None,
    context: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    attacks = sorted({_label(r) for r in members})
    if len(attacks) < 2:
        return None  # a single attack: its own row already is the worst case
    per_case: dict[str, dict[str, Mapping[str, Any]]] = defaultdict(dict)
    for r in members:
        per_case[str(r["case_id"])][_label(r)] = r
    complete = {c: [rs[a] for a in attacks] for c, rs in sorted(per_case.items()) if sorted(rs) == attacks}
    if not complete:
        return None
    by_dice = [min(rs, key=lambda r: _metric(r, "dice", min)) for rs in complete.values()]
    single = budget != "all"
    first = by_dice[0]
    row = make_row(by_dice, class_names, context, attack=label, budget=budget)
    row |= {"eps": first.get("eps") if single else None, "budget_value": row["budget_value"] if single else None}
    row["budget_hu"] = row["budget_hu"] if single else None
    row |= {k: None for k in row if k.startswith("attack.")} | {"attack_name": ", ".join(attacks)}
    row |= {"kind": first.get("kind", ""), "group": label[len(WORST) + 1 : -1] if "[" in label else ""}
    row |= {"selected_by": SELECTED_BY, "worst_dice_attacks": _counts(by_dice)}
    for metric, pick, prefixes in CHOICES:
        chosen = [pick(rs, key=lambda r, m=metric, p=pick: _metric(r, m, p)) for rs in complete.values()]
        part = aggregate(chosen, class_names)
        row |= {k: v for k, v in part.items() if k.startswith(prefixes)}
        row[f"worst_{metric}_attacks"] = _counts(chosen)
    row |= _sea(list(complete.values()), attacks, class_names)
    return row


def _sea(
    per_case: Sequence[Sequence[Mapping[str, Any]]], attacks: Sequence[str], class_names: Sequence[str] | None
) -> dict[str, Any]:
    """Pooled per-class Dice under SEA's greedy assignment (``ensemble.greedy_assignment``).

    ``per_case[i][j]`` is case i's record of ``attacks[j]``. A record a cascade skipped (no ``dice_counts``)
    stands for the case's lowest-Dice result (``ensemble.counts_table``), and is reported as that attack.
    Empty when a case has no counts at all (records written before counts were recorded).
    """
    if any(all(r.get("dice_counts") is None for r in rs) for rs in per_case):
        return {}
    from robustseg.evaluation.ensemble import counts_table, greedy_assignment

    relabelled = [{**r, "attack": _label(r)} for rs in per_case for r in rs]
    case_ids, counts, _ = counts_table(relabelled, list(attacks))  # counts: (cases, attacks, 3, K)
    choice, pooled_fg = greedy_assignment(counts)
    by_case = {str(rs[0]["case_id"]): rs for rs in per_case}
    chosen = []
    for case_id, j in zip(case_ids, choice):
        record = by_case[case_id][int(j)]
        if record.get("dice_counts") is None:  # skipped: the counts used are the case's lowest-Dice result
            record = min(
                (r for r in by_case[case_id] if r.get("dice_counts") is not None), key=lambda r: r["dice_mean"]
            )
        chosen.append(record)
    pooled = pooled_dice([r["dice_counts"] for r in chosen])
    names = names_of(chosen, class_names)
    out: dict[str, Any] = {f"sea_pooled_dice_{class_slug(n)}": v for n, v in zip(names[1:], pooled[1:])}
    out["sea_pooled_dice_mean"] = float(pooled_fg)
    out["sea_attacks"] = _counts(chosen)
    return out
