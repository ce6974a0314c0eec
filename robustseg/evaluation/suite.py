"""The attack suite of an evaluation: presets from ``conf/attack/`` and named suites from ``conf/suite/``, crossed
with the budget sweep.

Each entry is one (attack, budget) pair. The sweep sets the attack's budget field: ``eps`` for norm-bounded
attacks (FGSM, PGD, APGD, ...), ``sigma`` for Gaussian noise (Malik et al. use the same 4/255, 8/255 for both) and
``q_max`` for VAFA (Hanif et al., MICCAI 2023: 10, 20, 30) when ``q_max`` values are given; an attack with none
of these runs once at its preset. Presets are composed with OmegaConf so ``step_size: ${.eps}`` (FGSM) follows
the swept value.

A suite (``suite=reliable``, ``--suite reliable``: the config group ``conf/suite/``) adds fixed, documented
members, each a preset with field values, labelled and tagged with a ``group`` (the report takes the worst case
per group):

.. code-block:: yaml

    group: reliable
    common: {steps: 100, track_best: true}        # fields set on every member
    members:
      apgd_mce: {preset: apgd, loss: masked_ce}   # label: preset + its own field values
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

import robustseg.attacks  # noqa: F401  (import = registration of every attack)
from robustseg.attacks.base import LARGE_BUDGET_ESCAPE
from robustseg.errors import ConfigError
from robustseg.registry import ATTACKS

EPS_FIELDS = ("eps", "sigma")  # budget fields swept by ``eps``
NORM_BOUNDED = "eps"  # only this field is a hard norm bound to audit (sigma is a noise scale)


@dataclass(frozen=True)
class AttackSpec:
    """One attack of the suite at one budget.

    ``group`` names the suite a member came from (``reliable``, ``papers``; None for ``attacks=`` presets): records
    carry it and the report takes the worst case per group. ``cascade``: the evaluator may skip this member on a
    case where an earlier member of the same group already reached foreground Dice 0
    (:func:`robustseg.evaluation.ensemble.cascade_skip`).
    """

    label: str  # preset or member name, e.g. "fgsm", "apgd_js"
    budget: str  # "4/255", "q_max=20" or "preset"
    eps: float | None  # the swept eps/sigma in [0, 1] units, None for q_max or preset budgets
    config: dict[str, Any]  # the resolved preset with the budget set: ATTACKS.build(config)
    norm_bound: float | None  # audited norm bound (eps of eps-attacks), else None
    norm: str | None  # "linf" or "l2" for norm-bounded attacks
    group: str | None = None
    cascade: bool = False

    def build(self) -> Any:
        return ATTACKS.build(self.config)

    def with_budget(self, value: float, **overrides: Any) -> AttackSpec:
        """The same attack at another eps/sigma (used by the eps=0 check), plus field overrides."""
        config = dict(self.config)
        for name in EPS_FIELDS:
            if name in config:
                config[name] = value
        config.update({k: v for k, v in overrides.items() if k in config})
        bound = value if NORM_BOUNDED in config else None
        return dataclasses.replace(self, budget=str(value), eps=value, config=config, norm_bound=bound)


@dataclass(frozen=True)
class Member:
    """One attack to sweep: a label, its preset file and field values over the preset's."""

    label: str
    preset: str
    values: dict[str, Any]
    group: str | None = None


def parse_eps(value: Any) -> tuple[str, float]:
    """``"4/255"`` -> ("4/255", 0.0157); ``0.01`` -> ("0.01", 0.01)."""
    text = str(value).replace(" ", "")
    try:
        number = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"eps: expected numbers or fractions like '4/255', got {value!r}") from None
    if number < 0:
        raise ConfigError(f"eps: budgets must be >= 0, got {value!r}")
    return text, number


