"""``fastnn.convert(model)`` swaps the modules fastnn supports for its own, in place, keeping their
weights; ``fastnn.revert(model)`` swaps them back. A checkpoint saved from either loads into the
other, so fastnn is never needed to load one.

Each family registers its pairs here (``register``), next to its modules; this module holds no
family knowledge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["convert", "revert", "register", "Conversion"]


@dataclass(frozen=True)
class Conversion:
    name: str
    matches: Callable[[torch.nn.Module], bool]   # is this a module fastnn replaces?
    to_fastnn: Callable[[torch.nn.Module], torch.nn.Module]
    fastnn_type: type
    to_original: Callable[[torch.nn.Module], torch.nn.Module]


_CONVERSIONS: list[Conversion] = []


def register(conversion: Conversion) -> Conversion:
    if any(c.name == conversion.name for c in _CONVERSIONS):
        raise ValueError(f"conversion {conversion.name!r} registered twice")
    _CONVERSIONS.append(conversion)
    return conversion


def _load_families() -> None:
    # Importing the families registers their conversions.
    from . import nn  # noqa: F401
    try:
        from . import integrations  # noqa: F401
    except ImportError:
        pass


def _swap(model: torch.nn.Module, pick: Callable[[torch.nn.Module], Callable | None]) -> torch.nn.Module:
    fn = pick(model)
    if fn is not None:
        return fn(model)
    for name, child in list(model.named_children()):
        new = _swap(child, pick)
        if new is not child:
            setattr(model, name, new)
    return model


def convert(model: torch.nn.Module, *, only: list[str] | None = None) -> torch.nn.Module:
    """Swap every supported module of ``model`` (or ``model`` itself) for fastnn's, weights kept.

    ``only`` restricts the swap to the named conversions (see ``fastnn.convert.names()``).
    Returns the model (a new object only when ``model`` itself was swapped).
    """
    _load_families()
    chosen = [c for c in _CONVERSIONS if only is None or c.name in only]
    if only is not None:
        unknown = set(only) - {c.name for c in _CONVERSIONS}
        if unknown:
            raise ValueError(f"fastnn.convert: unknown conversion(s) {sorted(unknown)}; known: {names()}")

    def pick(m: torch.nn.Module):
        for c in chosen:
            if not isinstance(m, c.fastnn_type) and c.matches(m):
                return c.to_fastnn
        return None

    return _swap(model, pick)


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every fastnn module of ``model`` back to the module it replaced, weights kept."""
    _load_families()

    def pick(m: torch.nn.Module):
        for c in _CONVERSIONS:
            if type(m) is c.fastnn_type:
                return c.to_original
        return None

    return _swap(model, pick)


def names() -> list[str]:
    _load_families()
    return [c.name for c in _CONVERSIONS]
