"""``quantize_dynamic`` and ``dequantize``: swap float layers for their int8 counterparts and back."""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
from torch import nn

from .modules import GRU, LSTM, RNN, GRUCell, Linear, LSTMCell, RNNCell

__all__ = ["quantize_dynamic", "dequantize", "default_mapping"]


def default_mapping() -> dict[type, type]:
    """Float module type -> quantized module type (exact types, as torch's mapping: a subclass of
    nn.Linear such as MultiheadAttention's out_proj is not swapped)."""
    from ..nn import rnn as fnn  # fastnn's float layers (imported here: fastnn.nn is not needed to import this)
    table = {nn.Linear: Linear, nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell,
             nn.RNNCell: RNNCell, fnn.LSTM: LSTM, fnn.GRU: GRU, fnn.RNN: RNN, fnn.LSTMCell: LSTMCell,
             fnn.GRUCell: GRUCell, fnn.RNNCell: RNNCell}
    table.update(_moe_mapping())
    return table


def _moe_mapping() -> dict[type, type]:
    """fastnn.MoE and the Hugging Face blocks fastnn.convert made into one (one class per family)."""
    from ..integrations.hf_moe import HuggingFaceMoE  # does not import transformers
    from ..nn.moe import MoE as FloatMoE
    from .moe import MoE
    return {cls: MoE for cls in (FloatMoE, *HuggingFaceMoE.__subclasses__())}


def _spec(qconfig_spec: Any, mapping: dict) -> tuple[dict, dict]:
    """({type: selected}, {submodule name: selected}) from ``qconfig_spec``: a set/list of types
    and/or submodule names (each selects), or a dict whose keys are those (a value other than None
    selects; None deselects, as a None qconfig does in torch)."""
    if qconfig_spec is None:
        return {t: True for t in mapping}, {}
    if isinstance(qconfig_spec, dict):
        items = [(k, v is not None) for k, v in qconfig_spec.items()]
        for k, v in qconfig_spec.items():
            _refuse_float16(v)
    elif isinstance(qconfig_spec, (set, frozenset, list, tuple)):
        items = [(k, True) for k in qconfig_spec]
    else:
        raise TypeError("fastnn: argument 'quantize_dynamic: qconfig_spec': expected None, a set of module types "
                        f"and/or submodule names, or a dict of them, got {type(qconfig_spec).__name__}")
    types, names = {}, {}
    for k, selected in items:
        if isinstance(k, type):
            types[k] = selected
        elif isinstance(k, str):
            names[k] = selected
        else:
            raise TypeError("fastnn: argument 'quantize_dynamic: qconfig_spec': expected module types or submodule "
                            f"names as keys, got {k!r}")
    return types, names


_FLOAT16_UNSUPPORTED = ("float16 weight-only quantization is not supported yet; weight_only=True keeps int8 weights "
                        "with fp32 activations")


def _refuse_float16(qconfig: Any) -> None:
    """A float16 qconfig (torch.ao.quantization.float16_dynamic_qconfig) asks for fp16 weights, which
    fastnn does not make: refuse it as dtype=torch.float16 is refused, rather than giving int8."""
    weight = getattr(qconfig, "weight", None)
    try:
        dtype = weight().dtype if callable(weight) else None
    except Exception:  # a qconfig whose observer cannot be built without arguments: not float16's
        dtype = None
    if dtype == torch.float16:
        raise NotImplementedError(f"fastnn: argument 'quantize_dynamic: qconfig_spec': {_FLOAT16_UNSUPPORTED}; got a "
                                  "float16 qconfig")


