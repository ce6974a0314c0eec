"""The evaluation loop: one case at a time, white-box and transfer, resumable.

For every case of the shard: each target scores the clean volume; then for every source (each target itself
when no surrogate is given, white-box; the surrogate otherwise, transfer) and every (attack, budget) of the
suite, the adversarial volume is crafted once (or loaded from the :class:`AdversarialStore`) and scored by every
target that source serves. So a transfer matrix costs S x A attack generations, never S x T x A, and the counts
of generations and of network forward/backward passes are reported.

Scoring is MONAI ``sliding_window_inference`` over the whole volume; crafting is ``attack_volume`` through that
same sliding window (``attack_mode=pipeline``, the exact white-box threat model) or on the papers' tiles.
Finished results are appended to the per-case JSONL as they complete; on a rerun they are skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import Tensor, nn

from robustseg.evaluation import checks
from robustseg.evaluation.frequency import band_filtered_inputs
from robustseg.evaluation.metrics import dice_per_class, flip_rate, perturbation_metrics, segmentation_metrics
from robustseg.evaluation.records import CaseLog
from robustseg.evaluation.resolve import LoadedModel
from robustseg.evaluation.store import AdversarialStore
from robustseg.evaluation.suite import AttackSpec

log = logging.getLogger(__name__)

CLEAN = "clean"


class PassCounter(nn.Module):
    """Wraps a network to count its forward calls, the windows they carried and the backward passes through them."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.forwards = 0
        self.windows = 0
        self.backwards = 0

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        self.forwards += 1
        self.windows += x.shape[0]
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def _count_backward(self, grad: Tensor) -> None:
        self.backwards += 1

    def counts(self) -> dict[str, int]:
        return {"forwards": self.forwards, "windows": self.windows, "backwards": self.backwards}


@dataclass
class SlidingWindow:
    """Scoring and crafting window settings; ``roi_size`` None means each model's own training ROI."""

    overlap: float = 0.5
    sw_batch_size: int = 2
    blend_mode: str = "gaussian"
    roi_size: tuple[int, int, int] | None = None

    def roi(self, model: LoadedModel) -> tuple[int, int, int]:
        return tuple(self.roi_size) if self.roi_size else tuple(model.roi_size)


@dataclass
class RunStats:
    """What the run spent: attack generations and network passes, by phase."""

    generations: int = 0
    reused_volumes: int = 0
    attack_passes: dict[str, int] = field(default_factory=lambda: {"forwards": 0, "windows": 0, "backwards": 0})
    score_passes: dict[str, int] = field(default_factory=lambda: {"forwards": 0, "windows": 0, "backwards": 0})
    records_written: int = 0
    records_skipped: int = 0
    seconds: float = 0.0

    def add(self, phase: dict[str, int], before: dict[str, int], after: dict[str, int]) -> None:
        for k in phase:
            phase[k] += after[k] - before[k]


