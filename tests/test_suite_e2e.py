"""``evaluate.py --suite reliable`` end to end on synthetic volumes: both threat models, groups, cascade."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustseg.config import expand_flags, load_config
from robustseg.evaluation import evaluate
from robustseg.evaluation.records import read_records
from robustseg.evaluation.shard import log_path

SIZE = 16


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    from test_evaluation_e2e import make_run

    root = tmp_path_factory.mktemp("suite")
    make_run(root / "runs", "unet-synthetic", "unet", root / "data")
    return root


def run(root: Path, out: Path, *args: str) -> list[dict]:
    overrides = [
        "data=synthetic",
        "logger=none",
        f"data.root={root / 'data'}",
        "data.prepare.num_cases=3",
        "data.prepare.num_validation=2",
        f"data.prepare.size=[{SIZE},{SIZE},{SIZE}]",
        f"data.roi_size=[{SIZE},{SIZE},{SIZE}]",
        f"runs_root={root / 'runs'}",
        f"output_dir={out}",
        "+attack_overrides.apgd.steps=3",
        "frequency.bands=null",
        "montage_cases=0",
        *expand_flags("evaluate", ["--target", "unet", "--suite", "reliable", "--eps", "8/255"]),
        *args,
    ]
    evaluate(load_config("evaluate", overrides))
    return read_records(log_path(out, 0, 1))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pipeline", "tiles"])
def test_reliable_suite_runs_alongside_the_papers_attacks(workspace, tmp_path, mode):
    records = run(workspace, tmp_path / mode, f"attack_mode={mode}", "attacks=[pgd]", "+attack_overrides.pgd.steps=2")
    attacks = {(r["attack"], r.get("group")) for r in records if r["attack"] != "clean"}
    members = {(label, "reliable") for label in ("apgd_mce", "apgd_bce", "apgd_js", "apgd_dce")}
    assert attacks == {("pgd", None), *members}
    assert all(r["budget_ok"] for r in records if r["attack"] != "clean")
    assert all(r["attack_config"]["steps"] == 3 for r in records if r.get("group") == "reliable")


def background_only(run: Path) -> None:
    """Rewrite the run's checkpoint so the network predicts background everywhere: every case is at Dice 0."""
    path = run / "checkpoints" / "best.ckpt"
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["state_dict"]
    *_, weight, bias = [k for k, v in state.items() if v.dtype.is_floating_point]  # the output convolution
    state[weight] = torch.zeros_like(state[weight])
    state[bias] = torch.tensor([10.0, 0.0, 0.0])
    torch.save(ckpt, path)


@pytest.mark.slow
def test_cascade_skips_only_after_dice_zero(tmp_path):
    from test_evaluation_e2e import make_run

    background_only(make_run(tmp_path / "runs", "unet-synthetic", "unet", tmp_path / "data"))
    records = run(tmp_path, tmp_path / "cascade", "cascade=true", "attacks=[pgd]", "+attack_overrides.pgd.steps=2")
    by_attack = {}
    for r in records:
        by_attack.setdefault(r["attack"], []).append(r)
    assert all(r["dice_mean"] == 0 for r in by_attack["clean"] + by_attack["apgd_mce"])
    assert all(r.get("skipped") is None for r in by_attack["pgd"] + by_attack["apgd_mce"])  # no group; first member
    later = by_attack["apgd_bce"] + by_attack["apgd_js"] + by_attack["apgd_dce"]
    assert later and all(r.get("skipped") == "cascade" for r in later)
