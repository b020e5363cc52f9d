"""Quantized inference: int8 Linear, LSTM, GRU, RNN, their cells and MoE experts for the CPU.

``quantize_dynamic(model)`` swaps float layers for these modules (torch.ao.quantization's signature);
``dequantize(model)`` swaps them back. The ops are in fastnn.ops.quantized, their references (and the
quantization scheme) in fastnn.reference.quantized.
"""

from .convert import default_mapping, dequantize, quantize_dynamic
from .modules import GRU, LSTM, RNN, GRUCell, Linear, LSTMCell, RNNCell
from .moe import Experts, MoE
from . import report  # noqa: E402  (fastnn.quantized.report.compare, as the examples use it)

__all__ = ["quantize_dynamic", "dequantize", "default_mapping", "Linear", "LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell",
           "MoE", "Experts"]
