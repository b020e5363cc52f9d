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


def _spec(qconfig_spec: Any, mapping: dict) -> tuple[set, set]:
    """(types, names) selected by ``qconfig_spec``: a set/list of types and/or submodule names, or a
    dict whose keys are those (a None value leaves that key out)."""
    if qconfig_spec is None:
        return set(mapping), set()
    if isinstance(qconfig_spec, dict):
        keys = [k for k, v in qconfig_spec.items() if v is not None]
    elif isinstance(qconfig_spec, (set, frozenset, list, tuple)):
        keys = list(qconfig_spec)
    else:
        raise TypeError("fastnn: argument 'quantize_dynamic: qconfig_spec': expected None, a set of module types "
                        f"and/or submodule names, or a dict of them, got {type(qconfig_spec).__name__}")
    types, names = set(), set()
    for k in keys:
        if isinstance(k, type):
            types.add(k)
        elif isinstance(k, str):
            names.add(k)
        else:
            raise TypeError("fastnn: argument 'quantize_dynamic: qconfig_spec': expected module types or submodule "
                            f"names as keys, got {k!r}")
    return types, names


def _named(name: str, names: set) -> bool:
    return any(name == n or name.startswith(n + ".") or n == "" for n in names)


def _swap(model: nn.Module, pick, make) -> tuple[nn.Module, int]:
    """Replace every module ``pick(name, mod)`` selects by ``make(mod)``, not descending into them."""
    if pick("", model):
        return make(model), 1
    count = 0

    def walk(parent: nn.Module, prefix: str) -> None:
        nonlocal count
        for child_name, child in list(parent.named_children()):
            full = prefix + child_name
            if pick(full, child):
                setattr(parent, child_name, make(child))
                count += 1
            else:
                walk(child, full + ".")

    walk(model, "")
    return model, count


def quantize_dynamic(model: nn.Module, qconfig_spec: Any = None, dtype: torch.dtype = torch.qint8,
                     mapping: Optional[dict] = None, inplace: bool = False, *,
                     weight_only: bool = False) -> nn.Module:
    """Dynamic int8 quantization with the signature and selection rules of
    ``torch.ao.quantization.quantize_dynamic``, including fastnn's recurrent layers.

    ``qconfig_spec``: None (every type in the mapping: nn.Linear, nn.LSTM, nn.GRU, nn.RNN, the three
    cells, their fastnn.nn counterparts and fastnn.MoE, including the Hugging Face MoE blocks that
    fastnn.convert converted: their experts), a set of module types and/or submodule names, or a dict with those keys (values other
    than None select; the qconfig itself is not read: the scheme is fastnn's, see
    fastnn.reference.quantized). ``dtype``: torch.qint8 only (float16 weights are not supported yet).
    ``mapping`` extends/overrides :func:`default_mapping`. ``inplace=False`` quantizes a deep copy.
    ``weight_only=True`` keeps activations in fp32 (int8 weights dequantized in the kernel).

    A model with nothing to quantize comes back unchanged, with a warning. Layers the kernels do not
    cover yet (LSTM ``proj_size``, fastnn ``layer_norm``) raise NotImplementedError naming them.
    """
    if dtype == torch.float16:
        raise NotImplementedError("fastnn: argument 'quantize_dynamic: dtype': expected torch.qint8 (float16 "
                                  "weight-only quantization is not supported yet; weight_only=True keeps int8 "
                                  "weights with fp32 activations), got torch.float16")
    if dtype != torch.qint8:
        raise ValueError(f"fastnn: argument 'quantize_dynamic: dtype': expected torch.qint8, got {dtype}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastnn: argument 'quantize_dynamic: model': expected an nn.Module, got {type(model).__name__}")
    table = default_mapping()
    table.update(mapping or {})
    types, names = _spec(qconfig_spec, table)
    if not inplace:
        model = copy.deepcopy(model)

    def pick(name: str, mod: nn.Module) -> bool:
        return type(mod) in table and (type(mod) in types or _named(name, names))

    def make(mod: nn.Module) -> nn.Module:
        q = table[type(mod)].from_float(mod, weight_only=weight_only)
        return q.train(mod.training)

    model, count = _swap(model, pick, make)
    if count == 0:
        warnings.warn(f"fastnn.quantize_dynamic: nothing to quantize in {type(model).__name__} (no submodule matched "
                      "qconfig_spec and the mapping); the model comes back unchanged", UserWarning, stacklevel=2)
    return model


def dequantize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every fastnn.quantized module by its float layer (weights ``w_q * scale``, fp32)."""
    if not inplace:
        model = copy.deepcopy(model)
    from .moe import MoE
    quantized = (Linear, LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell, MoE)
    model, _ = _swap(model, lambda name, mod: isinstance(mod, quantized), lambda mod: mod.to_float())
    return model
