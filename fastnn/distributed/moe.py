"""``ExpertParallelMoE``: a :class:`fastnn.MoE` whose experts are sharded over a process group.

Every rank keeps the router (and the shared expert) and E / world experts: rank r holds experts
[r * E_local, (r + 1) * E_local). A forward pass on each rank's own tokens:

1. routes them with :func:`fastnn.ops.topk_gating` and permutes them into expert order (the rows
   for each rank's experts are then contiguous);
2. exchanges the per-expert counts, then the rows, with all-to-all;
3. regroups the received rows by local expert, runs the local experts (grouped GEMMs), and sends
   the results back with the reverse all-to-all;
4. combines them with the routing weights (:func:`fastnn.ops.unpermute_tokens`).

The result on each rank equals the single-process layer on that rank's tokens, and gradients
flow through the all-to-alls (``torch.distributed.nn.functional.all_to_all_single``).

The all-to-all split sizes must be known on the host (as for every variable-size all-to-all), so
a forward pass synchronises once with the device to read them; the rest of the layer does not.

Gradients: each rank's expert gradients sum the contributions of every rank's tokens (the
all-to-all's backward brings them home), i.e. they are gradients of the *sum* of the ranks' losses;
the replicated parameters (router, shared expert) get only their own rank's.

With data-parallel engines (measured with gloo on the CPU, 2 and 4 processes):

* FSDP2 (``fully_shard``) on the non-expert parameters is supported: shard the router, the shared
  expert and the surrounding layers as usual, and leave the experts to this layer by passing
  ``ignored_params=set(ep.expert_parameters())`` to every ``fully_shard`` call whose module
  contains it (the root included). FSDP2 averages the gradients it reduces, so before the
  optimizer step divide the expert gradients by the group size (``p.grad.div_(world)`` for ``p``
  in ``expert_parameters()``) to train the mean of the ranks' losses; the result then equals the
  single-process :class:`fastnn.MoE` on the global batch.
* Letting FSDP2 shard the expert weights is not supported (it would treat each rank's different
  experts as one replicated tensor and mix them silently): ``fully_shard`` raises a ValueError
  when it tries to.
* Expert parallelism within FSDP2's mesh (experts sharded over one mesh dimension and FSDP over
  another, as DTensors) is not supported, nor is a DTensor ``gate_up_proj`` / ``down_proj``.
* ``DistributedDataParallel`` would broadcast rank 0's experts to every rank and average the expert
  gradients: exclude the experts with
  ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)`` (not tested).
* ``torch.distributed.checkpoint`` takes the expert weights (plain tensors with the same key on
  every rank) for replicated ones and saves one rank's: not supported; save ``ep.state_dict()`` per
  rank with ``torch.save``. The state_dict names them ``gate_up_proj`` / ``down_proj`` (a
  :class:`fastnn.MoE` names them ``experts.gate_up_proj`` / ``experts.down_proj``).
* fastnn's optimizers clip (``max_grad_norm``) by the whole model's norm: the experts' squared
  norms are summed over the group.

Capacity limits, the auxiliary loss and routing noise are computed on each rank's own tokens (so
they equal the single-process layer run on that rank's tokens, not on the global batch), and the
selection bias has no ``update_selection_bias`` here.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

try:  # the differentiable all-to-all: functional collectives where this torch has them
    from torch.distributed._functional_collectives import all_to_all_single_autograd as _a2a

    def all_to_all_single(out: Tensor, inp: Tensor, out_splits: list, in_splits: list, group=None) -> Tensor:
        res = _a2a(inp, out_splits, in_splits, group if group is not None else dist.group.WORLD)
        return res.wait() if hasattr(res, "wait") else res
except ImportError:  # older torch
    from torch.distributed.nn.functional import all_to_all_single

from .. import ops
from ..nn.moe import MoE
from ..reference.moe import gated_activation

__all__ = ["ExpertParallelMoE"]

Tensor = torch.Tensor
_EXPERT_PARAMS = ("gate_up_proj", "down_proj")

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # older torch
    from torch.distributed._tensor import DTensor


class ExpertParallelMoE(nn.Module):
    """Shard ``moe``'s experts over ``group`` (default: the world). Parameters are copied: the
    router, shared expert and this rank's slice of ``experts.gate_up_proj`` / ``down_proj``."""

    def __init__(self, moe: MoE, group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("fastnn.distributed.ExpertParallelMoE: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        E = moe.num_experts
        if E % self.world:
            raise ValueError(f"fastnn.distributed.ExpertParallelMoE: argument 'moe': expected a number of experts "
                             f"divisible by the group size {self.world}, got {E}")
        self.num_experts, self.top_k, self.hidden_size = E, moe.top_k, moe.hidden_size
        self.local_experts = E // self.world
        self.first_expert = self.rank * self.local_experts
        self.routing = dict(moe.routing)
        self.activation = moe.experts.activation
        self.aux_loss_coef, self.z_loss_coef = moe.aux_loss_coef, moe.z_loss_coef
        self.gate = copy.deepcopy(moe.gate)
        sl = slice(self.first_expert, self.first_expert + self.local_experts)
        self.gate_up_proj = nn.Parameter(moe.experts.gate_up_proj.detach()[sl].clone())
        self.down_proj = nn.Parameter(moe.experts.down_proj.detach()[sl].clone())
        self.shared_expert = copy.deepcopy(moe.shared_expert)
        self.shared_expert_gate = copy.deepcopy(moe.shared_expert_gate)
        if moe.e_score_correction_bias is not None:
            self.register_buffer("e_score_correction_bias", moe.e_score_correction_bias.detach().clone())
        else:
            self.e_score_correction_bias = None
        self.aux_loss: Optional[Tensor] = None
        # Each rank holds other experts: a whole-model gradient norm (fastnn.optim's max_grad_norm)
        # sums their squares over the group instead of counting this rank's alone.
        for p in (self.gate_up_proj, self.down_proj):
            p._fastnn_norm_group = group if group is not None else dist.group.WORLD

    def expert_parameters(self) -> list[nn.Parameter]:
        """This rank's expert weights (``gate_up_proj``, ``down_proj``): each rank holds different
        ones, so a data-parallel engine must leave them alone (see the module docstring)."""
        return [self.gate_up_proj, self.down_proj]

    def __setattr__(self, name: str, value) -> None:
        # FSDP2 registers its sharded parameters with setattr when the module defines __setattr__:
        # the one place to refuse to let it treat the rank's own experts as a replicated tensor.
        if name in _EXPERT_PARAMS and isinstance(value, DTensor):
            raise ValueError(
                f"fastnn: argument 'ExpertParallelMoE: {name}': expected this rank's own experts, not sharded "
                f"by a data-parallel engine, got a DTensor (fully_shard must skip the expert weights: pass "
                f"ignored_params=set(ep.expert_parameters()) to every fully_shard call whose module contains "
                f"the layer)")
        super().__setattr__(name, value)

    def forward(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        logits = self.gate(x)
        g = ops.topk_gating(logits, self.top_k, selection_bias=self.e_score_correction_bias, **self.routing)
        xs = ops.permute_tokens(x, g.sorted_slots, self.top_k)
        kept = int(g.tokens_per_expert.sum())  # the one host synchronisation (split sizes)
        xs = xs[:kept]  # rows past the kept ones are dropped slots: nobody computes them
        # Counts per (destination rank, its local expert), exchanged so that each rank learns what
        # it receives from every source.
        send_counts = g.tokens_per_expert.view(self.world, self.local_experts)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)
        send_split = send_counts.sum(1).tolist()
        recv_counts_host = recv_counts.cpu()
        recv_split = recv_counts_host.sum(1).tolist()
        recv = all_to_all_single(xs.new_empty((sum(recv_split), self.hidden_size)), xs, recv_split, send_split,
                                 group=self.group)
        # Received rows come grouped by source rank, then local expert: regroup by local expert.
        local_e = torch.repeat_interleave(torch.arange(self.local_experts).repeat(self.world),
                                          recv_counts_host.flatten()).to(x.device)
        order = torch.sort(local_e, stable=True).indices
        offsets = torch.cumsum(recv_counts.sum(0), 0)
        h = ops.grouped_mm(recv.index_select(0, order), self.gate_up_proj, offsets, trans_b=True)
        y_sorted = ops.grouped_mm(gated_activation(h, self.activation), self.down_proj, offsets, trans_b=True)
        y_recv = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
        y = all_to_all_single(y_recv.new_empty((kept, self.hidden_size)), y_recv, send_split, recv_split,
                              group=self.group)
        y = torch.cat([y, y.new_zeros((x.shape[0] * self.top_k - kept, self.hidden_size))])
        out = ops.unpermute_tokens(y, g.slot_positions, g.weights)
        if self.shared_expert is not None:
            s = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(x)) * s
            out = out + s
        aux = logits.new_zeros((), dtype=torch.float32)
        if self.aux_loss_coef:
            aux = aux + self.aux_loss_coef * ops.load_balancing_loss(logits, g.tokens_per_expert,
                                                                     self.routing["score_func"])
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * ops.router_z_loss(logits)
        self.aux_loss = aux
        return out.reshape(shape)

