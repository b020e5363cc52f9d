"""Argument checks of the MoE ops, run once per call before any backend is chosen (so every
backend raises the same error for the same input). Shapes, dtypes and devices are checked always;
the values of index tensors (slots, positions, offsets, counts) only on CPU tensors outside
torch.compile, where reading them costs no host synchronisation. On CUDA the kernels guard every
index they read instead (no out-of-bounds access; see fastnn/reference/moe.py's conventions)."""

from __future__ import annotations

from typing import Optional

import torch

from ..._checks import FLOAT_DTYPES, INDEX_DTYPES, check_range, check_tensor, fail
from ...reference.moe import ACTIVATIONS, DROP_POLICIES, GROUP_SCORES, SCORE_FUNCS

Tensor = torch.Tensor


def _readable(t: Tensor) -> bool:
    """Whether ``t``'s values can be read for free: a real CPU tensor, not one being traced."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and \
        not isinstance(t, torch._subclasses.FakeTensor)


def _check_permutation(t: Tensor, arg: str, n: int, op: str) -> None:
    """On CPU tensors: ``t`` holds every index of [0, n) exactly once."""
    if not _readable(t) or t.numel() == 0:
        return
    flat = t.reshape(-1)
    bad = (flat < 0) | (flat >= n)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        fail(arg, f"indices in [0, {n})", f"{int(flat[i])} at position {i}", op=op)
    seen = torch.bincount(flat, minlength=n)
    if bool((seen != 1).any()):
        v = int((seen != 1).nonzero()[0, 0])
        fail(arg, f"a permutation of [0, {n}) (each index exactly once)",
             f"index {v} {int(seen[v])} times", op=op)


def validate_gating(logits, top_k, score_func="softmax", renormalize=True, selection_bias=None, num_groups=1,
                    topk_groups=1, group_score="max", routed_scaling_factor=1.0, capacity_factor=0.0,
                    drop_policy="drop") -> None:
    op = "topk_gating"
    check_tensor(logits, "logits", dim=2, dtypes=FLOAT_DTYPES, op=op)
    E = logits.shape[1]
    if E < 1:
        fail("logits", "at least one expert (logits of shape [T, E] with E >= 1)", logits, op=op)
    for arg, value, allowed in (("score_func", score_func, SCORE_FUNCS), ("group_score", group_score, GROUP_SCORES),
                                ("drop_policy", drop_policy, DROP_POLICIES)):
        if value not in allowed:
            fail(arg, f"one of {allowed}", value, op=op)
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1 or E % num_groups:
        fail("num_groups", f"a divisor of the number of experts ({E})", num_groups, op=op)
    if not isinstance(topk_groups, int) or isinstance(topk_groups, bool) or not 1 <= topk_groups <= num_groups:
        fail("topk_groups", f"an integer in [1, num_groups={num_groups}]", topk_groups, op=op)
    eligible = topk_groups * (E // num_groups)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= eligible:
        what = f"the number of experts ({E})" if num_groups == 1 else \
            f"the experts in the chosen groups (topk_groups * E / num_groups = {eligible})"
        fail("top_k", f"an integer in [1, {what}]", top_k, op=op)
    check_range("capacity_factor", capacity_factor, 0.0, float("inf"), hi_inclusive=True, op=op)
    check_range("routed_scaling_factor", routed_scaling_factor, float("-inf"), float("inf"), hi_inclusive=True,
                op=op)
    if selection_bias is not None:
        check_tensor(selection_bias, "selection_bias", dim=1, dtypes=FLOAT_DTYPES, device=logits.device, op=op)
        if selection_bias.shape[0] != E:
            fail("selection_bias", f"one value per expert, shape [{E}]", selection_bias, op=op)
        if selection_bias.requires_grad:
            fail("selection_bias", "a tensor without gradient (it only steers selection; update it "
                 "outside autograd, as DeepSeek-V3's aux-loss-free balancing does)", "requires_grad=True", op=op)


def _check_slots(sorted_slots: Tensor, n: int, device: torch.device, op: str) -> None:
    check_tensor(sorted_slots, "sorted_slots", dim=1, dtypes=INDEX_DTYPES, device=device, op=op)
    if sorted_slots.shape[0] != n:
        fail("sorted_slots", f"shape [{n}] (tokens x top_k)", sorted_slots, op=op)
    _check_permutation(sorted_slots, "sorted_slots", n, op)


def _check_combine(y_rows: int, slot_positions: Tensor, weights: Optional[Tensor], device: torch.device,
                   op: str, tokens: Optional[int] = None) -> None:
    check_tensor(slot_positions, "slot_positions", dim=2, dtypes=INDEX_DTYPES, device=device, op=op)
    T, k = slot_positions.shape
    if tokens is not None and T != tokens:
        fail("slot_positions", f"one row per token ({tokens})", slot_positions, op=op)
    if y_rows != T * k:
        fail("slot_positions", f"T * top_k = {y_rows} slots (one per row of the expert outputs)", slot_positions,
             op=op)
    if weights is not None:
        check_tensor(weights, "weights", dim=2, dtypes=FLOAT_DTYPES, device=device, op=op)
        if weights.shape != slot_positions.shape:
            fail("weights", f"the shape of slot_positions {list(slot_positions.shape)}", weights, op=op)
    _check_permutation(slot_positions, "slot_positions", T * k, op)


def validate_permute(x, sorted_slots, top_k) -> None:
    op = "permute_tokens"
    check_tensor(x, "x", dim=2, dtypes=FLOAT_DTYPES, op=op)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        fail("top_k", "an integer >= 1", top_k, op=op)
    _check_slots(sorted_slots, x.shape[0] * top_k, x.device, op)


def validate_unpermute(y, slot_positions, weights=None) -> None:
    op = "unpermute_tokens"
    check_tensor(y, "y", dim=2, dtypes=FLOAT_DTYPES, op=op)
    _check_combine(y.shape[0], slot_positions, weights, y.device, op)


def _check_offsets(offsets: Tensor, experts: int, rows: int, device: torch.device, op: str) -> None:
    check_tensor(offsets, "offsets", dim=1, dtypes=(torch.int64, torch.int32), device=device, op=op)
    if offsets.shape[0] != experts:
        fail("offsets", f"one cumulative row end per expert, shape [{experts}]", offsets, op=op)
    if not _readable(offsets) or experts == 0:
        return
    o = offsets.to(torch.int64)
    prev = torch.cat([o.new_zeros(1), o[:-1]])
    bad = (o < prev) | (o > rows)
    if bool(bad.any()):
        e = int(bad.nonzero()[0, 0])
        fail("offsets", f"non-decreasing cumulative row ends in [0, {rows}]",
             f"{int(o[e])} at expert {e} (previous end {int(prev[e])})", op=op)


def validate_grouped_mm(a, b, offsets, trans_b=False) -> None:
    op = "grouped_mm"
    check_tensor(a, "a", dim=2, dtypes=FLOAT_DTYPES, op=op)
    check_tensor(b, "b", dim=3, dtypes=(a.dtype,), device=a.device, op=op)
    K = b.shape[2] if trans_b else b.shape[1]
    if a.shape[1] != K:
        layout = "[E, N, K] (trans_b=True)" if trans_b else "[E, K, N]"
        fail("b", f"a {layout} tensor with K = a.shape[1] = {a.shape[1]}", b, op=op)
    _check_offsets(offsets, b.shape[0], a.shape[0], a.device, op)


def validate_mlp(x, sorted_slots, tokens_per_expert, slot_positions, weights, gate_up_proj, down_proj,
                 activation="silu") -> None:
    op = "moe_mlp"
    check_tensor(x, "x", dim=2, dtypes=FLOAT_DTYPES, op=op)
    T, H = x.shape
    check_tensor(gate_up_proj, "gate_up_proj", dim=3, dtypes=(x.dtype,), device=x.device, op=op)
    E, two_i = gate_up_proj.shape[:2]
    if gate_up_proj.shape[2] != H or two_i % 2:
        fail("gate_up_proj", f"[E, 2I, {H}] (the Hugging Face experts layout)", gate_up_proj, op=op)
    check_tensor(down_proj, "down_proj", dim=3, dtypes=(x.dtype,), device=x.device, op=op)
    if tuple(down_proj.shape) != (E, H, two_i // 2):
        fail("down_proj", f"shape [{E}, {H}, {two_i // 2}]", down_proj, op=op)
    if activation not in ACTIVATIONS:
        fail("activation", f"one of {tuple(ACTIVATIONS)}", activation, op=op)
    check_tensor(slot_positions, "slot_positions", dim=2, dtypes=INDEX_DTYPES, device=x.device, op=op)
    k = slot_positions.shape[1]
    _check_combine(T * k, slot_positions, weights, x.device, op, tokens=T)
    if weights is None:
        fail("weights", "a tensor [T, top_k]", weights, op=op, error=TypeError)
    _check_slots(sorted_slots, T * k, x.device, op)
    check_tensor(tokens_per_expert, "tokens_per_expert", dim=1, dtypes=INDEX_DTYPES, device=x.device, op=op)
    if tokens_per_expert.shape[0] != E:
        fail("tokens_per_expert", f"one count per expert, shape [{E}]", tokens_per_expert, op=op)
    if _readable(tokens_per_expert) and E:
        if bool((tokens_per_expert < 0).any()) or int(tokens_per_expert.sum()) > T * k:
            fail("tokens_per_expert", f"non-negative counts summing to at most T * top_k = {T * k}",
                 str(tokens_per_expert.tolist()), op=op)


__all__ = ["validate_gating", "validate_permute", "validate_unpermute", "validate_grouped_mm", "validate_mlp"]
