"""The evaluation loop: one case at a time, white-box and transfer, resumable, on the real voxels only.

For every case of the shard: the case is cropped to its real extent (``region.py``: padding added by the
transforms is never scored nor attacked) and fingerprinted; each target scores the clean volume; then for every
source (each target itself when no surrogate is given, white-box; the surrogate otherwise, transfer) and every
(attack, budget) of the suite, the adversarial volume is crafted once (or loaded from the
:class:`AdversarialStore` when its identity matches) and scored by every target that source serves. So a
transfer matrix costs S x A attack generations, never S x T x A.

Every record carries its identity hash (``settings_id``, ``identity.py``); a result whose identity is already in
the log is skipped, any change of a setting it depends on recomputes it. Each record also carries the cost of
the work that produced it (``cost``: generation, attack and scoring passes, seconds), so costs add up over
resumed runs. Scoring and crafting run the networks in eval mode through :class:`PassCounter`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from robustseg.evaluation import checks, identity
from robustseg.evaluation.costs import PASSES, RunStats
from robustseg.evaluation.frequency import band_filtered_inputs
from robustseg.evaluation.identity import ResultIdentity, budget_value, case_seed
from robustseg.evaluation.metrics import flip_rate, perturbation_metrics
from robustseg.evaluation.progress import Progress
from robustseg.evaluation.records import CaseLog
from robustseg.evaluation.region import real_case
from robustseg.evaluation.resolve import LoadedModel
from robustseg.evaluation.sanity import SanityChecks
from robustseg.evaluation.scoring import (
    PassCounter,
    SlidingWindow,
    dice_mean,
    predict,
    roi_weight_map,
    score_prediction,
)
from robustseg.evaluation.store import AdversarialStore
from robustseg.evaluation.suite import AttackSpec
from robustseg.external.adapters import observe_volume

__all__ = ["CLEAN", "Evaluator", "PassCounter", "RunStats", "SlidingWindow", "case_seed"]

log = logging.getLogger(__name__)

CLEAN = identity.CLEAN


class Evaluator(ResultIdentity, SanityChecks):
    """Runs the white-box/transfer evaluation over cases; see the module docstring.

    Args:
        targets: models that are scored (unique labels).
        source: the surrogate that crafts for every target (transfer), or None for white-box per target.
        suite: the (attack, budget) pairs.
        store, case_log: stored adversarial volumes and the per-case JSONL.
        window: sliding-window settings (scoring and crafting).
        mode: ``pipeline`` or ``tiles`` (passed to ``attack_volume``).
        data: the resolved data preprocessing (``identity.data_preprocessing``), part of every identity.
        bands: named DCT bands ``{name: (low, high)}`` for the frequency analysis; empty to skip it.
        also_whitebox: with a source, also attack every other target white-box (a full transfer matrix).
        craft_fn: ``attack_volume``; injectable for tests.
        skip: optional cascade predicate ``skip(case_id, spec, records_so_far) -> bool``; a skipped (source,
            attack, budget) is recorded as ``skipped: "cascade"`` without metrics.
        progress: progress display: True a tqdm bar, False log lines, None a bar only on a terminal.
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
        nsd_tolerance_mm: float | None = 1.0,
        bands: Mapping[str, Sequence[float]] | None = None,
        max_zero_grad_fraction: float = 0.5,
        montage: Callable[..., Any] | None = None,
        also_whitebox: bool = False,
        craft_fn: Callable[..., Tensor] | None = None,
        data: Mapping[str, Any] | None = None,
        skip: Callable[[str, AttackSpec, list[dict[str, Any]]], bool] | None = None,
        progress: bool | None = False,
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
        self.data = dict(data or {})
        self.skip = skip
        self.show_progress = progress
        self.models = {m.label: m for m in self._all_models()}
        self.counters = {label: PassCounter(m.net) for label, m in self.models.items()}
        self.stats = RunStats()
        self.flags: list[checks.Flag] = []
        self.expected: dict[tuple[str, ...], str] = {}  # this run's keys -> settings ids (the manifest)
        self.checked = False

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
        return predict(self.window, model, self.counters[model.label], image)

    def craft(self, source: LoadedModel, spec: AttackSpec, image: Tensor, label: Tensor, seed: int) -> Tensor:
        """The adversarial (1, C, D, H, W) volume of ``spec`` against ``source`` (network in eval mode)."""
        craft_fn = self.craft_fn
        if craft_fn is None:
            from robustseg.attacks.volume import attack_volume as craft_fn
        torch.manual_seed(seed)
        counter = self.counters[source.label].train(False)
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
            roi_weight_map=roi_weight_map(source),
        )

    def _passes(self) -> dict[str, int]:
        return {k: sum(c.counts()[k] for c in self.counters.values()) for k in PASSES}

    def _counted(self, phase: dict[str, int], fn: Callable[[], Any], cost: dict[str, Any] | None = None) -> Any:
        """Run ``fn``, add the passes it made to ``phase`` (and to a record's ``cost`` under its phase name)."""
        before, start = self._passes(), time.perf_counter()
        out = fn()
        after = self._passes()
        self.stats.add(phase, before, after)
        if cost is not None:
            name = "attack" if phase is self.stats.attack_passes else "score"
            for k in PASSES:
                cost[f"{name}_{k}"] = cost.get(f"{name}_{k}", 0) + after[k] - before[k]
            cost["seconds"] = cost.get("seconds", 0.0) + time.perf_counter() - start
        return out

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self, cases: Sequence[Mapping[str, Any]] | Any, first_checks: bool = True, total: int | None = None):
        """Evaluate every case (dicts with MetaTensor ``image``/``label`` and ``case_id``); returns the costs.

        The sanity checks run on the first case that has work to do (``first_checks``); when nothing is left
        to do they do not run (``checked`` stays False).
        """
        start = time.perf_counter()
        if total is None:
            cases = cases if hasattr(cases, "__len__") else list(cases)
            total = len(cases)
        n = total
        self.progress = Progress(n * (1 + len(self.plan()) * len(self.suite)), bar=self.show_progress)
        try:
            for case in cases:
                self.run_case(case, with_checks=first_checks and not self.checked)
        finally:
            self.progress.close()
        self.stats.seconds += time.perf_counter() - start
        self.stats.generations = self.store.generated
        self.stats.reused_volumes = self.store.reused
        return self.stats

    def run_case(self, case: Mapping[str, Any], with_checks: bool = False) -> None:
        case_id = str(case["case_id"])
        image, label, affine, spacing, region = real_case(case)  # (1, C, d, h, w), (1, 1, d, h, w): real voxels
        for model in self.models.values():  # adapters with a per-volume z-score frozen at the clean statistics
            observe_volume(model.net, image)
        case_hash = identity.case_fingerprint(image, label, spacing)
        ids = {k: identity.short_hash(self.record_identity(k, case_hash)) for k in self.keys(case_id)}
        self.expected.update(ids)
        todo = [k for k, sid in ids.items() if not self._have(k, sid)]
        self.stats.records_skipped += len(ids) - len(todo)
        if not todo:
            self.progress.skip(1 + len(self.plan()) * len(self.suite))
            return
        if with_checks:
            self.run_checks(image, label)
        info = {"spacing": spacing, "shape": list(image.shape[2:]), "region_start": list(region.start)}
        clean_pred = {}
        for t in self.targets:
            key = ("", t.label, CLEAN, "0", case_id)
            cost: dict[str, Any] = {}
            logits = self._counted(self.stats.score_passes, lambda t=t: self.predict(t, image), cost)
            clean_pred[t.label] = logits.argmax(1)[0]  # (d, h, w)
            if key in todo:
                metrics = score_prediction(
                    clean_pred[t.label], label[0, 0], t.num_classes, spacing, self.nsd_tolerance_mm
                )
                fields = {"kind": CLEAN, "eps": 0.0, "budget_value": 0.0, "attack_config": None, "group": None}
                self._write(
                    key, ids[key], {**fields, **metrics, **info, "window": self.window.identity(t), "cost": cost}
                )
        self.progress.update(f"{case_id} clean")
        for source, targets in self.plan():
            for spec in self.suite:
                self._run_attack(
                    case_id,
                    source,
                    targets,
                    spec,
                    todo,
                    ids,
                    image,
                    label,
                    affine,
                    spacing,
                    info,
                    case_hash,
                    clean_pred,
                )
                self.progress.update(f"{case_id} {source.label} {spec.label}@{spec.budget}")

    def _run_attack(
        self, case_id, source, targets, spec, todo, ids, image, label, affine, spacing, info, case_hash, clean_pred
    ):
        """Craft (or load) one adversarial volume and score it by every target of ``source`` that needs it."""
        wanted = [t for t in targets if (source.label, t.label, spec.label, spec.budget, case_id) in todo]
        if not wanted:
            return
        seed = case_seed(self.seed, source.label, spec.label, spec.budget, case_id)
        fields = {
            "kind": None,
            "eps": spec.eps,
            "budget_value": budget_value(spec),
            "attack_config": spec.config,
            "group": getattr(spec, "group", None),
            "mode": self.mode,
            "memory_bounded": self.memory_bounded,
            "run_seed": self.seed,
            "seed": seed,
            "window": self.window.identity(source),
            **info,
        }
        if self.skip is not None:
            so_far = [r for k, r in self._case_records(case_id, ids).items()]
            if self.skip(case_id, spec, so_far):
                for t in wanted:
                    key = (source.label, t.label, spec.label, spec.budget, case_id)
                    kind = "whitebox" if source.label == t.label else "transfer"
                    self._write(key, ids[key], {**fields, "kind": kind, "skipped": "cascade", "cost": {}})
                return
        volume_id = self.volume_identity(source, spec, case_hash)
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
            "identity": volume_id,
            "identity_sha256": identity.short_hash(volume_id),
        }
        store_key = (source.label, spec.label, spec.budget, case_id)
        generated_before, reused_before = self.store.generated, self.store.reused
        attack_cost: dict[str, Any] = {}
        adversarial = self._counted(
            self.stats.attack_passes,
            lambda: self.store.get_or_create(
                store_key, provenance, affine, lambda: self.craft(source, spec, image, label, seed)[0]
            ),
            attack_cost,
        )[None]  # (1, C, d, h, w)
        attack_cost["generated"] = self.store.generated - generated_before
        attack_cost["reused_volume"] = self.store.reused - reused_before
        ok, reason = checks.audit_volume(image[0], adversarial[0], spec.norm_bound, spec.norm)
        perturbation = perturbation_metrics(image[0], adversarial[0])
        for t in wanted:
            key = (source.label, t.label, spec.label, spec.budget, case_id)
            cost = dict(attack_cost)  # the volume's cost goes with the first record that needed it
            attack_cost = {}
            metrics = self._score_adversarial(
                source, t, spec, case_id, image, adversarial, label, spacing, clean_pred, cost, ids[key]
            )
            record = {**fields, **metrics, **perturbation, "budget_ok": ok, "budget_detail": reason, "cost": cost}
            record["target_window"] = self.window.identity(t)
            self._write(key, ids[key], record)

    def _case_records(self, case_id: str, ids: Mapping[tuple[str, ...], str]) -> dict[tuple[str, ...], dict]:
        """This run's records of one case written so far (for the cascade predicate)."""
        out = {}
        for key, sid in ids.items():
            record = self.log.by_identity.get((key, sid))
            if record is not None:
                out[key] = record
        return out

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
        cost: dict[str, Any],
        settings_id: str = "",
    ) -> dict[str, Any]:
        """Metrics of ``target`` on one adversarial (1, C, D, H, W) volume, incl. flip rate and DCT bands.

        The montage callback ``montage(source, target, spec, case_id, *volumes, settings_id=...)`` may return the
        path of the figure it wrote; the record keeps it as ``montage``.
        """
        logits = self._counted(self.stats.score_passes, lambda: self.predict(target, adversarial), cost)
        pred = logits.argmax(1)[0]  # (D, H, W)
        metrics = score_prediction(pred, label[0, 0], target.num_classes, spacing, self.nsd_tolerance_mm)
        metrics["flip_rate"] = flip_rate(clean_pred[target.label], pred)
        metrics["kind"] = "whitebox" if source.label == target.label else "transfer"
        if self.bands:
            metrics["freq_dice"] = {}
            for name, x in band_filtered_inputs(image[0], adversarial[0], self.bands).items():
                logits = self._counted(self.stats.score_passes, lambda x=x: self.predict(target, x[None]), cost)
                metrics["freq_dice"][name] = dice_mean(logits.argmax(1)[0], label[0, 0], target.num_classes)
        if self.montage is not None:
            volumes = (image[0], adversarial[0], label[0], clean_pred[target.label], pred)
            path = self.montage(source, target, spec, case_id, *volumes, settings_id=settings_id)
            if path is not None:
                metrics["montage"] = str(path)
        return metrics

    def _write(self, key: tuple[str, ...], settings_id: str, fields: Mapping[str, Any]) -> None:
        source, target, attack, budget, case_id = key
        record = {"source": source, "target": target, "attack": attack, "budget": budget, "case_id": case_id}
        self.log.append({**fields, **record, "settings_id": settings_id})
        self.stats.records_written += 1
