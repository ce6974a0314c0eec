"""The ``data`` config section, parsed once into a frozen, checked :class:`DataOptions`.

Every key of ``conf/data/*.yaml`` is a field here; an unknown key, a missing required key or a bad value
raises :class:`~robustseg.errors.ConfigError` naming ``data.<key>``, the value and what was expected, before
any file is read.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robustseg.data.transforms import INTENSITY
from robustseg.errors import ConfigError

AUGMENT_KEYS = ("flip", "rot90", "scale_intensity", "shift_intensity")


@dataclass(frozen=True)
class DataOptions:
    """A checked ``data`` section; see ``conf/data/btcv.yaml`` for the meaning of each key.

    Sizes are in voxels ``(D, H, W)`` after orientation (for RAS: x, y, z); spacing in millimetres.
    """

    name: str
    root: Path
    num_classes: int
    modality: str
    datalist: str = "dataset.json"
    prepare: dict[str, Any] | None = None
    in_channels: int = 1
    class_names: tuple[str, ...] = ()
    intensity: dict[str, float] = field(default_factory=dict)
    orientation: str | None = "RAS"
    spacing: tuple[float, float, float] | None = None
    crop_foreground: bool = False
    crop_size: tuple[int, int, int] | None = None
    roi_size: tuple[int, int, int] = (96, 96, 96)
    num_samples: int = 4
    crop_ratios: tuple[float, ...] | None = None
    batch_size: int = 1
    repeats: int = 1
    augment: dict[str, float] = field(default_factory=dict)
    pad_divisor: int | None = 32
    cache_rate: float = 1.0
    num_workers: int = 0

    @property
    def datalist_path(self) -> Path:
        """Absolute path of the decathlon-style JSON datalist."""
        return self.root / self.datalist


def _positive_ints(key: str, value: Any, n: int = 3) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * n
    if (
        not isinstance(value, (list, tuple))
        or len(value) != n
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ConfigError(f"data.{key}={value!r}: expected {n} positive integers (or one for all axes)")
    return tuple(value)


def _positive_floats(key: str, value: Any, n: int = 3) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * n
    if (
        not isinstance(value, (list, tuple))
        or len(value) != n
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ConfigError(f"data.{key}={value!r}: expected {n} positive numbers in mm (or null = as provided)")
    return tuple(float(v) for v in value)


def _int_at_least(key: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"data.{key}={value!r}: expected an integer >= {low}")
    return value


def _probabilities(key: str, value: Any, allowed: tuple[str, ...]) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"data.{key}={value!r}: expected a mapping with keys {list(allowed)}")
    out = {}
    for k, p in value.items():
        if k not in allowed:
            raise ConfigError(f"data.{key}.{k}: unknown key; expected one of {list(allowed)}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p <= 1:
            raise ConfigError(f"data.{key}.{k}={p!r}: expected a probability in [0, 1]")
        out[k] = float(p)
    return out


def _crop_ratios(value: Any, num_classes: int) -> tuple[float, ...] | None:
    """``data.crop_ratios``: null (crop centres positive/negative 1:1) or one non-negative weight per class."""
    if value is None:
        return None
    if (
        not isinstance(value, (list, tuple))
        or len(value) != num_classes
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)
        or not sum(value) > 0
    ):
        raise ConfigError(
            f"data.crop_ratios={value!r}: expected null or {num_classes} non-negative numbers (one per class, "
            "not all 0): how often a training crop is centred on a voxel of each class"
        )
    return tuple(float(v) for v in value)


def parse_options(cfg: Mapping[str, Any] | DictConfig) -> DataOptions:
    """Resolve and check a ``data`` config section (OmegaConf node or plain dict).

    Raises:
        ConfigError: naming the offending ``data.<key>`` and the expected value.
    """
    if isinstance(cfg, DictConfig):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True)
        except Exception as err:  # an unresolvable ${...} interpolation
            raise ConfigError(f"data: cannot resolve the config section: {err}") from err
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"data: expected a mapping, got {type(cfg).__name__}")
    raw = dict(cfg)
    names = [f.name for f in dataclasses.fields(DataOptions)]
    for key in raw:
        if key not in names:
            guess = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean {guess[0]!r}?" if guess else ""
            raise ConfigError(f"data.{key}: unknown key.{hint} Known: {names}")
    for key in ("name", "root", "num_classes", "modality"):
        if raw.get(key) is None:
            raise ConfigError(f"data.{key} is required")

    modality = raw["modality"]
    if modality not in INTENSITY:
        raise ConfigError(f"data.modality={modality!r}: expected one of {sorted(INTENSITY)}")
    num_classes = _int_at_least("num_classes", raw["num_classes"], 2)
    class_names = tuple(raw.get("class_names") or (f"class{k}" for k in range(num_classes)))
    if len(class_names) != num_classes:
        raise ConfigError(
            f"data.class_names has {len(class_names)} names but data.num_classes={num_classes}: give one per class"
        )
    roi_size = _positive_ints("roi_size", raw.get("roi_size", (96, 96, 96)))
    augment = _probabilities("augment", raw.get("augment") or {}, AUGMENT_KEYS)
    if augment.get("rot90", 0) > 0 and roi_size[0] != roi_size[1]:
        raise ConfigError(
            f"data.augment.rot90 > 0 rotates axes 0 and 1, so data.roi_size={list(roi_size)} needs its first two "
            "sizes equal"
        )
    crop_ratios = _crop_ratios(raw.get("crop_ratios"), num_classes)
    prepare = raw.get("prepare")
    if prepare is not None and (not isinstance(prepare, Mapping) or "name" not in prepare):
        raise ConfigError(f"data.prepare={prepare!r}: expected null or a mapping with a 'name' key")
    cache_rate = raw.get("cache_rate", 1.0)
    if not isinstance(cache_rate, (int, float)) or not 0 <= cache_rate <= 1:
        raise ConfigError(f"data.cache_rate={cache_rate!r}: expected a fraction in [0, 1]")
    orientation = raw.get("orientation", "RAS")
    if orientation is not None and (
        not isinstance(orientation, str) or len(orientation) != 3 or set(orientation.upper()) - set("RLAPSI")
    ):
        raise ConfigError(f"data.orientation={orientation!r}: expected a 3-letter axcode such as 'RAS', or null")
    intensity = raw.get("intensity") or {}
    if not isinstance(intensity, Mapping):
        raise ConfigError(f"data.intensity={intensity!r}: expected a mapping")
    pad_divisor = raw.get("pad_divisor", 32)

    if modality == "ct_pet" and raw.get("in_channels", 1) != 2:
        raise ConfigError(f"data.in_channels={raw.get('in_channels', 1)!r}: modality ct_pet needs 2 (CT, PET)")
    return DataOptions(
        name=str(raw["name"]),
        root=Path(str(raw["root"])).expanduser().absolute(),
        datalist=str(raw.get("datalist", "dataset.json")),
        prepare=dict(prepare) if prepare is not None else None,
        modality=modality,
        num_classes=num_classes,
        in_channels=_int_at_least("in_channels", raw.get("in_channels", 1), 1),
        class_names=class_names,
        intensity=dict(intensity),
        orientation=orientation,
        spacing=None if raw.get("spacing") is None else _positive_floats("spacing", raw["spacing"]),
        crop_foreground=bool(raw.get("crop_foreground", False)),
        crop_size=None if raw.get("crop_size") is None else _positive_ints("crop_size", raw["crop_size"]),
        roi_size=roi_size,
        num_samples=_int_at_least("num_samples", raw.get("num_samples", 4), 1),
        crop_ratios=crop_ratios,
        batch_size=_int_at_least("batch_size", raw.get("batch_size", 1), 1),
        repeats=_int_at_least("repeats", raw.get("repeats", 1), 1),
        augment=augment,
        pad_divisor=None if pad_divisor is None else _int_at_least("pad_divisor", pad_divisor, 1),
        cache_rate=float(cache_rate),
        num_workers=_int_at_least("num_workers", raw.get("num_workers", 0), 0),
    )
