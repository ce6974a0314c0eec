"""Summary rows, worst case per metric, threat model in every row and table, per-class columns, budget order."""

from __future__ import annotations

import csv
from collections import Counter

import pytest

from robustseg.evaluation import checks
from robustseg.evaluation.plots import budget_curves, plot_dice_vs_budget
from robustseg.evaluation.report import write_outputs
from robustseg.evaluation.summary import summarise
from robustseg.evaluation.tables import threat_text, whitebox_table

CLASSES = ["background", "liver", "tumour"]
PGD = {"name": "pgd", "eps": 8 / 255, "step_size": 0.01, "steps": 20, "random_start": True, "loss": "dice_ce"}
PGD |= {"targeted": False}
FGSM = {**PGD, "steps": 1, "random_start": False}
VAFA = {"name": "vafa", "q_max": 20, "steps": 20, "block_size": 32, "use_ssim": True, "init": "paper"}
CONTEXT = {"intensity": {"a_min": -175, "a_max": 250}, "modality": "ct", "seed": 7}
WINDOW = {"roi": [16, 16, 16], "overlap": 0.5, "blend_mode": "gaussian", "sigma_scale": 0.125}


def record(attack, budget, case, dice, hd95, nsd, eps=None, config=None, group=None, counts=None, **extra):
    """A per-case record as the Evaluator writes it (3 classes: per-class lists built from the means)."""
    return {
        "source": extra.pop("source", "unet"),
        "target": extra.pop("target", "unet"),
        "kind": "whitebox",
        "attack": attack,
        "budget": budget,
        "case_id": case,
        "eps": eps,
        "mode": "pipeline",
        "attack_config": config,
        "group": group,
        "window": WINDOW,
        "dice": [0.99, dice + 0.1, dice - 0.1],
        "dice_mean": dice,
        "hd95": [hd95 - 1, hd95 + 1],
        "hd95_mean": hd95,
        "nsd": [nsd + 0.05, nsd - 0.05],
        "nsd_mean": nsd,
        "hd95_empty_pred": extra.pop("empty_pred", 0),
        "hd95_empty_truth": extra.pop("empty_truth", 0),
        "nsd_tolerance_mm": 2.0,
        "dice_counts": counts,
        **extra,
    }


def clean(case, dice=0.9):
    return record("clean", "0", case, dice, 2.0, 0.95, eps=0.0, source="")


def test_worst_hd95_is_the_largest_hd95_not_the_one_dice_chose():
    """Issue 9's example: FGSM Dice 0.50 HD95 10 vs PGD Dice 0.55 HD95 80: worst HD95 is 80 (PGD)."""
    records = [
        clean("c0"),
        record("fgsm", "8/255", "c0", 0.50, 10.0, 0.60, eps=8 / 255, config=FGSM),
        record("pgd", "8/255", "c0", 0.55, 80.0, 0.70, eps=8 / 255, config=PGD),
    ]
    rows = summarise(records, CLASSES, CONTEXT)
    worst = [r for r in rows if r["attack"] == "worst" and r["budget"] == "8/255"]
    assert len(worst) == 1
    w = worst[0]
    assert w["dice_mean"] == pytest.approx(0.50) and w["worst_dice_attacks"] == "fgsm@8/255: 1"
    assert w["hd95_mean"] == pytest.approx(80.0) and w["worst_hd95_attacks"] == "pgd@8/255: 1"
    assert w["hd95_liver"] == pytest.approx(79.0) and w["hd95_tumour"] == pytest.approx(81.0)
    assert w["nsd_mean"] == pytest.approx(0.60) and w["worst_nsd_attacks"] == "fgsm@8/255: 1"
    assert "hd95* from the largest-HD95 attack" in w["selected_by"]


