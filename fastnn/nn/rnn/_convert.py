"""fastnn.convert / fastnn.revert for the recurrent modules: the same object state under the other
class, so parameters (and any optimizer holding them) are kept as they are."""

from __future__ import annotations

import warnings

from torch import nn

from ...convert_registry import Conversion, register
from ._cells import GRUCell, LSTMCell, RNNCell
from ._layers import GRU, LSTM, RNN, _RecurrentBase

_EXTRA = ("recurrent_dropout", "forget_bias", "layer_norm")


def _retype(module: nn.Module, cls: type) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def _to_fastnn(cls: type):
    def convert(module: nn.Module) -> nn.Module:
        new = _retype(module, cls)
        if issubclass(cls, _RecurrentBase):
            new.recurrent_dropout = 0.0
            new.layer_norm = False
            if cls is LSTM:
                new.forget_bias = None
        return new
    return convert


def _to_torch(cls: type):
    def revert(module: nn.Module) -> nn.Module:
        if getattr(module, "layer_norm", False):
            raise ValueError(f"fastnn.revert: {type(module).__name__}(layer_norm=True) has no torch.nn counterpart")
        if getattr(module, "recurrent_dropout", 0.0):
            warnings.warn(f"fastnn.revert: {type(module).__name__} had recurrent_dropout="
                          f"{module.recurrent_dropout}, which torch.nn.{cls.__name__} does not have; "
                          "training will run without it", UserWarning, stacklevel=3)
        new = _retype(module, cls)
        for k in _EXTRA:
            new.__dict__.pop(k, None)
        return new
    return revert


for _torch_cls, _fastnn_cls in [(nn.LSTM, LSTM), (nn.GRU, GRU), (nn.RNN, RNN), (nn.LSTMCell, LSTMCell),
                                (nn.GRUCell, GRUCell), (nn.RNNCell, RNNCell)]:
    register(Conversion(
        name=_torch_cls.__name__,
        matches=(lambda c: lambda m: type(m) is c)(_torch_cls),
        to_fastnn=_to_fastnn(_fastnn_cls),
        fastnn_type=_fastnn_cls,
        to_original=_to_torch(_torch_cls),
        explain=(lambda c: lambda m: f"a subclass of torch.nn.{c.__name__} (its forward may differ), not converted"
                 if isinstance(m, c) and type(m) is not c else None)(_torch_cls),
    ))
