"""`make demo`: exercise training on real data, then attack the model zoo and write report, cards and leaderboard.

1. Training: ``unet_small`` on data=lits117 (one real abdominal CT) for ``DEMO_TRAIN_EPOCHS`` epochs (default 20) with
   ``robustseg.training.train``, to show the training path works end to end. This briefly trained model is NOT
   attacked: a network trained for a minute segments poorly, and robustness numbers of such a model mean nothing.
2. The attacked models are the committed zoo (``zoo/``, trained by ``scripts/train_zoo.py`` for as many epochs as
   they needed, no wall-time cap): a CNN and a transformer, each clean and PGD-trained. Each states its clean
   validation Dice before the attacks; a model below ``MIN_DICE`` (0.5, foreground mean) is not attacked, unless
   the surrogate itself is below it: then all are, each named in a warning (see docs/zoo.md: the committed zoo).
3. Evaluation (``robustseg.evaluation.evaluate``): FGSM, PGD and VAFA white-box on every attacked zoo model and by
   transfer from the clean CNN to the others, at 4/255 and 8/255; transfer between families from the clean
   transformer (the surrogate only crafts, so it needs no Dice bar) to the attacked CNNs; then the reliable suite
   (APGD with SEA's three losses, ``--suite reliable``) white-box on the attacked clean models at 8/255 with
   ``DEMO_RELIABLE_STEPS`` steps.
4. Outputs under ``runs/demo``: ``eval/report.md`` (and ``from-unetr/report.md``, ``reliable/report.md``), a
   robustness card per model and evaluation (``*/cards/*.json``), ``LEADERBOARD.md`` built from those cards, and
   offline W&B runs.

Knobs (environment): ``DEMO_TRAIN_EPOCHS``, ``DEMO_PGD_STEPS`` / ``DEMO_VAFA_STEPS`` (default 5; the papers use 20),
``DEMO_RELIABLE_STEPS`` (default 10; the suite's fixed setting is 100), ``DEMO_RUNS`` (output folder).
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from robustseg import leaderboard  # noqa: E402
from robustseg.cards import load_card  # noqa: E402
from robustseg.config import CONF_DIR, load_config  # noqa: E402
from robustseg.evaluation import evaluate  # noqa: E402
from robustseg.training import train  # noqa: E402

log = logging.getLogger("demo")

TRAIN_EPOCHS = int(os.environ.get("DEMO_TRAIN_EPOCHS", "20"))
PGD_STEPS = int(os.environ.get("DEMO_PGD_STEPS", "5"))
VAFA_STEPS = int(os.environ.get("DEMO_VAFA_STEPS", "5"))
RELIABLE_STEPS = int(os.environ.get("DEMO_RELIABLE_STEPS", "10"))
RUNS = Path(os.environ.get("DEMO_RUNS", ROOT / "runs" / "demo"))
ZOO = ROOT / "zoo"
SOURCE = "unet_small-lits117-clean"  # the surrogate for transfer: the clean CNN
OTHER_FAMILY = "unetr_small-lits117-clean"  # the second surrogate: transformer -> CNN transfer
TARGETS = ("unet_small-lits117-clean", "unetr_small-lits117-clean", "unet_small-lits117-pgd", "unetr_small-lits117-pgd")
RELIABLE_TARGETS = ("unet_small-lits117-clean", "unet_small-lits117-pgd", "unetr_small-lits117-clean")
MIN_DICE = 0.5


def train_briefly() -> Path:
    """Train ``unet_small`` on lits117 for ``TRAIN_EPOCHS`` epochs (the training path, not a model to attack)."""
    cfg = load_config(
        "train",
        [
            "data=lits117",
            "model=unet_small",
            "logger=csv",
            f"output_dir={RUNS}",
            "run_name=unet_small-brief",
            f"trainer.max_epochs={TRAIN_EPOCHS}",
            "trainer.enable_progress_bar=false",
            "system.log_images=0",
        ],
    )
    return train(cfg)


def best_val_dice(run_dir: Path) -> float | None:
    """The best ``val/dice/clean`` in a run's Lightning CSV log (None when it never validated)."""
    values = []
    for path in run_dir.rglob("metrics.csv"):
        with open(path) as f:
            values += [float(r["val/dice/clean"]) for r in csv.DictReader(f) if r.get("val/dice/clean")]
    return max(values) if values else None


def clean_dice(run: Path) -> tuple[float, str]:
    """A zoo model's clean Dice on lits117's validation slab, and where it comes from.

    Its card's (``zoo/<name>/card.json``: the zoo evaluation, scored on the slab's real voxels as every reported
    number is) when there is one; else the best ``val/dice/clean`` of its training log (scored on the padded slab).
    """
    card = run / "card.json"
    if card.is_file():
        return load_card(card).clean.dice, "its robustness card"
    return best_val_dice(run) or 0.0, "its training log"


