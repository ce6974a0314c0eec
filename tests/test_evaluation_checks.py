"""Sanity flags raise on constructed bad cases; summary worst-case rows; DCT band filter; report outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustseg.evaluation import checks
from robustseg.evaluation.frequency import band_filter, dct_volume, idct_volume
from robustseg.evaluation.report import wandb_payload, write_outputs
from robustseg.evaluation.store import AdversarialStore
from robustseg.evaluation.summary import summarise


def _row(source, target, attack, budget, eps, dice):
    return {"source": source, "target": target, "attack": attack, "budget": budget, "eps": eps, "dice_mean": dice}


def test_eps_zero_flag():
    x = torch.rand(1, 4, 4, 4)
    p = torch.zeros(4, 4, 4, dtype=torch.long)
    assert not checks.check_eps_zero("pgd", x, x.clone(), p, p.clone()).raised
    assert checks.check_eps_zero("pgd", x, x + 1e-7, p, p).raised


def test_monotonic_flag():
    good = [_row("a", "a", "pgd", "4/255", 4 / 255, 0.6), _row("a", "a", "pgd", "8/255", 8 / 255, 0.5)]
    bad = [_row("a", "a", "pgd", "4/255", 4 / 255, 0.5), _row("a", "a", "pgd", "8/255", 8 / 255, 0.6)]
    assert not checks.check_monotonic(good)[0].raised
    assert checks.check_monotonic(bad)[0].raised
    above_clean = [_row("", "a", "clean", "0", 0.0, 0.5), _row("a", "a", "pgd", "4/255", 4 / 255, 0.6)]
    flags = checks.check_monotonic(above_clean)
    assert len(flags) == 1 and flags[0].raised  # an attack must not score above the clean volume


def test_gradient_flags():
    zero, nan = checks.input_gradient_fractions(lambda x: (x * 0).sum(), torch.rand(1, 1, 4, 4, 4))
    assert zero == 1.0 and checks.check_gradients("m", zero, nan).raised
    zero, nan = checks.input_gradient_fractions(lambda x: (x**2).sum(), torch.rand(1, 1, 4, 4, 4) + 0.1)
    assert zero == 0.0 and not checks.check_gradients("m", zero, nan).raised
    assert checks.check_gradients("m", 0.0, 0.01).raised


def test_transfer_and_noise_stronger_than_whitebox_flag():
    rows = [
        _row("a", "a", "pgd", "8/255", 8 / 255, 0.40),
        _row("b", "a", "pgd", "8/255", 8 / 255, 0.20),  # transfer beats white-box: masking?
        _row("a", "a", "gn", "8/255", 8 / 255, 0.30),  # noise beats white-box
    ]
    flags = checks.check_transfer_vs_whitebox(rows)
    assert len(flags) == 2 and all(f.raised for f in flags)
    rows[1]["dice_mean"] = rows[2]["dice_mean"] = 0.5
    assert not any(f.raised for f in checks.check_transfer_vs_whitebox(rows))


def test_budget_audit():
    x = torch.full((1, 4, 4, 4), 0.5)
    assert checks.audit_volume(x, x + 8 / 255, 8 / 255, "linf")[0]
    assert not checks.audit_volume(x, x + 9 / 255, 8 / 255, "linf")[0]
    assert not checks.audit_volume(x, x * 3, None, None)[0]  # out of [0, 1]
    assert not checks.audit_volume(x, x * float("nan"), None, None)[0]
    assert checks.audit_volume(x, x + 0.01, 0.1, "l2")[0]  # L2 = 0.01 * sqrt(64) = 0.08
    assert not checks.audit_volume(x, x + 0.01, 0.05, "l2")[0]
    records = [
        {
            "source": "a",
            "attack": "pgd",
            "budget": "8/255",
            "case_id": "c",
            "budget_ok": False,
            "budget_detail": "linf 0.04 > eps 0.03",
        }
    ]
    assert checks.check_budget(records).raised


def test_store_audit_and_determinism(tmp_path):
    store = AdversarialStore(tmp_path)
    store.get_or_create(("a", "pgd", "1", "c"), {"source": "a"}, np.eye(4), lambda: torch.rand(1, 3, 3, 3))
    assert not checks.audit_store(tmp_path).raised
    nii, _ = store.paths("a", "pgd", "1", "c")
    nii.write_bytes(nii.read_bytes()[:30])
    assert checks.audit_store(tmp_path).raised
    t = torch.rand(3)
    assert not checks.check_determinism("m", t, t.clone()).raised
    assert checks.check_determinism("m", t, t + 1).raised


def test_worst_case_is_per_case_minimum(tmp_path):
    records = []
    for case, (fgsm, pgd) in {"c0": (0.5, 0.3), "c1": (0.2, 0.6)}.items():
        base = {"source": "a", "target": "a", "case_id": case, "budget": "8/255", "eps": 8 / 255}
        records += [{**base, "attack": "fgsm", "dice_mean": fgsm}, {**base, "attack": "pgd", "dice_mean": pgd}]
        records.append({"source": "", "target": "a", "case_id": case, "attack": "clean", "budget": "0", "dice_mean": 1})
    rows = summarise(records)
    worst = [r for r in rows if r["attack"] == "worst" and r["budget"] == "8/255"]
    assert len(worst) == 1 and worst[0]["dice_mean"] == pytest.approx((0.3 + 0.2) / 2)
    pgd = next(r for r in rows if r["attack"] == "pgd")
    assert pgd["dice_mean"] == pytest.approx(0.45)
    payload = wandb_payload(rows, [{"name": "budget", "raised": False, "detail": ""}], {"seconds": 1.0})
    assert payload["eval/dice/pgd@8/255/a"] == pytest.approx(0.45) and payload["flags/budget"] is False
    paths = write_outputs(tmp_path, rows, [], {"data": "x"}, {"seconds": 1.0})
    assert "worst@8/255" in paths["report"].read_text() and paths["dice_vs_budget"].exists()


def test_dct_round_trip_and_bands_partition():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 7, 9)
    assert torch.allclose(idct_volume(dct_volume(x)).float(), x, atol=1e-5)
    low, high = band_filter(x, 0.0, 0.3), band_filter(x, 0.3, 1.0)
    assert torch.allclose(low + high, x, atol=1e-5)
    smooth = torch.ones(1, 8, 8, 8)
    assert torch.allclose(band_filter(smooth, 0.0, 0.05), smooth, atol=1e-5)  # a constant is pure DC


def test_monotonic_flag_on_vafa_q_max_axis():
    """VAFA's budget axis is q_max: a Dice that rises from q_max=10 to q_max=30 is flagged; eps curves apart."""
    rows = [
        _row("", "a", "clean", "0", 0.0, 0.9),
        _row("a", "a", "vafa", "q_max=10", None, 0.5),
        _row("a", "a", "vafa", "q_max=30", None, 0.7),
        _row("a", "a", "pgd", "4/255", 4 / 255, 0.6),
        _row("a", "a", "pgd", "8/255", 8 / 255, 0.4),
    ]
    flags = {f.detail.split(" ")[0]: f for f in checks.check_monotonic(rows)}
    assert (
        flags["vafa"].raised
        and "over q_max" in flags["vafa"].detail
        and "0.5000@10 -> 0.7000@30" in flags["vafa"].detail
    )
    assert not flags["pgd"].raised
    rows[2]["dice_mean"] = 0.3
    assert not any(f.raised for f in checks.check_monotonic(rows))


