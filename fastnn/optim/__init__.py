"""Drop-in replacements for ``torch.optim.Adam``, ``AdamW`` and ``SGD`` with fused multi-tensor
steps (one kernel launch for the whole model on CUDA; a vectorised, parallel C++ kernel on the
CPU; Triton and pure-PyTorch fallbacks). DTensor parameters (``fully_shard``, tensor-parallel
placements) are stepped through their local shards in the same fused step, with torch's DTensor
state, and ``max_grad_norm`` clips by the norm of the whole model across the ranks."""

from .adam import Adam, AdamW
from .sgd import SGD

__all__ = ["Adam", "AdamW", "SGD"]
