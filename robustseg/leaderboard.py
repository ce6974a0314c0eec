"""Leaderboards from robustness cards: ``python -m robustseg.leaderboard CARD... > LEADERBOARD.md``.

One markdown table per (dataset, threat model), as RobustBench generates its leaderboards from model cards
(Croce et al., NeurIPS 2021 Datasets and Benchmarks). Cards of different datasets or threat models never share a
table: a table's key is the dataset name plus the threat model's ``id`` (kind, surrogate, norm, budget). Rows are
sorted by robust Dice (the worst case over the attacks of that threat model), best first; each row gives the clean
Dice, the budget, the attack that was worst, the network passes the evaluation spent, the raised sanity flags (an
``unreliable`` card is marked) and a link to its evaluation report. ``--wandb`` logs the same tables to a W&B run
(offline unless an API key is configured).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustseg.cards.schema import Card, CardError, ThreatModel, load_card

log = logging.getLogger(__name__)

COLUMNS = (
    "rank",
    "model",
    "architecture",
    "training",
    "clean Dice",
    "robust Dice",
    "budget",
    "worst attack",
    "attacks",
    "cost (fwd / bwd)",
    "flags",
    "report",
)


@dataclass(frozen=True)
class Entry:
    """One card under one of its threat models (a leaderboard row before formatting)."""

    card: Card
    threat: ThreatModel
    path: Path  # the card file


def entries(cards: Sequence[tuple[Path, Card]]) -> dict[tuple[str, str], list[Entry]]:
    """Rows grouped by (dataset, threat model id), each group sorted by robust Dice (then clean Dice), best first."""
    tables: dict[tuple[str, str], list[Entry]] = {}
    for path, card in cards:
        for threat in card.threat_models:
            tables.setdefault((card.dataset.name, threat.id), []).append(Entry(card, threat, path))
    for rows in tables.values():
        rows.sort(key=lambda e: (-e.threat.robust_dice, -e.card.clean.dice, e.card.model.label))
    return dict(sorted(tables.items(), key=lambda kv: _table_order(kv[0], kv[1][0].threat)))


def _table_order(key: tuple[str, str], threat: ThreatModel) -> tuple:
    return (key[0], threat.kind != "white-box", threat.source or "", threat.norm, threat.eps or 0.0, key[1])


def _training(card: Card) -> str:
    t = card.training
    if t.mode == "attack" and t.attack:
        attack = t.attack
        name = attack.get("name", "?")
        budget = next((f"{k}={_number(attack[k])}" for k in ("eps", "sigma", "q_max") if k in attack), "")
        steps = f", {attack['steps']} steps" if "steps" in attack else ""
        return f"{name} AT ({budget}{steps})" + (f", {t.adv_mode}" if t.adv_mode not in (None, "adversarial") else "")
    return t.mode


def _number(value: Any) -> str:
    """``0.0157`` -> ``0.01569``; a config string such as ``4/255`` stays as written."""
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def _passes(card: Card, threat: ThreatModel) -> str:
    """Crafting passes of this threat model's volumes, else the card's total (``(run)`` when run-wide)."""
    if threat.attack_forwards is not None:
        return f"{threat.attack_forwards} / {threat.attack_backwards if threat.attack_backwards is not None else '-'}"
    c = card.cost
    if c.attack_forwards is None:
        return "-"
    scope = "" if c.scope == "target" else " (run)"
    return f"{c.attack_forwards} / {c.attack_backwards if c.attack_backwards is not None else '-'}{scope}"


def _flags(card: Card) -> str:
    raised = sorted({f.name for f in card.flags if f.raised})
    if card.unreliable:
        return "**unreliable**: " + ", ".join(raised)
    return ", ".join(raised) or "ok"


def _worst(threat: ThreatModel) -> str:
    if threat.worst is None:
        return threat.worst_attack
    return f"{threat.worst_attack} (of {len(threat.attacks)}, {threat.worst.suite} suite)"


def _link(card: Card, path: Path, root: Path) -> str:
    report = card.reports.get("report")
    if not report:
        return "-"
    target = (path.parent / report).resolve()
    try:
        rel = os.path.relpath(target, root.resolve())
    except ValueError:  # another drive (Windows)
        rel = str(target)
    return f"[report]({Path(rel).as_posix()})"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def row_cells(rank: int, entry: Entry, root: Path) -> list[str]:
    """The table cells of one entry, in :data:`COLUMNS` order."""
    card, threat = entry.card, entry.threat
    return [
        str(rank),
        card.model.label,
        card.model.architecture,
        _training(card),
        f"{card.clean.dice:.4f}",
        f"{threat.robust_dice:.4f}",
        threat.budget,
        _worst(threat),
        ", ".join(a.attack for a in threat.attacks),
        _passes(card, threat),
        _flags(card),
        _link(card, entry.path, root),
    ]


def tables(cards: Sequence[tuple[Path, Card]], root: Path) -> dict[tuple[str, str], list[list[str]]]:
    """(dataset, threat model id) -> rows of cells, ranked."""
    return {key: [row_cells(i + 1, e, root) for i, e in enumerate(rows)] for key, rows in entries(cards).items()}


def render(cards: Sequence[tuple[Path, Card]], root: Path = Path(".")) -> str:
    """The leaderboard markdown: a heading per dataset, a table per threat model."""
    lines = [
        "# Leaderboard",
        "",
        "Generated by `python -m robustseg.leaderboard` from robustness cards (format `robustseg-card/1`, "
        "[docs/cards.md](docs/cards.md)). Robust Dice: foreground mean Dice under the per-case worst attack of the "
        "threat model (the single attack's Dice when only one ran); sorted best first. Cost: network forward / "
        "backward passes the evaluation spent crafting, `(run)` when shared by all models of one evaluation.",
    ]
    dataset = None
    for (name, threat_id), rows in tables(cards, root).items():
        if name != dataset:
            lines += ["", f"## {name}"]
            dataset = name
        lines += ["", f"### {threat_id}", "", "| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    if dataset is None:
        lines += ["", "_no threat models in the given cards_"]
    return "\n".join(lines) + "\n"


def log_wandb(cards: Sequence[tuple[Path, Card]], root: Path, project: str, run_dir: Path) -> None:
    """Log every table as ``leaderboard/<dataset>/<threat model>`` to a new W&B run (offline without a key)."""
    from robustseg.loggers import wandb_mode

    mode = wandb_mode("auto")
    if mode == "disabled":
        log.info("W&B is disabled (WANDB_MODE=disabled): no leaderboard run")
        return
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=project,
        name="leaderboard",
        job_type="leaderboard",
        dir=str(run_dir),
        mode=mode,
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
    )
    try:
        for (name, threat_id), rows in tables(cards, root).items():
            run.log({f"leaderboard/{name}/{threat_id}": wandb.Table(columns=list(COLUMNS), data=rows)})
    finally:
        run.finish()
        wandb.teardown()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: validate the cards, print the leaderboard; exit status 2 on a bad card (named on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m robustseg.leaderboard", description=__doc__.split("\n")[0])
    parser.add_argument("cards", nargs="+", type=Path, help="robustness card JSON files (robustseg-card/1)")
    parser.add_argument("--root", type=Path, default=Path("."), help="where the markdown will live (for links)")
    parser.add_argument("--wandb", action="store_true", help="also log the tables to a W&B run")
    parser.add_argument("--wandb-project", default="robustseg", help="W&B project of that run")
    parser.add_argument("--wandb-dir", type=Path, default=Path("runs/leaderboard"), help="W&B run directory")
    args = parser.parse_args(argv)
    try:
        cards = [(path, load_card(path)) for path in args.cards]
    except CardError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    sys.stdout.write(render(cards, args.root))
    if args.wandb:
        log_wandb(cards, args.root, args.wandb_project, args.wandb_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
