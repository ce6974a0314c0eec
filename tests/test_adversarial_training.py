"""Adversarial training: every mode, adversarial validation, precision, and bad input failing before training."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from test_system import MODEL, Phantoms, fit

from robustseg.config import load_config
from robustseg.errors import ConfigError
from robustseg.systems import SegmentationSystem
from robustseg.training import train

FAST = {
    "pgd": {"name": "pgd", "eps": "4/255", "step_size": 0.01, "steps": 2},
    "fgsm": {"name": "pgd", "eps": "8/255", "step_size": "8/255", "steps": 1, "random_start": False},
    "gn": {"name": "gn", "sigma": "8/255", "seed": 0},
    "vafa": {"name": "vafa", "q_max": 20, "steps": 2, "block_size": 16},
}


def fit_steps(system: SegmentationSystem, tmp_path, **kwargs) -> L.Trainer:
    """One training step on two phantom crops, one 32^3 validation volume, no checkpoints."""
    kwargs.setdefault("max_steps", 1)
    return fit(system, tmp_path, train_cases=2, val_cases=1, val_size=32, enable_checkpointing=False, **kwargs)


@pytest.mark.parametrize(
    ("attack", "mode", "losses"),
    [
        ("pgd", "adversarial", {"adv", "total"}),
        ("fgsm", "mix", {"clean", "adv", "total"}),
        ("gn", "adversarial", {"adv", "total"}),
        ("vafa", "vaft", {"clean", "adv", "freq", "total"}),
    ],
)
def test_adversarial_modes_train_and_log_their_losses(attack, mode, losses, tmp_path):
    torch.manual_seed(0)
    system = SegmentationSystem(model=MODEL, attack=FAST[attack], num_classes=3, roi_size=(32,) * 3, adv_mode=mode)
    before = [p.detach().clone() for p in system.net.parameters()]
    trainer = fit_steps(system, tmp_path, limit_val_batches=0)
    logged = {k.split("/")[-1] for k in trainer.callback_metrics if k.startswith("train/loss/")}
    assert logged == losses
    assert all(torch.isfinite(trainer.callback_metrics[f"train/loss/{k}"]) for k in losses)
    assert "train/zero_grad_fraction" in trainer.callback_metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, system.net.parameters())), "the step must update"
    assert system.net.training


def test_adversarial_validation_needs_and_gets_gradients(tmp_path):
    val_attack = {"name": "pgd", "eps": "8/255", "step_size": "2/255", "steps": 2}
    system = SegmentationSystem(model=MODEL, num_classes=3, roi_size=(32,) * 3, val_attack=val_attack)
    batch = Phantoms(1, size=32)[0]
    batch = {"image": batch["image"][None], "label": batch["label"][None], "case_id": ["case0"]}
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        system.validation_step(batch, 0)
    trainer = fit_steps(system, tmp_path, inference_mode=False)
    metrics = trainer.callback_metrics
    assert {"val/dice/clean", "val/dice/adv", "val/dice_with_bg/adv"} <= set(metrics)
    assert metrics["val/dice/adv"] <= metrics["val/dice/clean"] + 1e-6


def test_bf16_mixed_adversarial_step_on_cpu(tmp_path):
    system = SegmentationSystem(model=MODEL, attack=FAST["pgd"], num_classes=3, roi_size=(32,) * 3)
    trainer = fit_steps(system, tmp_path, precision="bf16-mixed", limit_val_batches=0)
    assert torch.isfinite(trainer.callback_metrics["train/loss/adv"])
    assert trainer.callback_metrics["train/zero_grad_fraction"] < 0.5


def test_vaft_with_another_attack_says_what_it_does(caplog):
    with caplog.at_level(logging.WARNING):
        SegmentationSystem(model=MODEL, attack=FAST["pgd"], num_classes=3, adv_mode="vaft")
    assert "VAFT with attack PGD instead of VAFA" in caplog.text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--adv", "pgdd"], r"unknown attack option 'pgdd'\. Did you mean 'pgd'\?.*vaft"),
        (["--adv", "pgd", "attack.eps=-0.1"], r"eps.*-0\.1"),
        (["--adv", "pgd", "attack.eps=nan"], r"eps.*nan"),
        (["--adv", "pgd", "attack.steps=0"], r"steps.*0"),
        (["--adv", "vafa", "attack.steps=0"], r"steps.*0"),
        (["--adv", "gn", "attack.sigma=-1/255"], r"sigma"),
    ],
)
def test_bad_adversarial_settings_fail_before_any_data_is_read(argv, message, tmp_path):
    # data.root is empty: had the data been touched first, the error would name the missing datalist
    args = [*argv, "data=btcv", f"data.root={tmp_path / 'empty'}", f"output_dir={tmp_path}", "logger=none"]
    with pytest.raises(ConfigError, match=message):
        train(load_config("train", args))
    assert not any(tmp_path.iterdir())
