"""Robustness cards: building a card from hand-made summary rows, and the validator refusing bad cards."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from robustseg.cards import FORMAT, CardError, build_card, load_card, validate_card, write_cards
from robustseg.cards.build import dataset_of, flags_for

CLASSES = ["background", "liver", "tumour"]
SHA = "ab" * 32


def _row(target, attack, budget, dice, source=None, eps=None, **extra):
    return {
        "source": "" if attack == "clean" else (source or target),
        "target": target,
        "attack": attack,
        "budget": budget,
        "eps": eps,
        "n_cases": 2,
        "dice_mean": dice,
        "dice_mean_bg": (dice + 0.99) / 2,
        "hd95_mean": 10.0 * (1 - dice),
        "nsd_mean": dice * 0.9,
        "dice_per_class": [0.99, dice + 0.05, dice - 0.05],
        **extra,
    }


def _rows():
    """Two targets: ``cnn`` (white-box fgsm + pgd at 4/255 and 8/255, vafa at its preset) and ``vit`` (transfer from
    cnn at 8/255). The worst row of cnn at 8/255 is lower than either attack's mean (per-case worst)."""
    return [
        _row("cnn", "clean", "0", 0.80, eps=0.0),
        _row("cnn", "fgsm", "4/255", 0.60, eps=4 / 255),
        _row("cnn", "pgd", "4/255", 0.50, eps=4 / 255),
        _row("cnn", "worst", "4/255", 0.48, eps=4 / 255, worst_attacks="fgsm@4/255: 0, pgd@4/255: 2"),
        _row("cnn", "fgsm", "8/255", 0.40, eps=8 / 255),
        _row("cnn", "pgd", "8/255", 0.30, eps=8 / 255),
        _row("cnn", "worst", "8/255", 0.25, eps=8 / 255, worst_dice_attacks="fgsm@8/255: 1, pgd@8/255: 1"),
        _row("cnn", "vafa", "q_max=20", 0.35),
        _row("cnn", "worst", "all", 0.20, worst_attacks="pgd@8/255: 2"),
        _row("vit", "clean", "0", 0.70, eps=0.0),
        _row("vit", "pgd", "8/255", 0.65, source="cnn", eps=8 / 255),
    ]


def _model(tmp_path: Path, label: str, config: dict | None) -> SimpleNamespace:
    run = tmp_path / label
    run.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    return SimpleNamespace(
        label=label,
        model_name="unet",
        checkpoint=str(run / "checkpoints" / "best.ckpt"),
        checkpoint_sha256=SHA,
        class_names=CLASSES,
        roi_size=(64, 64, 64),
        net=torch.nn.Conv3d(1, 3, 3),  # 84 parameters
        extra={"run_dir": str(run)},
    )


DATA = {"name": "lits117", "modality": "ct", "intensity": {"a_min": -175, "a_max": 250}, "orientation": "RAS"}
CLEAN_CFG = {"choices": {"model": "unet_small", "data": "lits117"}, "attack": None, "data": DATA,
             "system": {"lr": 1e-3, "adv_mode": "adversarial"}, "trainer": {"max_epochs": 40}}  # fmt: skip
PGD = {"name": "pgd", "eps": 4 / 255, "steps": 3, "step_size": 0.01}


def _card(tmp_path, label="cnn", config=CLEAN_CFG, flags=(), labels=("cnn", "vit")):
    model = _model(tmp_path, label, config)
    costs = {"attack forwards": 120, "attack backwards": 100, "scoring forwards": 30, "seconds": 12.5}
    return build_card(model, _rows(), list(flags), costs, {"name": "lits117"}, list(labels), {"report": "../r.md"})


