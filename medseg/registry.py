"""Tiny name → factory registries (models, losses, datasets).

Each kind of pluggable component has one :class:`Registry`. A component registers itself
with a decorator in its own module; the YAML names it. A miss lists the valid names.

Example:
    >>> from medseg.registry import MODELS
    >>> @MODELS.register("tiny")
    ... def tiny(in_channels: int, num_classes: int, width: int = 8): ...
    >>> net = MODELS.build("tiny", {"width": 4}, in_channels=3, num_classes=2)
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class RegistryError(KeyError):
    """An unknown name or a bad parameter for a registered component."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class Registry:
    """A mapping from lowercase names to factories (classes or functions).

    Args:
        kind: what the registry holds, used in error messages ("model", "loss", ...).
        config_key: the config key that names an entry (e.g. ``"model.name"``).
    """

    def __init__(self, kind: str, config_key: str) -> None:
        self.kind = kind
        self.config_key = config_key
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering ``obj`` under ``name`` (one name per thing: no aliases)."""
        if name != name.lower():
            raise ValueError(f"{self.kind} names are lowercase: {name!r}")

        def deco(obj: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        """The factory registered as ``name``; an unknown name lists the valid ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} {name!r} ({self.config_key}); valid names: "
                + ", ".join(self.names())
            ) from None

    def build(self, name: str, params: dict[str, Any] | None = None, **fixed: Any) -> Any:
        """Build ``name`` with config ``params`` plus ``fixed`` keyword arguments.

        ``params`` come from the YAML (``<config_key parent>.params``) and are checked against the
        factory's signature: an unknown key or a value of the wrong type raises a
        :class:`RegistryError` naming the key.
        """
        factory = self.get(name)
        params = dict(params or {})
        check_params(factory, params, self.config_key.rsplit(".", 1)[0] + ".params", fixed)
        return factory(**fixed, **params)


def _accepts(value: Any, annotation: Any) -> bool:
    """Loose runtime check of ``value`` against a type annotation (int is accepted for float)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return all(_accepts(v, args[0]) for v in value) if args else True
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def check_params(
    factory: Callable[..., Any], params: dict[str, Any], prefix: str, fixed: dict[str, Any]
) -> None:
    """Raise :class:`RegistryError` for a key the factory does not take or a wrongly typed value."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    sig = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable forward refs: fall back to no type checks
        hints = {}
    accepted = {n for n, p in sig.parameters.items() if n != "self"}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    for key, value in params.items():
        if key in fixed:
            raise RegistryError(f"{prefix}.{key} is set by medseg itself and cannot be configured")
        if key not in accepted and not var_kw:
            valid = sorted(accepted - set(fixed) - {"args", "kwargs"})
            raise RegistryError(
                f"unknown key {prefix}.{key} for {getattr(factory, '__name__', factory)}; "
                f"valid keys: {', '.join(valid)}"
            )
        if key in hints and not _accepts(value, hints[key]):
            raise RegistryError(
                f"{prefix}.{key} = {value!r} has the wrong type; expected {hints[key]}"
            )


MODELS = Registry("model", "model.name")
LOSSES = Registry("loss", "loss.name")
DATASETS = Registry("dataset", "data.name")
