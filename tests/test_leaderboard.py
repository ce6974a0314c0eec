"""Leaderboard rendering on hand-made cards whose order is known; bad cards refused; tables never mixed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustseg import leaderboard
from robustseg.cards import FORMAT, validate_card

SHA = "cd" * 32


def _metrics(dice: float) -> dict:
    return {"dice": dice, "hd95": 5.0, "nsd": 0.5, "dice_with_bg": None, "dice_per_class": None, "n_cases": 1}


def _threat(budget: str, robust: float, kind: str = "white-box", source: str | None = None, worst_attack="pgd"):
    eps = {"4/255": 4 / 255, "8/255": 8 / 255}[budget]
    prefix = "white-box" if kind == "white-box" else f"transfer from {source}"
    return {
        "id": f"{prefix} linf {budget}",
        "kind": kind,
        "source": source,
        "norm": "linf",
        "budget": budget,
        "eps": eps,
        "attacks": [
            {"attack": "fgsm", "metrics": _metrics(robust + 0.1)},
            {"attack": "pgd", "metrics": _metrics(robust)},
        ],
        "worst": {"metrics": _metrics(robust), "attacks": {worst_attack: 1}, "suite": "standard"},
        "robust_dice": robust,
        "worst_attack": worst_attack,
    }


def _card(label: str, clean: float, threats: list[dict], dataset: str = "lits117", raised: str | None = None) -> dict:
    flags = [{"name": "budget", "raised": False, "detail": "ok"}]
    if raised:
        flags.append({"name": raised, "raised": True, "detail": f"{label}: {raised} failed"})
    return {
        "format": FORMAT,
        "created": "2026-11-30T20:00:00Z",
        "robustseg_version": "0.1.0",
        "dataset": {"name": dataset, "split": "validation", "n_cases": 1, "class_names": None},
        "model": {
            "label": label,
            "architecture": "unet",
            "preset": None,
            "parameters": 10,
            "checkpoint": f"{label}.ckpt",
            "checkpoint_sha256": SHA,
        },
        "training": {
            "mode": "attack" if "pgd" in label else "clean",
            "attack": {"name": "pgd", "eps": "4/255", "steps": 3} if "pgd" in label else None,  # as in config.yaml
            "adv_mode": "adversarial" if "pgd" in label else None,
            "data": dataset,
            "epochs": 10,
            "lr": 1e-3,
            "config": None,
        },
        "preprocessing": {
            "modality": "ct",
            "intensity": None,
            "orientation": "RAS",
            "spacing": None,
            "roi_size": [64] * 3,
        },
        "clean": _metrics(clean),
        "threat_models": threats,
        "cost": {"scope": "run", "attack_forwards": 40, "attack_backwards": 30, "score_forwards": 8, "seconds": 1.0},
        "flags": flags,
        "unreliable": raised is not None,
        "unreliable_reason": f"{raised}: {label}: {raised} failed" if raised else None,
        "reports": {"report": "../report.md"},
    }


def _write(folder: Path, card: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{card['model']['label']}.json"
    path.write_text(json.dumps(card))
    return path


def _cards(tmp_path: Path) -> list[Path]:
    """Three lits117 models with known robust Dice at 8/255 (0.30, 0.60, 0.10), one also at 4/255 and one with a
    transfer threat model; an mni152 model under the same white-box 8/255 threat model."""
    ev = tmp_path / "eval" / "cards"
    return [
        _write(ev, _card("unet-clean", 0.9, [_threat("8/255", 0.30), _threat("4/255", 0.5)])),
        _write(ev, _card("unet-pgd", 0.8, [_threat("8/255", 0.60)], raised="monotonic")),
        _write(ev, _card("unetr-clean", 0.85, [_threat("8/255", 0.10), _threat("8/255", 0.7, "transfer", "unet")])),
        _write(tmp_path / "brain" / "cards", _card("unet-mni", 0.7, [_threat("8/255", 0.65)], dataset="mni152")),
    ]


def _table(text: str, heading: str) -> list[list[str]]:
    """The data rows of the table under ``### heading`` (stops at the next heading)."""
    lines = text.split(f"### {heading}\n", 1)[1].split("\n#", 1)[0].strip().splitlines()
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]


