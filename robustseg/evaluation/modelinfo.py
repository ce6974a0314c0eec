"""What evaluation knows about a model beyond its weights: training mode, preprocessing, a unique label.

* :func:`train_mode` names how a robustseg run was trained (``clean``, an attack preset such as ``pgd``,
  ``pgd_mix``, ``vaft``), as ``training.run_prefix`` names runs; name resolution uses it to refuse ambiguous
  matches (``--target unet`` matching a clean and a PGD-trained run) unless ``train_mode=`` picks one.
* :func:`check_preprocessing` refuses a checkpoint trained with other data preprocessing (modality, intensity
  window, spacing, orientation) than the evaluated data, unless ``allow_preprocessing_mismatch=true``.
* :func:`check_run_architecture` refuses a checkpoint whose architecture is not the one its run directory's
  ``config.yaml`` names.
* :func:`unique_labels` makes the labels of different checkpoints distinct (a source and a target whose run
  directories share a name, ``best.ckpt`` and ``last.ckpt`` of one run).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from robustseg.errors import CheckpointError

log = logging.getLogger(__name__)

# training-data settings that must match the evaluated data (the network learnt on these voxels)
PREPROCESSING_CHECKED = ("modality", "intensity", "spacing", "orientation")


def train_mode(config: Mapping[str, Any] | None) -> str | None:
    """``clean``, ``<attack preset>``, ``<attack preset>_<adv_mode>`` or ``vaft`` from a run config (None: unknown)."""
    if not config:
        return None
    choices = config.get("choices") or {}
    attack = config.get("attack")
    system = config.get("system") or {}
    if "attack" not in config and "attack" not in choices:
        return "clean" if "model" in config else None
    if not attack or choices.get("attack") in (None, "none"):
        return "clean"
    adv_mode = system.get("adv_mode", "adversarial")
    if adv_mode == "vaft":
        return "vaft"
    name = choices.get("attack") or attack.get("name")
    return str(name) + ("" if adv_mode == "adversarial" else f"_{adv_mode}")


def run_config(run_dir: str | Path | None) -> dict[str, Any] | None:
    """``<run_dir>/config.yaml`` as a plain dict, None when absent or unreadable."""
    if run_dir is None:
        return None
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # an unreadable config cannot confirm anything; the checkpoint's own hparams remain
        log.warning("cannot read %s: %s", path, err)
        return None


def preprocessing_of(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The checked preprocessing keys present in a training config's ``data`` section."""
    data = (config or {}).get("data") or {}
    out = {k: data[k] for k in PREPROCESSING_CHECKED if k in data}
    return out or None


def _norm(key: str, value: Any) -> Any:
    if value is None:
        return None
    if key == "intensity" and isinstance(value, Mapping):
        return {k: float(v) if isinstance(v, (int, float)) else v for k, v in value.items()}
    if key == "spacing":
        values = list(value) if isinstance(value, (list, tuple)) else [value] * 3
        return [round(float(v), 6) for v in values]
    if key == "orientation":
        return str(value).upper()
    return value


def check_preprocessing(models: Sequence[Any], data: Mapping[str, Any], allow: bool = False) -> list[str]:
    """Compare each robustseg model's training preprocessing with the evaluated ``data`` config.

    Returns:
        One line per mismatch (empty when all agree); with ``allow`` they are returned (to be recorded in the
        report) instead of raised.

    Raises:
        CheckpointError: naming the model, the setting, the trained and the evaluated value and the override.
    """
    lines = []
    for m in models:
        trained = getattr(m, "preprocessing", None) or {}
        for key, value in trained.items():
            if key not in data:
                continue
            if _norm(key, value) != _norm(key, data[key]):
                lines.append(
                    f"model {m.label!r} ({m.checkpoint}) was trained with data.{key}={_norm(key, value)}, "
                    f"the evaluated data has data.{key}={_norm(key, data[key])}"
                )
    if lines and not allow:
        raise CheckpointError(
            "; ".join(lines) + ". Evaluate with a data config that preprocesses as the model was trained, or set "
            "allow_preprocessing_mismatch=true to proceed anyway (recorded in the report)"
        )
    for line in lines:
        log.warning("allow_preprocessing_mismatch: %s", line)
    return lines


def check_run_architecture(model_cfg: Mapping[str, Any], run_dir: Path, where: str, resolve: Any) -> None:
    """A checkpoint must hold the architecture its run directory's ``config.yaml`` names.

    Args:
        model_cfg: the checkpoint's ``hyper_parameters.model``.
        resolve: ``MODELS.resolve`` (registered name of an alias or prefix).

    Raises:
        CheckpointError: naming both architectures.
    """
    config = run_config(run_dir)
    named = ((config or {}).get("model") or {}) if config else {}
    if not named.get("name"):
        return
    try:
        mine, theirs = resolve(str(model_cfg.get("name"))), resolve(str(named["name"]))
    except KeyError:
        mine, theirs = model_cfg.get("name"), named["name"]
    differing = [
        k
        for k in sorted(set(model_cfg) & set(named))
        if k != "name" and not isinstance(named[k], str) and _plain_eq(model_cfg[k], named[k]) is False
    ]
    if mine != theirs or differing:
        detail = f"{mine!r} vs {theirs!r}" if mine != theirs else f"settings {differing} differ"
        raise CheckpointError(
            f"{where} holds a {mine!r} network but its run directory's {run_dir / 'config.yaml'} names "
            f"model {named.get('name')!r} ({detail}): the checkpoint does not belong to this run; pass the "
            "checkpoint of the right run"
        )


def _plain_eq(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_plain_eq(x, y) for x, y in zip(a, b))
    return a == b


def unique_labels(models: Sequence[Any]) -> list[str]:
    """Make the labels of different checkpoints distinct, in place; returns lines describing the renames.

    Models with the same checkpoint sha256 are one model and keep one label. Different checkpoints sharing a
    label get a suffix that tells them apart: the checkpoint file (``@last``), the run directory, the folder
    holding the run directory, or the sha256.
    """
    by_label: dict[str, list[Any]] = defaultdict(list)
    seen: dict[str, Any] = {}
    for m in models:
        if m.checkpoint_sha256 not in seen:
            seen[m.checkpoint_sha256] = m
            by_label[m.label].append(m)
    notes = []
    for label, group in by_label.items():
        if len(group) < 2:
            continue
        for attempt in (
            lambda m: Path(m.checkpoint).stem,
            lambda m: Path(getattr(m, "run_dir", None) or Path(m.checkpoint).parent).name,
            lambda m: Path(getattr(m, "run_dir", None) or Path(m.checkpoint).parent).parent.name,
            lambda m: m.checkpoint_sha256[:8],
        ):
            suffixes = [attempt(m) for m in group]
            if len(set(suffixes)) == len(group):
                break
        for m, suffix in zip(group, suffixes):
            m.label = f"{label}@{suffix}"
            notes.append(f"{label!r} named two checkpoints: {m.checkpoint} is labelled {m.label!r}")
    taken = [m.label for m in seen.values()]
    if len(set(taken)) != len(taken):  # a suffixed label equals another model's label: fall back to hashes
        for m in seen.values():
            m.label = f"{m.label}#{m.checkpoint_sha256[:8]}"
    for line in notes:
        log.warning("model labels: %s", line)
    return notes