def test_worst_per_case_choices_differ_between_cases_and_per_group():
    """Two cases, two metrics: each case picks its own attack per metric; the group row covers its members only."""
    records = []
    for case, (f, p, a) in {"c0": ((0.5, 10), (0.3, 5), (0.6, 90)), "c1": ((0.2, 40), (0.6, 30), (0.7, 20))}.items():
        records += [clean(case)]
        records.append(record("fgsm", "8/255", case, f[0], f[1], 0.5, eps=8 / 255, config=FGSM, group="reliable"))
        records.append(record("pgd", "8/255", case, p[0], p[1], 0.5, eps=8 / 255, config=PGD, group="reliable"))
        records.append(record("apgd", "8/255", case, a[0], a[1], 0.5, eps=8 / 255, config=PGD))
    rows = summarise(records, CLASSES, CONTEXT)
    suite = next(r for r in rows if r["attack"] == "worst" and r["budget"] == "8/255")
    assert suite["dice_mean"] == pytest.approx((0.3 + 0.2) / 2)  # c0: pgd, c1: fgsm
    assert suite["hd95_mean"] == pytest.approx((90 + 40) / 2)  # c0: apgd, c1: fgsm
    assert suite["worst_hd95_attacks"] == "apgd@8/255: 1, fgsm@8/255: 1"
    group = next(r for r in rows if r["attack"] == "worst[reliable]" and r["budget"] == "8/255")
    assert group["group"] == "reliable" and group["hd95_mean"] == pytest.approx((10 + 40) / 2)
    assert group["attack_name"] == "fgsm@8/255, pgd@8/255"


def _pooled_fg(counts):
    """Plain reference: per-class pooled Dice of summed (intersection, pred, label) dicts, foreground mean."""
    k = len(counts[0]["intersection"])
    dice = []
    for j in range(1, k):
        inter = sum(c["intersection"][j] for c in counts)
        denom = sum(c["pred"][j] + c["label"][j] for c in counts)
        dice.append(1.0 if denom == 0 else 2 * inter / denom)
    return dice


def test_sea_pooled_dice_of_a_group_is_the_best_assignment():
    """Two cases x two attacks: SEA's greedy choice equals the brute-force minimum of the pooled foreground Dice."""

    def counts(i1, p1, g1, i2=0, p2=0, g2=0):
        return {"intersection": [90, i1, i2], "pred": [100, p1, p2], "label": [100, g1, g2]}

    table = {
        ("c0", "fgsm"): counts(5, 10, 10, 3, 4, 4),
        ("c0", "pgd"): counts(1, 10, 10, 4, 4, 4),
        ("c1", "fgsm"): counts(2, 4, 6, 0, 1, 0),
        ("c1", "pgd"): counts(3, 4, 6, 0, 0, 0),
    }
    records = [
        record(a, "8/255", c, 0.5 if a == "fgsm" else 0.6, 1, 0.5, eps=1.0, config=PGD, group="sea", counts=n)
        for (c, a), n in table.items()
    ]
    rows = summarise(records, CLASSES, CONTEXT)
    row = next(r for r in rows if r["attack"] == "worst[sea]" and r["budget"] == "8/255")
    options = {
        (a0, a1): _pooled_fg([table[("c0", a0)], table[("c1", a1)]]) for a0 in ("fgsm", "pgd") for a1 in ("fgsm", "pgd")
    }
    best = min(options, key=lambda k: sum(options[k]) / 2)
    assert row["sea_pooled_dice_mean"] == pytest.approx(sum(options[best]) / 2)
    assert [row["sea_pooled_dice_liver"], row["sea_pooled_dice_tumour"]] == pytest.approx(options[best])
    assert row["sea_attacks"] == ", ".join(f"{a}@8/255: {n}" for a, n in sorted(Counter(best).items()))
    pgd = next(r for r in rows if r["attack"] == "pgd")
    assert pgd["pooled_dice_liver"] == pytest.approx(2 * 4 / 30)  # plain pooled Dice of one attack's counts


