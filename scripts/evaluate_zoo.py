"""Evaluate the model zoo, keep its report and robustness cards in ``zoo/eval/``, regenerate ``LEADERBOARD.md``.

Evaluations (``robustseg.evaluation.evaluate``; each writes a card per target model):

* ``lits117``: FGSM, PGD, VAFA crafted on the clean CNN (white-box on it, transfer to the other lits117 models);
* ``lits117-whitebox``: the same attacks white-box on the other lits117 models (the clean transformer and both
  PGD-trained models);
* ``lits117-from-unetr``: the same attacks crafted on the clean transformer, scored on the CNNs (the other
  direction of the transfer between families);
* ``lits117-reliable``: the reliable suite (APGD with SEA's three losses, ``--suite reliable``) white-box at 8/255
  on the clean and the PGD-trained CNN, when ``conf/suite/reliable.yaml`` exists;
* ``mni152``: FGSM, PGD, VAFA white-box on the brain pair and by transfer from its clean model.

Settings are small so this runs on a CPU in about 15 minutes (``--steps``, default 10, the papers use 20;
``--overlap`` 0.5, the window training validated with;
``--reliable-steps``, default 10, the suite's fixed setting is 100). The full outputs stay in
``runs/zoo_eval/<name>``; the light ones (``report.md``, ``summary.json``/``.csv``, plots, ``cards/``) are copied
to ``zoo/eval/<name>/`` (committed), each zoo model's card of the main evaluation of its dataset to
``zoo/<model>/card.json``, and ``LEADERBOARD.md`` is rendered from every card in ``zoo/eval``.

Usage::

    python scripts/evaluate_zoo.py                    # all evaluations (resumable: finished results are reused)
    python scripts/evaluate_zoo.py --only lits117 mni152 --steps 5
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from robustseg import leaderboard  # noqa: E402
from robustseg.cards import load_card  # noqa: E402
from robustseg.config import CONF_DIR, load_config  # noqa: E402
from robustseg.evaluation import evaluate  # noqa: E402

log = logging.getLogger("evaluate_zoo")

ZOO = ROOT / "zoo"
LIGHT = ("report.md", "summary.json", "summary.csv", "*.png", "montages/*.png")
CNN, VIT = "unet_small-lits117-clean", "unetr_small-lits117-clean"
LITS = (CNN, VIT, "unet_small-lits117-pgd", "unetr_small-lits117-pgd")
MNI = ("unet_small-mni152-clean", "unet_small-mni152-pgd")
MAIN = {"lits117": LITS, "mni152": MNI}  # evaluation whose card goes to zoo/<model>/card.json


def plan(steps: int, reliable_steps: int, attack_names: str, eps: str) -> dict[str, list[str]]:
    """Evaluation name -> evaluate overrides."""
    attacks = [f"--attacks={attack_names}", f"--eps={eps}"]
    attacks += [f"+attack_overrides.{a}.steps={steps}" for a in ("pgd", "vafa") if a in attack_names.split(",")]

    def targets(names) -> str:
        return "--target=" + ",".join(str(ZOO / n) for n in names if (ZOO / n / "checkpoints").is_dir())

    evaluations = {
        "lits117": ["data=lits117", f"--source={ZOO / CNN}", targets(LITS), *attacks],
        "lits117-whitebox": ["data=lits117", targets(LITS[1:]), *attacks],
        "lits117-from-unetr": ["data=lits117", f"--source={ZOO / VIT}", targets(LITS[::2]), *attacks],
        "mni152": ["data=mni152", f"--source={ZOO / MNI[0]}", targets(MNI), "also_whitebox=true", *attacks],
    }
    if (CONF_DIR / "suite" / "reliable.yaml").is_file():
        evaluations["lits117-reliable"] = [
            "data=lits117",
            targets((CNN, LITS[2])),
            "--suite=reliable",
            "attacks=[]",
            "--eps=8/255",
            f"+attack_overrides.apgd.steps={reliable_steps}",
        ]
    return evaluations


def keep(run: Path, dest: Path) -> None:
    """Copy the light outputs of an evaluation (report, summaries, plots, cards) to ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    for pattern in (*LIGHT, "cards/*.json"):
        for path in run.glob(pattern):
            target = dest / path.relative_to(run)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)


def publish_model_cards(name: str, models: tuple[str, ...]) -> None:
    """``zoo/<model>/card.json``: the model's card of evaluation ``name``, its report links rebased."""
    for model in models:
        src = ZOO / "eval" / name / "cards" / f"{model}.json"
        if not src.is_file():
            continue
        card = json.loads(src.read_text())
        card["reports"] = {k: f"../eval/{name}/{Path(v).name}" for k, v in card["reports"].items()}
        load_card(src)  # valid before it is published
        (ZOO / model / "card.json").write_text(json.dumps(card, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="run only these evaluations (default: all)")
    parser.add_argument("--steps", type=int, default=10, help="PGD and VAFA steps")
    parser.add_argument("--attacks", default="fgsm,pgd,vafa", help="conf/attack presets, comma-separated")
    parser.add_argument("--eps", default="4/255,8/255", help="budgets, comma-separated")
    parser.add_argument(
        "--overlap",
        type=float,
        default=0.5,
        help="sliding-window overlap (scoring and crafting; training validates at 0.5)",
    )
    parser.add_argument("--reliable-steps", type=int, default=10, help="APGD steps of each reliable-suite member")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "zoo_eval", help="full evaluation outputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, overrides in plan(args.steps, args.reliable_steps, args.attacks, args.eps).items():
        if args.only and name not in args.only:
            continue
        out = args.runs / name
        overrides = [*overrides, f"output_dir={out}", "frequency.bands=null", "logger=none"]
        overrides.append(f"sw.overlap={args.overlap}")
        cfg = load_config("evaluate", overrides)
        log.info("evaluation %s: %s", name, " ".join(overrides))
        evaluate(cfg)
        keep(out, ZOO / "eval" / name)
        if name in MAIN:
            publish_model_cards(name, MAIN[name])
    cards = sorted((ZOO / "eval").glob("*/cards/*.json"))
    text = leaderboard.render([(p, load_card(p)) for p in cards], ROOT)
    (ROOT / "LEADERBOARD.md").write_text(text)
    log.info("LEADERBOARD.md from %d card(s)", len(cards))


if __name__ == "__main__":
    main()
