"""``load_external(spec.yaml)``: an external model YAML to a :class:`~robustseg.evaluation.resolve.LoadedModel`.

The model source is looked up in :data:`LOADERS` by the spec's key (``torchscript``, ``export``, ``state_dict``,
``python``); each returns the bare network, and the spec's adapter wraps it (see :mod:`robustseg.external.adapters`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from torch import nn

from robustseg.errors import CheckpointError, ConfigError
from robustseg.evaluation.resolve import LoadedModel, _freeze, strict_load
from robustseg.evaluation.store import file_sha256
from robustseg.external.adapters import model_sha256
from robustseg.external.python_entry import load_python
from robustseg.external.spec import ExternalSpec, build_adapter, input_units, parse_spec
from robustseg.external.torchscript import load_exported, load_torchscript
from robustseg.external.weights import safe_load


def _state_dict(path: Path) -> dict:
    state = safe_load(path, "state dict")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise CheckpointError(f"state dict {path}: expected a mapping of parameter names to tensors")
    return state


def _from_torchscript(spec: ExternalSpec) -> tuple[nn.Module, str, Path]:
    path = spec.file("torchscript")
    return load_torchscript(path), "torchscript", path


def _from_export(spec: ExternalSpec) -> tuple[nn.Module, str, Path]:
    path = spec.file("export")
    net, roi = load_exported(path)
    if roi is not None:
        if spec.roi_size is not None and tuple(spec.roi_size) != roi:
            raise ConfigError(f"{spec.path}: roi_size: {list(spec.roi_size)}, but {path.name} was exported at {roi}")
        spec.roi_size = roi
    elif spec.roi_size is None:
        raise ConfigError(f"{spec.path}: roi_size: missing (the program has dynamic spatial sizes: choose a window)")
    return net, "torch.export", path


def _from_state_dict(spec: ExternalSpec) -> tuple[nn.Module, str, Path]:
    from robustseg.models import MODELS

    arch = spec.raw.get("architecture")
    if not isinstance(arch, dict) or "name" not in arch:
        raise ConfigError(f"{spec.path}: architecture: expected {{name: <registered model>, ...}}, got {arch!r}")
    path = spec.file("state_dict")
    arch = {"in_channels": spec.in_channels, "out_channels": spec.num_classes, **arch}
    try:
        net = MODELS.build(arch)
    except KeyError as err:
        raise ConfigError(f"{spec.path}: architecture.name: {err.args[0]}") from err
    except TypeError as err:
        raise ConfigError(f"{spec.path}: architecture: {arch['name']!r} rejected its keywords: {err}") from err
    strict_load(net, _state_dict(path), f"state dict {path} (architecture from {spec.path})")
    return net, MODELS.resolve(arch["name"]), path


def _from_python(spec: ExternalSpec) -> tuple[nn.Module, str, Path]:
    net = load_python(spec.raw["python"], spec.raw.get("kwargs"), spec.path, spec.raw.get("python_path"))
    if spec.raw.get("weights"):
        path = spec.file("weights")
        strict_load(net, _state_dict(path), f"weights {path} (module from {spec.raw['python']})")
        return net, f"python:{spec.raw['python']}", path
    return net, f"python:{spec.raw['python']}", spec.path


def _module_digest(net: nn.Module, prefix: str) -> str:
    h = hashlib.sha256(prefix.encode())
    for name, tensor in net.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


LOADERS: dict[str, Callable[[ExternalSpec], tuple[nn.Module, str, Path]]] = {
    "torchscript": _from_torchscript,
    "export": _from_export,
    "state_dict": _from_state_dict,
    "python": _from_python,
}


def load_external(spec_path: str | Path, label: str | None = None) -> LoadedModel:
    """Load the model an external YAML describes, wrapped in its adapter (eval mode, parameters frozen)."""
    spec = parse_spec(spec_path)
    net, model_name, weights = LOADERS[spec.source](spec)
    adapted = build_adapter(spec, net)
    digest = file_sha256(weights)
    if spec.source == "python" and weights == spec.path:  # code, no weight file: entry, kwargs and tensors identify it
        digest = _module_digest(net, repr((spec.raw["python"], spec.raw.get("kwargs"))))
    return LoadedModel(
        label=label or spec.raw.get("name") or spec.path.stem,
        net=_freeze(adapted),
        model_name=model_name,
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        roi_size=tuple(spec.roi_size),
        checkpoint=str(weights),
        checkpoint_sha256=model_sha256(digest, adapted),  # weights + adapter settings
        class_names=spec.class_names,
        data_name=spec.raw.get("data"),
        extra={
            "file_sha256": digest,
            "intensity": spec.raw.get("intensity"),
            "adapter": adapted.describe(),
            "input_units": input_units(adapted, spec.input.get("unit")),
        },
        preprocessing={"in_channels": spec.in_channels, **(expected_preprocessing(spec.raw) or {})},
    )


def expected_preprocessing(raw: dict) -> dict | None:
    """The data preprocessing the model's files state, checked against the evaluated data's (``check_preprocessing``:
    a mismatch in channels, intensity, spacing or orientation fails naming both values)."""
    out = {k: raw[k] for k in ("modality", "intensity", "spacing", "orientation") if raw.get(k) is not None}
    return out or None