def test_sea_takes_a_cascade_skipped_result_as_the_cases_worst(tmp_path):
    """A member the cascade skipped (no metrics, no counts) stands for the case's lowest-Dice result."""
    broken = {"intersection": [90, 0], "pred": [100, 0], "label": [100, 10]}
    fine = {"intersection": [90, 9], "pred": [100, 10], "label": [100, 10]}
    records = [
        record("fgsm", "8/255", "c0", 0.0, 1, 0.5, eps=1.0, config=FGSM, group="g", counts=broken),
        record("pgd", "8/255", "c0", 0.9, 1, 0.5, eps=1.0, config=PGD, group="g", counts=fine),
        {**record("apgd", "8/255", "c0", 0.0, 1, 0.5, eps=1.0, config=PGD, group="g"), "skipped": "cascade"},
    ]
    for r in records:  # two classes
        r["dice"], r["hd95"], r["nsd"] = r["dice"][:2], r["hd95"][:1], r["nsd"][:1]
    records[2] = {k: v for k, v in records[2].items() if k not in ("dice_mean", "hd95_mean", "nsd_mean", "dice")}
    rows = summarise(records, ["background", "liver"], CONTEXT)
    row = next(r for r in rows if r["attack"] == "worst[g]" and r["budget"] == "8/255")
    assert row["sea_pooled_dice_mean"] == 0.0 and row["sea_attacks"] == "fgsm@8/255: 1"
    assert row["worst_dice_attacks"] == "fgsm@8/255: 1"
    apgd = next(r for r in rows if r["attack"] == "apgd")
    assert apgd["n_skipped"] == 1 and apgd["n_cases"] == 0 and apgd["dice_mean"] is None
    flags = [f.to_dict() for f in checks.result_flags(rows, records)]  # a row without metrics breaks nothing
    report = write_outputs(tmp_path, rows, flags, {}, {}, ["background", "liver"])["report"].read_text()
    assert "| apgd | 8/255 | 0 | 1 | - |" in report  # no case scored, one skipped, no Dice


def test_every_row_carries_its_threat_model():
    records = [
        clean("c0"),
        record("pgd", "8/255", "c0", 0.5, 10, 0.6, eps=8 / 255, config=PGD),
        record("vafa", "q_max=20", "c0", 0.7, 10, 0.6, config=VAFA),
    ]
    rows = {r["attack"]: r for r in summarise(records, CLASSES, CONTEXT)}
    pgd, vafa = rows["pgd"], rows["vafa"]
    assert pgd["attack_name"] == "pgd" and pgd["attack.steps"] == 20 and pgd["attack.step_size"] == 0.01
    assert pgd["attack.random_start"] is True and pgd["attack.loss"] == "dice_ce" and pgd["attack.targeted"] is False
    assert pgd["budget_value"] == pytest.approx(8 / 255) and pgd["budget_hu"] == pytest.approx(8 / 255 * 425)
    assert pgd["mode"] == "pipeline" and pgd["seed"] == 7 and pgd["sw.overlap"] == 0.5
    assert pgd["intensity.a_min"] == -175 and pgd["sw.sigma_scale"] == 0.125
    assert vafa["budget_value"] == 20 and vafa["budget_hu"] is None
    assert vafa["attack.block_size"] == 32 and vafa["attack.init"] == "paper" and vafa["attack.use_ssim"] is True
    text = threat_text(pgd)
    for part in ("steps=20", "step_size=0.01", "random_start=True", "loss=dice_ce", "targeted=False", "13.3 HU"):
        assert part in text
    assert "mode pipeline" in text and "seed 7" in text and "overlap=0.5" in text
    assert "block_size=32" in threat_text(vafa) and "init=paper" in threat_text(vafa)


