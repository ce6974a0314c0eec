"""SEA's ensemble: pooled Dice, the greedy per-case assignment on a table with a known answer, the cascade."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from robustseg.evaluation.ensemble import (
    cascade_predicate,
    cascade_skip,
    counts_table,
    greedy_assignment,
    pooled_dice,
    worst_per_case,
)


def cell(inter, pred, label, k=2):
    """(3, K) counts with background zeros and the foreground values in class 1 (class 2 absent when K = 3)."""
    out = np.zeros((3, k))
    out[:, 1] = (inter, pred, label)
    return out


# case 0: both attacks reach Dice 0, but B also predicts 100 false-positive voxels (lower pooled Dice);
# cases 1, 2: A is much worse than B. Per-case worst: A, A, A (0.118); pooled optimum: B, A, A (0.030).
TABLE = np.array(
    [
        [cell(0, 0, 10), cell(0, 100, 10)],
        [cell(1, 2, 10), cell(10, 10, 10)],
        [cell(1, 2, 10), cell(10, 10, 10)],
    ]
)  # (cases, attacks, 3, K)


def plain_pooled(choice, table=TABLE):
    inter = sum(table[n, a][0][1] for n, a in enumerate(choice))
    pred = sum(table[n, a][1][1] for n, a in enumerate(choice))
    label = sum(table[n, a][2][1] for n, a in enumerate(choice))
    return 2 * inter / (pred + label)


def test_pooled_dice_hand():
    assert pooled_dice(TABLE[:, 0]) == pytest.approx(4 / 34)
    assert pooled_dice(TABLE[[0, 1, 2], [1, 0, 0]]) == pytest.approx(4 / 134)
    # a class absent from every prediction and label counts 1, as in the per-case metrics
    three = np.stack([cell(1, 2, 2, k=3), cell(0, 0, 2, k=3)])
    assert pooled_dice(three) == pytest.approx((2 * 1 / (2 + 4) + 1.0) / 2)


def test_greedy_finds_the_known_optimum():
    brute = min(itertools.product(range(2), repeat=3), key=plain_pooled)
    assert brute == (1, 0, 0)
    for seed in range(3):
        choice, score = greedy_assignment(TABLE, rng_seed=seed)
        assert tuple(choice) == brute
        assert score == pytest.approx(plain_pooled(brute))


def test_greedy_beats_the_per_case_worst():
    dice = np.array([[0.0, 0.0], [2 / 12, 1.0], [2 / 12, 1.0]])
    index, value = worst_per_case(dice)
    assert index.tolist() == [0, 0, 0] and value.tolist() == [0.0, 2 / 12, 2 / 12]
    assert greedy_assignment(TABLE)[1] < pooled_dice(TABLE[np.arange(3), index])


def test_greedy_random_tables_never_above_single_attacks():
    rng = np.random.default_rng(0)
    for _ in range(5):
        label = rng.integers(5, 50, size=(6, 1, 3))
        pred = rng.integers(0, 60, size=(6, 4, 3))
        inter = np.minimum(pred, label) * rng.random((6, 4, 3))
        counts = np.stack([inter, pred, np.broadcast_to(label, pred.shape)], axis=2).astype(float)  # (6, 4, 3, 3)
        choice, score = greedy_assignment(counts, rng_seed=1)
        assert score <= min(pooled_dice(counts[:, a]) for a in range(4)) + 1e-12
        best = min(itertools.product(range(4), repeat=6), key=lambda c: pooled_dice(counts[np.arange(6), c]))
        assert score <= pooled_dice(counts[np.arange(6), best]) + 0.05  # greedy: close to the brute-force optimum


def test_worst_per_case_skips_missing_results():
    index, value = worst_per_case(np.array([[0.4, np.nan, 0.2], [np.nan, 0.1, 0.1]]))
    assert index.tolist() == [2, 1] and value.tolist() == [0.2, 0.1]
    with pytest.raises(ValueError, match="result per case"):
        worst_per_case(np.array([[np.nan, np.nan]]))


def test_counts_table_from_records():
    def record(case, attack, dice, inter, pred, label):
        counts = {"intersection": inter, "pred": pred, "label": label}
        return {"case_id": case, "attack": attack, "dice_mean": dice, "dice_counts": counts}

    records = [
        record("b", "x", 0.5, [9, 1], [10, 2], [10, 2]),
        record("b", "y", 0.0, [8, 0], [12, 0], [10, 2]),
        record("a", "y", 1.0, [5, 5], [5, 5], [5, 5]),
    ]
    records.append({"case_id": "c", "attack": "x", "skipped": "cascade"})
    cases, counts, dice = counts_table(records, ["x", "y"])
    assert cases == ["a", "b"]  # case c has no result
    assert counts.shape == (2, 2, 3, 2) and counts[1, 1, 1].tolist() == [12, 0]
    assert dice.tolist() == [[1.0, 1.0], [0.5, 0.0]]  # a's missing x takes its only (worst) result
    assert counts[0, 0].tolist() == counts[0, 1].tolist()


def test_cascade_predicate_finds_the_current_source():
    from robustseg.evaluation.suite import AttackSpec

    def spec(label, cascade=True):
        return AttackSpec(label, "4/255", 4 / 255, {}, 4 / 255, "linf", "reliable", cascade)

    def rec(source, attack, dice, budget="4/255", group="reliable"):
        return {
            "case_id": "c1",
            "source": source,
            "target": source,
            "attack": attack,
            "budget": budget,
            "group": group,
            "dice_mean": dice,
        }

    # model u done with all three members (a reached 0); model v: member a at 0.2, member b at 0.0
    so_far = [rec("u", "a", 0.0), rec("u", "b", 0.1), rec("u", "c", 0.3), rec("v", "a", 0.2)]
    assert not cascade_predicate("c1", spec("b"), so_far)  # v still has Dice 0.2
    so_far.append(rec("v", "b", 0.0))
    assert cascade_predicate("c1", spec("c"), so_far)
    assert not cascade_predicate("c1", spec("c", cascade=False), so_far)
    assert not cascade_predicate("c1", spec("a"), [rec("u", "a", 0.0), rec("u", "b", 0.0), rec("u", "c", 0.0)])
    other = [rec("v", "a", 0.0, budget="8/255"), rec("v", "a", 0.0, group="papers"), {"attack": "clean"}]
    assert not cascade_predicate("c1", spec("b"), other)  # other budgets and groups do not count


def test_cascade_skip():
    assert not cascade_skip([])
    assert cascade_skip([{"target": "u", "dice_mean": 0.3}, {"target": "u", "dice_mean": 0.0}])
    assert not cascade_skip([{"target": "u", "dice_mean": 0.0}, {"target": "v", "dice_mean": 0.2}])
    assert not cascade_skip([{"target": "u", "dice_mean": 0.01}])
