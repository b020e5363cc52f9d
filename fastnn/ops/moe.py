"""Mixture-of-Experts ops: top-k gating with permutation metadata, token permutation, grouped GEMM.

Public functional API (each a :class:`fastnn.backends.Op`; the backend is chosen per call):

* ``topk_gating(logits, top_k, score_func="softmax", renormalize=True, selection_bias=None,
  num_groups=1, topk_groups=1, group_score="max", routed_scaling_factor=1.0, capacity_factor=0.0,
  drop_policy="drop") -> GatingOutput(weights, expert_ids, tokens_per_expert, sorted_slots,
  slot_positions)``; ``weights`` is differentiable.
* ``permute_tokens(x, sorted_slots, top_k)``: token rows in expert order, [T*k, H].
* ``unpermute_tokens(y, slot_positions, weights)``: the weighted combine back to token order.
* ``grouped_mm(a, b, offsets, trans_b=False)``: per-expert GEMM over contiguous row groups.
* ``load_balancing_loss``, ``router_z_loss``, ``routing_entropy``: differentiable torch compositions
  (a few reductions that ``torch.compile`` fuses; no kernel of their own).

Conventions (slots, layouts, dropped slots, dtypes) are those of :mod:`fastnn.reference.moe`.
Backends: ``cpu``/``cuda`` run the compiled ``fastnn::<name>`` ops, ``triton`` runs
``fastnn::triton_<name>`` (the fast path on CUDA), ``reference`` the pure-PyTorch functions.
Every compiled op has a fake kernel and its autograd registered here, with the backward an op.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _extension
from ..backends import Op, triton_available
from ..reference import moe as ref
from ..reference.moe import (  # noqa: F401  (re-exported)
    DROP_POLICIES, GROUP_SCORES, SCORE_FUNCS, GatingOutput, expert_capacity, load_balancing_loss, router_z_loss,
    routing_entropy,
)

__all__ = [
    "topk_gating", "permute_tokens", "unpermute_tokens", "grouped_mm", "GatingOutput", "expert_capacity",
    "load_balancing_loss", "router_z_loss", "routing_entropy", "validate_gating", "FLOAT_DTYPES",
]

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64,)


# ---------------------------------------------------------------------------------------------
# Argument checks, shared by every backend (the compiled ops repeat them in C++). None of them
# reads tensor data, so they cost no host synchronisation.

def _describe(t: Tensor) -> str:
    return f"tensor of shape {list(t.shape)}, dtype {t.dtype}, device {t.device}"


def _fail(arg: str, expected: str, got: object) -> None:
    raise ValueError(f"fastnn: argument '{arg}': expected {expected}, got {got}")


def _check_tensor(t: object, arg: str, *, dim: int, dtypes: tuple, device: Optional[torch.device] = None) -> None:
    if not isinstance(t, Tensor):
        _fail(arg, "a tensor", type(t).__name__)
    if t.dim() != dim or t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        _fail(arg, f"a {dim}-d tensor of dtype {names}", _describe(t))
    if device is not None and t.device != device:
        _fail(arg, f"a tensor on {device}", _describe(t))


def validate_gating(logits, top_k, score_func="softmax", renormalize=True, selection_bias=None, num_groups=1,
                    topk_groups=1, group_score="max", routed_scaling_factor=1.0, capacity_factor=0.0,
                    drop_policy="drop") -> None:
    _check_tensor(logits, "logits", dim=2, dtypes=FLOAT_DTYPES)
    E = logits.shape[1]
    if E < 1:
        _fail("logits", "at least one expert (logits of shape [T, E] with E >= 1)", _describe(logits))
    if score_func not in SCORE_FUNCS:
        _fail("score_func", f"one of {SCORE_FUNCS}", repr(score_func))
    if group_score not in GROUP_SCORES:
        _fail("group_score", f"one of {GROUP_SCORES}", repr(group_score))
    if drop_policy not in DROP_POLICIES:
        _fail("drop_policy", f"one of {DROP_POLICIES}", repr(drop_policy))
    if not isinstance(num_groups, int) or num_groups < 1 or E % num_groups:
        _fail("num_groups", f"a divisor of the number of experts ({E})", num_groups)
    if not isinstance(topk_groups, int) or not 1 <= topk_groups <= num_groups:
        _fail("topk_groups", f"an integer in [1, num_groups={num_groups}]", topk_groups)
    eligible = topk_groups * (E // num_groups)
    if not isinstance(top_k, int) or not 1 <= top_k <= eligible:
        what = f"the number of experts ({E})" if num_groups == 1 else \
            f"the experts in the chosen groups (topk_groups * E / num_groups = {eligible})"
        _fail("top_k", f"an integer in [1, {what}]", top_k)
    if capacity_factor < 0:
        _fail("capacity_factor", "a value >= 0 (0 = no capacity limit)", capacity_factor)
    if selection_bias is not None:
        _check_tensor(selection_bias, "selection_bias", dim=1, dtypes=FLOAT_DTYPES, device=logits.device)
        if selection_bias.shape[0] != E:
            _fail("selection_bias", f"one value per expert, shape [{E}]", _describe(selection_bias))
        if selection_bias.requires_grad:
            _fail("selection_bias", "a tensor without gradient (it only steers selection; update it "
                  "outside autograd, as DeepSeek-V3's aux-loss-free balancing does)", "requires_grad=True")


def _check_routing(T: int, k: int, sorted_slots: Optional[Tensor], slot_positions: Optional[Tensor],
                   weights: Optional[Tensor], device: torch.device) -> None:
    if sorted_slots is not None:
        _check_tensor(sorted_slots, "sorted_slots", dim=1, dtypes=INDEX_DTYPES, device=device)
        if sorted_slots.shape[0] != T * k:
            _fail("sorted_slots", f"shape [{T * k}] (tokens x top_k)", _describe(sorted_slots))
    if slot_positions is not None:
        _check_tensor(slot_positions, "slot_positions", dim=2, dtypes=INDEX_DTYPES, device=device)
    if weights is not None:
        _check_tensor(weights, "weights", dim=2, dtypes=FLOAT_DTYPES, device=device)
        if slot_positions is not None and weights.shape != slot_positions.shape:
            _fail("weights", f"the shape of slot_positions {list(slot_positions.shape)}", _describe(weights))


def validate_permute(x, sorted_slots, top_k) -> None:
    _check_tensor(x, "x", dim=2, dtypes=FLOAT_DTYPES)
    if not isinstance(top_k, int) or top_k < 1:
        _fail("top_k", "an integer >= 1", top_k)
    _check_routing(x.shape[0], top_k, sorted_slots, None, None, x.device)


def validate_unpermute(y, slot_positions, weights) -> None:
    _check_tensor(y, "y", dim=2, dtypes=FLOAT_DTYPES)
    _check_routing(0, 0, None, slot_positions, weights, y.device)
    T, k = slot_positions.shape
    if y.shape[0] != T * k:
        _fail("y", f"{T * k} rows (slot_positions is [{T}, {k}])", _describe(y))


def validate_grouped_mm(a, b, offsets, trans_b=False) -> None:
    _check_tensor(a, "a", dim=2, dtypes=FLOAT_DTYPES)
    _check_tensor(b, "b", dim=3, dtypes=FLOAT_DTYPES, device=a.device)
    if b.dtype != a.dtype:
        _fail("b", f"the dtype of a ({a.dtype})", _describe(b))
    _check_tensor(offsets, "offsets", dim=1, dtypes=(torch.int64, torch.int32), device=a.device)
    K = b.shape[2] if trans_b else b.shape[1]
    if a.shape[1] != K:
        layout = "[E, N, K] (trans_b=True)" if trans_b else "[E, K, N]"
        _fail("b", f"a {layout} tensor with K = a.shape[1] = {a.shape[1]}", _describe(b))
    if offsets.shape[0] != b.shape[0]:
        _fail("offsets", f"one cumulative row end per expert, shape [{b.shape[0]}]", _describe(offsets))


# ---------------------------------------------------------------------------------------------
# Autograd of the compiled ops (native C++/CUDA and Triton): the backward is itself an op.

def _gating_setup(ctx, inputs, output):
    logits, top_k, score_func, renormalize = inputs[:4]
    ctx.score_func, ctx.renormalize, ctx.scale = score_func, renormalize, inputs[8]
    ctx.save_for_backward(logits, output[1])


def _make_gating_backward(backward_op):
    def backward(ctx, grad_w, *_):
        logits, expert_ids = ctx.saved_tensors
        if grad_w is None:
            return (None,) * 11
        grad = backward_op(grad_w.contiguous(), logits, expert_ids, ctx.score_func, ctx.renormalize, ctx.scale)
        return (grad.to(logits.dtype),) + (None,) * 10
    return backward


def _permute_setup(ctx, inputs, output):
    x, sorted_slots, top_k = inputs
    ctx.top_k, ctx.T = top_k, x.shape[0]
    ctx.save_for_backward(sorted_slots)


def _unpermute_setup(ctx, inputs, output):
    y, slot_positions, weights = inputs
    ctx.save_for_backward(y, slot_positions, weights)


def _grouped_setup(ctx, inputs, output):
    a, b, offsets, trans_b = inputs
    ctx.trans_b = trans_b
    ctx.save_for_backward(a, b, offsets)


def _slot_positions_from_sorted(sorted_slots: Tensor, T: int, k: int) -> Tensor:
    pos = torch.empty_like(sorted_slots)
    pos[sorted_slots] = torch.arange(sorted_slots.numel(), device=sorted_slots.device)
    return pos.view(T, k)


def _register_autograd(prefix: str) -> None:
    """Autograd of fastnn::{prefix}topk_gating etc.: backward ops of the same family (prefix '' for
    the compiled library, 'triton_' for the Triton ops)."""
    ns = torch.ops.fastnn
    gating_bw = getattr(ns, f"{prefix}topk_gating_backward")
    unpermute = getattr(ns, f"{prefix}unpermute_tokens")
    unpermute_bw = getattr(ns, f"{prefix}unpermute_tokens_backward")
    gmm_bw = getattr(ns, f"{prefix}grouped_mm_backward")

    torch.library.register_autograd(f"fastnn::{prefix}topk_gating", _make_gating_backward(gating_bw),
                                    setup_context=_gating_setup)

    def permute_backward(ctx, grad):
        (sorted_slots,) = ctx.saved_tensors
        # d x[t] = sum over t's slots of d out[row of the slot]: the unweighted combine.
        pos = _slot_positions_from_sorted(sorted_slots, ctx.T, ctx.top_k)
        ones = torch.ones(pos.shape, dtype=grad.dtype, device=grad.device)
        return unpermute(grad.contiguous(), pos, ones), None, None

    torch.library.register_autograd(f"fastnn::{prefix}permute_tokens", permute_backward, setup_context=_permute_setup)

    def unpermute_backward(ctx, grad):
        y, slot_positions, weights = ctx.saved_tensors
        T, k = slot_positions.shape
        sorted_slots = torch.empty_like(slot_positions).view(-1)
        sorted_slots[slot_positions.view(-1)] = torch.arange(T * k, device=y.device)
        # d y rows = weight * d out[token] (a weighted permute), d w = <d out[t], y[row]>.
        gy, gw = unpermute_bw(grad.contiguous(), y, slot_positions, weights, sorted_slots)
        return gy, None, (gw if ctx.needs_input_grad[2] else None)

    torch.library.register_autograd(f"fastnn::{prefix}unpermute_tokens", unpermute_backward,
                                    setup_context=_unpermute_setup)

    def grouped_backward(ctx, grad):
        a, b, offsets = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ga, gb = gmm_bw(grad.contiguous(), a, b, offsets, ctx.trans_b, need_a, need_b)
        return (ga if need_a else None), (gb if need_b else None), None, None

    torch.library.register_autograd(f"fastnn::{prefix}grouped_mm", grouped_backward, setup_context=_grouped_setup)


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernels: the shapes of every op's outputs, with no data.

def _gating_fake(logits, top_k, score_func="softmax", renormalize=True, selection_bias=None, num_groups=1,
                 topk_groups=1, group_score="max", routed_scaling_factor=1.0, capacity_factor=0.0, drop_policy="drop"):
    T, E = logits.shape
    wdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    i64 = dict(dtype=torch.int64, device=logits.device)
    return (logits.new_empty((T, top_k), dtype=wdtype), logits.new_empty((T, top_k), **i64),
            logits.new_empty((E,), **i64), logits.new_empty((T * top_k,), **i64), logits.new_empty((T, top_k), **i64))


def _gating_backward_fake(grad_weights, logits, expert_ids, score_func, renormalize, routed_scaling_factor):
    return torch.empty_like(logits, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)


def _permute_fake(x, sorted_slots, top_k):
    return x.new_empty((sorted_slots.shape[0], x.shape[1]))


def _unpermute_fake(y, slot_positions, weights):
    return y.new_empty((slot_positions.shape[0], y.shape[1]))


def _unpermute_backward_fake(grad_out, y, slot_positions, weights, sorted_slots):
    return torch.empty_like(y), torch.empty_like(weights)


def _grouped_fake(a, b, offsets, trans_b=False):
    return a.new_empty((a.shape[0], b.shape[1] if trans_b else b.shape[2]))


def _grouped_backward_fake(grad, a, b, offsets, trans_b, need_a, need_b):
    return (torch.empty_like(a) if need_a else a.new_empty((0,)),
            torch.empty_like(b) if need_b else b.new_empty((0,)))


# ---------------------------------------------------------------------------------------------
# The CUDA grouped GEMM: torch's own (CUTLASS grouped GEMM on sm90, bf16) behind fastnn's op and
# conventions. Rows past the last group (dropped slots) and experts without tokens get zeros,
# computed with masks rather than slices so that nothing reads a device value on the host.

def _rows_past_groups(offsets: Tensor, M: int, device: torch.device) -> Tensor:
    return (torch.arange(M, device=device) >= offsets[-1]).unsqueeze(1)


def torch_grouped_mm(a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool = False) -> Tensor:
    if b.shape[0] == 0:
        return a.new_zeros((a.shape[0], b.shape[1] if trans_b else b.shape[2]))
    out = torch._grouped_mm(a, b.transpose(-2, -1) if trans_b else b, offs=offsets.to(torch.int32))
    return out.masked_fill(_rows_past_groups(offsets, a.shape[0], a.device), 0)


def torch_grouped_mm_backward(grad: Tensor, a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool, need_a: bool,
                              need_b: bool) -> tuple[Tensor, Tensor]:
    offs = offsets.to(torch.int32)
    ga, gb = a.new_empty((0,)), b.new_empty((0,))
    if need_a:  # dA = dY @ B_e^T
        ga = torch._grouped_mm(grad, b if trans_b else b.transpose(-2, -1), offs=offs)
        ga = ga.masked_fill(_rows_past_groups(offsets, a.shape[0], a.device), 0)
    if need_b:  # dB_e = A_e^T dY_e, [E, K, N] (transposed back for the [E, N, K] layout)
        gk = torch._grouped_mm(a.t(), grad, offs=offs)
        counts = torch.diff(offsets.to(torch.int64), prepend=offsets.new_zeros(1).to(torch.int64))
        gk = torch.where((counts > 0).view(-1, 1, 1), gk, torch.zeros((), dtype=gk.dtype, device=gk.device))
        gb = gk.transpose(-2, -1).contiguous() if trans_b else gk
    return ga, gb


@torch.compiler.assume_constant_result
def _sm90_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def _grouped_cuda_supports(a, b, offsets, trans_b=False) -> Optional[str]:
    if not _NATIVE:
        return "the compiled library has no MoE ops (rebuild fastnn)"
    if not hasattr(torch, "_grouped_mm"):
        return "this torch has no torch._grouped_mm"
    if not isinstance(a, Tensor) or a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        return "the CUDA grouped GEMM (torch._grouped_mm) takes bfloat16; other dtypes use triton or reference"
    if a.shape[1] % 8 or (b.shape[1] if trans_b else b.shape[2]) % 8:
        return "the CUDA grouped GEMM needs K and N multiples of 8 (16-byte rows)"
    if not _sm90_or_newer(a.device.index if a.device.index is not None else torch.cuda.current_device()):
        return "the CUDA grouped GEMM (CUTLASS) needs an sm90 or newer GPU"
    return None


_FAKES = {
    "topk_gating": _gating_fake, "topk_gating_backward": _gating_backward_fake, "permute_tokens": _permute_fake,
    "unpermute_tokens": _unpermute_fake, "unpermute_tokens_backward": _unpermute_backward_fake,
    "grouped_mm": _grouped_fake, "grouped_mm_backward": _grouped_backward_fake,
    "moe_mlp": lambda x, *args: torch.empty_like(x),
}


def _reference_gating_backward(grad_weights, logits, expert_ids, score_func, renormalize, routed_scaling_factor):
    return ref.topk_gating_backward(grad_weights, logits, expert_ids, score_func, renormalize,
                                    routed_scaling_factor)


_NATIVE = False  # the compiled library is loaded and has the MoE ops (set by _register_native)


@_extension.on_load
def _register_native(_module) -> None:
    """Fakes and autograd of the compiled ops, once the library is loaded (with its MoE ops)."""
    global _NATIVE
    if not hasattr(torch.ops.fastnn, "topk_gating"):
        return
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"fastnn::{name}", fake)
    # The gating backward is a few elementwise ops and reductions over [T, E]: on CUDA the
    # composed reference is as fast as a kernel would be, so it is the CUDA implementation.
    if _module.built_with_cuda():
        torch.library.impl("fastnn::topk_gating_backward", "CUDA")(_reference_gating_backward)
        torch.library.impl("fastnn::grouped_mm", "CUDA")(torch_grouped_mm)
        torch.library.impl("fastnn::grouped_mm_backward", "CUDA")(torch_grouped_mm_backward)
    _register_autograd("")

    def no_backward(ctx, grad):
        raise RuntimeError("fastnn::moe_mlp is the inference path of the experts; with gradients fastnn.MoE uses "
                           "the composed differentiable ops")

    torch.library.register_autograd("fastnn::moe_mlp", no_backward)
    _NATIVE = True


_TRITON = False
if triton_available():
    from . import _moe_triton  # noqa: E402,F401  (defines the fastnn::triton_* ops)

    _register_autograd("triton_")
    _TRITON = True


# ---------------------------------------------------------------------------------------------
# The public ops.

def _native_supports(*args, **kwargs) -> Optional[str]:
    return None if _NATIVE else "the compiled library has no MoE ops (rebuild fastnn)"


def _gating_args(args, kwargs) -> tuple:
    names = ("logits", "top_k", "score_func", "renormalize", "selection_bias", "num_groups", "topk_groups",
             "group_score", "routed_scaling_factor", "capacity_factor", "drop_policy")
    defaults = (None, None, "softmax", True, None, 1, 1, "max", 1.0, 0.0, "drop")
    vals = list(args) + [None] * (len(names) - len(args))
    for i, n in enumerate(names):
        if i >= len(args):
            vals[i] = kwargs.pop(n, defaults[i])
    if kwargs:
        raise TypeError(f"topk_gating() got unexpected keyword arguments {sorted(kwargs)}")
    return tuple(vals)


topk_gating = Op("topk_gating", preference={"cuda": ("triton", "cuda", "reference")})
permute_tokens = Op("permute_tokens", preference={"cuda": ("triton", "cuda", "reference")})
unpermute_tokens = Op("unpermute_tokens", preference={"cuda": ("triton", "cuda", "reference")})
grouped_mm = Op("grouped_mm", preference={"cuda": ("triton", "cuda", "reference")})
# The experts' whole inference forward in one op (CPU): see csrc/moe/moe_mlp_cpu.cpp.
moe_mlp = Op("moe_mlp", preference={"cuda": ("triton", "reference")})


@topk_gating.register("reference")
def _gating_reference(*args, **kwargs) -> GatingOutput:
    a = _gating_args(args, dict(kwargs))
    validate_gating(*a)
    return ref.topk_gating(*a)


def _gating_cuda_supports(*args, **kwargs) -> Optional[str]:
    if not _NATIVE:
        return "the compiled library has no MoE ops (rebuild fastnn)"
    logits, top_k, _, _, _, num_groups, _, _, _, capacity_factor, _ = _gating_args(args, dict(kwargs))
    if capacity_factor and capacity_factor > 0:
        return "the CUDA gating kernel has no capacity limit (capacity routing runs on the reference path)"
    if isinstance(top_k, int) and top_k > 32 or num_groups > 32:
        return "the CUDA gating kernel takes top_k <= 32 and num_groups <= 32 (one warp lane each)"
    if isinstance(logits, Tensor) and logits.dim() == 2 and logits.shape[1] > (512 if logits.dtype == torch.float64
                                                                                 else 1024):
        return "the CUDA gating kernel keeps a token's scores in shared memory (E <= 1024; 512 in float64)"
    return None


@topk_gating.register("cpu", native="topk_gating", supports=_native_supports)
@topk_gating.register("cuda", native="topk_gating", supports=_gating_cuda_supports)
def _gating_native(*args, **kwargs) -> GatingOutput:
    a = _gating_args(args, dict(kwargs))
    validate_gating(*a)
    return GatingOutput(*torch.ops.fastnn.topk_gating(*a))


def _gating_triton_supports(*args, **kwargs) -> Optional[str]:
    if not _TRITON:
        return "triton is not installed"
    logits, top_k, _, _, _, num_groups, _, _, _, capacity_factor, _ = _gating_args(args, dict(kwargs))
    if capacity_factor and capacity_factor > 0:
        return "the Triton gating kernel has no capacity limit (capacity routing runs on cpu, cuda or reference)"
    if isinstance(logits, Tensor) and logits.dim() == 2:
        E = logits.shape[1]
        if E > 1024:
            return f"the Triton gating kernel holds a token's experts in registers (E <= 1024), got E = {E}"
        if num_groups > 1 and E & (E - 1):
            return f"grouped routing in Triton needs a power-of-two number of experts, got E = {E}"
        if logits.dtype == torch.float64:
            return "the Triton gating kernel computes in float32; float64 logits use cpu/cuda/reference"
    return None


@topk_gating.register("triton", supports=_gating_triton_supports)
def _gating_triton(*args, **kwargs) -> GatingOutput:
    a = _gating_args(args, dict(kwargs))
    validate_gating(*a)
    return GatingOutput(*torch.ops.fastnn.triton_topk_gating(*a))


@permute_tokens.register("reference")
def _permute_reference(x, sorted_slots, top_k):
    validate_permute(x, sorted_slots, top_k)
    return ref.permute_tokens(x, sorted_slots, top_k)


@permute_tokens.register("cpu", native="permute_tokens", supports=_native_supports)
@permute_tokens.register("cuda", native="permute_tokens", supports=_native_supports)
def _permute_native(x, sorted_slots, top_k):
    validate_permute(x, sorted_slots, top_k)
    return torch.ops.fastnn.permute_tokens(x, sorted_slots, top_k)


@permute_tokens.register("triton", supports=lambda *a, **k: None if _TRITON else "triton is not installed")
def _permute_triton(x, sorted_slots, top_k):
    validate_permute(x, sorted_slots, top_k)
    return torch.ops.fastnn.triton_permute_tokens(x, sorted_slots, top_k)


def _combine_triton_supports(y, *args, **kwargs) -> Optional[str]:
    if not _TRITON:
        return "triton is not installed"
    if isinstance(y, Tensor) and y.dtype == torch.float64:
        return "the Triton combine accumulates in float32; float64 uses cpu/cuda/reference"
    return None


def _weights_for(y: Tensor, slot_positions: Tensor, weights: Optional[Tensor]) -> Tensor:
    if weights is None:
        return torch.ones(slot_positions.shape, dtype=y.dtype, device=y.device)
    return weights


@unpermute_tokens.register("reference")
def _unpermute_reference(y, slot_positions, weights=None):
    validate_unpermute(y, slot_positions, weights)
    return ref.unpermute_tokens(y, slot_positions, weights)


@unpermute_tokens.register("cpu", native="unpermute_tokens", supports=_native_supports)
@unpermute_tokens.register("cuda", native="unpermute_tokens", supports=_native_supports)
def _unpermute_native(y, slot_positions, weights=None):
    validate_unpermute(y, slot_positions, weights)
    return torch.ops.fastnn.unpermute_tokens(y, slot_positions, _weights_for(y, slot_positions, weights))


@unpermute_tokens.register("triton", supports=_combine_triton_supports)
def _unpermute_triton(y, slot_positions, weights=None):
    validate_unpermute(y, slot_positions, weights)
    return torch.ops.fastnn.triton_unpermute_tokens(y, slot_positions, _weights_for(y, slot_positions, weights))


@grouped_mm.register("reference")
def _grouped_reference(a, b, offsets, trans_b=False):
    validate_grouped_mm(a, b, offsets, trans_b)
    return ref.grouped_mm(a, b, offsets.to(torch.int64), trans_b)


@grouped_mm.register("cpu", native="grouped_mm", supports=_native_supports)
@grouped_mm.register("cuda", native="grouped_mm", supports=_grouped_cuda_supports)
def _grouped_native(a, b, offsets, trans_b=False):
    validate_grouped_mm(a, b, offsets, trans_b)
    return torch.ops.fastnn.grouped_mm(a, b, offsets.to(torch.int64), trans_b)


def _grouped_triton_supports(a, b, offsets, trans_b=False) -> Optional[str]:
    if not _TRITON:
        return "triton is not installed"
    if isinstance(a, Tensor) and a.dtype == torch.float64:
        return "the Triton grouped GEMM covers float32, bfloat16 and float16 (tl.dot has no float64 path)"
    if isinstance(a, Tensor) and a.dtype == torch.bfloat16 and a.device.type == "cpu":
        # Seen with Triton 3.8: a bare tl.dot of two bf16 tiles returns garbage when interpreted.
        return "the Triton interpreter computes bfloat16 tl.dot wrongly; bf16 runs on a GPU or another backend"
    return None



@grouped_mm.register("triton", supports=_grouped_triton_supports)
def _grouped_triton(a, b, offsets, trans_b=False):
    validate_grouped_mm(a, b, offsets, trans_b)
    return torch.ops.fastnn.triton_grouped_mm(a, b, offsets.to(torch.int64), trans_b)


def _mlp_supports(x, sorted_slots, tokens_per_expert, slot_positions, weights, gate_up_proj, down_proj,
                  activation="silu") -> Optional[str]:
    if not _NATIVE or not hasattr(torch.ops.fastnn, "moe_mlp"):
        return "the compiled library has no MoE ops (rebuild fastnn)"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, gate_up_proj, down_proj)):
        return "moe_mlp is inference-only (no backward); with gradients use the composed ops"
    return None


@moe_mlp.register("reference")
def _mlp_reference(x, sorted_slots, tokens_per_expert, slot_positions, weights, gate_up_proj, down_proj,
                   activation="silu"):
    return ref.moe_mlp(x, sorted_slots, tokens_per_expert, slot_positions, weights, gate_up_proj, down_proj,
                       activation)


@moe_mlp.register("cpu", native="moe_mlp", supports=_mlp_supports)
def _mlp_native(x, sorted_slots, tokens_per_expert, slot_positions, weights, gate_up_proj, down_proj,
                activation="silu"):
    return torch.ops.fastnn.moe_mlp(x, sorted_slots, tokens_per_expert, slot_positions, weights, gate_up_proj,
                                    down_proj, activation)


def _mlp_triton_supports(x, sorted_slots, tokens_per_expert, slot_positions, weights, gate_up_proj, down_proj,
                         activation="silu") -> Optional[str]:
    why = _grouped_triton_supports(x, gate_up_proj, tokens_per_expert)
    if why is None and torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, gate_up_proj, down_proj)):
        why = "moe_mlp is inference-only (no backward); with gradients use the composed ops"
    return why


@moe_mlp.register("triton", supports=_mlp_triton_supports)
def _mlp_triton(x, sorted_slots, tokens_per_expert, slot_positions, weights, gate_up_proj, down_proj,
                activation="silu"):
    return torch.ops.fastnn.triton_moe_mlp(x, sorted_slots, tokens_per_expert, slot_positions, weights,
                                           gate_up_proj, down_proj, activation)
