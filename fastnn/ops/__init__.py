"""fastnn's ops, one module per family. Each public op is a fastnn.backends.Op: calling it picks
the backend (reference / cpu / cuda / triton) for the inputs."""

from .moe import (grouped_mm, load_balancing_loss, permute_tokens, router_z_loss, routing_entropy, topk_gating,
                  unpermute_tokens)
from .optim import adam_step_, grad_norm_clip_coef, sgd_step_
from .rnn import gru_cell, gru_seq, lstm_cell, lstm_seq, rnn_seq

__all__ = ["adam_step_", "sgd_step_", "grad_norm_clip_coef",
           "lstm_seq", "gru_seq", "rnn_seq", "lstm_cell", "gru_cell",
           "topk_gating", "permute_tokens", "unpermute_tokens", "grouped_mm", "load_balancing_loss", "router_z_loss",
           "routing_entropy"]
