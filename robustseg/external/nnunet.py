"""nnU-Net v2 trained model folders: ``--target nnunet:PATH[,fold=0][,configuration=3d_fullres][,checkpoint=final]``.

The network is built from ``plans.json`` with ``dynamic-network-architectures`` (nnU-Net's own building blocks,
``pip install robustseg[nnunet]``), without nnU-Net's predictor: that runs under ``torch.inference_mode`` and cannot
be attacked (MIC-DKFZ/nnUNet#2193). The checkpoint is read with ``weights_only=True`` (numpy scalars allowed as
data); a checkpoint that needs more is refused.

nnU-Net's preprocessing is reproduced by robustseg's data pipeline plus the adapter (Isensee et al., Nature
Methods 2021; facts in ``docs/external_models.md``):

* ``CTNormalization``: clip to the foreground ``[p0.5, p99.5]``, then ``(x - mean) / std``. robustseg's CT window
  ``[p0.5, p99.5]`` gives ``x01``; the adapter's fixed affine ``x01 * (p99.5 - p0.5) / std + (p0.5 - mean) / std``
  gives exactly nnU-Net's input. A budget ``eps`` is ``eps (p99.5 - p0.5) / std`` in nnU-Net's units.
* ``ZScoreNormalization``: per-image z-score (inside the nonzero mask with ``use_mask_for_norm``), frozen at the
  clean volume's statistics (default) or recomputed from the attacked input (``zscore=adaptive``). The data config
  should map each volume's min..max to [0, 1] (``intensity: {lower: 0, upper: 100}``): the z-score of an affine
  image is the z-score of the image.
* Axes: nnU-Net works on SimpleITK arrays, (z, y, x) of the stored voxels, transposed by ``transpose_forward``;
  robustseg's volumes are (x, y, z): the adapter permutes them. The configuration's spacing is the expected
  ``data.spacing``; its patch size is the sliding-window ROI; nnU-Net's window (Gaussian, sigma 1/8, step 0.5) is
  robustseg's default ``sw`` settings, and nnU-Net's exact Gaussian is ``extra["sliding_window"]["roi_weight_map"]``.
  ``mirror=true`` adds nnU-Net's test-time mirroring (about 8x the cost), attacked as an expectation.
* Region-based models (``regions_class_order``) are scored with nnU-Net's region rule
  (:func:`~robustseg.external.adapters.region_scores`); a custom trainer whose network the plans do not describe
  fails naming the trainer and the class or the weights that do not fit.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustseg.errors import CheckpointError, ConfigError
from robustseg.evaluation.resolve import LoadedModel, _freeze, strict_load
from robustseg.evaluation.store import file_sha256
from robustseg.external.adapters import AdaptedModel, IntensityMap, SpatialMap, model_sha256
from robustseg.external.weights import safe_load

log = logging.getLogger(__name__)

KEYS = ("fold", "configuration", "checkpoint", "mirror", "zscore")
SUPPORTED_NORMALIZATION = ("CTNormalization", "ZScoreNormalization")


def importance_map(patch: Sequence[int], sigma_scale: float = 1 / 8) -> Tensor:
    """nnU-Net v2's Gaussian window weights (``compute_gaussian``), shape ``patch``, for MONAI's ``roi_weight_map``.

    A Gaussian of sigma ``sigma_scale * patch`` centred at ``patch // 2`` (not at the geometric centre, as MONAI's
    ``gaussian`` blending), scaled to a maximum of 10 and rounded to float16 as nnU-Net's predictor does, zeros
    replaced by the smallest nonzero weight. Blending with MONAI's own Gaussian instead moves a few voxels of a
    weakly trained model across a decision boundary (about 1 in 1000 in the nnU-Net test).
    """
    weights = []
    for size in patch:
        sigma = size * sigma_scale
        x = torch.arange(size, dtype=torch.float64) - size // 2  # (size,)
        weights.append(torch.exp(-(x**2) / (2 * sigma**2)) * (x.abs() <= int(4 * sigma + 0.5)))  # scipy truncation
    g = weights[0][:, None, None] * weights[1][None, :, None] * weights[2][None, None, :]  # (*patch)
    g = (g / g.max() * 10).half()
    g[g == 0] = g[g != 0].min()
    return g.float()


def parse_target(text: str) -> tuple[Path, dict[str, str]]:
    """``PATH[,key=value...]`` (or ``:key=value``) -> (folder, options); unknown keys fail naming the known ones."""
    from robustseg.external import split_options

    path, *pairs = split_options(text)
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key.strip() not in KEYS:
            raise ConfigError(f"nnunet:{text}: {pair!r} is not one of key=value with key in {list(KEYS)}")
        options[key.strip()] = value.strip()
    folder = Path(path)
    if not (folder / "plans.json").is_file() or not (folder / "dataset.json").is_file():
        raise ConfigError(
            f"nnunet:{text}: {folder} is not an nnU-Net v2 trained model folder (needs plans.json and dataset.json, "
            "e.g. nnUNet_results/Dataset001_X/nnUNetTrainer__nnUNetPlans__3d_fullres)"
        )
    return folder, options


def _fold_dir(folder: Path, fold: str | None) -> Path:
    folds = sorted(p.name[len("fold_") :] for p in folder.glob("fold_*") if p.is_dir())
    if fold is None:
        if len(folds) != 1:
            raise ConfigError(
                f"nnunet:{folder}: pick a fold with fold=<one of {folds}>" if folds else f"{folder}: no fold_*"
            )
        fold = folds[0]
    if fold not in folds:
        raise ConfigError(f"nnunet:{folder}: fold={fold!r} not found; trained folds: {folds}")
    return folder / f"fold_{fold}"


def configuration_of(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """A configuration of ``plans.json`` with its ``inherits_from`` parents merged in."""
    configs = plans.get("configurations", {})
    if name not in configs:
        raise ConfigError(f"nnunet: configuration={name!r} not in plans.json; available: {sorted(configs)}")
    config = dict(configs[name])
    if "inherits_from" in config:
        config = {**configuration_of(plans, config.pop("inherits_from")), **config}
    return config


def build_network(architecture: dict[str, Any], in_channels: int, num_outputs: int, trainer: str) -> nn.Module:
    """The plans' network with ``deep_supervision=False`` and out-of-place nonlinearities (input gradients)."""
    class_name = architecture.get("network_class_name", "")
    kwargs = dict(architecture.get("arch_kwargs", {}))
    module_name, _, attr = class_name.rpartition(".")
    try:
        network_class = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        hint = " (pip install 'robustseg[nnunet]')" if module_name.startswith("dynamic_network_architectures") else ""
        raise CheckpointError(
            f"nnunet: cannot import the network class {class_name!r} named by plans.json{hint}; trainer {trainer!r}"
            " may build a custom network, which needs its own builder"
        ) from err
    for key in architecture.get("_kw_requires_import", []):
        if kwargs.get(key) is not None:
            mod, _, name = str(kwargs[key]).rpartition(".")
            try:
                kwargs[key] = getattr(importlib.import_module(mod), name)
            except (ImportError, AttributeError) as err:
                raise CheckpointError(
                    f"nnunet: plans.json arch_kwargs.{key}={kwargs[key]!r} cannot be imported"
                ) from err
    if isinstance(kwargs.get("nonlin_kwargs"), dict) and "inplace" in kwargs["nonlin_kwargs"]:
        kwargs["nonlin_kwargs"] = {**kwargs["nonlin_kwargs"], "inplace": False}
    try:
        return network_class(input_channels=in_channels, num_classes=num_outputs, deep_supervision=False, **kwargs)
    except TypeError as err:
        raise CheckpointError(f"nnunet: {class_name} rejected the plans' arch_kwargs: {err}") from err


