"""Pure-PyTorch Mixture-of-Experts ops with the exact signatures of the ``fastnn::`` MoE ops.

They are the test oracle, the benchmark's "torch" path and the fallback of last resort. None of
them synchronises with the host: routing metadata stays on the tensors' device, so they also run
under CUDA graphs and ``torch.compile(fullgraph=True)``.

Routing conventions shared by every backend:

* ``logits`` [T, E] in any float dtype; scores and weights are computed in float32 (float64 for
  float64 logits, so that gradcheck works).
* Selection ranks experts by score (+ ``selection_bias``), ties broken toward the lower expert index.
* NaN: a NaN selection score ranks as -inf (last; among equals the lower index first), for experts
  and for groups alike, so a NaN never steers routing and every backend picks the same experts.
  The weights then follow IEEE arithmetic as torch's softmax / sigmoid do: with ``softmax`` and
  ``topk_softmax`` a NaN anywhere in a token's logits (or a softmax that is itself undefined: a
  +inf logit, or all chosen logits -inf) makes every kept weight of that token NaN, so the bad
  token is visible downstream; with ``sigmoid`` only a chosen NaN score is NaN (and, with
  ``renormalize``, the whole token through the sum). Dropped slots always weigh 0.
* A *slot* is one (token, choice) pair, flat index ``s = t * top_k + j``. ``expert_ids[t, j]`` is the
  expert that processes slot s, or -1 when capacity dropped it (its weight is 0).
* ``capacity_factor``: each expert accepts ``expert_capacity`` slots; 0, ``inf``, or a factor so large
  that the capacity reaches T * k (where nothing can be dropped) mean no limit.
* ``sorted_slots`` [T*k] lists the kept slots grouped by expert (expert 0 first), in slot order
  within an expert, followed by the dropped slots in slot order. ``slot_positions`` [T, k] is its
  inverse: the row of slot (t, j) in the permuted buffer. Both are permutations of [0, T*k): the ops
  that take them (and their backward) check this on CPU tensors; on CUDA the kernels guard every
  index (no out-of-bounds access) but do not check that it is a permutation, which would
  synchronise with the host. ``tokens_per_expert`` [E] counts the kept slots, so rows
  ``[0, tokens_per_expert.sum())`` are the ones the experts compute.
* ``renormalize`` divides a token's weights by their sum over the experts that process it (dropped
  slots excluded); ``routed_scaling_factor`` multiplies the result.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "SCORE_FUNCS", "GROUP_SCORES", "DROP_POLICIES", "GatingOutput", "topk_gating", "topk_gating_backward",
    "expert_capacity", "permute_tokens", "unpermute_tokens", "unpermute_tokens_backward", "grouped_mm",
    "grouped_mm_backward", "load_balancing_loss", "router_z_loss", "routing_entropy", "moe_mlp",
    "ACTIVATIONS", "gated_activation",
]

Tensor = torch.Tensor

# softmax: softmax over all experts, then top-k (Mixtral, Qwen, OLMoE). topk_softmax: top-k of the
# logits, then softmax over the chosen ones (the original Mixtral code; renormalised by definition).
# sigmoid: independent sigmoid scores (DeepSeek-V3).
SCORE_FUNCS = ("softmax", "topk_softmax", "sigmoid")
# How a group of experts is scored for grouped routing: its best expert (DeepSeek-V2) or the sum
# of its two best (DeepSeek-V3).
GROUP_SCORES = ("max", "top2_sum")
DROP_POLICIES = ("drop", "next_choice")


class GatingOutput(NamedTuple):
    weights: Tensor            # [T, k] float32 (float64 for float64 logits)
    expert_ids: Tensor         # [T, k] int64, -1 where capacity dropped the slot
    tokens_per_expert: Tensor  # [E] int64, kept slots per expert
    sorted_slots: Tensor       # [T*k] int64
    slot_positions: Tensor     # [T, k] int64


def _opmath(t: Tensor) -> Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots each expert accepts: ceil(capacity_factor * T * k / E), at least 1 (GShard / Switch).

    0 means unlimited: for ``capacity_factor`` 0, for ``inf``, and for any factor whose capacity
    reaches T * k (no expert can then be over-full, so no slot is ever dropped)."""
    if not capacity_factor > 0:
        return 0
    slots = num_tokens * top_k
    cap = capacity_factor * slots / num_experts
    if not math.isfinite(cap):
        return 0
    cap = max(1, math.ceil(cap))
    return 0 if cap >= slots else cap