def test_transfer_is_compared_with_the_strongest_whitebox_attack():
    white = [_row("a", "a", "pgd", "8/255", 8 / 255, 0.40), _row("a", "a", "fgsm", "8/255", 8 / 255, 0.20)]
    # transfer PGD (0.30) beats white-box PGD (0.40) but not the strongest white-box attack (FGSM, 0.20)
    flags = checks.check_transfer_vs_whitebox([*white, _row("b", "a", "pgd", "8/255", 8 / 255, 0.30)])
    assert len(flags) == 1 and not flags[0].raised and "strongest white-box (fgsm) 0.2000" in flags[0].detail
    # a transfer attack with no white-box twin is still compared (with the strongest white-box attack)
    flags = checks.check_transfer_vs_whitebox([*white, _row("b", "a", "vmi_fgsm", "8/255", 8 / 255, 0.10)])
    assert len(flags) == 1 and flags[0].raised
    # the same budget value written differently still matches
    flags = checks.check_transfer_vs_whitebox([*white, _row("b", "a", "pgd", "0.031372549", 8 / 255, 0.10)])
    assert flags[0].raised and flags[0].checked


def test_checks_that_cannot_run_say_not_checked_and_why():
    transfer_only = [_row("b", "a", "pgd", "8/255", 8 / 255, 0.3)]
    flags = checks.check_transfer_vs_whitebox(transfer_only)
    assert len(flags) == 1 and not flags[0].checked and not flags[0].raised
    assert flags[0].detail.startswith("not checked:") and "also_whitebox=true" in flags[0].detail
    assert flags[0].status == "not checked"
    (none,) = checks.check_transfer_vs_whitebox([_row("a", "a", "pgd", "8/255", 8 / 255, 0.3)])
    assert not none.checked and "no transfer or noise attack" in none.detail
    (mono,) = checks.check_monotonic([_row("", "a", "clean", "0", 0.0, 0.9)])
    assert not mono.checked
    everything = checks.result_flags([_row("", "a", "clean", "0", 0.0, 0.9)], [])
    names = {f.name: f for f in everything}
    assert {"determinism", "gradients", "eps_zero", "monotonic", "transfer_vs_whitebox", "budget"} <= set(names)
    assert all(not f.checked for f in names.values()) and not any(f.raised for f in everything)
    assert checks.Flag(**checks.not_checked("x", "y").to_dict()).status == "not checked"


def test_nsd_tolerance_flag():
    ok = {"nsd_tolerance_mm": 2.0, "spacing": [1.5, 1.5, 2.0]}
    small = {"nsd_tolerance_mm": 1.0, "spacing": [1.5, 1.5, 2.0]}
    assert not checks.check_nsd_tolerance([ok]).raised
    flag = checks.check_nsd_tolerance([ok, small])
    assert flag.raised and "1 record(s) below" in flag.detail and "largest voxel spacing 2 mm" in flag.detail
    assert not checks.check_nsd_tolerance([{"spacing": [1, 1, 1]}]).checked
