"""Turn the ``trainer`` config section into ``lightning.Trainer`` keyword arguments."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


def build_trainer_kwargs(section: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Plain Trainer kwargs; ``strategy: ddp`` on CPU uses gloo (Lightning picks it), on GPUs NCCL."""
    kwargs: dict[str, Any] = (
        OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    )
    return {k: v for k, v in kwargs.items() if v is not None}
