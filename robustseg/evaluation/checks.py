"""Sanity flags of an evaluation, in the spirit of AutoAttack's checks (Croce and Hein, ICML 2020) and ART.

Every flag is computed on every run and ends up in the summary JSON, the report and W&B; a raised flag means
"do not trust these numbers before looking", never a crash. The flags:

* ``eps_zero``: an attack at budget 0 returns the clean volume and the clean prediction exactly.
* ``monotonic``: mean Dice does not rise with the budget (per source, target, attack), on the budget's own axis:
  eps (or sigma) for norm-bounded and noise attacks, ``q_max`` for VAFA; the clean score is every curve's
  budget-0 point.
* ``gradients``: fraction of zero and of NaN input gradients of the loss on a clean case (masking or underflow).
* ``transfer_vs_whitebox``: a transfer or noise attack beating the *strongest* white-box gradient attack on the
  same target at the same budget (a sign of gradient masking).
* ``budget``: every adversarial volume lies in [0, 1], is finite and within its norm budget (AutoAttack's
  final audit); ``store``: every stored volume is readable and intact.
* ``determinism``: two clean forward passes of a model in eval mode are identical.
* ``nsd_tolerance``: NSD's tolerance is no smaller than the largest voxel spacing of every case.

A check that could not run is a flag with ``checked=False`` whose detail says "not checked" and why (e.g. a
transfer run without ``also_whitebox`` has no white-box result to compare with); it never silently disappears.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

from robustseg.evaluation.store import array_sha256
from robustseg.evaluation.summary import budget_value


@dataclass(frozen=True)
class Flag:
    """One sanity check's outcome; ``raised`` means the check failed."""

    name: str
    raised: bool
    detail: str
    checked: bool = True

    @property
    def status(self) -> str:
        """``RAISED``, ``ok`` or ``not checked``."""
        return "RAISED" if self.raised else "ok" if self.checked else "not checked"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def not_checked(name: str, why: str) -> Flag:
    """A check that could not run: never raised, shown as "not checked" with the reason."""
    return Flag(name, False, f"not checked: {why}", checked=False)


def check_eps_zero(label: str, clean: Tensor, adversarial: Tensor, pred_clean: Tensor, pred_adv: Tensor) -> Flag:
    """An attack at budget 0 must reproduce the clean input and prediction bit for bit."""
    same_input = torch.equal(clean, adversarial)
    same_pred = torch.equal(pred_clean, pred_adv)
    detail = f"{label}: input identical={same_input}, prediction identical={same_pred}"
    return Flag("eps_zero", not (same_input and same_pred), detail)


def budget_axis(row: Mapping[str, Any]) -> str:
    """The axis a row's budget lives on: ``q_max`` (VAFA) or ``eps`` (eps and sigma, in [0, 1] units)."""
    return "q_max" if str(row.get("budget", "")).startswith("q_max=") else "eps"


def check_monotonic(rows: Iterable[Mapping[str, Any]], tolerance: float = 1e-3) -> list[Flag]:
    """Per (source, target, attack, axis): mean Dice over increasing budget must not rise by more than ``tolerance``.

    Args:
        rows: summary rows with ``source``, ``target``, ``attack``, ``budget`` (``q_max=`` for VAFA), ``eps`` or
            ``budget_value`` and ``dice_mean``; rows without a numeric budget (``all``, a preset) are ignored; a
            target's ``clean`` row is every curve's budget-0 point.
    """
    rows = list(rows)
    clean = {r["target"]: float(r["dice_mean"]) for r in rows if r["attack"] == "clean"}
    curves: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        value = budget_value(r)
        if r["attack"] != "clean" and value is not None and r.get("dice_mean") is not None:
            curves[(r["source"], r["target"], r["attack"], budget_axis(r))].append((value, float(r["dice_mean"])))
    for (_, target, _, _), points in curves.items():
        if target in clean and all(v > 0 for v, _ in points):
            points.append((0.0, clean[target]))  # the clean score is the curve's value at budget 0
    if not curves:
        return [not_checked("monotonic", "no attack with a numeric budget (eps, sigma or q_max) in the results")]
    flags = []
    for (source, target, attack, axis), points in sorted(curves.items()):
        points.sort()
        if len(points) < 2:
            flags.append(not_checked("monotonic", f"{attack} {source}->{target}: one {axis} point, no clean score"))
            continue
        rises = [(a, b) for a, b in zip(points, points[1:]) if b[1] > a[1] + tolerance]
        detail = f"{attack} {source}->{target} over {axis}: " + (
            ", ".join(f"Dice {a[1]:.4f}@{a[0]:.4g} -> {b[1]:.4f}@{b[0]:.4g}" for a, b in rises) or "non-increasing"
        )
        flags.append(Flag("monotonic", bool(rises), detail))
    return flags


