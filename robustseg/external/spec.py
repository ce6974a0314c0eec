"""The external model YAML: reading, validation with errors that name the file, key and value, and the adapter.

A spec names exactly one model source (``torchscript``, ``export``, ``state_dict`` + ``architecture``, ``python``)
and describes the model: ``num_classes``, ``in_channels``, ``roi_size``, ``class_names``, the data preprocessing it
expects (``intensity``, ``spacing``, ``orientation``: checked against the data), and how robustseg's [0, 1] volume
reaches it (``input``), what it returns (``output``) and its test-time augmentation (``tta``). See
``docs/external_models.md``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from robustseg.errors import ConfigError
from robustseg.external.adapters import OUTPUT_KINDS, ZSCORE_MODES, AdaptedModel, IntensityMap, SpatialMap

SOURCES = ("torchscript", "export", "state_dict", "python")
TOP_KEYS = (
    *SOURCES,
    *("architecture", "kwargs", "python_path", "weights", "name", "num_classes", "in_channels", "roi_size"),
    *("class_names", "data", "intensity", "spacing", "orientation", "input", "output", "tta"),
    *("regions_class_order", "region_outputs"),
)
INPUT_KEYS = ("scale", "shift", "mean", "std", "zscore", "mask_nonzero", "axes", "size", "unit")


@dataclass
class ExternalSpec:
    """A validated external model YAML; ``path`` is the YAML file (relative file names resolve next to it)."""

    path: Path
    source: str
    raw: dict[str, Any]
    num_classes: int
    in_channels: int = 1
    roi_size: tuple[int, int, int] | None = None
    class_names: list[str] | None = None
    input: dict[str, Any] = field(default_factory=dict)
    output: str = "logits"
    mirror_axes: tuple[int, ...] = ()

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {message}")

    def file(self, key: str) -> Path:
        """The file named by ``key``, resolved next to the YAML; a missing one fails naming key and path."""
        value = self.raw.get(key)
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a file name, got {value!r}")
        path = Path(value) if Path(value).is_absolute() else self.path.parent / value
        if not path.is_file():
            raise self.fail(key, f"file {value!r} not found (looked for {path})")
        return path


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping; syntax errors and non-mappings fail naming the file (and the line, from the parser)."""
    path = Path(path)
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except FileNotFoundError as err:
        raise ConfigError(f"external model spec {path} does not exist") from err
    except Exception as err:  # yaml.YAMLError and OmegaConf's errors carry the line and column
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys (num_classes, roi_size, ...), got {type(data).__name__}")
    return data


def _unknown(path: Path, where: str, keys: Any, known: tuple[str, ...]) -> None:
    for key in keys:
        if key not in known:
            guess = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            raise ConfigError(f"{path}: {where}{key}: unknown key{hint} Known: {list(known)}")


def _ints(path: Path, key: str, value: Any, length: int | None = None) -> tuple[int, ...]:
    if isinstance(value, int) and length:
        value = [value] * length
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and v > 0 for v in value):
        raise ConfigError(f"{path}: {key}: expected a list of positive integers, got {value!r}")
    if length and len(value) != length:
        raise ConfigError(f"{path}: {key}: expected {length} values, got {list(value)}")
    return tuple(int(v) for v in value)