def _replace(parent: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    """``parent.name = new``, keeping ``old``'s forward hooks and pre-hooks (as torch's swap does)."""
    if new is not old:
        for hook in old._forward_pre_hooks.values():
            new.register_forward_pre_hook(hook)
        for hook in old._forward_hooks.values():
            new.register_forward_hook(hook)
    if parent is not None:
        setattr(parent, name, new)


def _swap(model: nn.Module, pick, make) -> tuple[nn.Module, int]:
    """Replace every module that ``pick(name, mod, inherited)`` selects by ``make(mod)``, not
    descending into those. ``pick`` returns (replace?, what the module's children inherit)."""
    count = 0

    def visit(parent: Optional[nn.Module], name: str, full: str, mod: nn.Module, inherited: Any) -> nn.Module:
        nonlocal count
        replace, passed = pick(full, mod, inherited)
        if replace:
            new = make(mod)
            _replace(parent, name, mod, new)
            count += 1
            return new
        for child_name, child in list(mod.named_children()):
            visit(mod, child_name, (full + "." if full else "") + child_name, child, passed)
        return mod

    model = visit(None, "", "", model, False)
    return model, count


def quantize_dynamic(model: nn.Module, qconfig_spec: Any = None, dtype: torch.dtype = torch.qint8,
                     mapping: Optional[dict] = None, inplace: bool = False, *,
                     weight_only: bool = False) -> nn.Module:
    """Dynamic int8 quantization with the signature and selection rules of
    ``torch.ao.quantization.quantize_dynamic``, including fastnn's recurrent layers.

    ``qconfig_spec``: None (every type in the mapping: nn.Linear, nn.LSTM, nn.GRU, nn.RNN, the three
    cells, their fastnn.nn counterparts and fastnn.MoE, including the Hugging Face MoE blocks that
    fastnn.convert converted: their experts), a set of module types and/or submodule names, or a dict with those keys:
    as in torch, a module takes its name's entry, else its type's, else its parent's, and a None
    value deselects (the qconfig itself is not read, the scheme is fastnn's, see
    fastnn.reference.quantized; a float16 qconfig is refused as dtype=torch.float16 is). ``dtype``: torch.qint8 only (float16 weights are not supported yet).
    ``mapping`` extends/overrides :func:`default_mapping`. ``inplace=False`` quantizes a deep copy.
    ``weight_only=True`` keeps activations in fp32 (int8 weights dequantized in the kernel).

    A model with nothing to quantize comes back unchanged, with a warning. Layers the kernels do not
    cover yet (fastnn's ``layer_norm``) raise NotImplementedError naming them.
    """
    if dtype == torch.float16:
        raise NotImplementedError(f"fastnn: argument 'quantize_dynamic: dtype': expected torch.qint8 "
                                  f"({_FLOAT16_UNSUPPORTED}), got torch.float16")
    if dtype != torch.qint8:
        raise ValueError(f"fastnn: argument 'quantize_dynamic: dtype': expected torch.qint8, got {dtype}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastnn: argument 'quantize_dynamic: model': expected an nn.Module, got {type(model).__name__}")
    table = default_mapping()
    table.update(mapping or {})
    types, names = _spec(qconfig_spec, table)
    if not inplace:
        model = copy.deepcopy(model)

    def pick(name: str, mod: nn.Module, inherited: bool) -> tuple[bool, bool]:
        # torch's rule: a module takes its type's entry, else its parent's; its own name's entry,
        # None included, overrides both; its children inherit the result.
        selected = names.get(name, types.get(type(mod), inherited))
        return type(mod) in table and selected, selected

    def make(mod: nn.Module) -> nn.Module:
        q = table[type(mod)].from_float(mod, weight_only=weight_only)
        return q.train(mod.training)

    model, count = _swap(model, pick, make)
    if count == 0:
        # Types match exactly, as in torch: name the subclasses of mapped types, the likely surprise.
        near = sorted({type(m).__name__ for m in model.modules()
                       if type(m) not in table and isinstance(m, tuple(table)) and not isinstance(m, _QUANTIZED)})
        hint = (f"; {', '.join(near)} subclass a mapped type, but types match exactly (add them to mapping=)"
                if near else "")
        warnings.warn(f"fastnn.quantize_dynamic: nothing to quantize in {type(model).__name__} (no submodule matched "
                      f"qconfig_spec and the mapping{hint}); the model comes back unchanged", UserWarning, stacklevel=2)
    return model


_QUANTIZED = (Linear, LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell)


def dequantize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every fastnn.quantized module by its float layer (weights ``w_q * scale``, fp32)."""
    if not inplace:
        model = copy.deepcopy(model)
    from .moe import MoE
    quantized = (*_QUANTIZED, MoE)
    model, _ = _swap(model, lambda name, mod, _: (isinstance(mod, quantized), False), lambda mod: mod.to_float())
    return model
