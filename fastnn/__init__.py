"""fastnn: fused Triton and CUDA kernels behind drop-in torch.nn / torch.optim replacements.

Families (DESIGN.md): optimizers (``fastnn.optim``), recurrent layers (``fastnn.LSTM`` ...),
Mixture of Experts (``fastnn.MoE``) and quantized edge inference. Ops live in ``fastnn.ops`` (each
choosing its backend per call, see ``fastnn.backends``); their pure-PyTorch references in
``fastnn.reference``.
"""

from . import backends, ops, optim
from ._extension import info as build_info
from .convert import convert, revert
from .nn import GRU, LSTM, RNN, GRUCell, LSTMCell, MoE, RNNCell

__version__ = "0.1.0"

__all__ = ["backends", "ops", "optim", "convert", "revert", "build_info", "__version__",
           "LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "MoE"]
