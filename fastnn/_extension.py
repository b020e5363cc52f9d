"""Loads fastnn's compiled library (``fastnn._C``) lazily and says which kernels exist.

The library is optional: a pure-Python install (``FASTNN_BUILD_EXT=0``), ``FASTNN_DISABLE_EXT=1``,
or a build that fails to load (compiled against another torch, say) leaves fastnn working on its
reference and Triton paths. A build that exists but fails to load gives one warning naming the
cause; it never raises at import.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import warnings

import torch

__all__ = ["load", "available", "error", "built_with_cuda", "has_kernel", "info", "on_load", "assume_constant"]

_ERROR: str | None = None
# Run once the library is loaded (families register the fake kernels and autograd of their
# compiled ops here): importing fastnn does not load the library, the first op call does.
_ON_LOAD: list = []
_LOADED = None


def on_load(fn):
    """Call ``fn(module)`` when the compiled library loads (now, if it already has)."""
    if _LOADED is not None:
        fn(_LOADED)
    else:
        _ON_LOAD.append(fn)
    return fn


def _disabled() -> bool:
    return os.environ.get("FASTNN_DISABLE_EXT", "0").strip().lower() not in ("", "0", "false", "no", "off")


def _fallback() -> str:
    """What runs instead of the compiled kernels. Triton is named only where it is installed: a
    CPU-only install (torch's CPU wheel) has none and must not be told about it."""
    try:
        has_triton = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError, AttributeError):  # sys.modules["triton"] = None, a broken install
        has_triton = False
    return "using the reference and Triton paths" if has_triton else "using the reference paths"


@functools.lru_cache(maxsize=None)
def load():
    """The compiled module, or None (with the reason in :func:`error`)."""
    global _ERROR, _LOADED
    if _LOADED is not None:  # a call from an on_load callback, during the first load
        return _LOADED
    if _disabled():
        _ERROR = "disabled by FASTNN_DISABLE_EXT=1"
        return None
    try:
        module = importlib.import_module("fastnn._C")
    except ModuleNotFoundError as exc:
        if exc.name != "fastnn._C":
            _ERROR = f"fastnn._C failed to import: {exc}"
            warnings.warn(f"fastnn: compiled kernels unavailable ({_ERROR}); {_fallback()}",
                          RuntimeWarning, stacklevel=2)
        else:
            # Not built (pure-Python install): expected, so no warning.
            _ERROR = "fastnn._C is not built (pure-Python install, FASTNN_BUILD_EXT=0)"
        return None
    except (ImportError, OSError) as exc:
        _ERROR = f"fastnn._C failed to load: {exc}"
        warnings.warn(f"fastnn: compiled kernels unavailable ({_ERROR}); {_fallback()}. "
                      "Rebuild with `pip install --no-build-isolation -e .` against this torch.",
                      RuntimeWarning, stacklevel=2)
        return None
    built = module.torch_version()
    running = ".".join(torch.__version__.split(".")[:2])
    if built != running:
        warnings.warn(f"fastnn: compiled kernels were built against torch {built} but torch {running} "
                      "is running; rebuild if ops misbehave", RuntimeWarning, stacklevel=2)
    _LOADED = module
    for fn in _ON_LOAD:
        fn(module)
    _ON_LOAD.clear()
    return module


def assume_constant(fn):
    """Mark ``fn`` as returning a constant for the process, as ``torch.compiler.assume_constant_result``
    does: torch.compile then calls it instead of tracing it.

    The queries below are such constants. Tracing them would reach importlib and torch._C and break
    the graph (the first call loads the library); marked, backend choice (fastnn.backends) works
    inside torch.compile(fullgraph=True). torch's own decorator imports torch._dynamo (over a second
    of import time), so the mark, the attribute that decorator sets, is set here directly.
    """
    fn._dynamo_marked_constant = True
    return fn


# Answers are cached: eager calls choose a backend on every op call.
_constant = assume_constant
_CACHE: dict = {}


@_constant
def available() -> bool:
    """Whether the compiled library is loaded."""
    if "available" not in _CACHE:
        _CACHE["available"] = load() is not None
    return _CACHE["available"]


@_constant
def error() -> str | None:
    """Why the compiled library is not loaded (None when it is)."""
    load()
    return _ERROR


@_constant
def built_with_cuda() -> bool:
    """Whether the loaded library contains CUDA kernels (independent of a GPU being present)."""
    module = load()
    return bool(module is not None and module.built_with_cuda())


@_constant
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``fastnn::<op>`` has a compiled kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    key = (op, dispatch_key)
    if key not in _CACHE:
        _CACHE[key] = _has_kernel(op, dispatch_key)
    return _CACHE[key]


def _has_kernel(op: str, dispatch_key: str) -> bool:
    if load() is None:
        return False
    qualname = f"fastnn::{op}"
    try:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key):  # noqa: SLF001
            return False
    except RuntimeError:  # the op is not registered at all (a library built before it existed)
        return False
    return True


@contextlib.contextmanager
def quiet_cpp_extension_import():
    """Imports made inside it do not log torch.utils.cpp_extension's import-time warning (on a CUDA
    build of torch without a GPU: "No CUDA runtime is found, using CUDA_HOME=..."). Modules that
    pull it in and have nothing to do with building C++ (torch.utils.benchmark, torch._inductor)
    are imported in it, so that a CPU user sees no CUDA noise."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def library_path() -> str | None:
    """The path of the compiled library (``fastnn/_C*.so``), or None where it is not built or failed
    to load (:func:`error` says why). A process without fastnn's Python loads fastnn's ops with
    ``torch.ops.load_library(path)``: an exported or AOT-compiled model that calls them needs it."""
    module = load()
    return None if module is None else os.path.realpath(module.__file__)


def info() -> dict:
    """A summary for bug reports and the benchmark header."""
    return {
        "extension": available(),
        "extension_error": error(),
        "cuda_kernels": built_with_cuda(),
        "cpu_isa": _cpu_isa("cpu_isa"),
        "int8_cpu_isa": _cpu_isa("quantized_isa"),
        "library_path": library_path(),
        "torch": torch.__version__,
    }


def _cpu_isa(op: str) -> str | None:
    """The CPU instruction-set level of the compiled CPU kernels (``cpu_isa``), or the variant of the
    int8 kernels it implies (``quantized_isa``), both chosen at run time; None without them."""
    if not available():
        return None
    try:
        return getattr(torch.ops.fastnn, op)()
    except (AttributeError, RuntimeError):
        return None
    except ValueError as exc:  # FASTNN_CPU_ISA names a level this CPU cannot run: say so, don't raise
        return f"none: {exc}"
