"""Drop-in replacements for ``torch.optim.Adam``, ``AdamW`` and ``SGD`` with fused multi-tensor
steps (one kernel launch for the whole model on CUDA; a vectorised, parallel C++ kernel on the
CPU; Triton and pure-PyTorch fallbacks)."""

from .adam import Adam, AdamW
from .sgd import SGD

__all__ = ["Adam", "AdamW", "SGD"]
