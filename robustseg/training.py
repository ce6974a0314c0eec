"""``train(cfg)``: build the system, data and Trainer from a composed config, fit, leave a run directory.

A run directory ``<output_dir>/<run_name>/`` holds ``config.yaml`` (the resolved config, written before
training starts), ``checkpoints/best.ckpt`` and ``checkpoints/last.ckpt``, and the logger's files.

Nothing is written before the whole configuration is known to be valid: the output location, the checkpoint to
resume from (read with ``weights_only=True``), the Trainer and system sections, the data and the Trainer itself
are checked first; only then is the run directory created. A failure to create it (read-only, a file in the
way, a full disk) leaves no orphan directory behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from robustseg.checkpoint_io import is_trusted, safe_torch_load
from robustseg.config import CONF_DIR, check_arguments, to_yaml
from robustseg.data import build_datamodule
from robustseg.errors import CheckpointError, ConfigError, OutputError
from robustseg.loggers import build_logger, finish
from robustseg.models import MODELS
from robustseg.systems import SegmentationSystem
from robustseg.trainer import build_trainer_kwargs

log = logging.getLogger(__name__)

RUN_DIR_ENV = "ROBUSTSEG_RUN_DIR"  # hands rank 0's run directory to DDP processes it launches
# Trainer arguments train() sets itself, and where the user chooses them instead
RESERVED_TRAINER_KEYS = {
    "logger": "choose it with logger=csv|wandb|none",
    "callbacks": "pass callbacks to train(cfg, callbacks=...)",
    "default_root_dir": "it is the run directory: set output_dir / run_name",
    "inference_mode": "it follows system.val_attack",
}


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
    output_dir = Path(cfg.output_dir).expanduser()
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
    check_arguments(SegmentationSystem.__init__, system_cfg, "system")
    _check_system_ranges({**system_cfg, "val_attack_steps": val_steps})
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


# system.<key>: (lowest, highest) allowed, None = unbounded; a bound in a list is exclusive (lr > 0)
SYSTEM_RANGES: dict[str, tuple[Any, Any]] = {
    "lr": ([0.0], None),
    "weight_decay": (0.0, None),
    "warmup_epochs": (0, None),
    "adv_weight": (0.0, 1.0),
    "freq_weight": (0.0, None),
    "sw_overlap": (0.0, [1.0]),  # MONAI's sliding window needs overlap < 1
    "sw_batch_size": (1, None),
    "val_attack_steps": (1, None),
    "val_attack_cases": (0, None),
    "log_images": (0, None),
}


def _check_system_ranges(values: dict[str, Any]) -> None:
    """Numbers of the ``system`` section must lie in their range (types are checked by ``check_arguments``)."""
    for key, (low, high) in SYSTEM_RANGES.items():
        value = values.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"system.{key}={value!r}: expected a number")
        parts, ok = [], True
        if low is not None:
            bound, strict = (low[0], True) if isinstance(low, list) else (low, False)
            ok &= value > bound if strict else value >= bound
            parts.append(f"{'>' if strict else '>='} {bound}")
        if high is not None:
            bound, strict = (high[0], True) if isinstance(high, list) else (high, False)
            ok &= value < bound if strict else value <= bound
            parts.append(f"{'<' if strict else '<='} {bound}")
        if not ok:
            raise ConfigError(f"system.{key}={value!r}: expected a number {' and '.join(parts)}")


def check_output_dir(path: str | Path, key: str = "output_dir") -> Path:
    """Check, without writing anything, that ``path`` is or can become a directory this process can write.

    Raises:
        OutputError: a file stands at ``path`` or one of its parents, or the nearest existing parent is not
            writable (read-only file system, no permission); the message names ``key`` and the path.
    """
    path = Path(path).expanduser()
    probe = path
    while not probe.exists() and probe.parent != probe:  # the nearest existing ancestor decides
        probe = probe.parent
    if not probe.is_dir():
        where = "" if probe == path else f" ({probe} is a file)"
        raise OutputError(f"{key}={str(path)!r} is a file{where}; expected a directory (or a path one can be made at)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(
            f"{key}={str(path)!r}: {probe} is not writable (read-only file system or no permission); "
            "expected a directory you can write"
        )
    return path


def check_resume_checkpoint(path: str | Path) -> None:
    """Read a checkpoint to resume from with ``weights_only=True`` before anything is written.

    Raises:
        CheckpointError: missing, empty, corrupt, or holding objects that could run code when unpickled.
    """
    ckpt = safe_torch_load(path, what="checkpoint to resume from (ckpt_path)")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"ckpt_path={str(path)!r} is not a Lightning checkpoint (no 'state_dict')")


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
    check_output_dir(cfg.output_dir)
    run_dir, ckpt_path = resolve_run(cfg)
    trainer_kwargs = build_trainer_kwargs(cfg.trainer)  # a bad trainer.<key> fails here, before any work
    reserved = sorted(set(trainer_kwargs) & set(RESERVED_TRAINER_KEYS))
    if reserved:
        raise ConfigError(
            f"trainer.{reserved[0]} is set by robustseg ({RESERVED_TRAINER_KEYS[reserved[0]]}); remove it from the "
            "trainer section"
        )
    resume_from = [ckpt_path] if ckpt_path else _slurm_checkpoints(run_dir)
    for path in resume_from:
        check_resume_checkpoint(path)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    system = build_system(cfg)
    datamodule = build_datamodule(cfg.data)
    datamodule.prepare_data()
    datamodule.validate()  # every data problem surfaces here, before the Trainer starts

    config = system.hparams.config
    logger = build_logger(config.get("logger"), run_dir, run_dir.name, config, resume=bool(resume_from))
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
    try:
        trainer = L.Trainer(
            **trainer_kwargs,
            logger=logger if logger is not None else False,
            callbacks=callbacks,
            default_root_dir=str(run_dir),
            inference_mode=system.val_attack is None,  # adversarial validation needs gradients
        )
    except (MisconfigurationException, ValueError, TypeError, RuntimeError, ImportError) as err:
        finish(logger)
        raise ConfigError(f"trainer: cannot build the Lightning Trainer: {err}") from None
    _create_run_dir(cfg, run_dir)  # the first write of the run
    os.environ[RUN_DIR_ENV] = str(run_dir)
    # weights_only=True unless the user trusted this very file (ROBUSTSEG_TRUST_PICKLE): no code runs on resume
    weights_only = not any(is_trusted(p) for p in resume_from)
    try:
        trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=weights_only)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
        finish(logger)
    if trainer.is_global_zero:
        log.info("run directory: %s (best: %s)", run_dir, checkpoint.best_model_path or "none")
    return run_dir


def _slurm_checkpoints(run_dir: Path) -> list[str]:
    """The SLURM pre-emption checkpoint Lightning resumes from on its own (highest ``hpc_ckpt_N.ckpt``), if any."""
    found = list(run_dir.glob("hpc_ckpt_*.ckpt")) if run_dir.is_dir() else []
    numbered = [(int(p.stem.rsplit("_", 1)[-1]), p) for p in found if p.stem.rsplit("_", 1)[-1].isdigit()]
    return [str(max(numbered)[1])] if numbered else []


def _create_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Create the run directory and write ``config.yaml``; on failure remove what this call created.

    Raises:
        OutputError: naming the directory, ``output_dir`` and the system's reason (read-only, full disk, ...).
    """
    first_new = None  # the outermost directory this call creates, removed again on failure
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists():
            break
        first_new = parent
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(cfg, run_dir)
    except OSError as err:
        if first_new is not None:
            shutil.rmtree(first_new, ignore_errors=True)
        reason = err.strerror or str(err)
        raise OutputError(
            f"cannot write the run directory {run_dir} (output_dir={cfg.output_dir!r}): {reason}; "
            "expected a writable directory with free space"
        ) from None


def _write_config(cfg: DictConfig, run_dir: Path) -> None:
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    try:
        tmp.write_text(to_yaml(cfg))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a partial temporary file (full disk) never stays behind