def labels_of(dataset: dict[str, Any]) -> tuple[list[str], int, list[int] | None]:
    """(class names by label value, number of network outputs, regions_class_order or None)."""
    labels = {k: v for k, v in dataset["labels"].items() if k != "ignore"}
    regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())
    if not regions:
        names = [name for name, _ in sorted(labels.items(), key=lambda kv: int(kv[1]))]
        return names, len(names), None
    order = dataset.get("regions_class_order")
    if not order:
        raise CheckpointError("nnunet: dataset.json defines regions but no regions_class_order")
    foreground = [k for k, v in labels.items() if v not in (0, [0])]
    if len(order) != len(foreground):
        raise CheckpointError(f"nnunet: regions_class_order {order} does not list one label per region {foreground}")
    names = ["background"] + [f"label{label}" for label in range(1, max(order) + 1)]
    for name, label in zip(foreground, order):
        names[int(label)] = name
    return names, len(foreground), [int(c) for c in order]


def intensity_of(plans: dict[str, Any], config: dict[str, Any], zscore: str) -> tuple[IntensityMap, dict, dict]:
    """(adapter intensity map, expected data preprocessing, input units) for the configuration's normalisation."""
    schemes = list(config.get("normalization_schemes", []))
    if not schemes or any(s != schemes[0] for s in schemes) or schemes[0] not in SUPPORTED_NORMALIZATION:
        raise CheckpointError(
            f"nnunet: normalization_schemes {schemes} are not supported; robustseg reproduces one scheme for all "
            f"channels, one of {list(SUPPORTED_NORMALIZATION)}"
        )
    if schemes[0] == "CTNormalization":
        props = [plans["foreground_intensity_properties_per_channel"][str(c)] for c in range(len(schemes))]
        lows = {float(p["percentile_00_5"]) for p in props}
        highs = {float(p["percentile_99_5"]) for p in props}
        if len(lows) != 1 or len(highs) != 1:
            raise CheckpointError("nnunet: CT channels with different percentile windows are not supported")
        low, high = lows.pop(), highs.pop()
        scale = [(high - low) / max(float(p["std"]), 1e-8) for p in props]
        shift = [(low - float(p["mean"])) / max(float(p["std"]), 1e-8) for p in props]
        units = {"scale": scale, "unit": "nnU-Net CTNormalization z-units", "hu_per_unit": high - low}
        return IntensityMap(scale, shift), {"modality": "ct", "intensity": {"a_min": low, "a_max": high}}, units
    mask = bool(any(config.get("use_mask_for_norm", [False])))
    units = {"scale": None, "unit": "nnU-Net ZScore units: 1 / (each volume's std) per [0, 1] unit", "zscore": zscore}
    expected = {"modality": "mri", "intensity": {"lower": 0.0, "upper": 100.0}}
    return IntensityMap(zscore=zscore, mask_nonzero=mask), expected, units


