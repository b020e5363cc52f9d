"""fastnn's ops, one module per family. Each public op is a fastnn.backends.Op: calling it picks
the backend (reference / cpu / cuda / triton) for the inputs."""

from .optim import adam_step_, grad_norm_clip_coef, sgd_step_

__all__ = ["adam_step_", "sgd_step_", "grad_norm_clip_coef"]
from .moe import grouped_mm, load_balancing_loss, permute_tokens, router_z_loss, routing_entropy, topk_gating, unpermute_tokens  # noqa: E501,F401
