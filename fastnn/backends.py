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
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from . import _extension

__all__ = ["BACKENDS", "BackendError", "Op", "Args", "force", "forced", "triton_available", "on_triton", "device_of"]

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


# fastnn.LSTM's float32 CPU forward at this batch size and above runs torch's own LSTM kernel
# (oneDNN's, which torch.nn.LSTM uses there) instead of fastnn's packed recurrence: measured on a
# 2-core AVX2 machine at T=100 B=32 H=256, fastnn's kernel ran at 0.90x torch's inference and
# 0.88x its training, and the drop-in promise is never to be slower than the replaced layer. It is
# the last resort, for this one layer and these shapes only (batch 1, where fastnn's kernel is
# 1.5x faster, and the GRU and RNN keep fastnn's). Forcing a backend for lstm_seq
# (FASTNN_BACKEND=lstm_seq:cpu, or force()) keeps fastnn's kernel.
TORCH_LSTM_CPU_MIN_BATCH = 16


def lstm_runs_torch_kernel(device: torch.device, dtype: torch.dtype, batch: int) -> bool:
    """Whether a plain fastnn.LSTM forward on these inputs runs torch's kernel (see above)."""
    return (device.type == "cpu" and dtype == torch.float32 and batch >= TORCH_LSTM_CPU_MIN_BATCH
            and forced("lstm_seq") is None)


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


# Plain module state rather than lru_cache, and constant for torch.compile (see _extension).
_TRITON: dict[str, bool] = {}
_ON_TRITON: list[Callable[[], None]] = []


def on_triton(fn: Callable[[], None]) -> Callable[[], None]:
    """Call ``fn()`` once Triton is found importable (now, if it already was).

    Families register their ``torch.library.triton_op``s here: registering one imports Triton, which
    ``import fastnn`` does not pay for, and without Triton (torch's CPU wheels) nothing is registered
    and nothing is logged. Every Triton backend asks :func:`triton_available` before it runs.
    """
    if _TRITON.get("available"):
        fn()
    else:
        _ON_TRITON.append(fn)
    return fn


@_extension.assume_constant
def triton_available() -> bool:
    """Whether Triton imports (it may be absent on CPU-only installs)."""
    if "available" not in _TRITON:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON["available"] = True
        except Exception:  # any import failure means "not usable here"
            _TRITON["available"] = False
        if _TRITON["available"]:
            for fn in _ON_TRITON:
                fn()
        _ON_TRITON.clear()
    return _TRITON["available"]