def test_tables_per_dataset_and_threat_model_sorted_by_robust_dice(tmp_path, capsys):
    assert leaderboard.main([str(p) for p in _cards(tmp_path)] + ["--root", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text.index("## lits117") < text.index("## mni152")
    lits, mni = text.split("## mni152")
    assert lits.count("### ") == 3 and mni.count("### ") == 1  # wb 4/255, wb 8/255, transfer; mni's own table
    rows = _table(lits, "white-box linf 8/255")
    assert [(r[0], r[1], r[5]) for r in rows] == [("1", "unet-pgd", "0.6000"), ("2", "unet-clean", "0.3000"),
                                                  ("3", "unetr-clean", "0.1000")]  # fmt: skip
    columns = leaderboard.COLUMNS
    first = dict(zip(columns, rows[0]))
    assert first["clean Dice"] == "0.8000" and first["budget"] == "8/255"
    assert first["training"] == "pgd AT (eps=4/255, 3 steps)"
    assert first["worst attack"] == "pgd (of 2, standard suite)" and first["attacks"] == "fgsm, pgd"
    assert first["flags"] == "**unreliable**: monotonic" and first["cost (fwd / bwd)"] == "40 / 30 (run)"
    assert first["report"] == "[report](eval/report.md)"
    assert dict(zip(columns, rows[1]))["flags"] == "ok"
    assert [r[1] for r in _table(lits, "white-box linf 4/255")] == ["unet-clean"]
    assert [r[1] for r in _table(lits, "transfer from unet linf 8/255")] == ["unetr-clean"]
    assert [r[1] for r in _table(mni, "white-box linf 8/255")] == ["unet-mni"]  # never with lits117's models


def test_ties_break_on_clean_dice(tmp_path):
    paths = [_write(tmp_path, _card(n, c, [_threat("8/255", 0.4)])) for n, c in (("a", 0.7), ("b", 0.9), ("c", 0.8))]
    cards = [(p, validate_card(json.loads(p.read_text()))) for p in paths]
    rows = next(iter(leaderboard.tables(cards, tmp_path).values()))
    assert [r[1] for r in rows] == ["b", "c", "a"]


def test_bad_card_is_refused_naming_file_and_field(tmp_path, capsys):
    good = _cards(tmp_path)[0]
    bad = json.loads(good.read_text())
    del bad["clean"]["dice"]
    path = _write(tmp_path / "bad", bad)
    assert leaderboard.main([str(good), str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and str(path) in captured.err and "field 'clean.dice' is missing" in captured.err
    old = {**json.loads(good.read_text()), "format": "robustseg-card/0"}
    assert leaderboard.main([str(_write(tmp_path / "old", old))]) == 2
    assert "older card format" in capsys.readouterr().err


def test_pipe_in_a_label_does_not_break_the_table(tmp_path):
    path = _write(tmp_path, _card("a|b", 0.9, [_threat("8/255", 0.4)]))
    text = leaderboard.render([(path, validate_card(json.loads(path.read_text())))], tmp_path)
    row = [line for line in text.splitlines() if line.startswith("| 1 ")][0]
    assert "a\\|b" in row and row.count(" | ") == len(leaderboard.COLUMNS) - 1


def test_wandb_logs_one_table_per_threat_model(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    logged, inits = {}, []

    class Run:
        def log(self, data):
            logged.update(data)

        def finish(self):
            pass

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", lambda **kw: inits.append(kw) or Run())
    monkeypatch.setattr(wandb, "teardown", lambda: None)
    paths = _cards(tmp_path)
    cards = [(p, validate_card(json.loads(p.read_text()))) for p in paths]
    leaderboard.log_wandb(cards, tmp_path, "proj", tmp_path / "wb")
    assert inits[0]["mode"] == "offline" and inits[0]["project"] == "proj"
    assert sorted(logged) == [
        "leaderboard/lits117/transfer from unet linf 8/255",
        "leaderboard/lits117/white-box linf 4/255",
        "leaderboard/lits117/white-box linf 8/255",
        "leaderboard/mni152/white-box linf 8/255",
    ]
    table = logged["leaderboard/lits117/white-box linf 8/255"]
    assert [row[1] for row in table.data] == ["unet-pgd", "unet-clean", "unetr-clean"]