def as_list(value: Any) -> list[Any]:
    """A config list, a comma string (``"fgsm,pgd"``) or a scalar -> list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        out: list[Any] = []
        for item in value:
            out += as_list(item) if isinstance(item, str) else [item]
        return out
    return [value]


def load_preset(name: str, conf_dir: Path, overrides: Mapping[str, Any] | None = None, where: str = "") -> Any:
    """``conf/attack/<name>.yaml`` merged with ``overrides`` (unknown keys are errors), unresolved."""
    path = conf_dir / "attack" / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"{where or 'attacks'}: no preset {name!r} (conf/attack/{name}.yaml); options: {options}")
    preset = OmegaConf.load(path)
    for key, value in (overrides or {}).items():
        if key not in preset:
            raise ConfigError(f"{where or f'attack_overrides.{name}'}.{key}: not a field of conf/attack/{name}.yaml")
        preset[key] = value
    return preset


def load_suite(suite: str | Mapping[str, Any], conf_dir: Path) -> list[Member]:
    """The members of a suite, checked against their presets (see the module docstring).

    Args:
        suite: a name (``conf/suite/<name>.yaml``) or the file's content already loaded (``cfg.suite``).

    A member may name its own ``group`` (a suite comparing two groups); otherwise it takes the suite's.
    """
    if isinstance(suite, str):
        path = conf_dir / "suite" / f"{suite}.yaml"
        if not path.is_file():
            options = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise ConfigError(f"suite: no suite {suite!r} (conf/suite/{suite}.yaml); options: {options}")
        cfg, name = OmegaConf.to_container(OmegaConf.load(path), resolve=True), suite
    else:
        cfg, name = dict(suite), str(suite.get("group") or "suite")
    where = f"conf/suite/{name}.yaml"
    unknown = set(cfg) - {"group", "description", "common", "members"}
    if unknown or not cfg.get("members"):
        raise ConfigError(f"{where}: expected keys group, description, common, members (non-empty), got {sorted(cfg)}")
    common, members = dict(cfg.get("common") or {}), []
    for label, spec in cfg["members"].items():
        spec = dict(spec or {})
        if "preset" not in spec:
            raise ConfigError(f"{where}: members.{label} needs a 'preset' (a conf/attack file)")
        preset, group = spec.pop("preset"), spec.pop("group", None) or cfg.get("group") or name
        load_preset(preset, conf_dir, {**common, **spec}, f"{where} members.{label}")  # fields must exist
        members.append(Member(str(label), str(preset), {**common, **spec}, str(group)))
    return members


def _check_overrides(overrides: Mapping[str, Any], members: Sequence[Member]) -> None:
    labels = sorted({m.label for m in members} | {m.preset for m in members})
    for key in overrides:
        if key not in labels:
            raise ConfigError(
                f"attack_overrides.{key}: {key!r} is not in the suite; the suite's presets and members: {labels}"
            )


def _check_budget(label: str, field: str, text: str, number: float, norm: str, allow_large_eps: bool) -> None:
    """``--eps 2`` almost always means 2/255: an L-inf eps or a noise sigma >= 1 needs ``allow_large_eps``."""
    if (field == "sigma" or norm == "linf") and number >= 1 and not allow_large_eps:
        raise ConfigError(
            f"eps={text} for {label}: an L-inf budget >= 1 spans the whole [0, 1] intensity range (any volume is "
            f"reachable); write a fraction such as {text}/255, or set allow_large_eps=true to run it anyway"
        )


def build_suite(
    names: Sequence[str],
    eps: Sequence[Any],
    q_max: Sequence[Any] | None,
    conf_dir: Path,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    suites: Sequence[str | Mapping[str, Any]] = (),
    cascade: bool = False,
    allow_large_eps: bool = False,
) -> list[AttackSpec]:
    """Every (attack, budget) of the evaluation: the presets ``names``, then the members of each named suite.

    Args:
        names: ``conf/attack`` presets (``attacks=``), labelled by their name, group None.
        eps, q_max: the budget sweeps.
        overrides: field values per preset name or suite member label (``attack_overrides``); a key that is
            neither is an error naming the suite's presets. A preset name applies to every member built from it.
        suites: ``conf/suite`` names, or their loaded content (``cfg.suite`` of ``suite=reliable``).
        cascade: mark suite members as skippable once a case is at foreground Dice 0 (see :class:`AttackSpec`).
        allow_large_eps: accept L-inf budgets and noise sigmas >= 1 (refused by default: ``--eps 2`` almost always
            means 2/255); sets ``allow_large_budget`` on attacks that have it (attacks without it still refuse).

    Each config is checked by building it once. A label given twice (``attacks=[pgd]`` and ``suite=papers``) is
    kept once if both define the same attack, an error otherwise.
    """
    members = [Member(str(n), str(n), {}) for n in names]
    for suite in suites:
        members += load_suite(suite, conf_dir)
    if not members:
        raise ConfigError("attacks: the suite is empty; name presets such as attacks=[fgsm,pgd,vafa] or suite=reliable")
    overrides = overrides or {}
    _check_overrides(overrides, members)
    budgets = [parse_eps(e) for e in eps]
    specs: dict[tuple[str, str], AttackSpec] = {}
    for member in members:
        values = {**member.values, **(overrides.get(member.preset) or {}), **(overrides.get(member.label) or {})}
        where = f"attack_overrides.{member.label}" if member.group is None else f"suite member {member.label}"
        preset = load_preset(member.preset, conf_dir, values, where)
        field = next((f for f in EPS_FIELDS if f in preset), None)
        if field is not None:
            if not budgets:
                raise ConfigError(f"attacks: {member.label} has a budget field {field!r} but eps is empty")
            sweep = [(text, number, {field: number}) for text, number in budgets]
        elif "q_max" in preset and q_max:
            sweep = [(f"q_max={q}", None, {"q_max": q}) for q in q_max]
        else:
            label = f"q_max={preset.q_max}" if "q_max" in preset else "preset"
            sweep = [(label, None, {})]
        norm = str(preset.get("norm") or ("l2" if "l2" in str(preset.name) else "linf"))
        for text, number, budget in sweep:
            if number is not None and field is not None:
                _check_budget(member.label, field, text, number, norm, allow_large_eps)
                if allow_large_eps and number >= 1 and LARGE_BUDGET_ESCAPE in preset:
                    budget = {**budget, LARGE_BUDGET_ESCAPE: True}  # the attack's own guard (attacks.base)
            config = OmegaConf.to_container(OmegaConf.merge(preset, budget), resolve=True)
            try:
                attack = ATTACKS.build(config)
            except (KeyError, TypeError, ValueError) as err:
                raise ConfigError(f"attack {member.label!r} at {text}: {err}") from None
            bound = number if field == NORM_BOUNDED else None
            norm = getattr(attack, "norm", None) or norm
            spec = AttackSpec(
                member.label,
                text,
                number,
                config,
                bound,
                norm if bound is not None else None,
                member.group,
                cascade and member.group is not None,
            )
            key = (spec.label, spec.budget)
            if key in specs and specs[key].config != spec.config:
                raise ConfigError(f"attack {spec.label!r} is given twice with different settings (attacks= and suite=)")
            if key not in specs or spec.group is not None:
                specs[key] = spec
    return list(specs.values())
