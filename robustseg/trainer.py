"""Turn the ``trainer`` config section into ``lightning.Trainer`` keyword arguments."""

from __future__ import annotations

import signal
from typing import Any

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from robustseg.config import check_arguments
from robustseg.errors import ConfigError


def build_trainer_kwargs(section: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Plain Trainer kwargs from the ``trainer`` section.

    ``strategy: ddp`` on CPU uses gloo (Lightning picks it), on GPUs NCCL. An optional ``slurm`` subsection
    (``auto_requeue``, ``requeue_signal``) becomes Lightning's :class:`SLURMEnvironment` plugin.

    Raises:
        ConfigError: a key that is not a Trainer argument, or a value of the wrong type
            (``trainer.max_epochs='abc': expected an integer or null``), before anything is built or written.
    """
    kwargs: dict[str, Any] = (
        OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    )
    slurm = kwargs.pop("slurm", None)
    check_arguments(L.Trainer.__init__, kwargs, "trainer")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if slurm:
        name = slurm.get("requeue_signal", "SIGUSR1")
        if not hasattr(signal, str(name)):
            raise ConfigError(f"trainer.slurm.requeue_signal={name!r} is not a signal name such as SIGUSR1")
        environment = SLURMEnvironment(
            auto_requeue=bool(slurm.get("auto_requeue", True)), requeue_signal=getattr(signal, name)
        )
        kwargs["plugins"] = [*kwargs.get("plugins", []), environment]
    return kwargs
