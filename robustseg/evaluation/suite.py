"""The attack suite of an evaluation: presets from ``conf/attack/`` crossed with the budget sweep.

Each entry is one (attack preset, budget) pair. The sweep sets the attack's budget field: ``eps`` for norm-bounded
attacks (FGSM, PGD, ...), ``sigma`` for Gaussian noise (Malik et al. use the same 4/255, 8/255 for both) and
``q_max`` for VAFA (Hanif et al., MICCAI 2023: 10, 20, 30) when ``q_max`` values are given; an attack with none
of these runs once at its preset. Presets are composed with OmegaConf so ``step_size: ${.eps}`` (FGSM) follows
the swept value.
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
from robustseg.errors import ConfigError
from robustseg.registry import ATTACKS

EPS_FIELDS = ("eps", "sigma")  # budget fields swept by ``eps``
NORM_BOUNDED = "eps"  # only this field is a hard norm bound to audit (sigma is a noise scale)


@dataclass(frozen=True)
class AttackSpec:
    """One attack of the suite at one budget."""

    label: str  # preset name, e.g. "fgsm"
    budget: str  # "4/255", "q_max=20" or "preset"
    eps: float | None  # the swept eps/sigma in [0, 1] units, None for q_max or preset budgets
    config: dict[str, Any]  # the resolved preset with the budget set: ATTACKS.build(config)
    norm_bound: float | None  # audited norm bound (eps of eps-attacks), else None
    norm: str | None  # "linf" or "l2" for norm-bounded attacks

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


def load_preset(name: str, conf_dir: Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``conf/attack/<name>.yaml`` merged with ``overrides`` (unknown keys are errors), unresolved."""
    path = conf_dir / "attack" / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"attacks: no preset {name!r} (conf/attack/{name}.yaml); options: {options}")
    preset = OmegaConf.load(path)
    for key, value in (overrides or {}).items():
        if key not in preset:
            raise ConfigError(f"attack_overrides.{name}.{key}: not a field of conf/attack/{name}.yaml")
        preset[key] = value
    return preset


def build_suite(
    names: Sequence[str],
    eps: Sequence[Any],
    q_max: Sequence[Any] | None,
    conf_dir: Path,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[AttackSpec]:
    """Every (preset, budget) of the evaluation, in the order given; each config is checked by building it once."""
    if not names:
        raise ConfigError("attacks: the suite is empty; name presets such as attacks=[fgsm,pgd,vafa]")
    budgets = [parse_eps(e) for e in eps]
    specs: list[AttackSpec] = []
    for name in names:
        preset = load_preset(name, conf_dir, (overrides or {}).get(name))
        field = next((f for f in EPS_FIELDS if f in preset), None)
        if field is not None:
            if not budgets:
                raise ConfigError(f"attacks: {name} has a budget field {field!r} but eps is empty")
            sweep = [(text, number, {field: number}) for text, number in budgets]
        elif "q_max" in preset and q_max:
            sweep = [(f"q_max={q}", None, {"q_max": q}) for q in q_max]
        else:
            label = f"q_max={preset.q_max}" if "q_max" in preset else "preset"
            sweep = [(label, None, {})]
        for text, number, values in sweep:
            node = OmegaConf.merge(preset, values)
            config = OmegaConf.to_container(node, resolve=True)
            try:
                attack = ATTACKS.build(config)
            except (KeyError, TypeError, ValueError) as err:
                raise ConfigError(f"attack preset {name!r} at {text}: {err}") from None
            bound = number if field == NORM_BOUNDED else None
            norm = getattr(attack, "norm", None) or ("l2" if "l2" in config["name"] else "linf")
            specs.append(AttackSpec(name, text, number, config, bound, norm if bound is not None else None))
    return specs
