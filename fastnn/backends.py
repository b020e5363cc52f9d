"""The one place that chooses how an op call runs: ``reference``, ``cpu``, ``cuda`` or ``triton``.

Each public op is an :class:`Op` holding one implementation per backend. A call picks the first
backend in the op's preference order for the inputs' device that is available and can serve the
inputs (device, dtype, shape, what was built). The choice is made in Python before the op call
and depends only on the inputs and on what is installed, never on hidden state that changes
results.

Forcing a backend (tests, benchmarks, debugging)::

    FASTNN_BACKEND=triton pytest ...                 # every op
    FASTNN_BACKEND=lstm_cell:triton,adam_step:cpu    # per op
    with fastnn.backends.force("reference"): ...      # in code, optionally ops=[...]

A forced backend that cannot serve the inputs raises :class:`BackendError` saying why; it never
falls back silently.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from . import _extension

__all__ = ["BACKENDS", "BackendError", "Op", "force", "forced", "triton_available", "device_of"]

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Default preference per device type. An op may pass its own (e.g. Triton before CUDA).
DEFAULT_PREFERENCE = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}


class BackendError(RuntimeError):
    """A forced backend cannot serve the inputs, or no backend can."""


def _parse_forced(spec: str | None) -> dict[str | None, str]:
    """``"triton"`` -> {None: "triton"}; ``"a:cpu,b:reference"`` -> {"a": "cpu", "b": "reference"}."""
    out: dict[str | None, str] = {}
    if not spec:
        return out
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        op, _, backend = part.rpartition(":")
        if backend not in BACKENDS:
            raise BackendError(f"FASTNN_BACKEND: unknown backend {backend!r} in {spec!r}; expected one of {BACKENDS}")
        out[op or None] = backend
    return out


# What is forced now, and where it came from (for error messages). Read once at import; changed
# only by force().
_FORCED: dict[str | None, str] = _parse_forced(os.environ.get("FASTNN_BACKEND"))
_FORCED_BY = "FASTNN_BACKEND=" + os.environ.get("FASTNN_BACKEND", "")


def forced(op: str) -> str | None:
    """The backend forced for ``op``, if any."""
    return _FORCED.get(op, _FORCED.get(None))


@contextlib.contextmanager
def force(backend: str, ops: Iterable[str] | None = None) -> Iterator[None]:
    """Force ``backend`` for every op, or for the ops named, inside the block."""
    global _FORCED, _FORCED_BY
    if backend not in BACKENDS:
        raise BackendError(f"fastnn.backends.force: unknown backend {backend!r}; expected one of {BACKENDS}")
    saved = (_FORCED, _FORCED_BY)
    new = dict(_FORCED)
    if ops is None:
        new = {None: backend}
    else:
        for op in ops:
            new[op] = backend
    _FORCED, _FORCED_BY = new, f"fastnn.backends.force({backend!r})"
    try:
        yield
    finally:
        _FORCED, _FORCED_BY = saved


@torch.compiler.assume_constant_result  # see fastnn/_extension.py
@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton imports (it may be absent on CPU-only installs)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # any import failure means "not usable here"
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_of(*args: Any) -> torch.device:
    """The device of the first tensor found in ``args`` (lists and tuples searched too)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    return b.device
    return torch.device("cpu")


def _generic_reason(backend: str, device: torch.device, native: str | None) -> str | None:
    """Why ``backend`` cannot run anything on ``device``, before op-specific checks."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return f"inputs are on {device}, the {backend} backend runs on {backend} tensors"
        if not _extension.available():
            return f"the compiled library is not loaded ({_extension.error()})"
        if native is None or not _extension.has_kernel(native, backend.upper()):
            what = "built without CUDA kernels" if backend == "cuda" and not _extension.built_with_cuda() else \
                f"has no {backend.upper()} kernel for fastnn::{native}"
            return f"the compiled library {what}"
        return None
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        return f"Triton kernels run on CUDA tensors (or on the CPU under TRITON_INTERPRET=1); inputs are on {device}"
    return f"unknown backend {backend!r}"


@dataclass(frozen=True)
class Implementation:
    backend: str
    fn: Callable[..., Any]
    supports: Callable[..., str | None] | None
    native: str | None  # the fastnn::<name> op whose compiled kernel this implementation calls


class Op:
    """One public op with an implementation per backend.

    ``device`` maps the call's arguments to the device that decides the backend (default: the
    first tensor's). ``preference`` overrides :data:`DEFAULT_PREFERENCE` per device type.
    """

    def __init__(self, name: str, *, device: Callable[..., torch.device] | None = None,
                 preference: dict[str, tuple[str, ...]] | None = None):
        self.name = name
        self.impls: dict[str, Implementation] = {}
        self._device = device or (lambda *a, **k: device_of(*a, *k.values()))
        self.preference = dict(DEFAULT_PREFERENCE, **(preference or {}))

    def register(self, backend: str, *, supports: Callable[..., str | None] | None = None,
                 native: str | None = None) -> Callable[[Callable], Callable]:
        """Decorator: register ``fn`` as this op's ``backend`` implementation.

        ``supports(*args, **kwargs)`` returns None when it can serve the inputs, else the reason.
        ``native`` names the compiled op it calls (``cpu``/``cuda`` backends).
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")

        def deco(fn: Callable) -> Callable:
            self.impls[backend] = Implementation(backend, fn, supports, native)
            return fn

        return deco

    def reason(self, backend: str, *args: Any, **kwargs: Any) -> str | None:
        """None when ``backend`` can serve these inputs, else why not."""
        impl = self.impls.get(backend)
        if impl is None:
            return f"fastnn has no {backend} implementation of {self.name}"
        why = _generic_reason(backend, self._device(*args, **kwargs), impl.native)
        if why is None and impl.supports is not None:
            why = impl.supports(*args, **kwargs)
        return why

    def choose(self, *args: Any, **kwargs: Any) -> str:
        """The backend this call runs on."""
        want = forced(self.name)
        if want is not None:
            why = self.reason(want, *args, **kwargs)
            if why is not None:
                raise BackendError(f"fastnn: {self.name} cannot run on the {want} backend forced by "
                                   f"{_FORCED_BY}: {why}")
            return want
        device = self._device(*args, **kwargs)
        order = self.preference.get(device.type, ("reference",))
        reasons = []
        for backend in order:
            why = self.reason(backend, *args, **kwargs)
            if why is None:
                return backend
            reasons.append(f"{backend}: {why}")
        raise BackendError(f"fastnn: no backend can run {self.name} on these inputs ({'; '.join(reasons)})")

    def available(self, *args: Any, **kwargs: Any) -> list[str]:
        """Every backend that can serve these inputs (for tests and benchmarks)."""
        return [b for b in BACKENDS if b in self.impls and self.reason(b, *args, **kwargs) is None]

    def call(self, backend: str, *args: Any, **kwargs: Any) -> Any:
        """Run on a given backend (raises BackendError when it cannot serve the inputs)."""
        why = self.reason(backend, *args, **kwargs)
        if why is not None:
            raise BackendError(f"fastnn: {self.name} cannot run on the {backend} backend: {why}")
        return self.impls[backend].fn(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.impls[self.choose(*args, **kwargs)].fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"fastnn.backends.Op({self.name!r}, backends={sorted(self.impls)})"
