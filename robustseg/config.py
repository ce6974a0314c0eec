"""Compose a run config from ``conf/`` with OmegaConf alone (no Hydra).

Order, later wins: the group files picked by ``defaults`` (``conf/<group>/<option>.yaml``, placed under the
key ``<group>``) < the top-level file < an ``experiment=<name>`` file (whose own ``defaults`` may re-pick
groups) < command-line ``key.path=value`` overrides. ``group=option`` on the command line picks another file
for that group (``attack=none`` leaves the group out: ``cfg.attack`` is then ``None``). ``+key=value`` adds a
key that the files do not have. Struct mode is on before the command-line values are merged, so a typo in a
key or option raises :class:`~robustseg.errors.ConfigError` naming the closest valid one, before any work.

The shorthand flags users type (``--adv pgd``, ``--model unetr``, ``--source unetr --target swin``) are
expanded into the same overrides by the table :data:`FLAGS`.
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from robustseg.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXPERIMENT = "experiment"


def _adv(value: str) -> list[str]:
    """``--adv NAME``: train against the attack preset NAME; ``--adv vaft`` is VAFA with the VAFT objective."""
    if value == "vaft":  # VAFT (Hanif et al., MICCAI 2023) trains against VAFA with two extra loss terms
        return ["attack=vafa", "system.adv_mode=vaft"]
    if value in ("none", "clean"):
        return ["attack=none"]
    return [f"attack={value}"]


def _group(group: str) -> Callable[[str], list[str]]:
    return lambda value: [f"{group}={value}"]


def _value(key: str) -> Callable[[str], list[str]]:
    return lambda value: [f"{key}={value}"]


def _list(key: str) -> Callable[[str], list[str]]:
    return lambda value: [f"{key}=[{value}]"]


# flag -> (expansion into overrides, help line), per top-level config
FLAGS: dict[str, dict[str, tuple[Callable[[str], list[str]], str]]] = {
    "train": {
        "--adv": (_adv, "training attack: a conf/attack preset, or 'vaft' (VAFA + frequency consistency)"),
        "--model": (_group("model"), "model preset in conf/model"),
        "--data": (_group("data"), "dataset in conf/data"),
        "--experiment": (_group(EXPERIMENT), "experiment in conf/experiment"),
    },
    "evaluate": {
        "--source": (_value("source"), "surrogate that crafts the attacks (transfer); omit for white-box"),
        "--target": (_list("target"), "comma list of models to evaluate: name or prefix, run dir or .ckpt"),
        "--attacks": (_list("attacks"), "comma list of conf/attack presets, e.g. fgsm,pgd,vafa"),
        "--eps": (_list("eps"), "comma list of budgets in [0, 1] units, e.g. 4/255,8/255"),
        "--suite": (_group("suite"), "conf/suite run alongside --attacks: reliable | papers | compare"),
        "--data": (_group("data"), "dataset in conf/data"),
        "--experiment": (_group(EXPERIMENT), "experiment in conf/experiment"),
    },
}


def groups(conf_dir: Path = CONF_DIR) -> dict[str, list[str]]:
    """Every config group (a folder of ``conf/``) and its options (the YAML files in it)."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(conf_dir.iterdir())
        if d.is_dir() and not d.name.startswith((".", "_"))
    }


def help_text(name: str, conf_dir: Path = CONF_DIR) -> str:
    """The ``--help`` text of ``conf/<name>.yaml``: usage, shorthand flags, groups and their options."""
    root = OmegaConf.load(conf_dir / f"{name}.yaml")
    defaults = dict(root.get("defaults", {}))
    lines = [
        f"usage: python {name}.py [--flag VALUE ...] [group=option ...] [key.path=value ...] [+new.key=value ...]",
        "",
        "flags:",
    ]
    lines += [f"  {flag} VALUE  {text}" for flag, (_, text) in FLAGS.get(name, {}).items()]
    lines += ["", "groups (default marked *; 'none' leaves a group out):"]
    for group, options in groups(conf_dir).items():
        marked = [f"{o}*" if defaults.get(group) == o else o for o in options]
        lines.append(f"  {group}: {', '.join(marked)}")
    lines += ["", f"top-level keys of conf/{name}.yaml:"]
    lines += [f"  {key}" for key in root if key != "defaults"]
    return "\n".join(lines)


