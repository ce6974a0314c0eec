"""``train(cfg)``: build the system, data and Trainer from a composed config, fit, leave a run directory.

A run directory ``<output_dir>/<run_name>/`` holds ``config.yaml`` (the resolved config, written before
training starts), ``checkpoints/best.ckpt`` and ``checkpoints/last.ckpt``, and the logger's files.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from robustseg.config import CONF_DIR, to_yaml
from robustseg.data import build_datamodule
from robustseg.errors import ConfigError
from robustseg.loggers import build_logger, finish
from robustseg.models import MODELS
from robustseg.systems import SegmentationSystem
from robustseg.trainer import build_trainer_kwargs

log = logging.getLogger(__name__)

RUN_DIR_ENV = "ROBUSTSEG_RUN_DIR"  # hands rank 0's run directory to DDP processes it launches


def run_prefix(cfg: DictConfig) -> str:
    """``<model>-<data>-<mode>``: what a run trains; ``ckpt_path=last`` resumes the newest run with this prefix."""
    if cfg.attack is None:
        mode = "clean"
    elif cfg.system.adv_mode == "vaft":
        mode = "vaft"
    else:
        mode = f"{cfg.choices.attack}" + ("" if cfg.system.adv_mode == "adversarial" else f"_{cfg.system.adv_mode}")
    return f"{cfg.choices.model}-{cfg.choices.data}-{mode}"


def resolve_run(cfg: DictConfig) -> tuple[Path, str | None]:
    """The run directory and the checkpoint to resume from (``None`` for a fresh run)."""
    output_dir = Path(cfg.output_dir)
    ckpt = cfg.ckpt_path
    if os.environ.get(RUN_DIR_ENV):  # a process launched by rank 0's DDP launcher
        run_dir = Path(os.environ[RUN_DIR_ENV])
        return run_dir, (_newest_checkpoint(run_dir.parent, run_dir.name) if ckpt == "last" else ckpt)
    if ckpt == "last":
        pattern = f"{cfg.run_name}" if cfg.run_name else f"{run_prefix(cfg)}-*"
        newest = _newest_checkpoint(output_dir, pattern)
        if newest is None:
            raise ConfigError(
                f"ckpt_path=last: no {pattern}/checkpoints/last.ckpt (nor a SLURM hpc_ckpt_*.ckpt) under "
                f"{output_dir.resolve()}"
            )
        path = Path(newest)
        return (path.parent.parent if path.parent.name == "checkpoints" else path.parent), newest
    if ckpt is not None:
        path = Path(ckpt)
        if not path.is_file():
            raise ConfigError(f"ckpt_path={ckpt!r}: no such checkpoint file")
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else output_dir / path.stem
        return run_dir, str(path)
    if cfg.run_name:
        return output_dir / cfg.run_name, None
    # SLURM: tasks of one job (and the job after a requeue) share the run directory through the job id
    suffix = os.environ.get("SLURM_JOB_ID") or time.strftime("%Y%m%d-%H%M%S")
    return output_dir / f"{run_prefix(cfg)}-{suffix}", None


def _newest_checkpoint(output_dir: Path, pattern: str) -> str | None:
    """The most recently written resumable checkpoint of the runs matching ``pattern``: an epoch-end
    ``checkpoints/last.ckpt`` or the ``hpc_ckpt_N.ckpt`` Lightning writes on a SLURM pre-emption signal."""
    found = [*output_dir.glob(f"{pattern}/checkpoints/last.ckpt"), *output_dir.glob(f"{pattern}/hpc_ckpt_*.ckpt")]
    return str(max(found, key=lambda p: p.stat().st_mtime_ns)) if found else None


def build_system(cfg: DictConfig) -> SegmentationSystem:
    """The LightningModule of a run config; raises before any data is touched when a section is wrong."""
    container: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    model = container["model"]
    try:
        model["name"] = MODELS.resolve(model["name"])
    except KeyError as err:
        raise ConfigError(f"model.name: {err.args[0]}") from None
    system_cfg = dict(container["system"])
    system_cfg.pop("monitor", None)
    val_attack = system_cfg.pop("val_attack", None)
    val_steps = system_cfg.pop("val_attack_steps", 2)
    if val_attack:
        val_attack = _attack_preset(val_attack, steps=val_steps)
    data = container["data"]
    try:
        return SegmentationSystem(
            model=model,
            attack=container.get("attack"),
            num_classes=data["num_classes"],
            class_names=data.get("class_names"),
            roi_size=data["roi_size"],
            val_attack=val_attack,
            config=container,
            **system_cfg,
        )
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"cannot build the system from model={model.get('name')!r}, attack: {err}") from None


def _attack_preset(name: str, steps: int) -> dict[str, Any]:
    path = CONF_DIR / "attack" / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"system.val_attack={name!r}: no conf/attack/{name}.yaml; options: {options}")
    section = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if "steps" in section:
        section["steps"] = steps
    return section


def train(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> Path:
    """Fit a system as ``cfg`` says and return its run directory.

    Args:
        cfg: a composed run config (:func:`robustseg.config.load_config`).
        callbacks: extra Lightning callbacks, for programmatic users (the checkpoint callback is always there).
    """
    run_dir, ckpt_path = resolve_run(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    system = build_system(cfg)
    datamodule = build_datamodule(cfg.data)
    datamodule.prepare_data()
    datamodule.validate()  # every data problem surfaces here, before the Trainer starts

    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(cfg, run_dir)
    config = system.hparams.config
    logger = build_logger(config.get("logger"), run_dir, run_dir.name, config)
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=cfg.system.monitor,
        mode="max",
        save_last=True,
        save_top_k=1,
        enable_version_counter=False,
    )
    callbacks = [checkpoint, *callbacks] + ([LearningRateMonitor("step")] if logger is not None else [])
    trainer = L.Trainer(
        **build_trainer_kwargs(cfg.trainer),
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        inference_mode=system.val_attack is None,  # adversarial validation needs gradients
    )
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
        finish(logger)
    if trainer.is_global_zero:
        log.info("run directory: %s (best: %s)", run_dir, checkpoint.best_model_path or "none")
    return run_dir


def _write_config(cfg: DictConfig, run_dir: Path) -> None:
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
