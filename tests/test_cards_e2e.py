"""Every evaluation writes a valid card per target; the leaderboard renders the cards of a real evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from robustseg import leaderboard
from robustseg.cards import load_card
from robustseg.config import load_config
from robustseg.evaluation import evaluate
from robustseg.evaluation.store import file_sha256
from robustseg.models import TINY
from robustseg.systems import SegmentationSystem

SIZE = 16
CLASSES = ["background", "organ1", "organ2"]


def _run(root: Path, name: str, model: str, seed: int, attack: dict | None = None) -> Path:
    """A run directory as ``train(cfg)`` leaves it (config.yaml + checkpoints/best.ckpt) of an untrained tiny net."""
    torch.manual_seed(seed)
    model_cfg = {"name": model, "in_channels": 1, "out_channels": 3, **TINY[model]}
    model_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in model_cfg.items()}
    config = {
        "model": model_cfg,
        "attack": attack,
        "system": {"adv_mode": "adversarial", "lr": 1e-3},
        "trainer": {"max_epochs": 3},
        "data": {"name": "synthetic", "num_classes": 3, "modality": "ct"},
        "choices": {"model": model, "data": "synthetic"},
    }
    system = SegmentationSystem(model=model_cfg, num_classes=3, class_names=CLASSES, roi_size=[SIZE] * 3, config=config)
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    torch.save(
        {"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}, run / "checkpoints" / "best.ckpt"
    )
    return run


@pytest.mark.slow
def test_evaluation_writes_cards_and_the_leaderboard_renders_them(tmp_path, capsys):
    cnn = _run(tmp_path / "runs", "cnn", "unet", 0)
    other = _run(tmp_path / "runs", "cnn-pgd", "segresnet", 1, attack={"name": "pgd", "eps": 4 / 255, "steps": 2})
    out = tmp_path / "eval"
    cfg = load_config(
        "evaluate",
        [
            "data=synthetic",
            "logger=none",
            f"data.root={tmp_path / 'data'}",
            "data.prepare.num_cases=3",
            "data.prepare.num_validation=1",
            f"data.prepare.size=[{SIZE},{SIZE},{SIZE}]",
            f"data.roi_size=[{SIZE},{SIZE},{SIZE}]",
            f"output_dir={out}",
            f"--source={cnn}",
            f"--target={cnn},{other}",
            "also_whitebox=true",
            "attacks=[fgsm,pgd]",
            "+attack_overrides.pgd.steps=2",
            "eps=[2/255,8/255]",
            "frequency.bands=null",
        ],
    )
    evaluate(cfg)
    summary = json.loads((out / "summary.json").read_text())
    paths = sorted((out / "cards").glob("*.json"))
    assert sorted(p.stem for p in paths) == ["cnn", "cnn-pgd"]
    cards = {p.stem: load_card(p) for p in paths}
    for label, card in cards.items():
        clean = next(r for r in summary["rows"] if r["target"] == label and r["attack"] == "clean")
        assert card.clean.dice == pytest.approx(clean["dice_mean"]) and card.dataset.name == "synthetic"
        run = cnn if label == "cnn" else other
        assert card.model.checkpoint_sha256 == file_sha256(run / "checkpoints" / "best.ckpt")
        assert card.cost.scope == "target" and card.cost.attack_forwards > 0
        assert (out / "cards" / card.reports["report"]).resolve() == (out / "report.md").resolve()
        worst = next(
            r for r in summary["rows"] if r["target"] == label and r["source"] == label and r["attack"] == "worst"
            and r["budget"] == "8/255"
        )  # fmt: skip
        assert card_threat(card, "white-box linf 8/255").robust_dice == pytest.approx(worst["dice_mean"])
    assert cards["cnn"].training.mode == "clean" and cards["cnn-pgd"].training.mode == "attack"
    assert card_threat(cards["cnn-pgd"], "transfer from cnn linf 2/255").source == "cnn"
    assert all(t.kind == "white-box" for t in cards["cnn"].threat_models)  # the surrogate's own volumes
    assert leaderboard.main([str(p) for p in paths]) == 0
    text = capsys.readouterr().out
    assert "### white-box linf 8/255" in text and "### transfer from cnn linf 8/255" in text


def card_threat(card, threat_id):
    return next(t for t in card.threat_models if t.id == threat_id)