def case_seed(seed: int, *parts: str) -> int:
    """A seed per (source, attack, budget, case) that does not depend on run order or sharding."""
    digest = hashlib.sha256("|".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class Evaluator:
    """Runs the white-box/transfer evaluation over cases; see the module docstring.

    Args:
        targets: models that are scored.
        source: the surrogate that crafts for every target (transfer), or None for white-box per target.
        also_whitebox: with a source, also attack every other target white-box (a full transfer matrix).
        suite: the (attack, budget) pairs.
        mode: ``pipeline`` or ``tiles`` (passed to ``attack_volume``).
        bands: named DCT bands ``{name: (low, high)}`` for the frequency analysis; empty to skip it.
        craft_fn: ``attack_volume``; injectable for tests.
    """

    def __init__(
        self,
        targets: Sequence[LoadedModel],
        source: LoadedModel | None,
        suite: Sequence[AttackSpec],
        store: AdversarialStore,
        case_log: CaseLog,
        *,
        window: SlidingWindow,
        mode: str = "pipeline",
        memory_bounded: bool = False,
        seed: int = 0,
        nsd_tolerance_mm: float = 1.0,
        bands: Mapping[str, Sequence[float]] | None = None,
        max_zero_grad_fraction: float = 0.5,
        montage: Callable[..., None] | None = None,
        also_whitebox: bool = False,
        craft_fn: Callable[..., Tensor] | None = None,
    ) -> None:
        self.targets = list(targets)
        self.source = source
        self.suite = list(suite)
        self.store = store
        self.log = case_log
        self.window = window
        self.mode = mode
        self.memory_bounded = memory_bounded
        self.seed = seed
        self.nsd_tolerance_mm = nsd_tolerance_mm
        self.bands = dict(bands or {})
        self.max_zero_grad_fraction = max_zero_grad_fraction
        self.montage = montage
        self.also_whitebox = also_whitebox
        self.craft_fn = craft_fn
        self.counters = {m.label: PassCounter(m.net) for m in self._all_models()}
        self.stats = RunStats()
        self.flags: list[checks.Flag] = []

    def _all_models(self) -> list[LoadedModel]:
        models = {m.label: m for m in self.targets}
        if self.source is not None:
            models.setdefault(self.source.label, self.source)
        return list(models.values())

    def plan(self) -> list[tuple[LoadedModel, list[LoadedModel]]]:
        """(source, targets it is scored by): white-box pairs each target with itself; transfer shares one."""
        if self.source is None:
            return [(t, [t]) for t in self.targets]
        plan = [(self.source, self.targets)]
        if self.also_whitebox:
            plan += [(t, [t]) for t in self.targets if t.label != self.source.label]
        return plan

    def keys(self, case_id: str) -> list[tuple[str, ...]]:
        """Every record key this run produces for ``case_id`` (for the shard manifest)."""
        out = [("", t.label, CLEAN, "0", case_id) for t in self.targets]
        for source, targets in self.plan():
            out += [(source.label, t.label, s.label, s.budget, case_id) for s in self.suite for t in targets]
        return out

    # -- network passes -----------------------------------------------------------------------------------------

    def predict(self, model: LoadedModel, image: Tensor) -> Tensor:
        """Sliding-window logits (1, K, D, H, W) of a (1, C, D, H, W) volume."""
        with torch.no_grad():
            return sliding_window_inference(
                image,
                roi_size=self.window.roi(model),
                sw_batch_size=self.window.sw_batch_size,
                predictor=self.counters[model.label],
                overlap=self.window.overlap,
                mode=self.window.blend_mode,
            )

    def craft(self, source: LoadedModel, spec: AttackSpec, image: Tensor, label: Tensor, seed: int) -> Tensor:
        """The adversarial (1, C, D, H, W) volume of ``spec`` against ``source``."""
        craft_fn = self.craft_fn
        if craft_fn is None:
            from robustseg.attacks.volume import attack_volume as craft_fn
        torch.manual_seed(seed)
        counter = self.counters[source.label]
        return craft_fn(
            spec.build(),
            counter,
            image,
            label,
            mode=self.mode,
            roi_size=self.window.roi(source),
            overlap=self.window.overlap,
            sw_batch_size=self.window.sw_batch_size,
            memory_bounded=self.memory_bounded,
            blend_mode=self.window.blend_mode,
        )

    def _counted(self, phase: dict[str, int], fn: Callable[[], Any]) -> Any:
        before = {k: sum(c.counts()[k] for c in self.counters.values()) for k in phase}
        out = fn()
        after = {k: sum(c.counts()[k] for c in self.counters.values()) for k in phase}
        self.stats.add(phase, before, after)
        return out

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self, cases: Sequence[Mapping[str, Any]] | Any, first_checks: bool = True) -> RunStats:
        """Evaluate every case (dicts with MetaTensor ``image``/``label`` and ``case_id``); returns the costs."""
        start = time.perf_counter()
        for index, case in enumerate(cases):
            self.run_case(case, with_checks=first_checks and index == 0)
        self.stats.seconds += time.perf_counter() - start
        self.stats.generations = self.store.generated
        self.stats.reused_volumes = self.store.reused
        return self.stats

    def run_case(self, case: Mapping[str, Any], with_checks: bool = False) -> None:
        case_id = str(case["case_id"])
        image = _plain(case["image"]).float()[None]  # (1, C, D, H, W)
        label = _plain(case["label"]).long()[None]  # (1, 1, D, H, W)
        affine = _affine(case["image"])
        spacing = _spacing(case["image"], affine)
        todo = [k for k in self.keys(case_id) if not self.done(k)]
        self.stats.records_skipped += len(self.keys(case_id)) - len(todo)
        if not todo and not with_checks:
            return
        clean_pred = {}
        for t in self.targets:
            logits = self._counted(self.stats.score_passes, lambda t=t: self.predict(t, image))
            clean_pred[t.label] = logits.argmax(1)[0]  # (D, H, W)
            if with_checks:
                self._check_model(t, image, label, logits)
            key = ("", t.label, CLEAN, "0", case_id)
            if key in todo:
                metrics = self._score(clean_pred[t.label], label, t, spacing)
                self._write(key, {"kind": CLEAN, "eps": 0.0, **metrics, "spacing": spacing})
        if self.source is not None and with_checks and self.source.label not in clean_pred:
            self._check_model(self.source, image, label, self.predict(self.source, image))
        for source, targets in self.plan():
            for spec in self.suite:
                wanted = [t for t in targets if (source.label, t.label, spec.label, spec.budget, case_id) in todo]
                if with_checks and spec.eps is not None:
                    self._check_eps_zero(source, spec, image, label)
                if not wanted:
                    continue
                seed = case_seed(self.seed, source.label, spec.label, spec.budget, case_id)
                provenance = {
                    "source": source.label,
                    "model": source.model_name,
                    "checkpoint": source.checkpoint,
                    "checkpoint_sha256": source.checkpoint_sha256,
                    "attack": spec.config,
                    "preset": spec.label,
                    "budget": spec.budget,
                    "mode": self.mode,
                    "memory_bounded": self.memory_bounded,
                    "seed": seed,
                    "case_id": case_id,
                }
                key = (source.label, spec.label, spec.budget, case_id)
                adversarial = self._counted(
                    self.stats.attack_passes,
                    lambda s=source, sp=spec, sd=seed, k=key, p=provenance: self.store.get_or_create(
                        k, p, affine, lambda: self.craft(s, sp, image, label, sd)[0]
                    ),
                )[None]  # (1, C, D, H, W)
                ok, reason = checks.audit_volume(image[0], adversarial[0], spec.norm_bound, spec.norm)
                perturbation = perturbation_metrics(image[0], adversarial[0])
                for t in wanted:
                    metrics = self._score_adversarial(
                        source, t, spec, case_id, image, adversarial, label, spacing, clean_pred
                    )
                    self._write(
                        (source.label, t.label, spec.label, spec.budget, case_id),
                        {**metrics, **perturbation, "budget_ok": ok, "budget_detail": reason, "seed": seed},
                    )

    def _score_adversarial(
        self,
        source: LoadedModel,
        target: LoadedModel,
        spec: AttackSpec,
        case_id: str,
        image: Tensor,
        adversarial: Tensor,
        label: Tensor,
        spacing: list[float],
        clean_pred: Mapping[str, Tensor],
    ) -> dict[str, Any]:
        """Metrics of ``target`` on one adversarial (1, C, D, H, W) volume, incl. flip rate and DCT bands."""
        logits = self._counted(self.stats.score_passes, lambda: self.predict(target, adversarial))
        pred = logits.argmax(1)[0]  # (D, H, W)
        metrics = self._score(pred, label, target, spacing)
        metrics["flip_rate"] = flip_rate(clean_pred[target.label], pred)
        metrics["kind"] = "whitebox" if source.label == target.label else "transfer"
        metrics["eps"] = spec.eps
        metrics["mode"] = self.mode
        metrics["spacing"] = spacing
        if self.bands:
            filtered = band_filtered_inputs(image[0], adversarial[0], self.bands)
            metrics["freq_dice"] = {
                name: self._score(
                    self._counted(self.stats.score_passes, lambda x=x: self.predict(target, x[None])).argmax(1)[0],
                    label,
                    target,
                    spacing,
                    dice_only=True,
                )["dice_mean"]
                for name, x in filtered.items()
            }
        if self.montage is not None:
            volumes = (image[0], adversarial[0], label[0], clean_pred[target.label], pred)
            self.montage(source, target, spec, case_id, *volumes)
        return metrics

    def _score(self, pred: Tensor, label: Tensor, model: LoadedModel, spacing, dice_only: bool = False) -> dict:
        if dice_only:
            dice = dice_per_class(pred, label[0, 0], model.num_classes)
            return {"dice_mean": sum(dice[1:]) / (len(dice) - 1)}
        return segmentation_metrics(pred, label[0, 0], model.num_classes, spacing, self.nsd_tolerance_mm)

    def settings_id(self, key: tuple[str, ...]) -> str:
        """Hash of every setting a record depends on: a result made with other settings is recomputed, not reused."""
        source, target, attack, budget, _ = key
        models = {m.label: m for m in self._all_models()}
        parts: dict[str, Any] = {
            "target": models[target].checkpoint_sha256,
            "window": [self.window.overlap, self.window.sw_batch_size, self.window.blend_mode],
            "roi": list(self.window.roi(models[target])),
            "nsd": self.nsd_tolerance_mm,
            "bands": self.bands,
        }
        if attack != CLEAN:
            spec = next(s for s in self.suite if (s.label, s.budget) == (attack, budget))
            parts |= {"source": models[source].checkpoint_sha256, "attack": spec.config, "mode": self.mode}
            parts |= {"memory_bounded": self.memory_bounded, "seed": self.seed}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def done(self, key: tuple[str, ...]) -> bool:
        """Whether ``key`` has a record made with the current settings."""
        record = self.log.records.get(key)
        return record is not None and record.get("settings_id") == self.settings_id(key)

    def _write(self, key: tuple[str, ...], fields: Mapping[str, Any]) -> None:
        source, target, attack, budget, case_id = key
        record = {"source": source, "target": target, "attack": attack, "budget": budget, "case_id": case_id}
        self.log.append({**fields, **record, "settings_id": self.settings_id(key)})
        self.stats.records_written += 1

    # -- sanity checks on the first case -------------------------------------------------------------------------

    def _check_model(self, model: LoadedModel, image: Tensor, label: Tensor, logits: Tensor) -> None:
        again = self.predict(model, image)
        self.flags.append(checks.check_determinism(model.label, logits, again))
        loss = DiceCELoss(to_onehot_y=True, softmax=True)
        roi = self.window.roi(model)

        def loss_fn(x: Tensor) -> Tensor:
            window = self.window
            out = sliding_window_inference(
                x, roi, window.sw_batch_size, self.counters[model.label], window.overlap, window.blend_mode
            )
            return loss(out, label)

        zero, nan = checks.input_gradient_fractions(loss_fn, image)
        self.flags.append(checks.check_gradients(model.label, zero, nan, self.max_zero_grad_fraction))

    def _check_eps_zero(self, source: LoadedModel, spec: AttackSpec, image: Tensor, label: Tensor) -> None:
        zero = spec.with_budget(0.0, steps=1)  # with eps 0 the result cannot depend on the step count
        if any(f.name == "eps_zero" and f.detail.startswith(f"{source.label}/{spec.label}:") for f in self.flags):
            return
        adversarial = self.craft(source, zero, image, label, seed=self.seed)
        if torch.equal(adversarial, image):  # identical input: the prediction is identical iff determinism holds
            clean = adv = torch.zeros(())
        else:
            clean = self.predict(source, image).argmax(1)
            adv = self.predict(source, adversarial).argmax(1)
        self.flags.append(checks.check_eps_zero(f"{source.label}/{spec.label}", image, adversarial, clean, adv))


def _plain(x: Any) -> Tensor:
    """A plain tensor: MetaTensor's per-op metadata tracking would dominate the cost of scoring."""
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.detach().clone()


def _affine(image: Any) -> np.ndarray:
    affine = getattr(image, "affine", None)
    return np.eye(4) if affine is None else np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)


def _spacing(image: Any, affine: np.ndarray) -> list[float]:
    pixdim = getattr(image, "pixdim", None)
    if pixdim is not None:
        return [float(s) for s in torch.as_tensor(pixdim).flatten()[:3]]
    return [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)]
