"""``fastnn.convert(model)`` swaps the modules fastnn supports for its own, in place, keeping their
weights; ``fastnn.revert(model)`` swaps them back. A checkpoint saved from either loads into the
other, so fastnn is never needed to load one.

The pairs are registered by the families next to their modules (``fastnn.convert_registry``); this
module holds no family knowledge. A swap:

* converts each distinct module once: a module reachable under two names stays one module;
* happens all at once: when one module fails to convert, the model is left as it was;
* keeps the replaced module's hooks (``convert_registry.share_hooks``), so hooks installed before the
  swap (a user's, or those Hugging Face installs on the first forward) keep firing after it;
* names what it left alone and why, in a warning (``report=True`` prints the whole report, and
  ``fastnn.convert.report(model)`` returns it without converting).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ._checks import fail
from .convert_registry import Conversion, register, registered, share_hooks

__all__ = ["convert", "revert", "names", "report", "ConversionReport", "Entry", "register", "Conversion"]


def _load_families() -> None:
    # Importing the families registers their conversions; transformers itself is imported only by
    # the user's model, so a failure here is fastnn's own and must surface.
    from . import integrations, nn  # noqa: F401


@dataclass(frozen=True)
class Entry:
    """One line of a :class:`ConversionReport`.

    ``action`` is "converted" (by ``convert``), "reverted" (by ``revert``), "fastnn" (already
    fastnn's module) or "left alone" (with the ``reason``)."""

    path: str
    before: str
    action: str
    after: str = ""
    conversion: str = ""
    reason: str = ""


class ConversionReport(list):
    """What ``convert`` / ``revert`` did (or would do) to a model: a list of :class:`Entry`."""

    @property
    def swapped(self) -> list[Entry]:
        return [e for e in self if e.action in ("converted", "reverted")]

    @property
    def left_alone(self) -> list[Entry]:
        return [e for e in self if e.action == "left alone"]

    @property
    def already_fastnn(self) -> list[Entry]:
        """The modules that were fastnn's before the call (a model converted twice): not swapped."""
        return [e for e in self if e.action == "fastnn"]

    def __str__(self) -> str:
        if not self:
            return "fastnn.convert: nothing to convert or revert"
        width = max(len(e.path) for e in self)
        lines = []
        for e in self:
            what = f"{e.before} -> {e.after} ({e.conversion})" if e.after else e.before
            if e.reason:
                what += f": {e.reason}"
            action = "already fastnn" if e.action == "fastnn" else e.action
            lines.append(f"  {action:<14}  {e.path:<{width}}  {what}")
        head = f"fastnn: {len(self.swapped)} module(s) swapped, {len(self.left_alone)} left alone"
        if self.already_fastnn:
            head += f", {len(self.already_fastnn)} already fastnn's (not swapped again)"
        return "\n".join([head] + lines)


def _qualname(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# A decision for one module: (action, conversion, function building the replacement, reason).
_Decision = tuple[str, Optional[Conversion], Optional[Callable], str]


def _plan(model: torch.nn.Module, decide: Callable[[torch.nn.Module], Optional[_Decision]],
          build: bool) -> tuple[torch.nn.Module, list, ConversionReport]:
    """Walk ``model`` once per distinct module; returns the (possibly new) root, the (parent, name,
    replacement) assignments to make, and the report. Nothing is modified here."""
    done: dict[int, torch.nn.Module] = {}   # id(module) -> its replacement (itself if kept)
    assignments: list = []
    out = ConversionReport()

    def visit(m: torch.nn.Module, path: str) -> torch.nn.Module:
        if id(m) in done:
            return done[id(m)]
        action, conv, fn, reason = decide(m) or ("", None, None, "")
        new = m
        if fn is not None and build:
            new = fn(m)
            share_hooks(m, new)
        if action:
            after = "" if fn is None else _qualname(new if build else conv.fastnn_type)
            out.append(Entry(path or "<model>", _qualname(m), action, after, conv.name if conv else "", reason))
        done[id(m)] = new
        if fn is None:  # a swapped module's children are its replacement's business
            # _modules, not named_children(): that one skips a module's second name.
            for name, child in list(m._modules.items()):
                if child is None:
                    continue
                new_child = visit(child, f"{path}.{name}" if path else name)
                if new_child is not child:
                    assignments.append((m, name, new_child))
        return new

    root = visit(model, "")
    return root, assignments, out


def _run(model: torch.nn.Module, decide, build: bool) -> tuple[torch.nn.Module, ConversionReport]:
    if not isinstance(model, torch.nn.Module):
        fail("model", "a torch.nn.Module", type(model).__name__, op="convert", error=TypeError)
    root, assignments, out = _plan(model, decide, build)
    if build:
        for parent, name, new in assignments:
            setattr(parent, name, new)
    return root, out


def _convert_decider(only: Optional[list[str]]):
    _load_families()
    convs = registered()
    if only is not None:
        if isinstance(only, str):
            fail("only", "a list of conversion names", repr(only), op="convert", error=TypeError)
        unknown = set(only) - {c.name for c in convs}
        if unknown:
            fail("only", f"names of registered conversions {names()}", f"unknown {sorted(unknown)}", op="convert")
    fastnn_types = tuple(c.fastnn_type for c in convs)

    def decide(m: torch.nn.Module) -> Optional[_Decision]:
        if isinstance(m, fastnn_types):
            return ("fastnn", None, None, "") if type(m) in fastnn_types else None
        for c in convs:
            if c.matches(m):
                if only is None or c.name in only:
                    return "converted", c, c.to_fastnn, ""
                return "left alone", c, None, f"not selected (only={list(only)})"
            reason = c.explain(m) if c.explain is not None else None
            if reason:
                return "left alone", c, None, reason
        return None

    return decide


def _warn_left_alone(out: ConversionReport) -> None:
    unsupported = [e for e in out.left_alone if not e.reason.startswith("not selected")]
    if unsupported:
        listed = "; ".join(f"{e.path} ({e.before}): {e.reason}" for e in unsupported)
        warnings.warn(f"fastnn.convert: {len(unsupported)} module(s) left unconverted: {listed}",
                      UserWarning, stacklevel=3)


def convert(model: torch.nn.Module, *, only: Optional[list[str]] = None, report: bool = False) -> torch.nn.Module:
    """Swap every supported module of ``model`` (or ``model`` itself) for fastnn's, weights kept.

    Works at any point of a model's life (before or after a forward, ``.to(...)``, inside
    ``torch.no_grad()``); the swapped modules keep the same ``nn.Parameter`` objects and their hooks.

    Args:
        model: the model to convert, in place.
        only: restrict the swap to these conversions (``fastnn.convert.names()`` lists them).
        report: print what was swapped and what was left alone, and why. Modules left alone because
            fastnn does not support them are named in a ``UserWarning`` either way;
            ``fastnn.convert.report(model)`` returns the report without converting.

    Returns the model (a new object only when ``model`` itself was swapped).
    """
    root, out = _run(model, _convert_decider(only), build=True)
    _warn_left_alone(out)
    if report:
        print(out)
    return root


def revert(model: torch.nn.Module, *, report: bool = False) -> torch.nn.Module:
    """Swap every fastnn module of ``model`` back to the module it replaced, weights and hooks kept.

    ``report=True`` prints what was swapped back. Returns the model (a new object only when
    ``model`` itself was swapped)."""
    root, out = _run(model, _revert_decider(), build=True)
    if report:
        print(out)
    return root


def _revert_decider():
    _load_families()
    convs = {c.fastnn_type: c for c in registered()}

    def decide(m: torch.nn.Module) -> Optional[_Decision]:
        c = convs.get(type(m))
        return ("reverted", c, c.to_original, "") if c is not None else None

    return decide


def report(model: torch.nn.Module, *, only: Optional[list[str]] = None) -> ConversionReport:
    """What ``fastnn.convert(model, only=only)`` would swap and what it would leave alone (and why),
    and which modules are fastnn's already; ``model`` is not modified."""
    return _run(model, _convert_decider(only), build=False)[1]


def converted_copy(model: torch.nn.Module, op: str) -> torch.nn.Module:
    """A copy of ``model`` with the layers fastnn supports swapped for fastnn's; ``model`` itself is
    not modified. The exporters start from it, so that a plain torch model exports through fastnn's
    ops (with a dynamic sequence length for nn.LSTM / nn.GRU). ``op`` names the caller in errors."""
    import copy

    if not isinstance(model, torch.nn.Module):
        fail("model", "a torch.nn.Module", type(model).__name__, op=op, error=TypeError)
    return convert(copy.deepcopy(model))


def names() -> list[str]:
    """The names of the registered conversions (the values ``convert(model, only=[...])`` takes)."""
    _load_families()
    return [c.name for c in registered()]


# ``fastnn.convert`` is the function (``fastnn.convert(model)``); its companions hang off it.
convert.names = names
convert.report = report
