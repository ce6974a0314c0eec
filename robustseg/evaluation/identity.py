"""Result identity: everything that can change a result, hashed, so a changed setting recomputes exactly that result.

A record (one source, target, attack, budget and case) is identified by its key and a ``settings_id``: the short
sha256 of its identity, which holds

* the target's checkpoint sha256 and the sliding window that scores it (ROI, overlap, blend mode and sigma);
* the metric settings (NSD tolerance, DCT bands);
* the data preprocessing of the resolved data config (modality, intensity, spacing, orientation, crops,
  padding) and a sha256 of the case's preprocessed input, label, and voxel spacing (:func:`case_fingerprint`);
* for an attack result also the source's checkpoint sha256 and window, every field of the attack (the
  resolved preset with its budget), the budget, the threat model (``pipeline``/``tiles``, memory-bounded) and
  the seed.

The stored adversarial volume of (source, attack, budget, case) carries the source-side part of the same
identity (:func:`volume_identity`); a change re-crafts it. A run's identity (:func:`run_identity`) is the
case-independent part; shards whose run identities differ cannot be merged and :func:`differences` names the
settings that differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import Tensor

CLEAN = "clean"

# data-config keys that change the preprocessed voxels (the data's name and location do not)
PREPROCESSING_KEYS = (
    "modality",
    "in_channels",
    "intensity",
    "orientation",
    "spacing",
    "crop_foreground",
    "crop_size",
    "roi_size",
    "pad_divisor",
)


def canonical(value: Any) -> str:
    """JSON with sorted keys: tuples and lists, ints and equal floats compare equal through it."""
    return json.dumps(value, sort_keys=True, default=_default)


def short_hash(value: Any, n: int = 16) -> str:
    """First ``n`` hex digits of the sha256 of :func:`canonical` ``(value)``."""
    return hashlib.sha256(canonical(value).encode()).hexdigest()[:n]


def _default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def case_seed(seed: int, *parts: str) -> int:
    """A seed per (source, attack, budget, case) that does not depend on run order or sharding."""
    digest = hashlib.sha256("|".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def budget_value(spec: Any) -> float | None:
    """The budget as a number: eps / sigma in [0, 1] units, or VAFA's q_max; None for a preset budget."""
    if spec.eps is not None:
        return float(spec.eps)
    if spec.budget.startswith("q_max") and "q_max" in spec.config:
        return float(spec.config["q_max"])
    return None


def data_preprocessing(data: Any) -> dict[str, Any]:
    """The resolved preprocessing of a data config (``DataOptions`` or a ``data`` mapping), for identities."""
    if dataclasses.is_dataclass(data):
        raw = {k: getattr(data, k) for k in PREPROCESSING_KEYS if hasattr(data, k)}
    else:
        raw = {k: data.get(k) for k in PREPROCESSING_KEYS if k in data}
    return json.loads(canonical(raw))


def case_fingerprint(image: Tensor, label: Tensor, spacing: Any) -> str:
    """sha256 of a preprocessed case: image (float32) and label (int64) voxels, their shapes and the spacing."""
    h = hashlib.sha256()
    for x, dtype in ((image, np.float32), (label, np.int64)):
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=dtype)
        h.update(canonical(list(array.shape)).encode())
        h.update(array.tobytes())
    h.update(canonical([round(float(s), 6) for s in spacing]).encode())
    return h.hexdigest()


def attack_identity(spec: Any) -> dict[str, Any]:
    """Every field of an attack at its budget: the resolved preset config, the budget text and value."""
    return {"preset": spec.label, "config": spec.config, "budget": spec.budget, "eps": spec.eps}


def volume_identity(
    source: Any, spec: Any, window: Mapping[str, Any], threat: Mapping[str, Any], data: Mapping, case: str
) -> dict[str, Any]:
    """What a stored adversarial volume depends on: source checkpoint and window, attack, threat model, data.

    Args:
        window: the source's sliding-window identity (``SlidingWindow.identity``).
        threat: ``{"mode": ..., "memory_bounded": ..., "seed": ...}``.
        data: the data preprocessing (:func:`data_preprocessing`).
        case: the case's fingerprint (:func:`case_fingerprint`).
    """
    return {
        "source_checkpoint": source.checkpoint_sha256,
        "source_window": dict(window),
        "attack": attack_identity(spec),
        **dict(threat),
        "data": dict(data),
        "case_sha256": case,
    }


