"""Turn a model spec from the command line into a loaded network and what evaluation needs to know about it.

A spec is, in this order:

* a ``.ckpt`` file (a Lightning checkpoint of ``SegmentationSystem``: rebuilt from its hyper-parameters alone);
* a run directory ``<run>/checkpoints/{best,last}.ckpt`` (``best`` unless ``checkpoint: last``);
* a ``.yaml`` describing an external model: ``torchscript: file`` or ``state_dict: file`` plus
  ``architecture: {name: <registered>, ...kwargs}``, with ``num_classes``, ``in_channels``, ``roi_size``,
  optional ``class_names`` and ``intensity`` (the preprocessing it expects, recorded in the report);
* a registered model name or unique prefix (``unet``, ``swin``), or a model preset name (``unet_small``), or a
  run name: the newest checkpoint of a run under ``runs_root`` whose ``config.yaml`` has that model and the
  evaluated dataset.

Weights are loaded with a strict key and shape comparison, so a checkpoint of another architecture or class
count fails with :class:`~robustseg.errors.CheckpointError` naming the mismatched keys and shapes.
A run name matching runs of several training modes is an error unless ``train_mode=`` picks one; a missing
``best.ckpt`` falls back to ``last.ckpt`` (logged, and recorded as the model's ``checkpoint_note``); a checkpoint
whose architecture is not the one its run directory's ``config.yaml`` names is refused (``modelinfo.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from robustseg.checkpoint_io import safe_torch_load
from robustseg.errors import CheckpointError, ConfigError
from robustseg.evaluation.modelinfo import check_run_architecture, preprocessing_of, run_config, train_mode
from robustseg.evaluation.store import file_sha256
from robustseg.models import MODELS

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A network ready for evaluation (eval mode, parameters frozen) and its provenance."""

    label: str  # how tables name it
    net: nn.Module
    model_name: str  # registered architecture, or "torchscript"
    num_classes: int
    in_channels: int
    roi_size: tuple[int, int, int]
    checkpoint: str
    checkpoint_sha256: str
    class_names: list[str] | None = None
    data_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    run_dir: str | None = None  # the run directory of a robustseg checkpoint
    train_mode: str | None = None  # clean | <attack preset>[_<adv_mode>] | vaft (robustseg runs), else None
    preprocessing: dict[str, Any] | None = None  # training data's modality / intensity / spacing / orientation
    checkpoint_note: str | None = None  # e.g. "checkpoint=best requested; no best.ckpt, used last.ckpt"


