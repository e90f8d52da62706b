"""A small name -> factory registry shared by datasets, towers and losses."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised when a registry is asked for a name it does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to factories, filled by a decorator.

    Example:
        LOSSES = Registry("loss")

        @LOSSES.register("dcmh")
        class DCMHLoss: ...

        LOSSES.create("dcmh", gamma=1.0)

    A family of names that share a prefix and name a model after it (``clip:<model>``) is
    registered once with ``register_prefix``; its factory takes the model as first argument.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}
        self._prefixes: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def wrap(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = factory
            return factory

        return wrap

    def register_prefix(self, prefix: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Register ``factory(model, ...)`` for every name ``<prefix><model>`` (prefix ends with ``:``)."""

        def wrap(factory: Callable[..., T]) -> Callable[..., T]:
            if not prefix.endswith(":") or prefix in self._prefixes:
                raise ValueError(f"{self.kind} prefix {prefix!r} must end with ':' and be registered once")
            self._prefixes[prefix] = factory
            return factory

        return wrap

    def get(self, name: str) -> Callable[..., T]:
        if name in self._items:
            return self._items[name]
        for prefix, factory in self._prefixes.items():
            if name.startswith(prefix):
                model = name[len(prefix) :]
                if not model:
                    raise UnknownNameError(f"{self.kind} {name!r} needs a model after the prefix: "
                                           f"'{prefix}<hub model id>' or '{prefix}/path/to/folder'")
                return functools.partial(factory, model)
        known = [*self.names(), *(f"{p}<model>" for p in self.prefixes())]
        raise UnknownNameError(f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(known)}")

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        """The registered names (prefix families not included: see ``prefixes``)."""
        return sorted(self._items)

    def prefixes(self) -> list[str]:
        """The registered name prefixes (``clip:``), sorted."""
        return sorted(self._prefixes)

    def __contains__(self, name: object) -> bool:
        return name in self._items
