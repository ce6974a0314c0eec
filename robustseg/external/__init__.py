"""Models trained elsewhere: external YAML specs, nnU-Net v2 folders, MONAI bundles, and the adapters that keep the
threat model in robustseg's [0, 1] space. Entry points: :func:`load_external` (a YAML) and :func:`load_prefixed`
(``nnunet:PATH[,key=value...]``, ``bundle:PATH[,key=value...]``)."""

from __future__ import annotations

import re
from collections.abc import Callable

from robustseg.evaluation.resolve import LoadedModel
from robustseg.external.adapters import AdaptedModel, budget_in_units, observe_volume
from robustseg.external.load import load_external


def _nnunet(spec: str) -> LoadedModel:
    from robustseg.external.nnunet import load_nnunet

    return load_nnunet(spec)


def _bundle(spec: str) -> LoadedModel:
    from robustseg.external.bundle import load_bundle

    return load_bundle(spec)


def split_options(text: str) -> list[str]:
    """``PATH`` and its ``key=value`` options, separated by ``,`` or ``:`` (``:`` survives the CLI's comma lists).

    Only a separator followed by ``word=`` splits, so paths keep their other commas and colons.
    """
    return re.split(r"[,:](?=[A-Za-z_]\w*=)", text)


PREFIXES: dict[str, Callable[[str], LoadedModel]] = {"nnunet": _nnunet, "bundle": _bundle}


def load_prefixed(spec: str) -> LoadedModel:
    """``nnunet:PATH,...`` or ``bundle:PATH,...`` (the prefix picks the loader; the rest is passed to it)."""
    prefix, _, rest = spec.partition(":")
    return PREFIXES[prefix](rest)


__all__ = [
    "PREFIXES",
    "AdaptedModel",
    "budget_in_units",
    "load_external",
    "load_prefixed",
    "observe_volume",
    "split_options",
]