def parse_spec(path: str | Path, data: Mapping[str, Any] | None = None) -> ExternalSpec:
    """Validate an external model YAML (or an already-read mapping ``data`` attributed to ``path``)."""
    path = Path(path)
    raw = dict(data) if data is not None else read_yaml(path)
    _unknown(path, "", raw, TOP_KEYS)
    given = [s for s in SOURCES if s in raw]
    if len(given) != 1:
        raise ConfigError(
            f"{path}: name exactly one model source of {list(SOURCES)} (got {given or 'none'}): 'torchscript: FILE', "
            "'export: FILE.pt2', 'state_dict: FILE' with 'architecture: {name: ...}', or 'python: package.module:fn'"
        )
    if "num_classes" not in raw:
        raise ConfigError(f"{path}: num_classes: missing (the labels the model predicts, background included)")
    num_classes = raw["num_classes"]
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"{path}: num_classes: expected an integer >= 2, got {num_classes!r}")
    in_channels = raw.get("in_channels", 1)
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"{path}: in_channels: expected a positive integer, got {in_channels!r}")
    roi = _ints(path, "roi_size", raw["roi_size"], 3) if raw.get("roi_size") is not None else None
    if roi is None and given[0] != "export":
        raise ConfigError(f"{path}: roi_size: missing (the sliding-window size the model runs at, e.g. [96, 96, 96])")
    names = raw.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != num_classes):
        raise ConfigError(f"{path}: class_names: expected {num_classes} names (num_classes), got {names!r}")
    output = raw.get("output", "logits")
    if output not in OUTPUT_KINDS:
        raise ConfigError(f"{path}: output: {output!r} is not one of {list(OUTPUT_KINDS)}")
    tta = raw.get("tta") or {}
    if not isinstance(tta, dict) or set(tta) - {"mirror"}:
        raise ConfigError(f"{path}: tta: expected {{mirror: [axes]}} or null, got {tta!r}")
    mirror = tta.get("mirror") or []
    if not isinstance(mirror, list) or not all(a in (0, 1, 2) for a in mirror):
        raise ConfigError(f"{path}: tta.mirror: expected spatial axes among [0, 1, 2], got {mirror!r}")
    section = raw.get("input") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: input: expected a mapping of {list(INPUT_KEYS)}, got {section!r}")
    _unknown(path, "input.", section, INPUT_KEYS)
    if section.get("zscore") not in (None, *ZSCORE_MODES):
        raise ConfigError(f"{path}: input.zscore: {section['zscore']!r} is not one of {list(ZSCORE_MODES)} or null")
    if section.get("zscore") and ("mean" in section or "std" in section):
        raise ConfigError(f"{path}: input: give either fixed mean/std or zscore: frozen|adaptive, not both")
    if ("mean" in section) != ("std" in section):
        raise ConfigError(f"{path}: input: a fixed z-score needs both mean and std, got {sorted(section)}")
    return ExternalSpec(
        path=path,
        source=given[0],
        raw=raw,
        num_classes=num_classes,
        in_channels=in_channels,
        roi_size=roi,
        class_names=[str(n) for n in names] if names else None,
        input=section,
        output=output,
        mirror_axes=tuple(int(a) for a in mirror),
    )


def _floats(path: Path, key: str, value: Any) -> list[float]:
    values = value if isinstance(value, list) else [value]
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {key}: expected a number or one per channel, got {value!r}") from err
    if key.endswith("std") and any(v <= 0 for v in out):
        raise ConfigError(f"{path}: {key}: must be positive, got {value!r}")
    return out


def intensity_map(spec: ExternalSpec) -> IntensityMap:
    """``input:`` scale/shift then a fixed (mean/std) or per-volume (zscore) z-score, folded into one map."""
    s, p = spec.input, spec.path
    scale = _floats(p, "input.scale", s.get("scale", 1.0))
    shift = _floats(p, "input.shift", s.get("shift", 0.0))
    for key, values in (("input.scale", scale), ("input.shift", shift)):
        if len(values) not in (1, spec.in_channels):
            raise ConfigError(f"{p}: {key}: expected 1 or {spec.in_channels} (in_channels) values, got {values}")
    if "mean" in s:  # (x * scale + shift - mean) / std: still an affine map of x
        mean, std = _floats(p, "input.mean", s["mean"]), _floats(p, "input.std", s["std"])
        n = max(len(scale), len(shift), len(mean), len(std))
        pick = lambda v, i: v[i if len(v) > 1 else 0]  # noqa: E731
        scale = [pick(scale, i) / pick(std, i) for i in range(n)]
        shift = [(pick(shift, i) - pick(mean, i)) / pick(std, i) for i in range(n)]
    return IntensityMap(scale, shift, zscore=s.get("zscore"), mask_nonzero=bool(s.get("mask_nonzero", False)))


def build_adapter(spec: ExternalSpec, net: Any) -> AdaptedModel:
    """Wrap ``net`` in the adapter the spec's ``input``/``output``/``tta`` sections describe."""
    try:
        spatial = SpatialMap(spec.input.get("axes"), spec.input.get("size"))
        return AdaptedModel(
            net,
            num_classes=spec.num_classes,
            in_channels=spec.in_channels,
            intensity=intensity_map(spec),
            spatial=spatial,
            mirror_axes=spec.mirror_axes,
            output=spec.output,
            regions_class_order=spec.raw.get("regions_class_order"),
            region_outputs=spec.raw.get("region_outputs", "logits"),
        )
    except ValueError as err:
        raise ConfigError(f"{spec.path}: {err}") from err


def input_units(adapter: AdaptedModel, unit: str | None) -> dict[str, Any]:
    """``extra["input_units"]``: one [0, 1] unit in the model's input units (multiply a budget by ``scale``)."""
    return {**adapter.intensity.units(), "unit": unit or "model input units"}
