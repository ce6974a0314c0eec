"""Train the model zoo on the real shipped data with ``robustseg.training.train`` and export it to ``zoo/``.

Every entry of :data:`ZOO` is one ``train(cfg)`` run (epoch-based, no wall-time cap) composed from ``conf/`` with
the overrides listed here. A PGD-trained entry starts from its clean sibling's weights (adversarial fine-tuning:
``zoo.init_from`` in its config) and trains with the papers' objective (loss on PGD examples only, ``--adv pgd``)
at a CPU-sized budget (eps 4/255, 2 steps). Each finished run is exported to ``zoo/<name>/``:

* ``checkpoints/best.ckpt``: the best-validation-Dice checkpoint, slimmed to what evaluation needs (weights in fp16,
  hyper-parameters; no optimiser state), loadable by ``evaluate.py --target zoo/<name>`` and by
  ``SegmentationSystem.load_from_checkpoint``;
* ``config.yaml`` (the run's resolved config), ``metrics.csv`` (Lightning's CSV log) and ``train.log`` (one line
  per epoch: training loss, validation Dice, elapsed time).

Cards are written by evaluating the zoo (``scripts/evaluate_zoo.py``), not here.

Usage::

    python scripts/train_zoo.py                       # every entry not yet exported, in order
    python scripts/train_zoo.py unet_small-lits117-clean --runs runs/zoo --zoo zoo
    python scripts/train_zoo.py unet_small-lits117-clean --export-only   # a run stopped by hand: its best so far
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning.pytorch.callbacks import Callback  # noqa: E402

from robustseg.checkpoint_io import safe_torch_load  # noqa: E402
from robustseg.config import load_config  # noqa: E402
from robustseg.training import train  # noqa: E402

log = logging.getLogger("train_zoo")

COMMON = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.check_val_every_n_epoch=3",  # validation costs a sliding window over the slab: every 3rd epoch
    "system.log_images=0",
    "system.lr=1.0e-3",
    "data.roi_size=[48,48,48]",  # 48^3 crops: 0.42x the voxels of 64^3, so more steps fit a CPU budget
]
PGD_AT = ["--adv", "pgd", "attack.eps=4/255", "attack.step_size=2/255", "attack.steps=2"]
# name -> (overrides, clean sibling whose weights a PGD entry starts from)
ZOO: dict[str, tuple[list[str], str | None]] = {
    "unet_small-lits117-clean": (["data=lits117", "model=unet_small", "trainer.max_epochs=200"], None),
    "unetr_small-lits117-clean": (
        [
            "data=lits117",
            "model=unetr_small",
            "data.repeats=32",
            "trainer.max_epochs=100",
            "trainer.check_val_every_n_epoch=4",
        ],
        None,
    ),
    "unet_small-lits117-pgd": (
        ["data=lits117", "model=unet_small", "trainer.max_epochs=40", *PGD_AT],
        "unet_small-lits117-clean",
    ),
    "unetr_small-lits117-pgd": (
        [
            "data=lits117",
            "model=unetr_small",
            "data.repeats=32",
            "trainer.max_epochs=12",
            "trainer.check_val_every_n_epoch=2",
            "system.lr=3.0e-4",  # 1e-3 (8 epochs) lost clean Dice: 0.511 -> 0.474
            *PGD_AT,
        ],
        "unetr_small-lits117-clean",
    ),
    "unet_small-mni152-clean": (["data=mni152", "model=unet_small", "trainer.max_epochs=120"], None),
    "unet_small-mni152-pgd": (
        ["data=mni152", "model=unet_small", "trainer.max_epochs=30", *PGD_AT],
        "unet_small-mni152-clean",
    ),
}


class InitFrom(Callback):
    """Load a zoo checkpoint's network weights before the first step (adversarial fine-tuning of a clean model)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_fit_start(self, trainer, pl_module) -> None:
        ckpt = safe_torch_load(self.path, what="zoo checkpoint")  # weights_only=True
        state = {k[len("net.") :]: v.float() for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        pl_module.net.load_state_dict(state)
        log.info("initialised from %s", self.path)


class EpochLog(Callback):
    """One log line per training epoch: the training loss, and the validation Dice when the epoch validated."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # validation of this epoch (if any) has run before this hook, so its metrics are in callback_metrics
        validated = (trainer.current_epoch + 1) % (trainer.check_val_every_n_epoch or 1) == 0
        keys = ("train/loss", "val/dice") if validated else ("train/loss",)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(keys)}
        text = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        log.info("epoch %d: %s (%.0f s)", trainer.current_epoch, text, time.perf_counter() - self.start)


def slim_checkpoint(src: Path, dst: Path) -> Path:
    """Copy a Lightning checkpoint keeping the weights (fp16) and hyper-parameters only."""
    ckpt = safe_torch_load(src, what="checkpoint")  # weights_only=True
    keep = ("epoch", "global_step", "pytorch-lightning_version", "hyper_parameters", "hparams_name")
    slim = {k: ckpt[k] for k in keep if k in ckpt}
    slim["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, dst)
    return dst


def export(run_dir: Path, dest: Path, log_file: Path) -> None:
    """``zoo/<name>/``: slim best checkpoint, config.yaml, metrics.csv, train.log."""
    slim_checkpoint(run_dir / "checkpoints" / "best.ckpt", dest / "checkpoints" / "best.ckpt")
    shutil.copy(run_dir / "config.yaml", dest / "config.yaml")
    metrics = next(run_dir.rglob("metrics.csv"), None)
    if metrics is not None:
        shutil.copy(metrics, dest / "metrics.csv")
    shutil.copy(log_file, dest / "train.log")
    log.info("exported %s -> %s", run_dir, dest)


def train_entry(name: str, runs: Path, zoo: Path) -> None:
    """Train one zoo entry into ``runs/<name>`` and export it to ``zoo/<name>``."""
    overrides, init = ZOO[name]
    log_file = runs / f"{name}.log"
    runs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        callbacks: list[Callback] = [EpochLog()]
        extra = []
        if init is not None:
            init_ckpt = zoo / init / "checkpoints" / "best.ckpt"
            if not init_ckpt.is_file():
                raise SystemExit(f"{name} starts from {init}: train and export it first ({init_ckpt} missing)")
            callbacks.append(InitFrom(init_ckpt))
            extra.append(f"+zoo.init_from={init_ckpt.relative_to(zoo.parent) if zoo.is_absolute() else init_ckpt}")
        cfg = load_config(
            "train", [*COMMON, *overrides, *extra, f"output_dir={runs}", f"run_name={name}", "+zoo.name=" + name]
        )
        log.info("training %s: %s", name, " ".join([*overrides, *extra]))
        run_dir = train(cfg, callbacks=callbacks)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    export(run_dir, zoo / name, log_file)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"zoo entries (default: all not yet exported): {list(ZOO)}")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "zoo", help="training run directories")
    parser.add_argument("--zoo", type=Path, default=ROOT / "zoo", help="export folder (committed)")
    parser.add_argument("--force", action="store_true", help="retrain entries that are already exported")
    parser.add_argument(
        "--export-only",
        action="store_true",
        help="export the named entries' existing runs (e.g. a run stopped by hand) without training",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    unknown = [n for n in args.names if n not in ZOO]
    if unknown:
        raise SystemExit(f"unknown zoo entries {unknown}; known: {list(ZOO)}")
    for name in args.names or list(ZOO):
        if args.export_only:
            export(args.runs / name, args.zoo / name, args.runs / f"{name}.log")
            continue
        if (args.zoo / name / "checkpoints" / "best.ckpt").is_file() and not args.force:
            log.info("%s is already exported; --force retrains it", name)
            continue
        train_entry(name, args.runs, args.zoo)


if __name__ == "__main__":
    main()