def strict_load(net: nn.Module, state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """``net.load_state_dict`` that names every missing, unexpected and mis-shaped key on failure."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:5]))
        if missing:
            parts.append(f"{len(missing)} key(s) missing from the checkpoint: {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) in the checkpoint: {unexpected[:5]}")
        raise CheckpointError(
            f"{where} does not fit the architecture it is loaded into ({type(net).__name__}): " + ". ".join(parts)
        )
    net.load_state_dict(state_dict)


def _freeze(net: nn.Module) -> nn.Module:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)  # attacks need input gradients only: a bare pass, not a training backward
    return net


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def load_checkpoint(path: str | Path, label: str | None = None) -> LoadedModel:
    """Rebuild the network of a ``SegmentationSystem`` checkpoint from its hyper-parameters and weights."""
    path = Path(path)
    ckpt = safe_torch_load(path, what="checkpoint")  # weights_only=True: a checkpoint never runs code
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hparams or "model" not in hparams or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a robustseg SegmentationSystem checkpoint (no hyper_parameters.model)")
    model_cfg = dict(_plain(hparams["model"]))
    try:
        net = MODELS.build(model_cfg)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot build model {model_cfg}: {err}") from err
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    strict_load(net, state, f"checkpoint {path}")
    check_run_architecture(model_cfg, run_dir, f"checkpoint {path}", MODELS.resolve)
    config = _plain(hparams.get("config")) or {}
    data_name = (config.get("data") or {}).get("name") or (config.get("choices") or {}).get("data")
    roi = hparams.get("roi_size") or (config.get("data") or {}).get("roi_size") or model_cfg.get("img_size")
    return LoadedModel(
        label=label or run_dir.name,
        net=_freeze(net),
        model_name=model_cfg["name"],
        num_classes=int(hparams.get("num_classes") or model_cfg.get("out_channels")),
        in_channels=int(model_cfg.get("in_channels", 1)),
        roi_size=tuple(int(s) for s in roi),
        checkpoint=str(path),
        checkpoint_sha256=file_sha256(path),
        class_names=list(_plain(hparams.get("class_names")) or []) or None,
        data_name=data_name,
        extra={"run_dir": str(run_dir), "choices": config.get("choices")},
        run_dir=str(run_dir),
        train_mode=train_mode(config) or train_mode(run_config(run_dir)),
        preprocessing=preprocessing_of(config) or preprocessing_of(run_config(run_dir)),
    )


def load_external(spec_path: str | Path, label: str | None = None) -> LoadedModel:
    """An external model YAML (TorchScript, torch.export, state dict, Python entry): see :mod:`robustseg.external`."""
    from robustseg.external import load_external as load

    return load(spec_path, label)


def run_checkpoint(run_dir: Path, which: str = "best") -> Path:
    """``<run>/checkpoints/<which>.ckpt``, else ``last.ckpt``, else the newest ``*.ckpt`` of the run."""
    ckpt_dir = run_dir / "checkpoints"
    for name in (which, "best", "last"):
        if (ckpt_dir / f"{name}.ckpt").is_file():
            if name != which:
                log.warning("%s: checkpoint=%s requested but missing; using %s.ckpt", run_dir, which, name)
            return ckpt_dir / f"{name}.ckpt"
    found = sorted(run_dir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise CheckpointError(f"run directory {run_dir} has no checkpoint (expected checkpoints/{which}.ckpt)")
    log.warning("%s: checkpoint=%s requested but missing; using the newest %s", run_dir, which, found[-1])
    return found[-1]


def _run_of(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def fallback_note(path: Path, which: str) -> str | None:
    """What the report says when ``run_checkpoint`` did not find the requested checkpoint file."""
    return None if path.stem == which else f"checkpoint={which} requested; no {which}.ckpt, used {path.name}"


def find_run(
    spec: str, runs_root: str | Path, data_names: Sequence[str], which: str = "best", mode: str | None = None
) -> Path:
    """Newest checkpoint of a run under ``runs_root`` matching ``spec`` (model name/prefix, preset or run name).

    Args:
        mode: only runs of this training mode (``clean``, ``pgd``, ``vaft``, ...: ``train_mode=``).

    Raises:
        ConfigError: no run matches, or runs of several training modes match and ``mode`` picks none.
    """
    runs_root = Path(runs_root)
    try:
        registered = MODELS.resolve(spec)
    except KeyError:
        registered = None
    candidates = []
    for config_path in sorted(runs_root.glob("*/config.yaml")) if runs_root.is_dir() else []:
        try:
            cfg = OmegaConf.load(config_path)
            model = OmegaConf.select(cfg, "model.name", default=None, throw_on_resolution_failure=False)
            preset = OmegaConf.select(cfg, "choices.model", default=None, throw_on_resolution_failure=False)
            data = {
                OmegaConf.select(cfg, "data.name", default=None, throw_on_resolution_failure=False),
                OmegaConf.select(cfg, "choices.data", default=None, throw_on_resolution_failure=False),
            }
            trained = train_mode(OmegaConf.to_container(cfg, resolve=False))
        except Exception as err:  # an unreadable run is skipped, not fatal
            log.warning("skipping %s: %s", config_path, err)
            continue
        run = config_path.parent
        named = spec in (run.name, preset) or (registered is not None and model == registered)
        if named and data & set(data_names) and (mode is None or trained == mode):
            try:
                candidates.append((run_checkpoint(run, which), trained))
            except CheckpointError:
                continue
    if not candidates:
        raise ConfigError(
            f"no run under {runs_root} with model {spec!r}"
            + (f" (registered name {registered!r})" if registered else "")
            + f" on data {sorted(data_names)}"
            + (f" trained as {mode!r}" if mode else "")
            + " that has a checkpoint; train one or pass a run directory or .ckpt path"
        )
    modes = sorted({str(m) for _, m in candidates})
    if len(modes) > 1:
        runs = "; ".join(f"{_run_of(p).name} ({m})" for p, m in candidates)
        raise ConfigError(
            f"{spec!r} matches runs of {len(modes)} training modes {modes} under {runs_root}: {runs}. Pick one with "
            f"train_mode=<{'|'.join(modes)}>, or pass a run directory or .ckpt path"
        )
    return max((p for p, _ in candidates), key=lambda p: p.stat().st_mtime)


def resolve_model(
    spec: str, runs_root: str | Path, data_names: Sequence[str], which: str = "best", mode: str | None = None
) -> LoadedModel:
    """Load the model that ``spec`` names (see the module docstring for the forms it can take).

    Args:
        which: ``best`` or ``last`` checkpoint of a run (a fallback to the other is logged and recorded).
        mode: training mode that picks among runs found by name (``train_mode=``).
    """
    from robustseg.external import PREFIXES, load_prefixed

    if spec.partition(":")[0] in PREFIXES:  # nnunet:PATH[,fold=...], bundle:PATH
        return load_prefixed(spec)
    path = Path(spec)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return load_external(path)
    if path.is_file():
        return load_checkpoint(path)
    ckpt = run_checkpoint(path, which) if path.is_dir() else find_run(spec, runs_root, data_names, which, mode)
    model = load_checkpoint(ckpt, label=None if path.is_dir() else spec)
    model.checkpoint_note = fallback_note(ckpt, which)
    return model


def check_compatible(
    models: Sequence[LoadedModel],
    num_classes: int,
    class_names: Sequence[str] | None,
    intensity: Mapping[str, Any] | None = None,
) -> None:
    """Every model must predict the evaluated dataset's label set; sources and targets must agree.

    An external model that states the intensity preprocessing it expects must match the data's ``intensity``.

    Raises:
        CheckpointError: naming the model, its classes and the expected ones.
    """
    for m in models:
        if m.num_classes != num_classes:
            raise CheckpointError(
                f"model {m.label!r} ({m.checkpoint}) predicts {m.num_classes} classes but the data has {num_classes}"
                f" {list(class_names or [])}: source and target must be trained for the same label set"
            )
        if class_names and m.class_names and list(m.class_names) != list(class_names):
            raise CheckpointError(
                f"model {m.label!r} was trained for classes {m.class_names}, the data has {list(class_names)}"
            )
        expects = m.extra.get("intensity")
        if (
            expects
            and intensity
            and {k: float(v) for k, v in expects.items()} != {k: float(v) for k, v in intensity.items() if k in expects}
        ):
            raise ConfigError(
                f"model {m.label!r} expects intensity preprocessing {dict(expects)}, but data.intensity is "
                f"{dict(intensity)}: evaluate it with a data config that preprocesses as it was trained"
            )
