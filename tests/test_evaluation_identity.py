"""Result identity and model identity (issue 9): a changed setting recomputes exactly what it changes, a run's
outputs hold only its own results, costs add up over resumed runs, and model labels are unambiguous."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_evaluation_e2e import eval_cfg, make_run

from robustseg.config import CONF_DIR
from robustseg.errors import CheckpointError, ConfigError
from robustseg.evaluation import evaluate, identity
from robustseg.evaluation.modelinfo import check_preprocessing
from robustseg.evaluation.pipeline import _models
from robustseg.evaluation.records import read_records
from robustseg.evaluation.resolve import find_run, resolve_model
from robustseg.evaluation.scoring import SlidingWindow
from robustseg.evaluation.shard import log_path
from robustseg.evaluation.suite import build_suite


class _M:
    def __init__(self, sha: str, roi=(16, 16, 16)) -> None:
        self.checkpoint_sha256, self.roi_size, self.label = sha, roi, sha


def _record_id(**change) -> str:
    """settings id of one attack record, with one ingredient changed."""
    spec = build_suite(["pgd"], [change.get("eps", "4/255")], None, CONF_DIR, {"pgd": change.get("pgd", {})})[0]
    window = SlidingWindow(overlap=change.get("overlap", 0.5), blend_mode=change.get("blend", "gaussian"))
    window.sigma_scale = change.get("sigma", window.sigma_scale)
    source, target = _M(change.get("source", "s")), _M(change.get("target", "t"))
    threat = {"mode": change.get("mode", "pipeline"), "memory_bounded": False, "seed": change.get("seed", 0)}
    data = {"intensity": {"a_min": -175.0, "a_max": change.get("a_max", 250.0)}, "spacing": change.get("spacing")}
    case = change.get("case", "c" * 64)
    volume = identity.volume_identity(source, spec, window.identity(source), threat, data, case)
    scoring = {"nsd_tolerance_mm": change.get("nsd", 1.0), "bands": {}}
    return identity.short_hash(identity.record_identity(target, window.identity(target), scoring, data, case, volume))


@pytest.mark.parametrize(
    "change",
    [
        {"source": "s2"},
        {"target": "t2"},
        {"eps": "8/255"},
        {"pgd": {"steps": 3}},
        {"pgd": {"random_start": False}},
        {"overlap": 0.25},
        {"blend": "constant"},
        {"sigma": 0.25},
        {"mode": "tiles"},
        {"seed": 1},
        {"a_max": 200.0},
        {"spacing": [1.0, 1.0, 1.0]},
        {"case": "d" * 64},
        {"nsd": 2.0},
    ],
)
def test_every_ingredient_changes_the_identity(change):
    assert _record_id() == _record_id()
    assert _record_id(**change) != _record_id()


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("identity")
    make_run(root / "runs", "unet-synthetic", "unet", root / "data", model_extra={"norm": "batch"})
    return root


def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "summary.csv").open()))


def _invocation(out: Path) -> dict:
    return json.loads((out / "run.shard-0-of-1.json").read_text())["this invocation"]


BASE = ("--target", "unet", "attacks=[fgsm]", "frequency.bands=null", "sw.overlap=0.25", "max_cases=2")


@pytest.mark.slow
def test_changed_settings_recompute_exactly_what_they_change(ws):
    out = ws / "out"
    evaluate(eval_cfg(ws, out, *BASE, "eps=[2/255]"))
    assert _invocation(out)["records written"] == 4  # 2 cases x (clean + fgsm)
    # another budget in the same folder: only the new budget is computed, and only it is reported
    evaluate(eval_cfg(ws, out, *BASE, "eps=[8/255]"))
    assert _invocation(out)["records written"] == 2
    budgets = {r["budget"] for r in _rows(out) if r["attack"] not in ("clean",)}
    assert budgets <= {"8/255", "all"} and "8/255" in budgets
    report = (out / "report.md").read_text()
    assert "2/255" not in report
    on_disk = {r["budget"] for r in read_records(log_path(out, 0, 1))}
    assert {"0", "2/255", "8/255"} <= on_disk  # older records stay on disk, untouched
    figures = sorted(p.name for p in (out / "montages").glob("*.png"))
    assert len(figures) == 1 and "fgsm@8_255" in figures[0]  # the 2/255 figure is set aside, not shown
    aside = [p.name for p in (out / "montages" / "other-results").glob("*.png")]
    assert len(aside) == 1 and "fgsm@2_255" in aside[0]
    # the sliding window shapes the attack: every volume is re-crafted and every record recomputed
    stored = {p: p.stat().st_mtime_ns for p in (out / "adversarial").rglob("*.nii.gz")}
    evaluate(eval_cfg(ws, out, *BASE[:-2], "sw.overlap=0.5", "max_cases=2", "eps=[8/255]"))
    assert _invocation(out)["records written"] == 4 and _invocation(out)["attack generations"] == 2
    changed = [p for p in stored if "8_255" in str(p) and p.stat().st_mtime_ns != stored[p]]
    assert len(changed) == 2
    # the intensity window changes the preprocessed input: everything is recomputed
    evaluate(eval_cfg(ws, out, *BASE, "eps=[8/255]", "data.intensity.a_max=200"))
    assert _invocation(out)["records written"] == 4
    # back to the first settings: nothing to compute
    evaluate(eval_cfg(ws, out, *BASE, "eps=[2/255]"))
    assert _invocation(out)["records written"] == 0


@pytest.mark.slow
def test_costs_accumulate_over_resumed_runs(ws):
    out = ws / "out_costs"
    args = (*BASE[:-1], "eps=[2/255]")
    evaluate(eval_cfg(ws, out, *args, "max_cases=1"))  # as if killed after the first case
    first = json.loads((out / "summary.json").read_text())["stats"]
    evaluate(eval_cfg(ws, out, *args, "max_cases=2"))  # the resumed run finishes the second case
    stats = json.loads((out / "summary.json").read_text())["stats"]
    assert first["attack generations"] == 1 and stats["attack generations"] == 2
    assert stats["attack forwards"] == 2 * first["attack forwards"]
    assert stats["scoring forwards"] == 2 * first["scoring forwards"]
    assert stats["invocations (finished runs with these settings)"] == 2


def test_same_named_run_directories_get_distinct_labels(ws, tmp_path):
    a = make_run(tmp_path / "a", "unet-synthetic", "unet", ws / "data", seed=1)
    b = make_run(tmp_path / "b", "unet-synthetic", "unet", ws / "data", seed=2)
    cfg = eval_cfg(ws, tmp_path / "o", "--source", str(a), "--target", str(b))
    targets, source = _models(cfg, ["synthetic"])
    assert source is not targets[0] and source.label != targets[0].label
    assert {source.label, targets[0].label} == {"unet-synthetic@" + "a", "unet-synthetic@" + "b"}
    # best and last of one run are two checkpoints: two labels
    make_run(tmp_path / "a", "unet-synthetic", "unet", ws / "data", seed=3, ckpt="last")
    best = resolve_model(str(a / "checkpoints" / "best.ckpt"), tmp_path, ["synthetic"])
    cfg = eval_cfg(ws, tmp_path / "o", "--source", str(a / "checkpoints" / "last.ckpt"), "--target", str(a))
    targets, source = _models(cfg, ["synthetic"])
    assert targets[0].checkpoint_sha256 == best.checkpoint_sha256
    assert {targets[0].label, source.label} == {"unet-synthetic@best", "unet-synthetic@last"}
    # the same checkpoint as source and target is one model: white-box
    cfg = eval_cfg(ws, tmp_path / "o", "--source", str(b), "--target", str(b / "checkpoints" / "best.ckpt"))
    targets, source = _models(cfg, ["synthetic"])
    assert source is targets[0]


def test_name_matching_runs_of_several_training_modes_fails_unless_train_mode_picks(ws, tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "unet-synthetic-clean", "unet", ws / "data")
    pgd = {"attack": {"name": "pgd", "eps": 0.03}, "choices": {"attack": "pgd"}, "system": {"adv_mode": "adversarial"}}
    make_run(runs, "unet-synthetic-pgd", "unet", ws / "data", seed=1, config_extra=pgd)
    with pytest.raises(ConfigError, match=r"2 training modes \['clean', 'pgd'\].*train_mode="):
        find_run("unet", runs, ["synthetic"])
    assert find_run("unet", runs, ["synthetic"], mode="pgd").parent.parent.name == "unet-synthetic-pgd"
    model = resolve_model("unet", runs, ["synthetic"], mode="clean")
    assert model.train_mode == "clean" and model.run_dir.endswith("unet-synthetic-clean")


def test_best_to_last_fallback_is_recorded(ws, tmp_path):
    run = make_run(tmp_path / "runs", "only-last", "unet", ws / "data", ckpt="last")
    model = resolve_model(str(run), tmp_path / "runs", ["synthetic"], which="best")
    assert model.checkpoint.endswith("last.ckpt") and "no best.ckpt, used last.ckpt" in model.checkpoint_note


def test_training_preprocessing_must_match_the_evaluated_data(ws, tmp_path):
    window = {"modality": "ct", "intensity": {"a_min": -100, "a_max": 200}, "orientation": "RAS"}
    run = make_run(tmp_path / "runs", "windowed", "unet", ws / "data", data_extra=window)
    model = resolve_model(str(run), tmp_path / "runs", ["synthetic"])
    data = {"modality": "ct", "intensity": {"a_min": -175.0, "a_max": 250.0}, "orientation": "ras", "spacing": None}
    with pytest.raises(CheckpointError, match=r"data.intensity=.*allow_preprocessing_mismatch=true"):
        check_preprocessing([model], data)
    lines = check_preprocessing([model], data, allow=True)
    assert len(lines) == 1 and "intensity" in lines[0]
    assert check_preprocessing([model], {**data, "intensity": {"a_min": -100, "a_max": 200.0}}) == []


@pytest.mark.slow
def test_evaluate_refuses_a_preprocessing_mismatch_and_records_the_override(ws, tmp_path):
    window = {"intensity": {"a_min": -100, "a_max": 200}}
    runs = tmp_path / "runs"
    make_run(runs, "unet-synthetic", "unet", ws / "data", data_extra=window)
    out = tmp_path / "o"
    args = ("--target", "unet", f"runs_root={runs}", "attacks=[fgsm]", "eps=[8/255]", "max_cases=1")
    with pytest.raises(CheckpointError, match="was trained with data.intensity"):
        evaluate(eval_cfg(ws, out, *args, "frequency.bands=null"))
    assert not out.exists()  # nothing written before the settings are valid
    evaluate(eval_cfg(ws, out, *args, "frequency.bands=null", "allow_preprocessing_mismatch=true"))
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert any("allow_preprocessing_mismatch" in n for n in settings["model notes"])
    assert "trained clean" in settings["models"] and "unet-synthetic/checkpoints/best.ckpt" in settings["models"]
    shutil.rmtree(out)


def test_bad_max_cases_writes_nothing(ws, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="max_cases=-1"):
        evaluate(eval_cfg(ws, out, "--target", "unet", "max_cases=-1"))
    assert not out.exists()


def test_a_second_evaluation_of_a_locked_output_fails_at_once(ws, tmp_path):
    import os
    import socket

    from robustseg.evaluation.lock import OutputLockedError

    out = tmp_path / "locked"
    out.mkdir()
    (out / ".lock.shard-0-of-1").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(OutputLockedError, match="being written by another evaluation"):
        evaluate(eval_cfg(ws, out, "--target", "unet", "attacks=[fgsm]", "max_cases=1", "frequency.bands=null"))
    assert not log_path(out, 0, 1).exists()


def test_checkpoint_weights_identity_uses_the_file(ws, tmp_path):
    """Two checkpoints with different weights never share a result (their sha256 is part of the identity)."""
    a = make_run(tmp_path / "r", "a", "unet", ws / "data", seed=1)
    b = make_run(tmp_path / "r", "b", "unet", ws / "data", seed=2)
    ma, mb = (resolve_model(str(r), tmp_path / "r", ["synthetic"]) for r in (a, b))
    assert ma.checkpoint_sha256 != mb.checkpoint_sha256
    assert not torch.equal(next(ma.net.parameters()), next(mb.net.parameters()))
