"""What the recurrent layers and cells share: state checks, autocast and the fastnn repr."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

from ..._checks import fail


def check_state(name: str, t: Tensor, input: Tensor) -> None:
    if t.dtype != input.dtype or t.device != input.device:
        fail(name, f"the dtype and device of 'input' ({input.dtype}, {input.device})", t)


def check_on(weight: Tensor, input: Tensor) -> None:
    if weight.device != input.device:
        fail("input", f"a tensor on the module's device {weight.device}", input)


def autocast_dtype(input: Tensor) -> Optional[torch.dtype]:
    """The dtype torch.autocast runs a recurrent layer in for this input, or None when autocast is
    off for its device. torch lists its recurrent ops (lstm, gru, rnn_tanh/relu and their cells)
    among the lower-precision ones on the CPU and on CUDA: every floating-point operand is cast to
    the autocast dtype, and the outputs come out in it."""
    device = input.device.type
    if device not in ("cpu", "cuda") or not input.is_floating_point() or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """``t`` in ``dtype`` (differentiably), or as it is without a dtype."""
    return t if (t is None or dtype is None or t.dtype == dtype) else t.to(dtype)


def without_autocast(dtype: Optional[torch.dtype], input: Tensor):
    """Once the operands are in autocast's dtype (``dtype`` not None), the ops run on them as they
    are: autocast would otherwise recast the reference's inner products and the ops' own float32
    math."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(input.device.type, enabled=False)


class FastnnRepr(nn.Module):
    """``repr`` names the class as fastnn's (``fastnn.LSTM(...)``), so that a converted model's
    printout shows what runs."""

    def _get_name(self) -> str:
        return "fastnn." + type(self).__name__


DOC_BACKENDS = """Backends: the ops run on fastnn's compiled CPU and CUDA kernels, the Triton cells (LSTM/GRU
cells on CUDA) or the pure-PyTorch reference, chosen per call by ``fastnn.backends``
(``FASTNN_BACKEND`` forces one)."""
