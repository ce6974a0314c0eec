"""Flat name -> builder registries. Populated by explicit imports, never by directory scanning."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps the ``name`` field of a config section to the callable that builds it.

    The builder's signature is the schema: an unknown keyword fails with Python's own ``TypeError`` at
    build time, so there is no second schema to keep in sync. A name resolves by exact match or by a
    unique prefix (``swin`` means ``swin_unetr``); anything else raises ``KeyError`` listing the known
    names and the closest one.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@MODELS.register("unetr")`` above a function or class."""

        def decorator(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            if name != name.lower() or " " in name:
                raise ValueError(f"{self.kind} names are lowercase snake case, got {name!r}")
            self._builders[name] = builder
            return builder

        return decorator

    def resolve(self, name: str) -> str:
        """Return the registered name that ``name`` means: itself, or the one name it is a prefix of."""
        if name in self._builders:
            return name
        matches = [known for known in self._builders if known.startswith(name)] if name else []
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise KeyError(f"{self.kind} {name!r} is ambiguous: it could be {sorted(matches)}")
        guess = difflib.get_close_matches(name, self._builders, n=1)
        hint = f" Did you mean {guess[0]!r}?" if guess else ""
        raise KeyError(f"unknown {self.kind} {name!r}.{hint} Known: {self.names()}")

    def get(self, name: str) -> Callable[..., T]:
        """The builder registered under ``name`` (exact or unique prefix)."""
        return self._builders[self.resolve(name)]

    def build(self, cfg: Mapping[str, Any]) -> T:
        """Build from a config section such as ``{"name": "pgd", "eps": 0.03}``."""
        kwargs = dict(cfg)
        if "name" not in kwargs:
            raise KeyError(f"a {self.kind} config needs a 'name' key; known names: {self.names()}")
        return self.get(kwargs.pop("name"))(**kwargs)

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders


MODELS: Registry = Registry("model")
ATTACKS: Registry = Registry("attack")
