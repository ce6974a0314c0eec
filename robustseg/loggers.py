"""Experiment loggers for the Trainer: none, csv or W&B (offline unless an API key is configured)."""

from __future__ import annotations

import netrc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from robustseg.errors import ConfigError


def wandb_mode(requested: str = "auto") -> str:
    """``online`` | ``offline`` | ``disabled``. WANDB_MODE in the environment wins; ``auto`` means online only
    when an API key is configured (WANDB_API_KEY or a ``wandb login`` entry in ~/.netrc), so a machine without a
    key never prompts or hangs."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    if requested != "auto":
        return requested
    return "online" if has_wandb_key() else "offline"


def has_wandb_key() -> bool:
    """Whether a W&B API key is configured on this machine (environment or netrc), without asking anybody."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def _none(section: dict[str, Any], run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
    return None


def _csv(section: dict[str, Any], run_dir: Path, run_name: str, config: dict[str, Any]) -> Logger:
    return CSVLogger(save_dir=str(run_dir), name="", version="csv")


def _wandb(section: dict[str, Any], run_dir: Path, run_name: str, config: dict[str, Any]) -> Logger | None:
    mode = wandb_mode(section.get("mode", "auto"))
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(
        save_dir=str(run_dir),
        project=section.get("project", "robustseg"),
        entity=section.get("entity"),
        name=run_name,
        id=None,
        tags=list(section.get("tags", [])),
        log_model=section.get("log_model", False),
        mode=mode,
        config=config,
        settings={"console": "off", "silent": True, "x_disable_stats": True},
    )


LOGGERS: dict[str, Callable[..., Logger | None]] = {"none": _none, "csv": _csv, "wandb": _wandb}


def build_logger(section: dict[str, Any] | None, run_dir: Path, run_name: str, config: dict[str, Any]) -> Logger | None:
    """The logger named by ``section["name"]``, writing under ``run_dir``, with ``config`` recorded."""
    name = (section or {}).get("name", "none")
    if name not in LOGGERS:
        raise ConfigError(f"logger.name={name!r}: expected one of {sorted(LOGGERS)}")
    return LOGGERS[name](section or {}, run_dir, run_name, config)


def finish(logger: Logger | None) -> None:
    """Close a W&B run and its background service so no process outlives the run."""
    if isinstance(logger, WandbLogger):
        import wandb

        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()
