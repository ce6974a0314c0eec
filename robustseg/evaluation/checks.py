"""Sanity flags of an evaluation, in the spirit of AutoAttack's checks (Croce and Hein, ICML 2020) and ART.

Every flag is computed on every run and ends up in the summary JSON, the report and W&B; a raised flag means
"do not trust these numbers before looking", never a crash. The flags:

* ``eps_zero``: an attack at budget 0 returns the clean volume and the clean prediction exactly.
* ``monotonic``: mean Dice does not rise with the budget (per source, target, attack).
* ``gradients``: fraction of zero and of NaN input gradients of the loss on a clean case (masking or underflow).
* ``transfer_vs_whitebox``: a transfer or noise attack beating the white-box attack on the same target at the
  same budget (a sign of gradient masking).
* ``budget``: every adversarial volume lies in [0, 1], is finite and within its norm budget (AutoAttack's
  final audit); ``store``: every stored volume is readable and intact.
* ``determinism``: two clean forward passes of a model in eval mode are identical.
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


@dataclass(frozen=True)
class Flag:
    """One sanity check's outcome; ``raised`` means the check failed."""

    name: str
    raised: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_eps_zero(label: str, clean: Tensor, adversarial: Tensor, pred_clean: Tensor, pred_adv: Tensor) -> Flag:
    """An attack at budget 0 must reproduce the clean input and prediction bit for bit."""
    same_input = torch.equal(clean, adversarial)
    same_pred = torch.equal(pred_clean, pred_adv)
    detail = f"{label}: input identical={same_input}, prediction identical={same_pred}"
    return Flag("eps_zero", not (same_input and same_pred), detail)


def check_monotonic(rows: Iterable[Mapping[str, Any]], tolerance: float = 1e-3) -> list[Flag]:
    """Per (source, target, attack): mean Dice over increasing ``eps`` must not rise by more than ``tolerance``.

    Args:
        rows: summary rows with ``source``, ``target``, ``attack``, ``eps`` (None for unbounded attacks) and
            ``dice_mean``; rows without ``eps`` are ignored; a target's ``clean`` row is every curve's budget-0 point.
    """
    rows = list(rows)
    clean = {r["target"]: float(r["dice_mean"]) for r in rows if r["attack"] == "clean"}
    curves: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r["attack"] != "clean" and r.get("eps") is not None and r.get("dice_mean") is not None:
            curves[(r["source"], r["target"], r["attack"])].append((float(r["eps"]), float(r["dice_mean"])))
    for (_, target, _), points in curves.items():
        if target in clean and all(eps > 0 for eps, _ in points):
            points.append((0.0, clean[target]))  # the clean score is the curve's value at budget 0
    flags = []
    for (source, target, attack), points in sorted(curves.items()):
        points.sort()
        rises = [(a, b) for a, b in zip(points, points[1:]) if b[1] > a[1] + tolerance]
        detail = f"{attack} {source}->{target}: " + (
            ", ".join(f"Dice {a[1]:.4f}@{a[0]:.4g} -> {b[1]:.4f}@{b[0]:.4g}" for a, b in rises) or "non-increasing"
        )
        flags.append(Flag("monotonic", bool(rises), detail))
    return flags


def input_gradient_fractions(loss_fn: Callable[[Tensor], Tensor], image: Tensor) -> tuple[float, float]:
    """(zero fraction, NaN fraction) of d loss / d image for a (1, C, D, H, W) image."""
    x = image.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss_fn(x), x)
    return float((grad == 0).float().mean()), float(torch.isnan(grad).float().mean())


def check_gradients(label: str, zero_fraction: float, nan_fraction: float, max_zero_fraction: float = 0.5) -> Flag:
    """Raise when any input gradient is NaN or more than ``max_zero_fraction`` of them are exactly zero."""
    raised = nan_fraction > 0 or zero_fraction > max_zero_fraction
    detail = f"{label}: zero {zero_fraction:.4f}, NaN {nan_fraction:.4f} (limit zero {max_zero_fraction})"
    return Flag("gradients", raised, detail)


def check_transfer_vs_whitebox(
    rows: Iterable[Mapping[str, Any]], noise_attacks: Sequence[str] = ("gn",), tolerance: float = 1e-3
) -> list[Flag]:
    """A transfer (source != target) or noise attack must not beat the white-box attack on the same target.

    Compares, per target and budget, the lowest white-box mean Dice of a gradient attack with every transfer
    row of the same attack and budget and every noise row of the same budget.
    """
    rows = [r for r in rows if r["attack"] not in ("clean",) and not str(r["attack"]).startswith("worst")]
    white = defaultdict(dict)  # (target, budget) -> {attack: dice}
    for r in rows:
        if r["source"] == r["target"] and r["attack"] not in noise_attacks:
            white[(r["target"], r["budget"])][r["attack"]] = float(r["dice_mean"])
    flags = []
    for r in rows:
        reference = white.get((r["target"], r["budget"]))
        if not reference:
            continue
        if r["attack"] in noise_attacks:
            best_white = min(reference.values())
            kind = "noise"
        elif r["source"] != r["target"] and r["attack"] in reference:
            best_white = reference[r["attack"]]
            kind = "transfer"
        else:
            continue
        raised = float(r["dice_mean"]) < best_white - tolerance
        detail = (
            f"{kind} {r['attack']}@{r['budget']} {r['source'] or 'noise'}->{r['target']}: Dice "
            f"{float(r['dice_mean']):.4f} vs white-box {best_white:.4f}"
        )
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
    audited = [r for r in records if "budget_ok" in r]
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


def summarise_flags(flags: Sequence[Flag]) -> dict[str, Any]:
    """``{name: raised_any}`` plus the total; what W&B and the report headline show."""
    out: dict[str, Any] = {}
    for f in flags:
        out[f.name] = out.get(f.name, False) or f.raised
    out["any_raised"] = any(out.values())
    return out