def input_gradient_fractions(loss_fn: Callable[[Tensor], Tensor], image: Tensor) -> tuple[float, float]:
    """(zero fraction, NaN fraction) of d loss / d image for a (1, C, D, H, W) image.

    A model that cuts the graph (``detach``, a non-differentiable wrapper) has no gradient at all: every
    gradient counts as zero, which is exactly the masking the flag reports, never a crash.
    """
    x = image.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x)
        if not loss.requires_grad:
            return 1.0, 0.0
        (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    if grad is None:
        return 1.0, 0.0
    return float((grad == 0).float().mean()), float(torch.isnan(grad).float().mean())


def check_gradients(label: str, zero_fraction: float, nan_fraction: float, max_zero_fraction: float = 0.5) -> Flag:
    """Raise when any input gradient is NaN or more than ``max_zero_fraction`` of them are exactly zero."""
    raised = nan_fraction > 0 or zero_fraction > max_zero_fraction
    detail = f"{label}: zero {zero_fraction:.4f}, NaN {nan_fraction:.4f} (limit zero {max_zero_fraction})"
    return Flag("gradients", raised, detail)


def _budget_match(row: Mapping[str, Any]) -> tuple:
    value = budget_value(row)
    return (budget_axis(row), round(value, 9) if value is not None else str(row.get("budget")))


def check_transfer_vs_whitebox(
    rows: Iterable[Mapping[str, Any]], noise_attacks: Sequence[str] = ("gn",), tolerance: float = 1e-3
) -> list[Flag]:
    """A transfer (source != target) or noise attack must not beat the strongest white-box attack.

    The reference of a row is the lowest mean Dice of any white-box gradient attack (source == target, not a
    noise preset, not a worst-case row) on the same target at the same budget value; a row without one is
    "not checked" (a transfer run needs ``also_whitebox=true`` for it).
    """
    rows = [r for r in rows if r["attack"] != "clean" and not str(r["attack"]).startswith("worst")]
    white: dict[tuple, tuple[float, str]] = {}  # (target, budget) -> (lowest Dice, attack)
    for r in rows:
        if r["source"] == r["target"] and r["attack"] not in noise_attacks and r.get("dice_mean") is not None:
            key = (r["target"], _budget_match(r))
            if key not in white or float(r["dice_mean"]) < white[key][0]:
                white[key] = (float(r["dice_mean"]), str(r["attack"]))
    compared = [
        r
        for r in rows
        if (r["attack"] in noise_attacks or r["source"] != r["target"]) and r.get("dice_mean") is not None
    ]
    if not compared:
        return [not_checked("transfer_vs_whitebox", "no transfer or noise attack in the results")]
    flags = []
    for r in compared:
        kind = "noise" if r["attack"] in noise_attacks else "transfer"
        what = f"{kind} {r['attack']}@{r['budget']} {r['source'] or 'noise'}->{r['target']}"
        reference = white.get((r["target"], _budget_match(r)))
        if reference is None:
            why = f"{what}: no white-box gradient attack on {r['target']} at {r['budget']}"
            why += " (add also_whitebox=true)" if kind == "transfer" else ""
            flags.append(not_checked("transfer_vs_whitebox", why))
            continue
        best, attack = reference
        raised = float(r["dice_mean"]) < best - tolerance
        detail = f"{what}: Dice {float(r['dice_mean']):.4f} vs strongest white-box ({attack}) {best:.4f}"
        flags.append(Flag("transfer_vs_whitebox", raised, detail))
    return flags


def audit_volume(clean: Tensor, adversarial: Tensor, eps: float | None, norm: str | None) -> tuple[bool, str]:
    """Check one adversarial volume: finite, in [0, 1], and within ``eps`` in its norm (L-inf unless ``l2``).

    Returns:
        (ok, reason); ``reason`` is empty when ok.
    """
    if not torch.isfinite(adversarial).all():
        return False, "non-finite voxels"
    lo, hi = float(adversarial.min()), float(adversarial.max())
    if lo < 0 or hi > 1:
        return False, f"range [{lo:.4g}, {hi:.4g}] outside [0, 1]"
    if eps is None:
        return True, ""
    delta = (adversarial.double() - clean.double()).flatten()
    if str(norm or "linf").lower() in ("l2", "2"):
        measured, slack = float(delta.norm()), 1e-4 * max(1.0, eps)
    else:
        measured, slack = float(delta.abs().max()), 1e-6
    ok = measured <= eps + slack
    return ok, "" if ok else f"{norm or 'linf'} {measured:.6g} > eps {eps:.6g}"


def check_budget(records: Iterable[Mapping[str, Any]]) -> Flag:
    """Aggregate the per-record budget audits: raised if any adversarial volume failed."""
    audited = [r for r in records if r.get("budget_ok") is not None]
    if not audited:
        return not_checked("budget", "no adversarial volume was audited")
    bad = [r for r in audited if not r["budget_ok"]]
    examples = "; ".join(
        f"{r['source']}/{r['attack']}@{r['budget']}/{r['case_id']}: {r['budget_detail']}" for r in bad[:3]
    )
    return Flag("budget", bool(bad), f"{len(audited) - len(bad)}/{len(audited)} volumes within budget. {examples}")


def audit_store(root: str | Path) -> Flag:
    """Re-read every stored volume: readable, hash matches its provenance, finite and in [0, 1]."""
    problems, count = [], 0
    for meta in sorted(Path(root).rglob("*.json")):
        count += 1
        nii = meta.with_name(meta.name[: -len(".json")] + ".nii.gz")
        try:
            provenance = json.loads(meta.read_text())
            array = np.asarray(nib.load(str(nii)).dataobj, dtype=np.float32)
            if array_sha256(array) != provenance.get("data_sha256"):
                problems.append(f"{nii}: data hash mismatch")
            elif not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
                problems.append(f"{nii}: values outside [0, 1] or non-finite")
        except Exception as err:  # any unreadable file is a finding, not a crash
            problems.append(f"{nii}: {type(err).__name__}: {err}")
    detail = f"{count - len(problems)}/{count} stored volumes intact" + (f": {problems[:3]}" if problems else "")
    return Flag("store", bool(problems), detail)


def check_determinism(label: str, first: Tensor, second: Tensor) -> Flag:
    """Two eval-mode forward passes of the same input must agree exactly."""
    same = torch.equal(first, second)
    diff = 0.0 if same else float((first - second).abs().max())
    return Flag("determinism", not same, f"{label}: max |difference| {diff:.3g}")


def check_nsd_tolerance(records: Iterable[Mapping[str, Any]]) -> Flag:
    """Raised when a record's NSD tolerance is below the largest voxel spacing of its case."""
    scored = [r for r in records if r.get("nsd_tolerance_mm") is not None and r.get("spacing")]
    if not scored:
        return not_checked("nsd_tolerance", "no record states its NSD tolerance and voxel spacing")
    small = [r for r in scored if float(r["nsd_tolerance_mm"]) < max(float(s) for s in r["spacing"]) - 1e-9]
    tolerances = sorted({float(r["nsd_tolerance_mm"]) for r in scored})
    spacing = max(max(float(s) for s in r["spacing"]) for r in scored)
    detail = f"tolerance(s) {tolerances} mm, largest voxel spacing {spacing:g} mm"
    if small:
        detail += (
            f"; {len(small)} record(s) below their case's largest spacing: NSD counts only exact boundary matches "
            "(metrics.nsd_tolerance_mm=null uses the largest spacing)"
        )
    return Flag("nsd_tolerance", bool(small), detail)


EVALUATOR_FLAGS = {
    "determinism": "the first case's model checks did not run in this run (a resumed or reused result)",
    "gradients": "the first case's model checks did not run in this run (a resumed or reused result)",
    "eps_zero": "no eps-bounded attack in the suite, or the checks did not run in this run",
}


def result_flags(
    rows: Sequence[Mapping[str, Any]],
    records: Sequence[Mapping[str, Any]],
    run_flags: Sequence[Flag] = (),
    *,
    noise_attacks: Sequence[str] = ("gn",),
    monotonic_tolerance: float = 1e-3,
    store_root: str | Path | None = None,
) -> list[Flag]:
    """Every flag of a finished run: the Evaluator's own (``run_flags``) plus those computed from the results.

    An Evaluator flag that is absent (its check did not run) appears as "not checked"; so does every check
    that had nothing to compare.
    """
    flags = list(run_flags)
    present = {f.name for f in flags}
    flags += [not_checked(name, why) for name, why in EVALUATOR_FLAGS.items() if name not in present]
    flags += check_monotonic(rows, monotonic_tolerance)
    flags += check_transfer_vs_whitebox(rows, noise_attacks)
    flags.append(check_budget(records))
    flags.append(check_nsd_tolerance(records))
    if store_root is not None:
        flags.append(audit_store(store_root))
    return flags


def summarise_flags(flags: Sequence[Flag]) -> dict[str, Any]:
    """``{name: raised_any}`` plus the total; what W&B and the report headline show."""
    out: dict[str, Any] = {}
    for f in flags:
        out[f.name] = out.get(f.name, False) or f.raised
    out["any_raised"] = any(out.values())
    return out