def _scores(logits: Tensor, score_func: str) -> Tensor:
    x = _opmath(logits)
    if score_func == "softmax":
        return torch.softmax(x, dim=-1)
    if score_func == "sigmoid":
        return torch.sigmoid(x)
    return x  # topk_softmax ranks the logits themselves


def _ranking(logits: Tensor, score_func: str, selection_bias: Optional[Tensor], num_groups: int,
             topk_groups: int, group_score: str) -> tuple[Tensor, Tensor]:
    """Every expert of every token in preference order [T, E], and how many are eligible [T]
    (grouped routing makes the experts of unchosen groups ineligible)."""
    T, E = logits.shape
    sel = _scores(logits, score_func).detach()
    if selection_bias is not None:
        sel = sel + selection_bias.to(sel.dtype)
    sel = sel.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    eligible = torch.full((T,), E, dtype=torch.int64, device=logits.device)
    if num_groups > 1:
        g = sel.view(T, num_groups, E // num_groups)
        if group_score == "max":
            gs = g.max(dim=-1).values
        else:
            top2 = torch.sort(g, dim=-1, descending=True, stable=True).values[..., :2]
            gs = top2.sum(dim=-1)
        gs = gs.nan_to_num(nan=float("-inf"))
        chosen = torch.sort(gs, dim=-1, descending=True, stable=True).indices[:, :topk_groups]
        keep = torch.zeros(T, num_groups, dtype=torch.bool, device=logits.device)
        keep.scatter_(1, chosen, True)
        keep = keep.repeat_interleave(E // num_groups, dim=1)
        # Ineligible experts rank after every eligible one (also after eligible -inf scores).
        order = torch.sort(torch.where(keep, sel, float("-inf")), dim=-1, descending=True, stable=True).indices
        rank_key = (~keep).gather(1, order).to(torch.int64)  # 0 eligible, 1 not
        order = order.gather(1, torch.sort(rank_key, dim=-1, stable=True).indices)
        eligible = eligible.fill_(topk_groups * (E // num_groups))
        return order, eligible
    return torch.sort(sel, dim=-1, descending=True, stable=True).indices, eligible


def _apply_capacity(ranking: Tensor, eligible: Tensor, top_k: int, num_experts: int, capacity: int,
                    drop_policy: str) -> Tensor:
    """expert_ids [T, k] after capacity: -1 for dropped slots.

    Priority: first choices of every token (in token order), then second choices, and so on.
    ``next_choice`` sends a slot rejected by a full expert to the token's next eligible expert in
    preference order, in rounds: round r offers every slot rejected in round r-1 its next candidate
    (the i-th rejected slot of a token, in choice order, takes the token's i-th unused candidate),
    experts fill in priority order, and a slot without candidates left is dropped.
    """
    T = ranking.shape[0]
    device = ranking.device
    ids = ranking[:, :top_k].clone()
    if capacity <= 0 or T == 0:
        return ids
    prio = torch.arange(top_k, device=device).view(1, -1) * T + torch.arange(T, device=device).view(-1, 1)
    fill = torch.zeros(num_experts, dtype=torch.int64, device=device)
    pending = torch.ones_like(ids, dtype=torch.bool)
    accepted = torch.zeros_like(ids, dtype=torch.bool)
    used = torch.full((T,), top_k, dtype=torch.int64, device=device)  # candidates consumed per token
    rounds = 1 if drop_policy == "drop" else num_experts - top_k + 1
    for r in range(rounds):
        if r > 0:
            # Next candidate for each pending slot: the i-th pending slot of a token takes
            # ranking[t, used_t + i]; beyond the eligible experts it is dropped.
            i = torch.cumsum(pending.to(torch.int64), dim=1) - 1
            cand = used.view(-1, 1) + i
            ok = pending & (cand < eligible.view(-1, 1))
            ids = torch.where(pending, ranking.gather(1, cand.clamp(max=ranking.shape[1] - 1)), ids)
            used = used + pending.sum(dim=1)
            pending = ok
        # Position of each pending slot in its expert: fill so far + rank among pending slots of
        # the same expert in priority order.
        flat_e = torch.where(pending, ids, num_experts).flatten()
        flat_p = prio.flatten()
        key = flat_e * (T * top_k) + flat_p
        order = torch.argsort(key)
        e_sorted = flat_e[order]
        counts = torch.bincount(e_sorted, minlength=num_experts + 1)
        starts = torch.cumsum(counts, 0) - counts
        rank_sorted = torch.arange(e_sorted.numel(), device=device) - starts[e_sorted]
        rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted).view(T, top_k)
        fill_ext = torch.cat([fill, fill.new_zeros(1)])
        pos = fill_ext[torch.where(pending, ids, num_experts)] + rank
        ok = pending & (pos < capacity)
        accepted = accepted | ok
        fill = fill + torch.bincount(torch.where(ok, ids, num_experts).flatten(), minlength=num_experts + 1)[:-1]
        pending = pending & ~ok
    return torch.where(accepted, ids, -1)


def _weights(logits: Tensor, expert_ids: Tensor, score_func: str, renormalize: bool,
             routed_scaling_factor: float) -> Tensor:
    """Differentiable weights [T, k] of the kept slots (0 for dropped ones)."""
    x = _opmath(logits)
    kept = expert_ids >= 0
    idx = expert_ids.clamp(min=0)
    if score_func == "topk_softmax":
        chosen = x.gather(1, idx).masked_fill(~kept, float("-inf"))
        w = torch.softmax(chosen, dim=-1) if x.shape[0] else chosen
        # A token whose every slot was dropped has all -inf (softmax NaN): its slots weigh 0.
        w = torch.where(kept, w, 0.0)
        nan_row = x.isnan().any(dim=-1, keepdim=True)
        w = torch.where(nan_row & kept, float("nan"), w)
    else:
        a = torch.softmax(x, dim=-1) if score_func == "softmax" else torch.sigmoid(x)
        w = torch.where(kept, a.gather(1, idx), 0.0)
        if renormalize:
            eps = 1e-20 if score_func == "sigmoid" else 0.0  # DeepSeek-V3 adds 1e-20
            denom = w.sum(dim=-1, keepdim=True) + eps
            w = torch.where(kept, w / torch.where(denom == 0, 1.0, denom), 0.0)
    return w * routed_scaling_factor if routed_scaling_factor != 1.0 else w


def _layout(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """tokens_per_expert, sorted_slots, slot_positions for expert_ids [T, k] (-1 = dropped)."""
    T, k = expert_ids.shape
    flat = expert_ids.flatten()
    key = torch.where(flat >= 0, flat, num_experts)
    # Stable sort by expert keeps slot order within an expert; dropped slots (key E) go last.
    sorted_slots = torch.sort(key, stable=True).indices
    slot_positions = torch.empty_like(sorted_slots)
    slot_positions[sorted_slots] = torch.arange(T * k, device=flat.device)
    tokens_per_expert = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    return tokens_per_expert, sorted_slots, slot_positions.view(T, k)


def topk_gating(logits: Tensor, top_k: int, score_func: str = "softmax", renormalize: bool = True,
                selection_bias: Optional[Tensor] = None, num_groups: int = 1, topk_groups: int = 1,
                group_score: str = "max", routed_scaling_factor: float = 1.0, capacity_factor: float = 0.0,
                drop_policy: str = "drop") -> GatingOutput:
    """Route each token of ``logits`` [T, E] to ``top_k`` experts (see the module docstring).

    The weights are differentiable with respect to ``logits`` (plain autograd here; the compiled
    ops use :func:`topk_gating_backward`).
    """
    T, E = logits.shape
    ranking, eligible = _ranking(logits, score_func, selection_bias, num_groups, topk_groups, group_score)
    capacity = expert_capacity(T, E, top_k, capacity_factor)
    expert_ids = _apply_capacity(ranking, eligible, top_k, E, capacity, drop_policy)
    weights = _weights(logits, expert_ids, score_func, renormalize, routed_scaling_factor)
    tokens_per_expert, sorted_slots, slot_positions = _layout(expert_ids, E)
    return GatingOutput(weights, expert_ids, tokens_per_expert, sorted_slots, slot_positions)


def topk_gating_backward(grad_weights: Tensor, logits: Tensor, expert_ids: Tensor, score_func: str,
                         renormalize: bool, routed_scaling_factor: float) -> Tensor:
    """d loss / d logits [T, E] given d loss / d weights [T, k] (closed form; the routing is fixed).

    With a = per-expert scores (softmax or sigmoid), S the kept experts of a token and
    D = sum_S a (1 without renormalisation): w_j = c * a[e_j] / D, so
    dL/da_m = c/D * (g at m) - [renormalize] * c/D^2 * sum_j g_j a[e_j], and dL/dlogits follows
    from the softmax or sigmoid Jacobian. topk_softmax is the renormalised case with a = exp(logits).
    """
    x = _opmath(logits)
    g = _opmath(grad_weights) * routed_scaling_factor
    kept = expert_ids >= 0
    idx = expert_ids.clamp(min=0)
    g = torch.where(kept, g, 0.0)
    if score_func == "topk_softmax":
        chosen = x.gather(1, idx).masked_fill(~kept, float("-inf"))
        q = torch.where(kept, torch.softmax(chosen, dim=-1), 0.0) if x.shape[0] else chosen
        gq = q * (g - (g * q).sum(dim=-1, keepdim=True))
        return torch.zeros_like(x).scatter_add_(1, idx, torch.where(kept, gq, 0.0))
    a = torch.softmax(x, dim=-1) if score_func == "softmax" else torch.sigmoid(x)
    a_sel = torch.where(kept, a.gather(1, idx), 0.0)
    if renormalize:
        eps = 1e-20 if score_func == "sigmoid" else 0.0
        denom = a_sel.sum(dim=-1, keepdim=True) + eps
        denom = torch.where(denom == 0, 1.0, denom)
        grad_sel = g / denom - (g * a_sel).sum(dim=-1, keepdim=True) / (denom * denom)
    else:
        grad_sel = g
    grad_a = torch.zeros_like(x).scatter_add_(1, idx, torch.where(kept, grad_sel, 0.0))
    if score_func == "softmax":
        return a * (grad_a - (grad_a * a).sum(dim=-1, keepdim=True))
    return grad_a * a * (1 - a)


# ---------------------------------------------------------------------------------------------
# Token permutation.

def permute_tokens(x: Tensor, sorted_slots: Tensor, top_k: int) -> Tensor:
    """Rows of ``x`` [T, H] in expert order: out[p] = x[sorted_slots[p] // top_k], [T*k, H]."""
    return x.index_select(0, torch.div(sorted_slots, top_k, rounding_mode="floor"))


def unpermute_tokens(y: Tensor, slot_positions: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Weighted combine back to token order: out[t] = sum_j w[t, j] * y[slot_positions[t, j]].

    Accumulates in float32 (float64 for float64 ``y``) and returns ``y``'s dtype; without weights it
    sums (the backward of :func:`permute_tokens`).
    """
    T, k = slot_positions.shape
    rows = _opmath(y).index_select(0, slot_positions.flatten()).view(T, k, y.shape[-1])
    if weights is not None:
        rows = rows * _opmath(weights).unsqueeze(-1)
    return rows.sum(dim=1).to(y.dtype)


def unpermute_tokens_backward(grad_out: Tensor, y: Tensor, slot_positions: Tensor, weights: Optional[Tensor],
                              sorted_slots: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """(d y [T*k, H], d weights [T, k] or None) of :func:`unpermute_tokens`."""
    T, k = slot_positions.shape
    g = _opmath(grad_out)
    tok = torch.div(sorted_slots, k, rounding_mode="floor")
    grad_rows = g.index_select(0, tok)  # row p belongs to token sorted_slots[p] // k
    grad_w = None
    if weights is not None:
        w_sorted = _opmath(weights).flatten().index_select(0, sorted_slots)
        grad_rows = grad_rows * w_sorted.unsqueeze(-1)
        rows = _opmath(y).index_select(0, slot_positions.flatten()).view(T, k, -1)
        grad_w = (rows * g.unsqueeze(1)).sum(dim=-1).to(weights.dtype)
    return grad_rows.to(y.dtype), grad_w


# ---------------------------------------------------------------------------------------------
# Grouped GEMM.

def _row_expert(offsets: Tensor, m: int) -> Tensor:
    """Expert of each row [m]; rows at or past offsets[-1] get E (no expert)."""
    rows = torch.arange(m, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets, rows, right=True)


def _expert_mat(b: Tensor, e: int, trans_b: bool) -> Tensor:
    """B_e as [K, N] in the computation dtype."""
    w = _opmath(b[e])
    return w.t() if trans_b else w


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool = False) -> Tensor:
    """out[r] = a[r] @ B_e for the rows r of group e, ``offsets`` [E] the cumulative row ends.

    ``b`` is [E, K, N], or [E, N, K] with ``trans_b`` (the Hugging Face / nn.Linear layout). Rows at
    or past ``offsets[-1]`` are zero. Accumulates in float32 and returns ``a``'s dtype.

    The reference multiplies every row by every expert and keeps the row's own expert: E times the
    work of the real thing, but exact and free of host synchronisation.
    """
    M = a.shape[0]
    E = b.shape[0]
    N = b.shape[1] if trans_b else b.shape[2]
    e = _row_expert(offsets, M).unsqueeze(-1)
    x = _opmath(a)
    out = x.new_zeros(M, N)
    for i in range(E):
        out = torch.where(e == i, x @ _expert_mat(b, i, trans_b), out)
    return out.to(a.dtype)


def grouped_mm_backward(grad_out: Tensor, a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool,
                        need_a: bool = True, need_b: bool = True) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(d a, d b) of :func:`grouped_mm`. dA = dY @ B_e^T per group; dB_e = A_e^T @ dY_e (or its
    transpose with ``trans_b``); an expert with no rows gets a zero gradient."""
    M = a.shape[0]
    E = b.shape[0]
    e = _row_expert(offsets, M).unsqueeze(-1)
    g = _opmath(grad_out)
    x = _opmath(a)
    grad_a = grad_b = None
    if need_a:
        ga = x.new_zeros(x.shape)
        for i in range(E):
            ga = torch.where(e == i, g @ _expert_mat(b, i, trans_b).t(), ga)
        grad_a = ga.to(a.dtype)
    if need_b:
        mats = []
        for i in range(E):
            gb = torch.where(e == i, x, 0.0).t() @ g  # [K, N]
            mats.append(gb.t() if trans_b else gb)
        grad_b = (torch.stack(mats) if mats else _opmath(b).new_zeros(b.shape)).to(b.dtype)
    return grad_a, grad_b


# ---------------------------------------------------------------------------------------------
# Expert MLP and losses.

def gated_activation(h: Tensor, activation: str) -> Tensor:
    """act(gate) * up for h = [gate | up] along the last dim (the Hugging Face gate_up_proj layout)."""
    gate, up = h.chunk(2, dim=-1)
    return ACTIVATIONS[activation](gate) * up


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def moe_mlp(x: Tensor, sorted_slots: Tensor, tokens_per_expert: Tensor, slot_positions: Tensor, weights: Tensor,
            gate_up_proj: Tensor, down_proj: Tensor, activation: str = "silu") -> Tensor:
    """The routed experts' output [T, H] for tokens ``x`` [T, H] (the HF experts layout), composed
    from the ops above: permute, grouped GEMM, gated activation, grouped GEMM, weighted combine."""
    top_k = slot_positions.shape[1]
    offsets = torch.cumsum(tokens_per_expert, 0)
    xs = permute_tokens(x, sorted_slots, top_k)
    h = grouped_mm(xs, gate_up_proj, offsets, trans_b=True)
    y = grouped_mm(gated_activation(h, activation), down_proj, offsets, trans_b=True)
    return unpermute_tokens(y, slot_positions, weights)


def load_balancing_loss(logits: Tensor, tokens_per_expert: Tensor, score_func: str = "softmax") -> Tensor:
    """Switch load-balancing loss E * sum_i f_i * P_i (times the coefficient outside).

    f_i = tokens routed to expert i / T (as Hugging Face's ``load_balancing_loss_func`` counts, so
    top-k routing sums to k when balanced), P_i = mean router probability of expert i (softmax; for
    sigmoid scores the per-token normalised scores, as DeepSeek-V3's sequence-wise loss). The
    gradient flows through P only.
    """
    T, E = logits.shape
    x = _opmath(logits)
    if score_func == "sigmoid":
        s = torch.sigmoid(x)
        p = s / (s.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        p = torch.softmax(x, dim=-1)
    f = tokens_per_expert.to(x.dtype) / max(T, 1)
    return E * (f * p.mean(dim=0)).sum() if T else x.sum() * 0


def router_z_loss(logits: Tensor) -> Tensor:
    """mean over tokens of logsumexp(logits)^2 (ST-MoE)."""
    x = _opmath(logits)
    return torch.logsumexp(x, dim=-1).square().mean() if x.shape[0] else x.sum() * 0


def routing_entropy(logits: Tensor, score_func: str = "softmax") -> Tensor:
    """Mean entropy (nats) of the tokens' router distributions, for monitoring."""
    x = _opmath(logits).detach()
    if score_func == "sigmoid":
        s = torch.sigmoid(x)
        p = s / (s.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        p = torch.softmax(x, dim=-1)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)
    return ent.mean() if x.shape[0] else x.sum() * 0
