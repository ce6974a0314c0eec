"""MONAI bundles: ``--target bundle:PATH[,config=inference.json][,output=logits|probabilities][,roi=96x96x96]``.

``network_def`` is built with ``monai.bundle.ConfigParser`` (instantiating it runs the bundle's config expressions:
loading a bundle is, like a Python entry, the user's own choice), then ``models/model.pt`` (a state dict, read with
``weights_only=True``) is loaded into it, or ``models/model.ts`` (TorchScript) is used as is. The bundle's
``preprocessing`` transforms are mapped onto robustseg's data pipeline and the adapter (:data:`TRANSFORMS`); one that
cannot be mapped fails naming it. Class count, names, channels and ROI come from ``metadata.json``
(``network_data_format``) and the ``inferer``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from robustseg.errors import CheckpointError, ConfigError
from robustseg.evaluation.resolve import LoadedModel, _freeze, strict_load
from robustseg.evaluation.store import file_sha256
from robustseg.external.adapters import AdaptedModel, IntensityMap, model_sha256
from robustseg.external.torchscript import load_torchscript
from robustseg.external.weights import safe_load

KEYS = ("config", "output", "roi")
# Transforms that change types, channels or the crop only: robustseg's pipeline does the equivalent.
NEUTRAL = (
    "LoadImaged",
    "LoadImage",
    "EnsureChannelFirstd",
    "EnsureChannelFirst",
    "EnsureTyped",
    "EnsureType",
    "ToTensord",
    "CastToTyped",
    "CropForegroundd",
    "Identityd",
    "SqueezeDimd",
    "DivisiblePadd",
    "SpatialPadd",
)


class Mapped:
    """What the bundle's preprocessing asks of robustseg: expected data settings and the adapter's input map."""

    def __init__(self) -> None:
        self.preprocessing: dict[str, Any] = {}
        self.intensity = IntensityMap()
        self.unit = "model input units"


def _scale_intensity_range(get: Callable[[str, Any], Any], mapped: Mapped, name: str) -> None:
    if not get("clip", False):
        raise ConfigError(f"{name}: clip=False cannot be mapped (robustseg's window clips to [a_min, a_max])")
    a_min, a_max = float(get("a_min", None)), float(get("a_max", None))
    b_min, b_max = float(get("b_min", 0.0)), float(get("b_max", 1.0))
    mapped.preprocessing.update({"modality": "ct", "intensity": {"a_min": a_min, "a_max": a_max}})
    mapped.intensity = IntensityMap(b_max - b_min, b_min)  # [0, 1] -> [b_min, b_max]
    mapped.unit = f"bundle input units ([{b_min}, {b_max}] for [{a_min}, {a_max}] HU)"


def _orientation(get: Callable[[str, Any], Any], mapped: Mapped, name: str) -> None:
    mapped.preprocessing["orientation"] = str(get("axcodes", None))


def _spacing(get: Callable[[str, Any], Any], mapped: Mapped, name: str) -> None:
    pixdim = get("pixdim", None)
    mapped.preprocessing["spacing"] = [
        float(p) for p in (pixdim if isinstance(pixdim, (list, tuple)) else [pixdim] * 3)
    ]


def _normalize_intensity(get: Callable[[str, Any], Any], mapped: Mapped, name: str) -> None:
    if get("subtrahend", None) is not None or get("divisor", None) is not None:
        raise ConfigError(
            f"{name}: fixed subtrahend/divisor are not mapped; write an external YAML with input.mean/std"
        )
    mapped.intensity = IntensityMap(zscore="frozen", mask_nonzero=bool(get("nonzero", False)))
    mapped.unit = "bundle z-score units (1 / each volume's std per [0, 1] unit)"


TRANSFORMS: dict[str, Callable[[Callable[[str, Any], Any], Mapped, str], None]] = {
    "ScaleIntensityRanged": _scale_intensity_range,
    "ScaleIntensityRange": _scale_intensity_range,
    "Orientationd": _orientation,
    "Spacingd": _spacing,
    "NormalizeIntensityd": _normalize_intensity,
}


def map_preprocessing(parser: Any, where: str) -> Mapped:
    """Walk ``preprocessing.transforms`` and map each one; an unmappable transform fails, naming it."""
    mapped = Mapped()
    if "preprocessing" not in parser:
        return mapped
    transforms = parser["preprocessing"].get("transforms", []) if isinstance(parser["preprocessing"], dict) else []
    for i, item in enumerate(transforms):
        target = str(item.get("_target_", "?")) if isinstance(item, dict) else str(item)
        short = target.rpartition(".")[2]
        name = f"{where}: preprocessing transform #{i} {short}"
        if short in NEUTRAL:
            continue
        if short not in TRANSFORMS:
            raise ConfigError(
                f"{name} cannot be mapped onto robustseg's [0, 1] pipeline; mappable: {sorted(TRANSFORMS)}, "
                f"ignored as neutral: {sorted(NEUTRAL)}. Write an external YAML with an input: section instead"
            )

        def get(key: str, default: Any, i: int = i, item: dict = item) -> Any:
            return parser.get_parsed_content(f"preprocessing#transforms#{i}#{key}") if key in item else default

        TRANSFORMS[short](get, mapped, name)
    return mapped


def _metadata(parser: Any) -> tuple[int | None, int | None, list[str] | None, list[int] | None]:
    fmt = (parser.get("_meta_#network_data_format") or {}) if hasattr(parser, "get") else {}
    image = (fmt.get("inputs") or {}).get("image") or {}
    pred = (fmt.get("outputs") or {}).get("pred") or {}
    channel_def = pred.get("channel_def") or {}
    names = [str(channel_def[k]) for k in sorted(channel_def, key=int)] if channel_def else None
    shape = image.get("spatial_shape")
    roi = [int(s) for s in shape] if shape and all(isinstance(s, int) for s in shape) else None
    return image.get("num_channels"), pred.get("num_channels"), names, roi


def load_bundle(text: str) -> LoadedModel:
    """Load a MONAI bundle folder as an adapted model; see the module docstring for the options."""
    from monai.bundle import ConfigParser

    from robustseg.external import split_options

    path, *pairs = split_options(text)
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in KEYS:
            raise ConfigError(f"bundle:{text}: {pair!r} is not key=value with key in {list(KEYS)}")
        options[key] = value
    root = Path(path)
    config = root / "configs" / options.get("config", "inference.json")
    if not config.is_file():
        candidates = sorted(p.name for p in (root / "configs").glob("inference.*")) if root.is_dir() else []
        raise ConfigError(f"bundle:{text}: no {config} (a MONAI bundle has configs/inference.json); found {candidates}")
    parser = ConfigParser()
    try:
        parser.read_config(str(config))
        if (root / "configs" / "metadata.json").is_file():
            parser.read_meta(str(root / "configs" / "metadata.json"))
        parser["bundle_root"] = str(root)
    except Exception as err:
        raise ConfigError(f"bundle:{text}: cannot read {config}: {type(err).__name__}: {err}") from err
    mapped = map_preprocessing(parser, str(config))
    in_channels, num_classes, names, roi = _metadata(parser)
    if "inferer" in parser and isinstance(parser["inferer"], dict) and "roi_size" in parser["inferer"]:
        roi = [int(s) for s in parser.get_parsed_content("inferer#roi_size")]
    if options.get("roi"):
        roi = [int(s) for s in options["roi"].split("x")]
    if not roi or len(roi) != 3:
        raise ConfigError(f"bundle:{text}: no 3D roi_size in the inferer or metadata; pass roi=DxHxW")
    ts, pt = root / "models" / "model.ts", root / "models" / "model.pt"
    if pt.is_file():
        try:
            net = parser.get_parsed_content("network_def")
        except Exception as err:
            raise ConfigError(f"bundle:{text}: cannot build network_def: {type(err).__name__}: {err}") from err
        state = safe_load(pt, "bundle state dict")
        state = state.get("model", state) if isinstance(state, dict) else state  # CheckpointSaver's {"model": ...}
        strict_load(net, state, f"bundle weights {pt}")
        weights, model_name = pt, f"bundle:{type(net).__name__}"
    elif ts.is_file():
        net, weights, model_name = load_torchscript(ts), ts, "bundle:torchscript"
    else:
        raise CheckpointError(f"bundle:{text}: no models/model.pt or models/model.ts")
    if num_classes is None:
        raise ConfigError(f"bundle:{text}: metadata.json network_data_format.outputs.pred.num_channels is missing")
    output = options.get("output", "logits")
    try:
        adapter = AdaptedModel(net, int(num_classes), int(in_channels or 1), intensity=mapped.intensity, output=output)
    except ValueError as err:
        raise ConfigError(f"bundle:{text}: {err}") from err
    digest = file_sha256(weights)
    return LoadedModel(
        label=f"bundle-{root.name}",
        net=_freeze(adapter),
        model_name=model_name,
        num_classes=int(num_classes),
        in_channels=int(in_channels or 1),
        roi_size=tuple(roi),
        checkpoint=str(weights),
        checkpoint_sha256=model_sha256(digest, adapter),  # weights + adapter settings
        class_names=names,
        extra={
            "file_sha256": digest,
            "intensity": mapped.preprocessing.get("intensity"),
            "adapter": adapter.describe(),
            "input_units": {**mapped.intensity.units(), "unit": mapped.unit},
        },
        preprocessing={**mapped.preprocessing, "in_channels": int(in_channels or 1)},
    )
