"""SEA's ensemble scores over an attack suite: the worst case per case, the greedy per-case assignment that
minimises the pooled per-class Dice, and the cascade predicate.

Croce, Singh, Hein, "Towards Reliable Evaluation and Fast Training of Robust Semantic Segmentation Models" (ECCV
2024): per input, the worst case over the attacks; for a score pooled over inputs (their mIoU; here the
per-class Dice of voxel counts summed over cases) the attack of each input is chosen greedily, because the attack
that is worst for one input alone need not be the one that lowers the pooled score most.

Counts are per case, attack and class: ``counts[n, a] = (intersection, pred, label)`` voxel counts ``(3, K)`` of
class ``k`` (``|P_k & G_k|``, ``|P_k|``, ``|G_k|``), as the evaluator writes them in each record's
``dice_counts``. Class 0 (background) is never scored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

INTERSECTION, PRED, LABEL = 0, 1, 2


def _dice_from_totals(totals: np.ndarray) -> np.ndarray:
    """Per-class foreground Dice from summed counts ``(..., 3, K)`` -> ``(..., K - 1)``; 1 where a class is absent
    from both prediction and label (the per-case policy of ``evaluation.metrics``)."""
    inter = totals[..., INTERSECTION, 1:]
    denominator = totals[..., PRED, 1:] + totals[..., LABEL, 1:]
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, 2.0 * inter / safe, 1.0)


def pooled_dice(counts_selected: np.ndarray) -> float:
    """The pooled foreground per-class mean Dice of one attack choice per case.

    Args:
        counts_selected: ``(cases, 3, K)`` (intersection, pred, label) voxel counts per class of the chosen
            attack's result on each case.

    Returns:
        ``mean_{k=1..K-1} 2 sum_n I[n, k] / (sum_n P[n, k] + sum_n L[n, k])`` (a class with no predicted and no
        label voxel in any case counts 1).
    """
    counts = np.asarray(counts_selected, dtype=np.float64)
    if counts.ndim != 3 or counts.shape[1] != 3 or counts.shape[2] < 2:
        raise ValueError(f"pooled_dice: expected counts (cases, 3, K >= 2), got shape {counts.shape}")
    return float(_dice_from_totals(counts.sum(axis=0)).mean())


def greedy_assignment(
    counts: np.ndarray, rng_seed: int = 0, max_rounds: int = 1000, tol: float = 1e-6
) -> tuple[np.ndarray, float]:
    """SEA's greedy choice of one attack per case minimising the pooled foreground Dice.

    Starts with every case on the attack whose pooled Dice (all cases on it) is lowest (the first on ties). A
    round visits the cases in a random order (``numpy.random.default_rng(rng_seed)``, one permutation per round)
    and moves each case to the attack that gives the lowest pooled Dice with the other cases' choices fixed,
    when that lowers it by more than ``tol``. Stops after a round without a move, or after ``max_rounds``.

    Args:
        counts: ``(cases, attacks, 3, K)`` (intersection, pred, label) voxel counts per class.
        rng_seed: seed of the visiting order.
        max_rounds: at most this many rounds.
        tol: the least decrease of the pooled Dice that makes a move.

    Returns:
        The attack index per case ``(cases,)`` int64 and the pooled Dice of that choice (:func:`pooled_dice`).
        The pooled Dice is never above that of any single attack, nor (up to ``tol`` per move) above the one of
        the start.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 4 or counts.shape[2] != 3 or counts.shape[3] < 2 or 0 in counts.shape[:2]:
        raise ValueError(f"greedy_assignment: expected counts (cases, attacks >= 1, 3, K >= 2), got {counts.shape}")
    n_cases, n_attacks = counts.shape[:2]
    single = _dice_from_totals(counts.sum(axis=0)).mean(axis=-1)  # (attacks,): every case on one attack
    choice = np.full(n_cases, int(np.argmin(single)), dtype=np.int64)
    totals = counts[np.arange(n_cases), choice].sum(axis=0)  # (3, K)
    score = float(_dice_from_totals(totals).mean())
    rng = np.random.default_rng(rng_seed)
    for _ in range(max_rounds):
        moved = False
        for n in rng.permutation(n_cases):
            candidates = totals[None] - counts[n, choice[n]][None] + counts[n]  # (attacks, 3, K)
            scores = _dice_from_totals(candidates).mean(axis=-1)  # (attacks,)
            best = int(np.argmin(scores))
            if scores[best] < score - tol:
                totals, choice[n], score, moved = candidates[best], best, float(scores[best]), True
        if not moved:
            break
    return choice, pooled_dice(counts[np.arange(n_cases), choice])


