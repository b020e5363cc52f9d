"""Deployment with AOTInductor: a model compiled ahead of time into one package file that runs
without fastnn's Python.

``package(model, example_inputs, path)`` exports a float or quantized model (``fastnn.quantize_dynamic``)
with ``torch.export`` and compiles it with ``torch._inductor.aoti_compile_and_package``. A plain torch
model is accepted too: the layers fastnn supports are converted on a copy (``fastnn.convert``) first,
so a model built from ``nn.LSTM`` / ``nn.GRU`` exports with a dynamic sequence length, which
``torch.export`` cannot give those layers (it specializes the number of steps to a constant).

fastnn's ops stay fastnn's compiled ops in the package: the generated code calls them through
torch's op registry, so a process that runs the package needs fastnn's compiled library, not its
Python::

    import torch
    torch.ops.load_library(path_of_fastnn_C)   # fastnn.library_path() where fastnn is installed
    model = torch._inductor.aoti_load_package("model.pt2")

``load(path)`` does the same from fastnn, after checking that the package was built by this fastnn
version, for this torch and with the int8 instruction set fastnn uses here (the package records
them; see :func:`metadata`).

This module imports ``torch._inductor`` and ``torch.export``; ``import fastnn`` does not import it
(``fastnn.aoti`` loads on first access).
"""

from __future__ import annotations

import json
import os
import platform
import zipfile
from typing import Any, Optional

import torch

from . import _extension

__all__ = ["package", "load", "metadata", "PackageError", "ExportError"]

# Keys of the metadata fastnn stores in a package (torch's aot_inductor.metadata mechanism).
_KEYS = {"fastnn.version": "fastnn version", "fastnn.torch": "torch version",
         "fastnn.int8_cpu_isa": "int8 instruction set"}


class ExportError(RuntimeError):
    """The model (one of its modules, named in the message) cannot be exported."""


class PackageError(RuntimeError):
    """The file is not a loadable fastnn AOTInductor package (the message says why)."""


def _version() -> str:
    from . import __version__
    return __version__


def _build_metadata() -> dict[str, str]:
    # torch's metadata mechanism stores str -> str only; a missing compiled library reads "none"
    isa = _extension.info()["int8_cpu_isa"]
    return {"fastnn.version": _version(), "fastnn.torch": torch.__version__.split("+")[0],
            "fastnn.int8_cpu_isa": str(isa) if isa is not None else "none"}


def _failing_module(exc: BaseException, model: torch.nn.Module) -> Optional[str]:
    """The path (``model.named_modules()`` name) of the innermost module of ``model`` whose forward
    was running when ``exc`` was raised, from the traceback (non-strict export runs the forwards
    as Python), or None."""
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    found: Optional[str] = None
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            owner = tb.tb_frame.f_locals.get("self")
            if owner is not None and id(owner) in names:
                found = names[id(owner)]
            tb = tb.tb_next
        if found is not None:
            return found
        exc = exc.__cause__ or exc.__context__
    return None