def test_card_threat_models_and_worst_case(tmp_path):
    card = _card(tmp_path)
    assert card.format == FORMAT and card.dataset.name == "lits117" and card.dataset.n_cases == 2
    assert card.clean.dice == pytest.approx(0.80) and card.clean.hd95 == pytest.approx(2.0)
    assert card.clean.dice_per_class == pytest.approx({"background": 0.99, "liver": 0.85, "tumour": 0.75})
    by_id = {t.id: t for t in card.threat_models}
    # budget "all" is no threat model; vafa's frequency budget is its own
    assert sorted(by_id) == ["white-box frequency q_max=20", "white-box linf 4/255", "white-box linf 8/255"]
    eight = by_id["white-box linf 8/255"]
    assert eight.robust_dice == pytest.approx(0.25)  # the per-case worst row, not min(0.40, 0.30)
    assert [a.attack for a in eight.attacks] == ["fgsm", "pgd"] and eight.worst.suite == "standard"
    assert eight.worst.attacks == {"fgsm": 1, "pgd": 1} and eight.worst_attack == "pgd"  # tie: name order
    assert by_id["white-box linf 4/255"].worst_attack == "pgd"  # old-format worst_attacks column
    vafa = by_id["white-box frequency q_max=20"]
    assert vafa.worst is None and vafa.robust_dice == pytest.approx(0.35) and vafa.worst_attack == "vafa"
    assert card.model.parameters == 84 and card.model.preset == "unet_small"
    assert card.training.mode == "clean" and card.training.epochs == 40 and card.training.data == "lits117"
    assert card.preprocessing.intensity == {"a_min": -175.0, "a_max": 250.0} and card.preprocessing.roi_size == [64] * 3
    assert card.cost.attack_forwards == 120 and card.cost.scope == "run"
    assert not card.unreliable and card.unreliable_reason is None


def test_card_transfer_and_training_modes(tmp_path):
    at = {**CLEAN_CFG, "attack": PGD}
    card = _card(tmp_path, "vit", at)
    [threat] = card.threat_models
    assert threat.kind == "transfer" and threat.source == "cnn" and threat.id == "transfer from cnn linf 8/255"
    assert threat.robust_dice == pytest.approx(0.65)
    assert card.training.mode == "attack" and card.training.attack["eps"] == pytest.approx(4 / 255)
    vaft = {**CLEAN_CFG, "attack": {"name": "vafa", "q_max": 20}, "system": {"adv_mode": "vaft", "lr": 1e-3}}
    assert _card(tmp_path, "vit", vaft).training.mode == "vaft"
    assert (
        _card(tmp_path / "external", "vit", None).training.mode == "unknown"
    )  # an external model without a run config


def test_card_unreliable_names_the_flag_of_its_model(tmp_path):
    flags = [
        {"name": "monotonic", "raised": True, "detail": "pgd vit->vit: Dice 0.3@0.01 -> 0.5@0.03"},
        {"name": "gradients", "raised": True, "detail": "cnn: 80% zero input gradients"},
        {"name": "budget", "raised": False, "detail": "all 12 volumes within budget"},
    ]
    card = _card(tmp_path, flags=flags)
    assert [f.name for f in card.flags] == ["gradients", "budget"]  # vit's flag is not cnn's
    assert card.unreliable and card.unreliable_reason == "gradients: cnn: 80% zero input gradients"
    assert flags_for(flags, "vit", ["cnn", "vit"])[0]["name"] == "monotonic"


def test_write_cards_round_trip(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.md").write_text("# report\n")
    models = [_model(tmp_path, "cnn", CLEAN_CFG), _model(tmp_path, "ghost", CLEAN_CFG)]  # ghost: no rows
    settings = {"data": "lits117 (validation, 2 case(s) in this run)", "sliding window": {"overlap": 0.25}, "x": 1}
    paths = write_cards(out, _rows(), models, [], {}, settings)
    assert [p.name for p in paths] == ["cnn.json"]
    card = load_card(paths[0])
    assert card.reports == {"report": "../report.md"} and card.cost.attack_forwards is None
    assert card.evaluation == {"sliding window": {"overlap": 0.25}}  # what reproduces the numbers, not all settings
    assert dataset_of({"data": "mni152 (validation, 1 case(s))"}) == {"name": "mni152", "split": "validation"}


def _valid(tmp_path) -> dict:
    return json.loads(_card(tmp_path).model_dump_json())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("format"), "field 'format' is missing"),
        (lambda c: c.update(format="robustseg-card/0"), "older card format"),
        (lambda c: c.update(format="robustbench"), "'format' is 'robustbench'"),
        (lambda c: c["model"].pop("checkpoint_sha256"), "field 'model.checkpoint_sha256' is missing"),
        (lambda c: c["clean"].update(dice="0.8"), "field 'clean.dice'"),
        (lambda c: c["clean"].update(dice=1.5), "field 'clean.dice'"),
        (lambda c: c["threat_models"][0].pop("robust_dice"), "field 'threat_models[0].robust_dice' is missing"),
        (lambda c: c["threat_models"][1]["attacks"][0]["metrics"].update(n_cases=2.5), "threat_models[1].attacks[0]"),
        (lambda c: c.update(robust=0.3), "field 'robust' is unknown"),
        (lambda c: c.update(unreliable=True), "unreliable_reason is empty"),
        (lambda c: c["model"].update(checkpoint_sha256="abc"), "field 'model.checkpoint_sha256'"),
    ],
)
def test_validator_refuses_bad_cards_naming_the_field(tmp_path, edit, message):
    card = _valid(tmp_path)
    validate_card(copy.deepcopy(card), "ok.json")  # the unedited card passes
    edit(card)
    with pytest.raises(CardError, match="bad.json") as err:
        validate_card(card, "bad.json")
    assert message in str(err.value)