def test_csv_per_class_columns_and_hd95_empty_both_directions(tmp_path):
    records = [
        clean("c0"),
        clean("c1"),
        record("pgd", "8/255", "c0", 0.4, 10, 0.6, eps=8 / 255, config=PGD, empty_pred=1),
        record("pgd", "8/255", "c1", 0.6, 30, 0.8, eps=8 / 255, config=PGD, empty_truth=2),
    ]
    paths = write_outputs(tmp_path, summarise(records, CLASSES, CONTEXT), [], {}, {}, CLASSES)
    rows = {r["attack"]: r for r in csv.DictReader(paths["csv"].open())}
    pgd = rows["pgd"]
    assert float(pgd["dice_liver"]) == pytest.approx(0.6) and float(pgd["dice_tumour"]) == pytest.approx(0.4)
    assert float(pgd["dice_background"]) == pytest.approx(0.99)
    assert float(pgd["hd95_liver"]) == pytest.approx(19.0) and float(pgd["hd95_tumour"]) == pytest.approx(21.0)
    assert float(pgd["nsd_liver"]) == pytest.approx(0.75) and float(pgd["nsd_tumour"]) == pytest.approx(0.65)
    assert pgd["hd95_empty_pred"] == "1" and pgd["hd95_empty_truth"] == "2"
    assert pgd["attack.steps"] == "20" and pgd["budget_hu"].startswith("13.3")
    report = paths["report"].read_text()
    assert "## Per class" in report and "| liver | tumour |" in report.replace("background | ", "")
    assert "NSD (surface Dice) tolerance: 2.0 mm" in report and "hd95_empty_truth" in report


def test_columns_and_rows_are_sorted_by_budget_value_not_text(tmp_path):
    records = [clean("c0")]
    for budget, eps, dice in (("16/255", 16 / 255, 0.2), ("2/255", 2 / 255, 0.8), ("8/255", 8 / 255, 0.5)):
        records.append(record("pgd", budget, "c0", dice, 10, 0.5, eps=eps, config={**PGD, "eps": eps}))
    rows = summarise(records, CLASSES, CONTEXT)
    assert [r["budget"] for r in rows if r["attack"] == "pgd"] == ["2/255", "8/255", "16/255"]
    header = whitebox_table(rows).splitlines()[0]
    assert header.index("pgd@2/255") < header.index("pgd@8/255") < header.index("pgd@16/255")
    paths = write_outputs(tmp_path, rows, [], {}, {}, CLASSES)
    assert [r["budget"] for r in csv.DictReader(paths["csv"].open()) if r["attack"] == "pgd"] == [
        "2/255",
        "8/255",
        "16/255",
    ]


def test_report_shows_worst_table_flags_not_checked_and_figure_paths(tmp_path):
    records = [
        clean("c0"),
        record("fgsm", "8/255", "c0", 0.50, 10.0, 0.60, eps=8 / 255, config=FGSM),
        record("pgd", "8/255", "c0", 0.55, 80.0, 0.70, eps=8 / 255, config=PGD),
    ]
    (tmp_path / "montages").mkdir()
    (tmp_path / "montages" / "m.png").write_bytes(b"png")
    flags = [{"name": "transfer_vs_whitebox", "raised": False, "detail": "not checked: why", "checked": False}]
    paths = write_outputs(tmp_path, summarise(records, CLASSES, CONTEXT), flags, {}, {}, CLASSES)
    report = paths["report"].read_text()
    assert "*not checked* `transfer_vs_whitebox`: not checked: why" in report and "1 not checked" in report
    worst_line = next(line for line in report.splitlines() if line.startswith("| unet | unet | worst | 8/255"))
    assert "fgsm@8/255: 1" in worst_line and "80.00 | pgd@8/255: 1" in worst_line
    assert "![m](montages/m.png)" in report


def test_dice_vs_budget_has_vafa_on_its_q_max_axis(tmp_path):
    records = [clean("c0")]
    for budget, q, dice in (("q_max=30", 30, 0.3), ("q_max=10", 10, 0.6)):
        records.append(record("vafa", budget, "c0", dice, 10, 0.5, config={**VAFA, "q_max": q}))
    records.append(record("pgd", "8/255", "c0", 0.4, 10, 0.5, eps=8 / 255, config=PGD))
    curves = budget_curves(summarise(records, CLASSES, CONTEXT))
    assert curves[("q_max", "unet")][("unet", "vafa")] == [(0.0, 0.9), (10.0, 0.6), (30.0, 0.3)]
    assert curves[("eps", "unet")][("unet", "pgd")] == [(0.0, 0.9), (pytest.approx(8 / 255), 0.4)]
    assert plot_dice_vs_budget(summarise(records, CLASSES, CONTEXT), tmp_path / "p.png").stat().st_size > 0