def worst_per_case(dice: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The worst attack per case: the lowest per-case score.

    Args:
        dice: ``(cases, attacks)`` per-case foreground mean Dice; NaN where an attack has no result for a case
            (e.g. skipped by the cascade). A case needs at least one result.

    Returns:
        ``(index, value)``, each ``(cases,)``: the attack with the lowest Dice (the first on ties) and that Dice.
    """
    dice = np.asarray(dice, dtype=np.float64)
    if dice.ndim != 2 or np.isnan(dice).all(axis=1).any():
        raise ValueError(f"worst_per_case: expected (cases, attacks) with a result per case, got shape {dice.shape}")
    index = np.nanargmin(dice, axis=1)
    return index, dice[np.arange(dice.shape[0]), index]


def counts_table(
    records: Iterable[Mapping[str, Any]], attacks: Sequence[str]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Arrange records of one (source, target, budget) into :func:`greedy_assignment`'s table.

    Args:
        records: records with ``case_id``, ``attack``, ``dice_mean`` and ``dice_counts`` (``{"intersection": [K],
            "pred": [K], "label": [K]}``).
        attacks: the attack labels to use, in column order.

    Returns:
        ``case_ids`` (sorted), ``counts (cases, attacks, 3, K)`` and ``dice (cases, attacks)``. An attack without a
        result for a case (skipped by the cascade: the record has no ``dice_counts``) takes the result of the
        case's worst attack, which a cascade only skips after when it is at Dice 0; cases with no result are left
        out.
    """
    column = {a: j for j, a in enumerate(attacks)}
    by_case: dict[str, dict[int, Mapping[str, Any]]] = {}
    for record in records:
        if record.get("attack") in column and record.get("dice_counts") is not None:
            by_case.setdefault(str(record["case_id"]), {})[column[record["attack"]]] = record
    for row in by_case.values():
        worst = min(row.values(), key=lambda r: float(r["dice_mean"]))
        for j in range(len(attacks)):
            row.setdefault(j, worst)
    case_ids = sorted(by_case)
    counts = np.array(
        [
            [[by_case[c][j]["dice_counts"][k] for k in ("intersection", "pred", "label")] for j in range(len(attacks))]
            for c in case_ids
        ],
        dtype=np.float64,
    ).reshape(len(case_ids), len(attacks), 3, -1)  # (cases, attacks, 3, K)
    dice = np.array([[by_case[c][j]["dice_mean"] for j in range(len(attacks))] for c in case_ids], dtype=np.float64)
    return case_ids, counts, dice.reshape(len(case_ids), len(attacks))


def cascade_skip(previous_records: Iterable[Mapping[str, Any]], zero: float = 0.0) -> bool:
    """Whether a later member of a suite may skip a case: an earlier member already drove it to foreground Dice 0.

    Args:
        previous_records: the records of the earlier members of the same group for this case, source and budget
            (one per target scored; transfer scores one adversarial volume on several targets).
        zero: the Dice treated as zero.

    Returns:
        True iff, for every target among the records, some earlier member reached ``dice_mean <= zero``. Then
        the case's worst case over the group is already 0 and cannot go lower, so skipping never changes it (the
        skipped member has no result for the case: its own mean is over fewer cases, and :func:`counts_table`
        gives the greedy assignment the earlier member's counts in its place). Records without ``dice_mean``
        (themselves skipped) are ignored. False when there is no earlier result.
    """
    lowest: dict[str, float] = {}
    for record in previous_records:
        if record.get("dice_mean") is None:
            continue
        target = str(record.get("target", ""))
        lowest[target] = min(lowest.get(target, float("inf")), float(record["dice_mean"]))
    return bool(lowest) and all(value <= zero for value in lowest.values())


def cascade_predicate(case_id: str, spec: Any, records_so_far: Iterable[Mapping[str, Any]]) -> bool:
    """The Evaluator's ``skip(case_id, spec, records_so_far)`` hook: :func:`cascade_skip` for a cascading member.

    False unless ``spec.cascade`` and ``spec.group`` are set. The earlier members' records are those of this
    case, group and budget from the source now being attacked: the Evaluator runs the suite in order for one
    source after the other, so that source is the one whose group records do not yet include ``spec.label``
    (sources before it in the plan have all members; if no source qualifies, this is the group's first member).
    """
    if not getattr(spec, "cascade", False) or getattr(spec, "group", None) is None:
        return False
    mine = [
        r
        for r in records_so_far
        if r.get("group") == spec.group and r.get("budget") == spec.budget and str(r.get("case_id")) == str(case_id)
    ]
    done = {r.get("source") for r in mine if r.get("attack") == spec.label}
    current = {r.get("source") for r in mine} - done
    if len(current) != 1:
        return False
    (source,) = current
    return cascade_skip(r for r in mine if r.get("source") == source)


__all__ = ["cascade_predicate", "cascade_skip", "counts_table", "greedy_assignment", "pooled_dice", "worst_per_case"]