def record_identity(
    target: Any,
    target_window: Mapping[str, Any],
    scoring: Mapping[str, Any],
    data: Mapping[str, Any],
    case: str,
    volume: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Identity of one record: target side (checkpoint, window, metric settings, data, case) + the volume's."""
    out = {
        "target_checkpoint": target.checkpoint_sha256,
        "target_window": dict(target_window),
        "scoring": dict(scoring),
        "data": dict(data),
        "case_sha256": case,
    }
    if volume is not None:
        out["volume"] = dict(volume)
    return out


def run_identity(
    models: Mapping[str, Any],
    windows: Mapping[str, Mapping[str, Any]],
    suite: list[Any],
    plan: list[tuple[str, list[str]]],
    threat: Mapping[str, Any],
    scoring: Mapping[str, Any],
    data: Mapping[str, Any],
) -> dict[str, Any]:
    """The case-independent settings of a run (compared across shards before merging them)."""
    return {
        "checkpoints": {label: m.checkpoint_sha256 for label, m in sorted(models.items())},
        "windows": {label: dict(w) for label, w in sorted(windows.items())},
        "attacks": [attack_identity(s) for s in suite],
        "plan (source: targets)": {source: list(targets) for source, targets in plan},
        "threat model": dict(threat),
        "scoring": dict(scoring),
        "data preprocessing": dict(data),
    }


def differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``name: A != B`` for every (nested) setting whose value differs between two identities."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key), b.get(key)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            out += differences(x, y, f"{prefix}{key}.")
        elif canonical(x) != canonical(y):
            out.append(f"{prefix}{key}: {canonical(x)} != {canonical(y)}")
    return out


class ResultIdentity:
    """Mixin of :class:`~robustseg.evaluation.runner.Evaluator`: the identities of its results.

    Uses the evaluator's ``models``, ``window``, ``suite``, ``plan()``, ``mode``, ``memory_bounded``, ``seed``,
    ``nsd_tolerance_mm``, ``bands``, ``data``, ``skip``, ``log`` and ``expected``.
    """

    def threat(self) -> dict[str, Any]:
        return {"mode": self.mode, "memory_bounded": self.memory_bounded, "seed": self.seed}

    def scoring(self) -> dict[str, Any]:
        return {"nsd_tolerance_mm": self.nsd_tolerance_mm, "bands": self.bands}

    def run_identity(self) -> dict[str, Any]:
        """The case-independent settings of this run (shards must agree on them to be merged)."""
        windows = {label: self.window.identity(m) for label, m in self.models.items()}
        plan = [(s.label, [t.label for t in ts]) for s, ts in self.plan()]
        threat = {**self.threat(), "cascade": self.skip is not None}
        return run_identity(self.models, windows, self.suite, plan, threat, self.scoring(), self.data)

    def volume_identity(self, source: Any, spec: Any, case_hash: str) -> dict[str, Any]:
        return volume_identity(source, spec, self.window.identity(source), self.threat(), self.data, case_hash)

    def record_identity(self, key: tuple[str, ...], case_hash: str) -> dict[str, Any]:
        """Everything the record of ``key`` depends on (see the module docstring)."""
        source, target, attack, budget, _ = key
        target_model = self.models[target]
        volume = None
        if attack != CLEAN:
            spec = self.spec(attack, budget)
            volume = self.volume_identity(self.models[source], spec, case_hash)
        scoring = self.scoring() if attack != CLEAN else {"nsd_tolerance_mm": self.nsd_tolerance_mm}
        window = self.window.identity(target_model)
        return record_identity(target_model, window, scoring, self.data, case_hash, volume)

    def spec(self, attack: str, budget: str) -> Any:
        return next(s for s in self.suite if (s.label, s.budget) == (attack, budget))

    def settings_id(self, key: tuple[str, ...]) -> str | None:
        """The identity hash this run expects for ``key`` (known once its case has been read), else None."""
        return self.expected.get(tuple(key))

    def done(self, key: tuple[str, ...]) -> bool:
        """Whether ``key`` has a record made with the current settings (its case must have been read)."""
        sid = self.settings_id(key)
        return sid is not None and self.log.done(tuple(key), sid)

    def _have(self, key: tuple[str, ...], sid: str) -> bool:
        """A record of ``key`` with identity ``sid`` exists (a cascade-skipped one counts only with a cascade)."""
        record = self.log.by_identity.get((tuple(key), sid))
        return record is not None and (self.skip is not None or not record.get("skipped"))