def test_load_card_refuses_non_json(tmp_path):
    path = tmp_path / "card.json"
    path.write_text("{not json")
    with pytest.raises(CardError, match="card.json: cannot read"):
        load_card(path)


def test_cards_from_report_model_dicts_and_record_costs(tmp_path):
    """finalize hands the report's model dicts (no network) and the records, whose ``cost`` gives passes per target
    and per threat model; the parameter count is read from the checkpoint's ``net.`` weights."""
    run = tmp_path / "cnn"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(CLEAN_CFG))
    ckpt = run / "checkpoints" / "best.ckpt"
    torch.save({"epoch": 11, "state_dict": {"net.w": torch.zeros(3, 5), "loss.x": torch.zeros(7)}}, ckpt)
    models = [
        {
            "label": "cnn",
            "architecture": "unet",
            "run_dir": str(run),
            "checkpoint": str(ckpt),
            "checkpoint_sha256": SHA,
        },
        {"label": "surrogate", "architecture": "unetr", "run_dir": None, "checkpoint": "x", "checkpoint_sha256": SHA},
    ]

    def record(attack, budget, fwd, bwd):
        cost = {"attack_forwards": fwd, "attack_backwards": bwd, "score_forwards": 1, "seconds": 0.5}
        return {"source": "cnn", "target": "cnn", "attack": attack, "budget": budget, "case_id": "a", "cost": cost}

    records = [record("fgsm", "8/255", 2, 1), record("pgd", "8/255", 20, 10), record("pgd", "4/255", 20, 10)]
    shared = {**record("pgd", "8/255", 0, 0), "target": "vit"}  # a transfer volume charged to the first target
    records.append(shared)
    records.append({"source": "", "target": "cnn", "attack": "clean", "budget": "0", "case_id": "a", "cost": {}})
    paths = write_cards(tmp_path / "eval", _rows(), models, [], {}, {"data": "lits117 (validation, 1 case(s))"},
                        records=records, class_names=CLASSES)  # fmt: skip
    card = load_card(paths[0])
    assert [p.name for p in paths] == ["cnn.json"]  # the surrogate has no clean row: no card
    assert card.model.parameters == 15 and card.model.architecture == "unet"
    assert card.training.epochs == 12  # trained (checkpoint epoch 11 + 1), not the config's max_epochs 40
    assert card.dataset.class_names == CLASSES and card.clean.dice_per_class["tumour"] == pytest.approx(0.75)
    assert (card.cost.scope, card.cost.attack_forwards, card.cost.attack_backwards) == ("target", 42, 21)
    by_id = {t.id: t for t in card.threat_models}
    assert (by_id["white-box linf 8/255"].attack_forwards, by_id["white-box linf 8/255"].attack_backwards) == (22, 11)
    assert by_id["white-box frequency q_max=20"].attack_forwards is None  # no record: not recorded, never 0
    vit = {**models[1], "label": "vit"}
    transfer = build_card(vit, _rows(), [], {}, {"name": "lits117"}, ["cnn", "vit"], records=records).threat_models[0]
    assert (transfer.id, transfer.attack_forwards) == ("transfer from cnn linf 8/255", 22)  # crafted once, on cnn