def load_nnunet(text: str) -> LoadedModel:
    """Load ``PATH[,fold=..,configuration=..,checkpoint=final|best,mirror=true|false,zscore=frozen|adaptive]``."""
    folder, options = parse_target(text)
    plans = json.loads((folder / "plans.json").read_text())
    dataset = json.loads((folder / "dataset.json").read_text())
    fold_dir = _fold_dir(folder, options.get("fold"))
    which = options.get("checkpoint", "final")
    if which not in ("final", "best"):
        raise ConfigError(f"nnunet:{text}: checkpoint={which!r}: expected final or best")
    ckpt_path = fold_dir / f"checkpoint_{which}.pth"
    ckpt = safe_load(ckpt_path, f"nnU-Net checkpoint_{which}")
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise CheckpointError(f"{ckpt_path}: not an nnU-Net v2 checkpoint (no network_weights)")
    trainer = str(ckpt.get("trainer_name", "?"))
    if not trainer.startswith("nnUNetTrainer"):
        log.warning("nnunet: trainer %r is not one of nnU-Net's; its network is rebuilt from plans.json", trainer)
    name = (
        options.get("configuration")
        or (ckpt.get("init_args") or {}).get("configuration")
        or folder.name.split("__")[-1]
    )
    config = configuration_of(plans, name)
    if "architecture" not in config:
        raise CheckpointError(f"nnunet: configuration {name!r} has no 'architecture' (plans from nnU-Net < 2.4?)")
    in_channels = len(dataset.get("channel_names", dataset.get("modality", {"0": "?"})))
    names, num_outputs, order = labels_of(dataset)
    net = build_network(config["architecture"], in_channels, num_outputs, trainer)
    weights = {k.removeprefix("_orig_mod."): v for k, v in ckpt["network_weights"].items()}
    try:
        strict_load(net, weights, f"nnU-Net checkpoint {ckpt_path}")
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}. Trainer {trainer!r} may build a custom network (U-Mamba, ...) that the plans "
            "do not describe: it needs its own builder"
        ) from err
    zscore = options.get("zscore", "frozen")
    intensity, expected, units = intensity_of(plans, config, zscore)
    transpose = [int(t) for t in plans.get("transpose_forward", [0, 1, 2])]
    axes = [2 - t for t in transpose]  # model axis i = SimpleITK axis t = nibabel axis 2 - t
    spacing = [0.0, 0.0, 0.0]
    for i, a in enumerate(axes):
        spacing[a] = float(config["spacing"][i])
    mirror = options.get("mirror", "false").lower() in ("1", "true", "yes")
    adapter = AdaptedModel(
        net,
        num_classes=len(names),
        in_channels=in_channels,
        intensity=intensity,
        spatial=SpatialMap(axes),
        mirror_axes=tuple(ckpt.get("inference_allowed_mirroring_axes") or ()) if mirror else (),
        output="regions" if order else "logits",
        regions_class_order=order,
    )
    roi = [0, 0, 0]
    for i, a in enumerate(axes):
        roi[a] = int(config["patch_size"][i])
    digest = file_sha256(ckpt_path)
    return LoadedModel(
        label=f"nnunet-{folder.parent.name}-{name}-fold{fold_dir.name[5:]}",
        net=_freeze(adapter),
        model_name=f"nnunet:{config['architecture'].get('network_class_name', '?').rpartition('.')[2]}",
        num_classes=len(names),
        in_channels=in_channels,
        roi_size=tuple(roi),
        checkpoint=str(ckpt_path),
        checkpoint_sha256=model_sha256(digest, adapter),  # weights + adapter settings
        class_names=names,
        extra={
            "file_sha256": digest,
            "intensity": expected["intensity"],
            "adapter": adapter.describe(),
            "input_units": units,
            "trainer": trainer,
            "configuration": name,
            # nnU-Net's window: step 0.5 = overlap 0.5; its Gaussian (sigma 1/8) as MONAI's roi_weight_map, in
            # robustseg's axes (the map is symmetric under flips, not under a transpose of an anisotropic patch)
            "sliding_window": {
                "overlap": 0.5,
                "blend_mode": "gaussian",
                "sigma_scale": 0.125,
                "roi_weight_map": importance_map(config["patch_size"]).permute(*adapter.spatial.inverse),
            },
        },
        preprocessing={**expected, "spacing": spacing, "in_channels": in_channels},
    )