def zoo_models() -> dict[str, Path]:
    """The zoo's lits117 models, each with its clean validation Dice stated.

    Models at or above ``MIN_DICE`` are attacked. When the surrogate is below it (a zoo not yet retrained on an idle
    machine, see docs/zoo.md), every zoo model is attacked anyway so the pipeline still runs end to end, and each
    weak model is named in a warning: its robustness numbers describe a model that segments poorly.
    """
    present, dice = {}, {}
    for name in TARGETS:
        run = ZOO / name
        if not (run / "checkpoints" / "best.ckpt").is_file():
            log.warning("zoo model %s is missing (train it: python scripts/train_zoo.py %s); skipped", name, name)
            continue
        present[name], dice[name], where = run, *clean_dice(run)
        log.info(
            "zoo model %s: clean validation Dice %.3f (foreground mean, lits117 validation; %s)",
            name,
            dice[name],
            where,
        )
    if SOURCE not in present:
        raise SystemExit(f"the demo's surrogate {SOURCE} is not in {ZOO}: run python scripts/train_zoo.py {SOURCE}")
    good = {n: r for n, r in present.items() if dice[n] >= MIN_DICE}
    if SOURCE in good:
        for name in sorted(set(present) - set(good)):
            log.warning("zoo model %s: Dice %.3f < %.1f: NOT attacked (retrain it)", name, dice[name], MIN_DICE)
        return good
    for name in present:
        if dice[name] < MIN_DICE:
            log.warning(
                "zoo model %s: clean validation Dice %.3f < %.1f: attacked only to exercise the pipeline; its "
                "robustness numbers describe a weak model (retrain the zoo on an idle machine: docs/zoo.md)",
                name,
                dice[name],
                MIN_DICE,
            )
    return present


def run_evaluation(out: Path, overrides: list[str]) -> Path:
    cfg = load_config(
        "evaluate",
        ["data=lits117", f"runs_root={RUNS}", f"output_dir={out}", "frequency.bands=null", "sw.overlap=0.25"]
        + overrides,
    )
    return evaluate(cfg)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    brief = train_briefly()
    brief_dice = best_val_dice(brief)  # one read of its metrics.csv
    log.info(
        "training path exercised: %s, %d epoch(s), validation Dice %s (not attacked: the zoo models are) in %.0f s",
        brief.name,
        TRAIN_EPOCHS,
        f"{brief_dice:.3f}" if brief_dice is not None else "n/a",
        time.perf_counter() - start,
    )
    models = zoo_models()
    main_eval = run_evaluation(
        RUNS / "eval",
        [
            f"--source={models[SOURCE]}",
            "--target=" + ",".join(str(p) for p in models.values()),
            "also_whitebox=true",  # white-box on each model + transfer from the clean CNN, volumes crafted once
            "--attacks=fgsm,pgd,vafa",
            "--eps=4/255,8/255",
            f"+attack_overrides.pgd.steps={PGD_STEPS}",
            f"+attack_overrides.vafa.steps={VAFA_STEPS}",
        ],
    )
    evaluations = [main_eval]
    surrogate = ZOO / OTHER_FAMILY
    if (surrogate / "checkpoints" / "best.ckpt").is_file():
        # transfer between families, transformer -> CNNs: the surrogate only crafts the volumes (it is not attacked,
        # so it needs no Dice bar); every scored model is one of the attacked zoo models above
        dice, where = clean_dice(surrogate)
        log.info("transfer surrogate %s: clean Dice %.3f (%s); it crafts, it is not scored", OTHER_FAMILY, dice, where)
        cnns = [str(p) for n, p in models.items() if n.startswith("unet_")]
        evaluations.append(
            run_evaluation(
                RUNS / "from-unetr",
                [
                    f"--source={surrogate}",
                    "--target=" + ",".join(cnns),
                    "--attacks=fgsm,pgd,vafa",
                    "--eps=4/255,8/255",
                    f"+attack_overrides.pgd.steps={PGD_STEPS}",
                    f"+attack_overrides.vafa.steps={VAFA_STEPS}",
                ],
            )
        )
    if (CONF_DIR / "suite" / "reliable.yaml").is_file():
        evaluations.append(
            run_evaluation(
                RUNS / "reliable",
                [
                    "--target=" + ",".join(str(models[t]) for t in RELIABLE_TARGETS if t in models),
                    "--suite=reliable",
                    "attacks=[]",
                    "--eps=8/255",
                    f"+attack_overrides.apgd.steps={RELIABLE_STEPS}",
                ],
            )
        )
    else:
        log.warning("conf/suite/reliable.yaml is missing: the reliable suite is skipped")
    cards = sorted(p for e in evaluations for p in (e / "cards").glob("*.json"))
    board = RUNS / "LEADERBOARD.md"
    loaded = [(p, load_card(p)) for p in cards]
    board.write_text(leaderboard.render(loaded, RUNS))
    leaderboard.log_wandb(loaded, RUNS, "robustseg", RUNS / "leaderboard")
    log.info("demo done in %.0f s: %s, %d card(s), %s", time.perf_counter() - start, main_eval / "report.md",
             len(cards), board)  # fmt: skip
    sys.stdout.write(f"report: {main_eval / 'report.md'}\nleaderboard: {board}\n")


if __name__ == "__main__":
    main()
