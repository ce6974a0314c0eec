"""The committed model zoo: every checkpoint loads and reproduces its card's clean Dice on the validation data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustseg.cards import load_card
from robustseg.config import load_config
from robustseg.data import build_datamodule
from robustseg.evaluation.metrics import dice_per_class
from robustseg.evaluation.region import real_case
from robustseg.evaluation.resolve import load_checkpoint
from robustseg.evaluation.scoring import SlidingWindow, predict
from robustseg.evaluation.store import file_sha256

ZOO = Path(__file__).resolve().parents[1] / "zoo"
CARDS = sorted(ZOO.glob("*/card.json"))
REQUIRED = {  # issue 13: a CNN and a transformer, clean and PGD-trained, on lits117; a pair on mni152
    "unet_small-lits117-clean",
    "unet_small-lits117-pgd",
    "unetr_small-lits117-clean",
    "unetr_small-lits117-pgd",
    "unet_small-mni152-clean",
    "unet_small-mni152-pgd",
}
MIN_LITS_DICE = 0.5  # the demo attacks only models that segment: foreground mean Dice on lits117's validation slab
MAX_MB = 8.0


def test_zoo_is_complete():
    have = {p.parent.name for p in CARDS}
    assert have >= REQUIRED, f"zoo entries without a card: {sorted(REQUIRED - have)} (scripts/train_zoo.py)"


@pytest.mark.parametrize("card_path", CARDS, ids=lambda p: p.parent.name)
def test_zoo_checkpoint_reproduces_its_card(card_path: Path):
    card = load_card(card_path)
    ckpt = card_path.parent / "checkpoints" / "best.ckpt"
    assert ckpt.stat().st_size < MAX_MB * 2**20
    assert file_sha256(ckpt) == card.model.checkpoint_sha256  # the card describes exactly this file
    assert (card_path.parent / "config.yaml").is_file() and (card_path.parent / "train.log").is_file()
    model = load_checkpoint(ckpt)
    assert model.model_name == card.model.architecture
    cfg = load_config("evaluate", [f"data={card.dataset.name}"])
    datamodule = build_datamodule(cfg.data)
    cases = datamodule.validate()[card.dataset.split]
    dataset = datamodule.eval_dataset(card.dataset.split)
    sw = dict(card.evaluation.get("sliding window") or {})  # the window the zoo evaluation scored with
    roi = sw.pop("roi_size", None)
    window = SlidingWindow(**sw, roi_size=tuple(roi) if roi else None)
    scores = []
    torch.set_num_threads(1)
    for index in range(len(cases)):
        image, label, _affine, _spacing, _region = real_case(dataset[index])
        pred = predict(window, model, model.net, image).argmax(1)[0]  # (D, H, W)
        dice = dice_per_class(pred, label[0, 0], model.num_classes)
        scores.append(sum(dice[1:]) / (len(dice) - 1))
    assert len(scores) == card.dataset.n_cases
    assert sum(scores) / len(scores) == pytest.approx(card.clean.dice, abs=1e-4)


BELOW_BAR = {  # measured, docs/zoo.md: the small UNETR overfits the single training slab (validation 0.51 / 0.51 on
    # the padded slab, 0.495 / 0.477 on its real voxels); the demo does not attack these two
    "unetr_small-lits117-clean",
    "unetr_small-lits117-pgd",
}
LITS_CARDS = [p for p in CARDS if load_card(p).dataset.name == "lits117"]


@pytest.mark.parametrize(
    "card_path",
    [pytest.param(p, marks=pytest.mark.xfail(strict=True)) if p.parent.name in BELOW_BAR else p for p in LITS_CARDS],
    ids=lambda p: p.parent.name,
)
def test_lits117_zoo_models_segment(card_path: Path):
    """Issue 13's bar for the models the demo attacks: >= 0.5 foreground mean Dice on lits117's validation slab."""
    assert load_card(card_path).clean.dice >= MIN_LITS_DICE
