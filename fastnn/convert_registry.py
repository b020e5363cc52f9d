"""The pairs of modules ``fastnn.convert`` swaps, and how a swap keeps a module's hooks.

A leaf module: it imports nothing from fastnn, so a family registers its pairs when its module file
is imported (``register(Conversion(...))``) without importing the converter, and the converter
(``fastnn.convert``) imports the families without an import cycle. Other libraries can register
their own pairs the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Conversion", "register", "registered", "share_hooks"]


@dataclass(frozen=True)
class Conversion:
    """One pair of modules that ``fastnn.convert`` / ``fastnn.revert`` swap.

    Args:
        name: what ``fastnn.convert(model, only=[...])`` selects it by.
        matches: ``matches(module) -> bool``: is ``module`` one this conversion replaces?
        to_fastnn: ``to_fastnn(module) -> module``: its replacement, keeping the weights. It must not
            modify ``module``: when another module of the model fails to convert, the model is left
            as it was.
        fastnn_type: the class of the replacement (``revert`` recognises it by exact type).
        to_original: ``to_original(module) -> module``: the module ``revert`` puts back.
        explain: ``explain(module) -> str | None``: why a module that looks like this conversion's
            (the same class from an older library version, an unsupported option) is left alone;
            None when it is not such a module. ``convert`` warns with the reason and the module's
            path, so that nothing is left unconverted silently.
    """

    name: str
    matches: Callable[["nn.Module"], bool]
    to_fastnn: Callable[["nn.Module"], "nn.Module"]
    fastnn_type: type
    to_original: Callable[["nn.Module"], "nn.Module"]
    explain: Optional[Callable[["nn.Module"], Optional[str]]] = None


_CONVERSIONS: list[Conversion] = []


def register(conversion: Conversion) -> Conversion:
    """Add a pair to the ones ``fastnn.convert`` knows (names are unique)."""
    if any(c.name == conversion.name for c in _CONVERSIONS):
        raise ValueError(f"fastnn.convert: conversion {conversion.name!r} registered twice")
    _CONVERSIONS.append(conversion)
    return conversion


def registered() -> tuple[Conversion, ...]:
    """The registered pairs, in registration order (the order ``convert`` tries them in)."""
    return tuple(_CONVERSIONS)


# The hook tables nn.Module consults in __call__ (the *_with_kwargs / *_always_called tables are
# keyed by the same handle ids as _forward_hooks, so they travel together).
_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def share_hooks(src: "nn.Module", dst: "nn.Module") -> None:
    """Make ``dst`` use ``src``'s hook tables (the same dict objects, not copies).

    A replacement then runs the hooks the replaced module had (a user's hooks, or the output
    capture hooks that Hugging Face installs on the first forward that asks for router logits),
    hooks registered on either one later run on both, and removing a hook through its handle
    removes it from both. ``dst``'s own hooks, if any, are kept."""
    if src is dst:
        return
    for attr in _HOOK_TABLES:
        table, own = getattr(src, attr, None), getattr(dst, attr, None)
        if table is None or own is None or own is table:
            continue
        table.update(own)
        object.__setattr__(dst, attr, table)
    if getattr(src, "_is_full_backward_hook", None) is not None:
        object.__setattr__(dst, "_is_full_backward_hook", src._is_full_backward_hook)
