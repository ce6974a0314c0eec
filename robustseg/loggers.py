"""Experiment loggers for the Trainer: none, csv or W&B (offline unless an API key is configured).

A resumed run never loses what it logged before: the CSV logger appends to ``metrics.csv`` (Lightning's own
deletes it when the log folder is not empty), and the W&B logger continues the run's W&B run (same id,
``resume="allow"``) instead of starting an empty one; ``wandb sync`` then joins the offline parts in order.
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from robustseg.errors import ConfigError

log = logging.getLogger(__name__)


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


class KeepingExperimentWriter(ExperimentWriter):
    """``metrics.csv`` writer that keeps the rows already in the file: a resumed run appends to them.

    New metric names widen the header (earlier rows get empty cells); the file is then rewritten atomically.
    """

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes an existing metrics.csv here; earlier epochs' rows must stay."""

    def save(self) -> None:
        if not self.metrics:
            return
        path = Path(self.metrics_file_path)
        header: list[str] = []
        if path.is_file() and path.stat().st_size:
            with path.open(newline="") as f:
                header = next(csv.reader(f), [])
        keys = header + sorted({k for m in self.metrics for k in m} - set(header))
        if header and keys == header:
            with path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=keys).writerows(self.metrics)
        else:
            rows = []
            if header:
                with path.open(newline="") as f:
                    rows = list(csv.DictReader(f))
            tmp = path.with_name(f".{path.name}.tmp")
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows([*rows, *self.metrics])
            os.replace(tmp, path)
        self.metrics = []


class KeepingCSVLogger(CSVLogger):
    """Lightning's CSVLogger whose ``metrics.csv`` survives a resume (see :class:`KeepingExperimentWriter`)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> KeepingExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = KeepingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


_WANDB_RUN_DIR = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-([A-Za-z0-9_-]+)$")


def previous_wandb_id(run_dir: Path) -> str | None:
    """The id of the newest W&B run written under ``<run_dir>/wandb/`` (online or offline), if any."""
    folder = Path(run_dir) / "wandb"
    found = [m.groups() for p in folder.glob("*run-*") if p.is_dir() and (m := _WANDB_RUN_DIR.match(p.name))]
    return max(found)[1] if found else None


def _none(section: dict[str, Any], run_dir: Path, run_name: str, config: dict[str, Any], resume: bool) -> None:
    return None


def _csv(section: dict[str, Any], run_dir: Path, run_name: str, config: dict[str, Any], resume: bool) -> Logger:
    return KeepingCSVLogger(save_dir=str(run_dir), name="", version="csv")


def _wandb(
    section: dict[str, Any], run_dir: Path, run_name: str, config: dict[str, Any], resume: bool
) -> Logger | None:
    mode = wandb_mode(section.get("mode", "auto"))
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    if wandb.run is not None:  # WandbLogger would silently log this run into a run left open in this process
        log.warning("W&B run %s was still open in this process: finished before run %s", wandb.run.id, run_name)
        wandb.finish()
    run_id = previous_wandb_id(run_dir) if resume else None  # a resumed training continues its W&B run
    return WandbLogger(
        save_dir=str(run_dir),
        project=section.get("project", "robustseg"),
        entity=section.get("entity"),
        name=run_name,
        id=run_id,
        resume="allow",
        tags=list(section.get("tags", [])),
        log_model=section.get("log_model", False),
        mode=mode,
        config=config,
        settings={"console": "off", "silent": True, "x_disable_stats": True},
    )


LOGGERS: dict[str, Callable[..., Logger | None]] = {"none": _none, "csv": _csv, "wandb": _wandb}


def build_logger(
    section: dict[str, Any] | None, run_dir: Path, run_name: str, config: dict[str, Any], resume: bool = False
) -> Logger | None:
    """The logger named by ``section["name"]``, writing under ``run_dir``, with ``config`` recorded.

    Args:
        resume: the run continues from a checkpoint: W&B continues the run's newest W&B run id.
    """
    name = (section or {}).get("name", "none")
    if name not in LOGGERS:
        raise ConfigError(f"logger.name={name!r}: expected one of {sorted(LOGGERS)}")
    return LOGGERS[name](section or {}, run_dir, run_name, config, resume)


def finish(logger: Logger | None) -> None:
    """Close a W&B run and its background service so no process outlives the run."""
    if isinstance(logger, WandbLogger):
        import wandb

        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()