def triton_interpreted() -> bool:
    if "interpreted" not in _TRITON:
        _TRITON["interpreted"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return _TRITON["interpreted"]


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


class Args(dict):
    """An op call's arguments by parameter name, defaults filled in; read as ``a.logits`` or
    ``a["logits"]``. What ``supports`` and ``validate`` receive."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _Binder:
    """Binds a call's ``(*args, **kwargs)`` to the parameters of the op's reference function, as
    ``inspect.Signature.bind`` + ``apply_defaults`` would, in a microsecond or two (ops run per
    recurrent step)."""

    def __init__(self, name: str, fn: Callable[..., Any]):
        sig = inspect.signature(fn)
        self.name = name
        self.signature = sig
        self.names = tuple(sig.parameters)
        self.known = frozenset(self.names)
        self.n_positional = sum(1 for p in sig.parameters.values()
                                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        self.defaults = {n: p.default for n, p in sig.parameters.items() if p.default is not p.empty}
        for p in sig.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"fastnn.backends.Op({name!r}): the signature function may not take *args/**kwargs")

    def __call__(self, args: tuple, kwargs: dict) -> Args:
        if len(args) > self.n_positional:
            raise TypeError(f"{self.name}() takes {self.n_positional} positional arguments but {len(args)} were given")
        bound = Args(zip(self.names, args))
        for k, v in kwargs.items():
            if k in bound:
                raise TypeError(f"{self.name}() got multiple values for argument {k!r}")
            if k not in self.known:
                raise TypeError(f"{self.name}() got an unexpected keyword argument {k!r}")
            bound[k] = v
        if len(bound) < len(self.names):
            for n in self.names:
                if n not in bound:
                    if n not in self.defaults:
                        raise TypeError(f"{self.name}() missing required argument {n!r}")
                    bound[n] = self.defaults[n]
        return bound


def _first_tensor_device(a: Args) -> torch.device:
    return device_of(*a.values())


class Op:
    """One public op with an implementation per backend.

    ``signature`` is the op's pure-PyTorch reference function: the op takes its parameters (a call
    is bound to them once, defaults filled in) and shows its signature and docstring in ``help``.
    ``validate(a)`` checks the bound arguments :class:`Args` once per call, before any backend is
    chosen, so every backend raises the same error for the same bad input. ``supports(a)`` of an
    implementation returns None when it can serve the bound arguments, else the reason.
    ``device(a)`` gives the device that decides the backend (default: the first tensor's).
    ``preference`` overrides :data:`DEFAULT_PREFERENCE` per device type. Implementations are called
    with the bound arguments as keywords.
    """

    def __init__(self, name: str, *, signature: Callable[..., Any], validate: Callable[[Args], None] | None = None,
                 device: Callable[[Args], torch.device] | None = None,
                 preference: dict[str, tuple[str, ...]] | None = None):
        self.name = name
        self.impls: dict[str, Implementation] = {}
        self._native_cache: dict[str, tuple] = {}  # native_kernel's answers
        self._validate = validate
        self.preference = dict(DEFAULT_PREFERENCE, **(preference or {}))
        self.__name__ = name
        self._bind = _Binder(name, signature)
        self._device = device or _first_tensor_device
        self.__signature__ = self._bind.signature
        self._doc = inspect.getdoc(signature) or ""
        self._update_doc()

    def _update_doc(self) -> None:
        backends = ", ".join(b for b in BACKENDS if b in self.impls) or "none registered yet"
        self.__doc__ = (f"{self.name}{self._bind.signature}\n\n{self._doc}\n\n"
                        f"Backends: {backends} (chosen per call by fastnn.backends; FASTNN_BACKEND forces one).")

    def register(self, backend: str, *, supports: Callable[[Args], str | None] | None = None,
                 native: str | None = None) -> Callable[[Callable], Callable]:
        """Decorator: register ``fn`` as this op's ``backend`` implementation.

        ``supports(a)`` returns None when it can serve the bound arguments ``a``, else the reason.
        ``native`` names the compiled op it calls (``cpu``/``cuda`` backends).
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")

        def deco(fn: Callable) -> Callable:
            self.impls[backend] = Implementation(backend, fn, supports, native)
            self._native_cache.clear()
            self._update_doc()
            return fn

        return deco

    def bind(self, *args: Any, **kwargs: Any) -> Args:
        """The call's arguments by name, defaults filled in (raises TypeError as a function would)."""
        return self._bind(args, kwargs)

    def _reason(self, backend: str, a: Args) -> str | None:
        if backend == "triton":
            triton_available()  # registers the families' Triton implementations on first use (on_triton)
        impl = self.impls.get(backend)
        if impl is None:
            return f"fastnn has no {backend} implementation of {self.name}"
        why = _generic_reason(backend, self._device(a), impl.native)
        if why is None and impl.supports is not None:
            why = impl.supports(a)
        return why

    def _choose(self, a: Args) -> str:
        want = forced(self.name)
        if want is not None:
            why = self._reason(want, a)
            if why is not None:
                raise BackendError(f"fastnn: {self.name} cannot run on the {want} backend forced by "
                                   f"{_FORCED_BY}: {why}")
            return want
        order = self.preference.get(self._device(a).type, ("reference",))
        reasons = []
        for backend in order:
            why = self._reason(backend, a)
            if why is None:
                return backend
            reasons.append(f"{backend}: {why}")
        raise BackendError(f"fastnn: no backend can run {self.name} on these inputs ({'; '.join(reasons)})")

    def validate(self, *args: Any, **kwargs: Any) -> Args:
        """Bind and validate a call's arguments without running it (raises as the call would)."""
        return self._checked(args, kwargs)

    def _checked(self, args: tuple, kwargs: dict) -> Args:
        a = self._bind(args, kwargs)
        if self._validate is not None:
            self._validate(a)
        return a

    def reason(self, backend: str, *args: Any, **kwargs: Any) -> str | None:
        """None when ``backend`` can serve these inputs, else why not."""
        return self._reason(backend, self._bind(args, kwargs))

    def choose(self, *args: Any, **kwargs: Any) -> str:
        """The backend this call runs on."""
        return self._choose(self._bind(args, kwargs))

    def available(self, *args: Any, **kwargs: Any) -> list[str]:
        """Every backend that can serve these inputs (for tests and benchmarks)."""
        a = self._bind(args, kwargs)
        triton_available()  # registers the families' Triton implementations on first use (on_triton)
        return [b for b in BACKENDS if b in self.impls and self._reason(b, a) is None]

    def call(self, backend: str, *args: Any, **kwargs: Any) -> Any:
        """Run on a given backend (raises BackendError when it cannot serve the inputs)."""
        a = self._checked(args, kwargs)
        why = self._reason(backend, a)
        if why is not None:
            raise BackendError(f"fastnn: {self.name} cannot run on the {backend} backend: {why}")
        return self._run(backend, a)

    def _run(self, backend: str, a: Args) -> Any:
        return self.impls[backend].fn(**a)

    def trusted(self, *args: Any, **kwargs: Any) -> Any:
        """Run the call without the Python argument checks: for fastnn's own modules, which build the
        arguments themselves and check the user's inputs as the torch layer does. The compiled and
        Triton kernels keep the checks their memory safety depends on."""
        a = self._bind(args, kwargs)
        return self._run(self._choose(a), a)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        a = self._checked(args, kwargs)
        return self._run(self._choose(a), a)

    def native_kernel(self, device: torch.device) -> Callable[..., Any] | None:
        """The compiled implementation (called with the op's arguments in signature order) that a call
        on ``device`` would run, when that choice depends on the device alone: nothing forces another
        backend, the first backend preferred for the device is ``cpu``/``cuda``, it is loaded and it
        has no per-call ``supports`` check. Else None: go through the op.

        For callers that own their arguments' validity (a quantized module passes its own checked
        weights, once per layer and call) and cannot afford :meth:`validate` per call at batch 1,
        where it costs more than the int8 kernel. The compiled ops keep their own checks.
        """
        # Cached per device type while the forced backends stay the same object (force() swaps it);
        # what else decides (the registrations, the loaded library) does not change once ops run.
        cached = self._native_cache.get(device.type)
        if cached is not None and cached[0] is _FORCED:
            return cached[1]
        want = forced(self.name)
        backend = want or self.preference.get(device.type, ("reference",))[0]
        impl = self.impls.get(backend)
        fn = None
        if backend in ("cpu", "cuda") and impl is not None and impl.supports is None:
            fn = impl.fn if _generic_reason(backend, device, impl.native) is None else None
        self._native_cache[device.type] = (_FORCED, fn)
        return fn

    def __repr__(self) -> str:
        return f"fastnn.backends.Op({self.name!r}, backends={sorted(self.impls)})"