def _export(model: torch.nn.Module, example_inputs: tuple, dynamic_shapes: Any = None) -> torch.export.ExportedProgram:
    from .convert import converted_copy

    prepared = converted_copy(model, "aoti.package").eval()  # a package is for inference
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    try:
        # strict=False: the forwards run as Python on fake tensors, so fastnn's backend choice and
        # argument checks run as in eager mode, and a failure's traceback names the module.
        with torch.no_grad():
            return torch.export.export(prepared, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the module's name
        where = _failing_module(exc, prepared)
        if where is None or str(exc).startswith("fastnn: argument"):  # fastnn's own checks name the argument
            raise
        mod = prepared.get_submodule(where) if where else prepared
        label = f"module '{where}'" if where else "the model's own forward"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(
            f"fastnn.aoti.package: torch.export failed in {label} ({type(mod).__module__}.{type(mod).__qualname__}): "
            f"{type(exc).__name__}: {first}\nThat module has no export path: its forward cannot be traced (a Python "
            "branch on a tensor's value, a call outside torch, ...). Rewrite it with torch ops (torch.cond for a "
            "branch) or keep it out of the exported model.") from exc


def package(model: torch.nn.Module, example_inputs: tuple, path: str | os.PathLike,
            dynamic_shapes: Any = None) -> str:
    """Export ``model`` and compile it into an AOTInductor package at ``path`` (a ``.pt2`` file).

    Args:
        model: a float model (torch's layers or fastnn's) or one quantized with
            ``fastnn.quantize_dynamic``. It is not modified: a copy is converted with
            ``fastnn.convert`` (so ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` run on fastnn's ops) and
            put in eval mode.
        example_inputs: the positional arguments of one forward call (a tuple; a single tensor
            is taken as a 1-tuple).
        path: where to write the package.
        dynamic_shapes: as for ``torch.export.export``, e.g. ``({1: torch.export.Dim("T")},)``
            for a batch-first sequence input of any length. Dimensions not named are fixed to
            the example's sizes.

    The package records fastnn's version, the torch version and the int8 instruction set in use
    (:func:`metadata`), which :func:`load` checks. Returns the package's path.

    Raises :class:`ExportError` naming the module whose forward ``torch.export`` cannot trace.
    """
    ep = _export(model, example_inputs, dynamic_shapes)
    with _extension.quiet_cpp_extension_import():
        import torch._inductor
    # check_lowerbound=False: the package's input checks (see load) accept sizes 0 and 1 of a
    # dynamic dimension, which the exported program handles (export only specialises on 0 and 1).
    options = {"aot_inductor.metadata": _build_metadata(), "aot_inductor.check_lowerbound": False}
    return torch._inductor.aoti_compile_and_package(ep, package_path=os.fspath(path), inductor_configs=options)


def _read_zip(path: str, caller: str) -> dict[str, str]:
    """The metadata stored in the package at ``path``; checks every member's CRC first. ``caller``
    is the public function the user called (its name starts every error message)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fastnn.aoti.{caller}: no package file at '{path}'")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if bad is not None:
                raise PackageError(f"fastnn.aoti.{caller}: '{path}' is corrupted (member '{bad}' fails its checksum)")
            found: dict[str, str] = {}
            for name in z.namelist():
                # torch writes the aot_inductor.metadata entries into the compiled model's
                # <hash>.wrapper_metadata.json (and the kernels') under data/aotinductor/
                if "/data/aotinductor/" in name and name.endswith("_metadata.json"):
                    found.update(json.loads(z.read(name)))
            return found
    except PackageError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise PackageError(f"fastnn.aoti.{caller}: '{path}' is not a readable AOTInductor package (truncated or "
                           f"corrupted?): {exc}") from exc


def metadata(path: str | os.PathLike) -> dict[str, str]:
    """What the package at ``path`` records: fastnn's keys (``fastnn.version``, ``fastnn.torch``,
    ``fastnn.int8_cpu_isa``) and torch's (``AOTI_CPU_ISA``, ``AOTI_MACHINE``, ...). Reads the file
    only (nothing is loaded); raises :class:`PackageError` for a truncated or corrupted file."""
    return _read_zip(os.fspath(path), "metadata")


def _check(path: str, meta: dict[str, str]) -> None:
    if "fastnn.version" not in meta:
        raise PackageError(f"fastnn.aoti.load: '{path}' was not built by fastnn.aoti.package (it records no fastnn "
                           "version); load it with torch._inductor.aoti_load_package")
    machine = meta.get("AOTI_MACHINE")
    if machine and machine != platform.machine():
        raise PackageError(f"fastnn.aoti.load: '{path}' was compiled for {machine}, this machine is "
                           f"{platform.machine()}; build the package on (or for) this machine")
    vec = meta.get("AOTI_CPU_ISA")
    if vec:
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list
        runs = {str(isa).upper() for isa in valid_vec_isa_list()}
        if vec not in runs:
            raise PackageError(f"fastnn.aoti.load: '{path}' was compiled for the {vec} instruction set, which this "
                               f"CPU does not run (it runs {sorted(runs) or 'none'}); rebuild the package here")
    here = _build_metadata()
    for key, what in _KEYS.items():
        if meta.get(key) != here[key]:
            hint = ""
            if key == "fastnn.int8_cpu_isa":
                hint = (f" (set FASTNN_CPU_ISA={meta.get(key)} if this CPU runs it, or rebuild the package here)")
            raise PackageError(f"fastnn.aoti.load: '{path}' was built with {what} {meta.get(key)}, but this process "
                               f"runs {what} {here[key]}{hint or '; rebuild the package with this installation'}")


def load(path: str | os.PathLike):
    """Load a package written by :func:`package`; returns a callable taking the same inputs as the
    exported model's forward.

    Checks first, reading the file only, that it is an intact package (:class:`PackageError` for a
    truncated or corrupted file) built by this fastnn version, for this torch version and machine,
    with the int8 instruction set fastnn uses here (:class:`PackageError` saying which differs).
    Turns on the package's input checks (``AOTI_RUNTIME_CHECK_INPUTS=1``, unless set otherwise):
    an input of the wrong shape, dtype or strides raises instead of being read out of bounds.
    """
    path = os.fspath(path)
    meta = _read_zip(path, "load")
    _check(path, meta)
    if _extension.load() is None:
        raise PackageError(f"fastnn.aoti.load: fastnn's compiled library is not available ({_extension.error()}); "
                           "the package calls its ops")
    # A compiled package checks its inputs' shapes, dtypes and strides only when this variable is
    # set when it first runs; without the checks a wrong input reads out of bounds or gives wrong
    # numbers silently. A process that loads a package without fastnn sets it itself.
    os.environ.setdefault("AOTI_RUNTIME_CHECK_INPUTS", "1")
    with _extension.quiet_cpp_extension_import():
        import torch._inductor
    return torch._inductor.aoti_load_package(path)