def expand_flags(name: str, argv: Sequence[str]) -> list[str]:
    """Turn ``--flag VALUE`` / ``--flag=VALUE`` into overrides; other arguments pass through unchanged."""
    table = FLAGS.get(name, {})
    out: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            out.append(arg)
            continue
        flag, eq, value = arg.partition("=")
        if flag not in table:
            guess = difflib.get_close_matches(flag, table, n=1)
            hint = f" Did you mean {guess[0]}?" if guess else ""
            raise ConfigError(f"unknown flag {flag!r}.{hint} Flags: {sorted(table)}; see --help")
        if not eq:
            if not args or args[0].startswith("--"):
                raise ConfigError(f"flag {flag} needs a value, e.g. {flag} NAME")
            value = args.pop(0)
        out += table[flag][0](value)
    return out


def load_config(name: str, argv: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> DictConfig:
    """Return the composed, struct-mode, fully resolvable config for ``conf/<name>.yaml``.

    Args:
        name: top-level config, ``train`` or ``evaluate``.
        argv: command-line arguments after the script name: flags, group picks and dotlist overrides.

    Raises:
        ConfigError: unknown flag, group option, key or a value that does not resolve; the message names
            the closest valid choice.
    """
    overrides = expand_flags(name, argv)
    options = groups(conf_dir)
    picks: dict[str, str] = {}
    values: list[str] = []
    for override in overrides:
        key, eq, value = override.partition("=")
        if not eq:
            raise ConfigError(f"expected key=value or group=option, got {override!r}; see --help")
        if key in options or key == EXPERIMENT:
            picks[key] = value
        else:
            values.append(override)

    top = conf_dir / f"{name}.yaml"
    if not top.is_file():
        raise ConfigError(f"no top-level config {top}")
    root = OmegaConf.load(top)
    experiment_name = picks.pop(EXPERIMENT, None)
    experiment = _load(conf_dir, EXPERIMENT, experiment_name) if experiment_name else OmegaConf.create()
    choices = {
        **_as_dict(root.pop("defaults", None), top),
        **_as_dict(experiment.pop("defaults", None), f"experiment {experiment_name}"),
        **picks,
    }
    if experiment_name:
        choices[EXPERIMENT] = experiment_name

    sections: dict[str, Any] = {}
    for group, option in choices.items():
        if group == EXPERIMENT:
            continue
        if group not in options:
            raise ConfigError(_unknown("config group", group, options))
        sections[group] = None if option in (None, "none") else _load(conf_dir, group, option)
    try:
        cfg = OmegaConf.merge(sections, root, experiment, {"choices": choices})
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot merge the config files of {name}: {err}") from None
    OmegaConf.set_struct(cfg, True)  # from here on, a typo in an override raises

    for override in values:
        cfg = _apply(cfg, override)
    _check_resolves(cfg)
    return cfg


def _apply(cfg: DictConfig, override: str) -> DictConfig:
    """Merge one ``key.path=value`` (or ``+key.path=value``) override into ``cfg``, checking the key exists."""
    key, _, value = override.partition("=")
    add = key.startswith("+")
    key = key.lstrip("+")
    if not add:
        _check_key(cfg, key)
    try:
        parsed = OmegaConf.from_dotlist([f"{key}={value}"])
        if add:
            with _open_struct(cfg):
                return OmegaConf.merge(cfg, parsed)
        return OmegaConf.merge(cfg, parsed)
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad override {override!r}: {err}") from None


class _open_struct:
    """Context manager lifting struct mode so ``+key=value`` can add a key."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def __enter__(self) -> None:
        OmegaConf.set_struct(self.cfg, False)

    def __exit__(self, *exc: object) -> None:
        OmegaConf.set_struct(self.cfg, True)


def _check_key(cfg: DictConfig, key: str) -> None:
    """Raise ConfigError naming the closest valid key when ``key`` is not a path in ``cfg``."""
    node: Any = cfg
    walked: list[str] = []
    for part in key.split("."):
        if node is None:
            group = walked[0] if walked else key
            raise ConfigError(
                f"cannot set {key!r}: {'.'.join(walked)} is none; pick an option first, e.g. {group}=NAME"
            )
        if isinstance(node, ListConfig):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"cannot set {key!r}: {'.'.join(walked)} is a list of {len(node)} items")
            node = node[int(part)]
        elif isinstance(node, DictConfig):
            if part not in node:
                prefix = ".".join(walked)
                known = [f"{prefix}.{k}" if prefix else str(k) for k in node]
                raise ConfigError(_unknown("config key", f"{prefix}.{part}" if prefix else part, known))
            node = node._get_node(part)  # the raw node: no interpolation is resolved while walking
            node = node if isinstance(node, (DictConfig, ListConfig)) else (None if node._is_none() else node)
        else:
            raise ConfigError(f"cannot set {key!r}: {'.'.join(walked)} is a value, not a section")
        walked.append(part)


def _check_resolves(cfg: DictConfig) -> None:
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or "?"
        raise ConfigError(f"config value {key!r} does not resolve: {err.msg if hasattr(err, 'msg') else err}") from None


def _load(conf_dir: Path, group: str, option: str) -> DictConfig:
    path = conf_dir / group / f"{option}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        if group != EXPERIMENT:
            options.append("none")
        hint = " (--adv also takes vaft: VAFA with the VAFT objective)" if group == "attack" else ""
        raise ConfigError(_unknown(f"{group} option", option, options) + hint)
    loaded = OmegaConf.load(path)
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path} must hold a mapping, got {type(loaded).__name__}")
    return loaded


def _as_dict(defaults: Any, where: object) -> dict[str, str]:
    if defaults is None:
        return {}
    if not isinstance(defaults, DictConfig):
        raise ConfigError(f"'defaults' in {where} must be a mapping group: option")
    return {str(k): (None if v is None else str(v)) for k, v in defaults.items()}


def _unknown(kind: str, name: str, known: Sequence[str]) -> str:
    guess = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    hint = f" Did you mean {guess[0]!r}?" if guess else ""
    return f"unknown {kind} {name!r}.{hint} Valid: {sorted(known)}"


def check_arguments(fn: Callable, values: Mapping[str, Any], section: str) -> None:
    """Check a config section against the keyword arguments of the callable it is passed to, before any work.

    Unknown keys (when ``fn`` takes no ``**kwargs``) and values whose type does not fit the parameter's annotation
    (``int``, ``float``, ``str``, ``bool``, ``None``, ``Literal``, unions, lists, mappings, classes) raise
    :class:`ConfigError` naming ``<section>.<key>``, the value and what was expected, e.g.
    ``trainer.max_epochs='abc': expected an integer or null``. Annotations it cannot judge are accepted.
    """
    params = inspect.signature(fn).parameters
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: judge the keys only
        hints = {}
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in values.items():
        if key not in params:
            if open_kwargs:
                continue
            keyword = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            known = [f"{section}.{k}" for k, p in params.items() if k != "self" and p.kind in keyword]
            raise ConfigError(_unknown("config key", f"{section}.{key}", known))
        hint = hints.get(key)
        if hint is not None and _fits(value, hint) is False:
            raise ConfigError(f"{section}.{key}={value!r}: expected {_describe(hint)}")


def _fits(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits the annotation ``hint``; ``None`` when the annotation is beyond this check."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        verdicts = [_fits(value, a) for a in args]
        return any(v is not False for v in verdicts)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable, collections.abc.MutableSequence):
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        inner = args[0] if args and origin is not tuple else None
        if inner is None or inner is Ellipsis:
            return True
        return all(_fits(v, inner) is not False for v in value)
    if origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping) or hint in (dict, Mapping):
        return isinstance(value, (Mapping, DictConfig))
    if hint in (list, tuple):
        return isinstance(value, (list, tuple, ListConfig))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return None


def _describe(hint: Any) -> str:
    """Words for an annotation: ``an integer or null``, ``one of ['16-mixed', 'bf16-mixed', ...]``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        literals = [a for arg in args if typing.get_origin(arg) is Literal for a in typing.get_args(arg)]
        rest = [_describe(a) for a in args if typing.get_origin(a) is not Literal]
        words = ([f"one of {literals}"] if literals else []) + rest
        return " or ".join(dict.fromkeys(words))
    if origin is Literal:
        return f"one of {list(args)}"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable, collections.abc.MutableSequence):
        return f"a list of {_describe(args[0])}s" if args and args[0] is not Ellipsis else "a list"
    if origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping) or hint in (dict, Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, as written into every run directory."""
    return OmegaConf.to_yaml(cfg, resolve=True)
