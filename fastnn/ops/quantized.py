"""Quantized (int8) inference ops: the Python API of ``fastnn::int8_linear``, ``int8_lstm_seq``,
``int8_gru_seq``, ``int8_rnn_seq`` and ``int8_moe_mlp`` (the routed experts of an MoE layer).

Each is a :class:`fastnn.backends.Op` with the signature of its reference in
fastnn/reference/quantized.py (the quantization scheme is described there). Backends: ``cpu`` (the
compiled kernels, int8 GEMM variant chosen at run time, see :func:`isa`) and ``reference``; and, for
``int8_linear`` and ``int8_moe_mlp`` in weight-only mode, ``triton`` (CUDA tensors: int8 weights
dequantized in the kernel). Other CUDA inputs are refused with an error that says so.

The ops are inference-only. They have no gradient; a call whose ``input`` (or state) requires a
gradient while autograd is recording raises a RuntimeError rather than returning a result that
silently drops the graph.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _extension
from .._checks import check_range, check_tensor, fail
from ..backends import Op, on_triton
from ..reference import moe as ref_moe
from ..reference import quantized as ref

__all__ = ["int8_linear", "int8_lstm_seq", "int8_gru_seq", "int8_rnn_seq", "int8_moe_mlp", "quantize_weight", "isa",
           "isas", "set_isa"]

Tensor = torch.Tensor
quantize_weight = ref.quantize_weight
_F32 = (torch.float32,)
_I8 = (torch.int8,)


def _no_gpu(a, names, op: str, why: str = "fastnn's quantized ops have no GPU path yet") -> None:
    for n in names:
        t = a[n]
        if isinstance(t, Tensor) and t.device.type != "cpu":
            fail(n, f"a CPU tensor ({why})", t, op=op, error=NotImplementedError)


def _devices(a, names, op: str) -> None:
    """CPU tensors; or, in weight-only mode, tensors on one device (CUDA runs the Triton kernels)."""
    if a.weight_only is not True:
        _no_gpu(a, names, op, "dynamic int8 activations have no GPU path; weight_only=True runs on a GPU")
        return
    dev = a[names[0]].device
    for n in names:
        if isinstance(a[n], Tensor) and a[n].device != dev:
            fail(n, f"a tensor on {dev}, the device of '{names[0]}'", a[n], op=op)


def _inference_only(a, names, op: str) -> None:
    if not torch.is_grad_enabled():
        return
    for n in names:
        t = a[n]
        if isinstance(t, Tensor) and t.requires_grad:
            raise RuntimeError(f"fastnn: {op} is inference-only (int8, no gradient), but argument '{n}' requires "
                               "grad while autograd is recording; run it under torch.no_grad() or "
                               "torch.inference_mode(), or detach the input")


def _check_weight(a, w: str, s: str, rows: int, cols: int, op: str) -> None:
    check_tensor(a[w], w, dim=2, dtypes=_I8, op=op)
    if tuple(a[w].shape) != (rows, cols):
        fail(w, f"an int8 tensor of shape [{rows}, {cols}]", a[w], op=op)
    check_tensor(a[s], s, dim=1, dtypes=_F32, op=op)
    if a[s].shape[0] != rows:
        fail(s, f"a float32 tensor of shape [{rows}]", a[s], op=op)


def _check_opt_f32(a, name: str, shape: tuple, op: str) -> None:
    t = a[name]
    if t is None:
        return
    check_tensor(t, name, dtypes=_F32, op=op)
    if tuple(t.shape) != shape:
        fail(name, f"a float32 tensor of shape {list(shape)}", t, op=op)


def _validate_linear(a) -> None:
    op = "int8_linear"
    _devices(a, ("input", "w_q", "w_scale", "bias"), op)
    check_tensor(a.input, "input", dtypes=_F32, op=op)
    if a.input.dim() < 1:
        fail("input", "a float32 tensor [..., in_features]", a.input, op=op)
    check_tensor(a.w_q, "w_q", dim=2, dtypes=_I8, op=op)
    _check_weight(a, "w_q", "w_scale", a.w_q.shape[0], a.input.shape[-1], op)
    _check_opt_f32(a, "bias", (a.w_q.shape[0],), op)
    if not isinstance(a.weight_only, bool):
        fail("weight_only", "a bool", a.weight_only, op=op, error=TypeError)
    _inference_only(a, ("input", "bias"), op)


def _validate_seq(kind: str):
    op = f"int8_{kind}_seq"
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
    states = ("h0", "c0") if kind == "lstm" else ("h0",)

    def validate(a) -> None:
        projection = ("w_hr_q", "w_hr_scale") if kind == "lstm" else ()
        tensors = ("input", *states, "w_ih_q", "w_ih_scale", "w_hh_q", "w_hh_scale", "b_ih", "b_hh", "lengths",
                   *projection)
        _no_gpu(a, tensors, op)
        check_tensor(a.input, "input", dim=3, dtypes=_F32, op=op)
        check_tensor(a.w_hh_q, "w_hh_q", dim=2, dtypes=_I8, op=op)
        proj = bool(projection) and (a.w_hr_q is not None or a.w_hr_scale is not None)
        P = a.w_hh_q.shape[1]  # the size of h: hidden_size, or proj_size
        if proj:
            if a.w_hr_q is None or a.w_hr_scale is None:
                missing = "w_hr_q" if a.w_hr_q is None else "w_hr_scale"
                fail(missing, "a tensor, as w_hr_q and w_hr_scale come together (or both None)", None, op=op)
            H = a.w_hh_q.shape[0] // gates
            if P == 0 or H == 0 or a.w_hh_q.shape[0] != gates * H:
                fail("w_hh_q", f"an int8 tensor [{gates}*hidden_size, proj_size]", a.w_hh_q, op=op)
            check_tensor(a.w_hr_q, "w_hr_q", dim=2, dtypes=_I8, op=op)
            if tuple(a.w_hr_q.shape) != (P, H):
                fail("w_hr_q", f"an int8 tensor [proj_size, hidden_size] = [{P}, {H}] (proj_size = "
                     "w_hh_q.shape[1], hidden_size = w_hh_q.shape[0] / 4)", a.w_hr_q, op=op)
            _check_weight(a, "w_hr_q", "w_hr_scale", P, H, op)
        else:
            H = P
            if H == 0 or a.w_hh_q.shape[0] != gates * H:
                fail("w_hh_q", f"an int8 tensor [{gates}*hidden_size, hidden_size]", a.w_hh_q, op=op)
        T, B, I = a.input.shape
        _check_weight(a, "w_ih_q", "w_ih_scale", gates * H, I, op)
        _check_weight(a, "w_hh_q", "w_hh_scale", gates * H, P, op)
        for s in states:
            size = P if s == "h0" else H
            check_tensor(a[s], s, dim=2, dtypes=_F32, op=op)
            if tuple(a[s].shape) != (B, size):
                fail(s, f"a float32 tensor of shape [{B}, {size}]", a[s], op=op)
        _check_opt_f32(a, "b_ih", (gates * H,), op)
        _check_opt_f32(a, "b_hh", (gates * H,), op)
        if a.lengths is not None:
            check_tensor(a.lengths, "lengths", dim=1, dtypes=(torch.int64,), op=op)
            if a.lengths.shape[0] != B:
                fail("lengths", f"an int64 tensor of shape [{B}]", a.lengths, op=op)
            if B and not torch.compiler.is_compiling():
                lo, hi = int(a.lengths.min()), int(a.lengths.max())  # CPU tensor: reading it is cheap
                check_range("lengths", lo, 0, T, hi_inclusive=True, op=op)
                check_range("lengths", hi, 0, T, hi_inclusive=True, op=op)
        if kind == "rnn" and a.nonlinearity not in ("tanh", "relu"):
            fail("nonlinearity", "'tanh' or 'relu'", a.nonlinearity, op=op)
        for flag in ("reverse", "weight_only"):
            if not isinstance(a[flag], bool):
                fail(flag, "a bool", a[flag], op=op, error=TypeError)
        _inference_only(a, ("input", *states, "b_ih", "b_hh"), op)

    return validate


def _validate_moe(a) -> None:
    from .moe._checks import _check_combine, _check_slots, _readable  # the MoE family's routing checks

    op = "int8_moe_mlp"
    _devices(a, ("x", "sorted_slots", "tokens_per_expert", "slot_positions", "weights", "gate_up_q",
                 "gate_up_scale", "down_q", "down_scale"), op)
    check_tensor(a.x, "x", dim=2, dtypes=_F32, op=op)
    T, H = a.x.shape
    check_tensor(a.gate_up_q, "gate_up_q", dim=3, dtypes=_I8, op=op)
    E, two_i = a.gate_up_q.shape[:2]
    if a.gate_up_q.shape[2] != H or two_i % 2:
        fail("gate_up_q", f"an int8 tensor [E, 2I, {H}] (the Hugging Face experts layout)", a.gate_up_q, op=op)
    I = two_i // 2
    for name, shape in (("gate_up_scale", (E, two_i)), ("down_q", (E, H, I)), ("down_scale", (E, H))):
        check_tensor(a[name], name, dtypes=_I8 if name == "down_q" else _F32, op=op)
        if tuple(a[name].shape) != shape:
            fail(name, f"a tensor of shape {list(shape)}", a[name], op=op)
    if a.activation not in ref_moe.ACTIVATIONS:
        fail("activation", f"one of {tuple(ref_moe.ACTIVATIONS)}", a.activation, op=op)
    if not isinstance(a.weight_only, bool):
        fail("weight_only", "a bool", a.weight_only, op=op, error=TypeError)
    check_tensor(a.slot_positions, "slot_positions", dim=2, dtypes=(torch.int64,), op=op)
    k = a.slot_positions.shape[1]
    check_tensor(a.weights, "weights", dim=2, dtypes=_F32, op=op)
    _check_combine(T * k, a.slot_positions, a.weights, a.x.device, op, tokens=T)
    _check_slots(a.sorted_slots, T * k, a.x.device, op)
    counts = a.tokens_per_expert
    check_tensor(counts, "tokens_per_expert", dim=1, dtypes=(torch.int64,), op=op)
    if counts.shape[0] != E:
        fail("tokens_per_expert", f"one count per expert, shape [{E}]", counts, op=op)
    if _readable(counts) and E and (bool((counts < 0).any()) or int(counts.sum()) > T * k):
        fail("tokens_per_expert", f"non-negative counts summing to at most T * top_k = {T * k}",
             str(counts.tolist()), op=op)
    _inference_only(a, ("x", "weights"), op)


int8_linear = Op("int8_linear", signature=ref.int8_linear, validate=_validate_linear)
int8_lstm_seq = Op("int8_lstm_seq", signature=ref.int8_lstm_seq, validate=_validate_seq("lstm"))
int8_gru_seq = Op("int8_gru_seq", signature=ref.int8_gru_seq, validate=_validate_seq("gru"))
int8_rnn_seq = Op("int8_rnn_seq", signature=ref.int8_rnn_seq, validate=_validate_seq("rnn"))
int8_moe_mlp = Op("int8_moe_mlp", signature=ref.int8_moe_mlp, validate=_validate_moe)


@int8_linear.register("reference")
def _linear_reference(**a):
    return ref.int8_linear(**a)


@int8_linear.register("cpu", native="int8_linear")
def _linear_cpu(input, w_q, w_scale, bias, weight_only):
    return torch.ops.fastnn.int8_linear(input, w_q, w_scale, bias, weight_only)


@int8_lstm_seq.register("reference")
def _lstm_reference(**a):
    return ref.int8_lstm_seq(**a)


@int8_lstm_seq.register("cpu", native="int8_lstm_seq")
def _lstm_cpu(input, h0, c0, w_ih_q, w_ih_scale, w_hh_q, w_hh_scale, b_ih, b_hh, lengths, reverse, weight_only,
              w_hr_q=None, w_hr_scale=None):
    return torch.ops.fastnn.int8_lstm_seq(input, h0, c0, w_ih_q, w_ih_scale, w_hh_q, w_hh_scale, b_ih, b_hh,
                                          lengths, reverse, weight_only, w_hr_q, w_hr_scale)


@int8_gru_seq.register("reference")
def _gru_reference(**a):
    return ref.int8_gru_seq(**a)


@int8_gru_seq.register("cpu", native="int8_gru_seq")
def _gru_cpu(input, h0, w_ih_q, w_ih_scale, w_hh_q, w_hh_scale, b_ih, b_hh, lengths, reverse, weight_only):
    return torch.ops.fastnn.int8_gru_seq(input, h0, w_ih_q, w_ih_scale, w_hh_q, w_hh_scale, b_ih, b_hh, lengths,
                                         reverse, weight_only)


@int8_rnn_seq.register("reference")
def _rnn_reference(**a):
    return ref.int8_rnn_seq(**a)


@int8_rnn_seq.register("cpu", native="int8_rnn_seq")
def _rnn_cpu(input, h0, w_ih_q, w_ih_scale, w_hh_q, w_hh_scale, b_ih, b_hh, lengths, reverse, weight_only,
             nonlinearity):
    return torch.ops.fastnn.int8_rnn_seq(input, h0, w_ih_q, w_ih_scale, w_hh_q, w_hh_scale, b_ih, b_hh, lengths,
                                         reverse, weight_only, nonlinearity)


@int8_moe_mlp.register("reference")
def _moe_reference(**a):
    return ref.int8_moe_mlp(**a)


@int8_moe_mlp.register("cpu", native="int8_moe_mlp")
def _moe_cpu(**a):
    return torch.ops.fastnn.int8_moe_mlp(**a)


# Weight-only int8 on CUDA tensors (and on the CPU under TRITON_INTERPRET=1): the Triton kernels of
# fastnn.kernels.quantized, as torch.library.triton_ops registered once Triton imports.
_TRITON = {"registered": False}


def _triton_weight_only(a) -> Optional[str]:
    if not _TRITON["registered"]:
        return "this torch has no torch.library.triton_op"
    return None if a.weight_only else ("the Triton kernels are weight-only (int8 weights, fp32 activations); "
                                       "dynamic int8 activations run on the CPU")


@int8_linear.register("triton", supports=_triton_weight_only)
def _linear_triton(input, w_q, w_scale, bias, weight_only):
    return torch.ops.fastnn.triton_int8_linear(input, w_q, w_scale, bias)


@int8_moe_mlp.register("triton", supports=_triton_weight_only)
def _moe_triton(x, sorted_slots, tokens_per_expert, slot_positions, weights, gate_up_q, gate_up_scale, down_q,
                down_scale, activation, weight_only):
    return torch.ops.fastnn.triton_int8_moe_mlp(x, sorted_slots, tokens_per_expert, slot_positions, weights,
                                                gate_up_q, gate_up_scale, down_q, down_scale, activation)


@on_triton
def _register_triton() -> None:
    if not hasattr(torch.library, "triton_op"):
        return
    from torch.library import triton_op

    def kernels():
        from ..kernels import quantized
        return quantized

    @triton_op("fastnn::triton_int8_linear", mutates_args=())
    def triton_int8_linear(input: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
        return kernels().int8_linear(input, w_q, w_scale, bias)

    @triton_op("fastnn::triton_int8_moe_mlp", mutates_args=())
    def triton_int8_moe_mlp(x: Tensor, sorted_slots: Tensor, tokens_per_expert: Tensor, slot_positions: Tensor,
                            weights: Tensor, gate_up_q: Tensor, gate_up_scale: Tensor, down_q: Tensor,
                            down_scale: Tensor, activation: str) -> Tensor:
        return kernels().int8_moe_mlp(x, sorted_slots, tokens_per_expert, slot_positions, weights, gate_up_q,
                                      gate_up_scale, down_q, down_scale, activation)

    _TRITON["registered"] = True


# ---------------------------------------------------------------------------------------------
# Fake kernels (torch.compile / torch.export), registered when the compiled library loads. They
# are also the ops' meta kernels: a call with one argument on the meta device and the others on
# the CPU lands here, and must raise (as torch's own ops do for mixed devices), not return empty
# CPU tensors as if it had computed them.

def _one_device(op: str, *args) -> None:
    tensors = [t for t in args if isinstance(t, Tensor)]
    for t in tensors[1:]:
        if t.device != tensors[0].device:
            raise ValueError(f"fastnn: {op}: expected every tensor argument on one device, got {tensors[0].device} "
                             f"and {t.device}")


def _fake_linear(input, w_q, w_scale, bias, weight_only):
    _one_device("int8_linear", input, w_q, w_scale, bias)
    return input.new_empty((*input.shape[:-1], w_q.shape[0]))


def _fake_lstm(input, h0, c0, *rest):
    _one_device("int8_lstm_seq", input, h0, c0, *rest)
    T, B = input.shape[0], input.shape[1]
    return input.new_empty((T, B, h0.shape[1])), h0.new_empty(h0.shape), c0.new_empty(c0.shape)


def _fake_gru(input, h0, *rest):
    _one_device("int8_gru_seq / int8_rnn_seq", input, h0, *rest)
    T, B = input.shape[0], input.shape[1]
    return input.new_empty((T, B, h0.shape[1])), h0.new_empty(h0.shape)


def _fake_moe(x, *rest):
    _one_device("int8_moe_mlp", x, *rest)
    return x.new_empty(x.shape)


@_extension.on_load
def _register_native(_module) -> None:
    if not _extension.has_kernel("int8_linear", "CPU"):  # a library built before these ops existed
        return
    torch.library.register_fake("fastnn::int8_linear")(_fake_linear)
    torch.library.register_fake("fastnn::int8_lstm_seq")(_fake_lstm)
    torch.library.register_fake("fastnn::int8_gru_seq")(_fake_gru)
    if _extension.has_kernel("int8_rnn_seq", "CPU"):
        torch.library.register_fake("fastnn::int8_rnn_seq")(_fake_gru)  # same outputs as the GRU's
    if _extension.has_kernel("int8_moe_mlp", "CPU"):
        torch.library.register_fake("fastnn::int8_moe_mlp")(_fake_moe)


# ---------------------------------------------------------------------------------------------
# Which int8 kernel variant runs (portable C++ "default"; "avx2", "avx512_vnni" on x86-64; "neon",
# "neon_dotprod" on aarch64). The process starts with FASTNN_CPU_ISA (auto when unset: the best
# this CPU runs).

def _lib():
    if _extension.load() is None or not _extension.has_kernel("int8_linear", "CPU"):
        raise RuntimeError(f"fastnn: the compiled quantized kernels are not available ({_extension.error()})")
    return torch.ops.fastnn


def isa() -> str:
    """The int8 kernel variant in use."""
    return _lib().quantized_isa()


def isas() -> list[str]:
    """The CPU instruction-set levels this CPU runs, lowest first ("default", "avx2", "avx512",
    "avx512_vnni" on x86-64; "default", "neon", "neon_dotprod" on AArch64). Each level picks an int8
    kernel variant (:func:`isa`) and the copy of the fp32 kernels compiled for it."""
    return list(_lib().quantized_isas())


def set_isa(name: str) -> str:
    """Use level ``name`` (one of :func:`isas`, or "auto": the best) from now on, for the int8 and the
    fp32 kernels alike; returns the level that was in use (pass it back to restore). A level this
    CPU cannot run raises ValueError."""
    return _lib().quantized_set_isa(name)
