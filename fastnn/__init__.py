"""fastnn: fused Triton and CUDA kernels behind drop-in torch.nn / torch.optim replacements.

Families: optimizers (``fastnn.optim``), recurrent layers (``fastnn.LSTM`` ...), Mixture of
Experts (``fastnn.MoE``, ``fastnn.distributed.ExpertParallelMoE``) and int8 inference
(``fastnn.quantize_dynamic``, ``fastnn.quantized``). Ops live in ``fastnn.ops``
(each choosing its backend per call, see ``fastnn.backends``); their pure-PyTorch references in
``fastnn.reference``. ``fastnn.build_info()`` says what the compiled library provides here.
"""

from . import backends, ops, optim, quantized
from ._extension import info as build_info
from ._extension import library_path
from .convert import convert, revert
from .nn import GRU, LSTM, RNN, GRUCell, LSTMCell, MoE, RNNCell
from .quantized import dequantize, quantize_dynamic

__version__ = "0.1.0"

__all__ = ["backends", "ops", "optim", "convert", "revert", "build_info", "library_path", "__version__", "distributed",
           "LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "MoE", "quantized", "quantize_dynamic",
           "dequantize"]


def __getattr__(name: str):
    # fastnn.distributed imports torch.distributed, fastnn.onnx onnxscript and fastnn.aoti
    # torch._inductor, which `import fastnn` does not pay for: they load on first access (the export
    # modules are left out of __all__, so that a star import does not load them either).
    if name in ("distributed", "onnx", "aoti"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastnn' has no attribute {name!r}")
