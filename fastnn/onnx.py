"""``fastnn.onnx.export``: models with fastnn layers as ONNX files that run without fastnn.

:func:`export` mirrors ``torch.onnx.export`` (the dynamo exporter). fastnn's ops are custom torch
ops, which no ONNX runtime knows; a translation table (:data:`TRANSLATIONS`) writes each of them as
standard ONNX ops (opset 18 operators, usable with any ``opset_version`` >= 18):

* ``fastnn::lstm_seq`` / ``gru_seq`` / ``rnn_seq`` and the cells: the ONNX ``LSTM`` / ``GRU``
  (``linear_before_reset=1``) / ``RNN`` ops, one per layer and direction, gates reordered (torch
  LSTM i,f,g,o -> ONNX i,o,f,c; GRU r,z,n -> z,r,h), initial states and ``lengths``
  (``sequence_lens``) kept;
* ``fastnn::int8_linear``: fastnn's dynamic int8 arithmetic itself, per-row symmetric activation
  quantization (``ReduceMax(Abs)``, ``Round``, ``Clip``) then ``MatMulInteger`` int8 x int8 and the
  two scales, so the numbers are fastnn's (``DynamicQuantizeLinear`` quantizes a whole tensor to
  uint8 with one scale and a zero point, which is not fastnn's scheme); weight-only layers are
  ``MatMul`` with the int8 weights cast to float;
* ``fastnn::int8_{lstm,gru,rnn}_seq``: the input projection of all steps as ``int8_linear`` above,
  then a ``Scan`` whose body is one step of fastnn's int8 cell (the hidden state quantized per row,
  ``MatMulInteger`` with the int8 recurrent weight, fp32 gate math), so the numbers are fastnn's;
* the MoE ops (``topk_gating``, ``moe_mlp``, ``permute_tokens``, ``unpermute_tokens``, ``grouped_mm``):
  ``TopK``, ``CumSum``, ``ScatterElements``, ``MatMul``...; the grouped GEMM runs every expert on
  every routed row and keeps each row's own (as the reference does: exact, E times the FLOPs).

An op or an option with no translation (a fastnn op missing from the table, an LSTM projection,
dropout masks of a model left in training mode, capacity-limited or grouped MoE routing) raises
:class:`UnsupportedError` naming the op and the module that calls it, before anything is written.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Optional

import onnx_ir as ir
import onnxscript.evaluator
import torch
from onnx_ir import tape as ir_tape
from onnxscript import opset18 as op
from torch.onnx._internal.exporter import _tensors

__all__ = ["export", "UnsupportedError", "TRANSLATIONS"]

_FLOAT, _INT32, _INT64, _INT8, _BOOL = 1, 6, 7, 3, 9  # onnx.TensorProto data types
_SCANS = itertools.count()  # numbers the Scan bodies


class UnsupportedError(RuntimeError):
    """A model holds a module or an op that fastnn.onnx cannot write as ONNX."""


# ---------------------------------------------------------------------------------------------
# Small helpers (called while the exporter traces a translation: the values are ONNX values).

def _ints(*v: int, o=op):
    return o.Constant(value_ints=list(v))


def _scalar(v: float, like=None, o=op):
    c = o.Constant(value_float=float(v))
    return c if like is None else o.CastLike(c, like)


def _static(value, dim: int, what: str) -> int:
    """A dimension that an ONNX attribute needs as a number (weights have static shapes)."""
    shape = value.shape
    if shape is None or not isinstance(shape[dim], int):
        raise UnsupportedError(f"fastnn.onnx: {what} needs a static weight shape, got {shape}")
    return int(shape[dim])


# ---------------------------------------------------------------------------------------------
# Recurrent layers: ONNX LSTM / GRU / RNN, one direction each.

# torch's gate blocks in ONNX's order: LSTM i,f,g,o -> i,o,f,c; GRU r,z,n -> z,r,h.
_GATE_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn": (0,)}


def _gates(w, kind: str, H: int):
    """Reorder the gate blocks (axis 0, ``H`` rows each) of a torch weight or bias into ONNX's order:
    one Gather of constant rows, which the exporter folds into the stored weight."""
    order = _GATE_ORDER[kind]
    if len(order) == 1:
        return w
    rows = [g * H + r for g in order for r in range(H)]
    return op.Gather(w, op.Constant(value_ints=rows), axis=0)


def _recurrent(kind: str, input, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse: bool,
               nonlinearity: str = "tanh"):
    """One layer and direction over ``input`` [T, B, I] with states [B, H]: (output [T, B, H], *finals)."""
    H = _static(w_hh, 1, f"fastnn::{kind}_seq")
    W = op.Unsqueeze(_gates(w_ih, kind, H), _ints(0))
    R = op.Unsqueeze(_gates(w_hh, kind, H), _ints(0))
    B = None
    if b_ih is not None or b_hh is not None:  # ONNX has one B for both: a missing one is zeros
        other = b_ih if b_ih is not None else b_hh
        b_ih, b_hh = [op.Mul(other, _scalar(0.0)) if b is None else b for b in (b_ih, b_hh)]
        B = op.Unsqueeze(op.Concat(_gates(b_ih, kind, H), _gates(b_hh, kind, H), axis=0), _ints(0))
    seq = None if lengths is None else op.Cast(lengths, to=_INT32)
    init = [op.Unsqueeze(s, _ints(0)) for s in states]
    direction = "reverse" if reverse else "forward"
    if kind == "lstm":
        Y, Y_h, Y_c = op.LSTM(input, W, R, B, seq, init[0], init[1], hidden_size=H, direction=direction)
        finals = [Y_h, Y_c]
    elif kind == "gru":
        Y, Y_h = op.GRU(input, W, R, B, seq, init[0], hidden_size=H, direction=direction, linear_before_reset=1)
        finals = [Y_h]
    else:
        act = {"tanh": "Tanh", "relu": "Relu"}[nonlinearity]
        Y, Y_h = op.RNN(input, W, R, B, seq, init[0], hidden_size=H, direction=direction, activations=[act])
        finals = [Y_h]
    return (op.Squeeze(Y, _ints(1)), *[op.Squeeze(f, _ints(0)) for f in finals])


def _unused():  # an output no inference graph reads (the float ops' backward workspace)
    return op.ConstantOfShape(_ints(0))


def lstm_seq(input, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, lengths=None, h_mask=None,
             reverse: bool = False):
    out, h, c = _recurrent("lstm", input, (h0, c0), w_ih, w_hh, b_ih, b_hh, lengths, reverse)
    return out, h, c, _unused()


def gru_seq(input, h0, w_ih, w_hh, b_ih=None, b_hh=None, lengths=None, h_mask=None, reverse: bool = False):
    out, h = _recurrent("gru", input, (h0,), w_ih, w_hh, b_ih, b_hh, lengths, reverse)
    return out, h, _unused()


def rnn_seq(input, h0, w_ih, w_hh, b_ih=None, b_hh=None, lengths=None, h_mask=None, reverse: bool = False,
            nonlinearity: str = "tanh"):
    out, h = _recurrent("rnn", input, (h0,), w_ih, w_hh, b_ih, b_hh, lengths, reverse, nonlinearity)
    return out, h, _unused()


def lstm_cell(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None):
    _, h, c = _recurrent("lstm", op.Unsqueeze(input, _ints(0)), (hx, cx), w_ih, w_hh, b_ih, b_hh, None, False)
    return h, c, _unused()


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    _, h = _recurrent("gru", op.Unsqueeze(input, _ints(0)), (hx,), w_ih, w_hh, b_ih, b_hh, None, False)
    return h, _unused()


# ---------------------------------------------------------------------------------------------
# int8 Linear: fastnn's per-row symmetric dynamic quantization, then MatMulInteger.

def _quantize_rows(x, o=op):
    """fastnn.reference.quantized.quantize_rows over the last axis: (x_q int8, scale [..., 1]); a
    row holding NaN or inf gets scale NaN and zeros, so its outputs are NaN."""
    amax = o.ReduceMax(o.Abs(x), _ints(-1, o=o), keepdims=1)
    scale = o.Div(amax, _scalar(127.0, o=o))
    scale = o.Where(o.Equal(amax, _scalar(0.0, o=o)), _scalar(1.0, o=o), scale)
    finite = o.Not(o.Or(o.IsNaN(scale), o.IsInf(scale)))
    safe = o.Where(finite, scale, _scalar(1.0, o=o))
    q = o.Clip(o.Round(o.Div(x, safe)), _scalar(-127.0, o=o), _scalar(127.0, o=o))
    q = o.Cast(o.Where(finite, q, _scalar(0.0, o=o)), to=_INT8)
    return q, o.Where(finite, scale, _scalar(float("nan"), o=o))


def _int8_matmul(x, w_t, w_scale, bias, weight_only: bool, o=op):
    """fastnn.reference.quantized.int8_linear with the int8 weight transposed (``w_t`` [K, N])."""
    if weight_only:
        y = o.Mul(o.MatMul(x, o.Cast(w_t, to=_FLOAT)), w_scale)
    else:
        x_q, x_scale = _quantize_rows(x, o)
        y = o.Mul(o.Mul(o.Cast(o.MatMulInteger(x_q, w_t), to=_FLOAT), x_scale), w_scale)
    return y if bias is None else o.Add(y, bias)


def int8_linear(input, w_q, w_scale, bias=None, weight_only: bool = False):
    return _int8_matmul(input, op.Transpose(w_q, perm=[1, 0]), w_scale, bias, weight_only)


# ---------------------------------------------------------------------------------------------
# int8 recurrent layers: the input projection of every step as int8_linear, then a Scan whose body
# is one step of fastnn.reference.quantized (the hidden state quantized per row, MatMulInteger).

class _Subgraph:
    """``op.<Name>(...)`` over an onnx_ir tape: builds the body graph of a Scan."""

    def __init__(self):
        self.tape = ir_tape.Tape()

    def __getattr__(self, name: str):
        def emit(*inputs, **attrs):
            if name == "Split":  # the only multi-output op of the bodies
                return self.tape.op_multi_out(name, list(inputs), attrs, num_outputs=attrs["num_outputs"])
            return self.tape.op(name, list(inputs), attrs)
        return emit


def _step(kind: str, o, states, gi, w_t, w_scale, bias, weight_only: bool, nonlinearity: str, proj=None):
    """One step of fastnn's int8 cell: the new states (the first is the output). ``proj``: an LSTM's
    projection (``W_hr^T``, its scales), or None."""
    h = states[0]
    gh = _int8_matmul(h, w_t, w_scale, bias, weight_only, o)
    if kind == "lstm":
        i, f, g, out = o.Split(o.Add(gi, gh), axis=-1, num_outputs=4)
        c = o.Add(o.Mul(o.Sigmoid(f), states[1]), o.Mul(o.Sigmoid(i), o.Tanh(g)))
        h = o.Mul(o.Sigmoid(out), o.Tanh(c))
        return [h if proj is None else _int8_matmul(h, proj[0], proj[1], None, weight_only, o), c]
    if kind == "gru":
        xr, xz, xn = o.Split(gi, axis=-1, num_outputs=3)
        hr, hz, hn = o.Split(gh, axis=-1, num_outputs=3)
        r, z = o.Sigmoid(o.Add(xr, hr)), o.Sigmoid(o.Add(xz, hz))
        n = o.Tanh(o.Add(xn, o.Mul(r, hn)))
        return [o.Add(o.Mul(o.Sub(_scalar(1.0, o=o), z), n), o.Mul(z, h))]
    pre = o.Add(gi, gh)
    return [o.Tanh(pre) if nonlinearity == "tanh" else o.Relu(pre)]


def _int8_recurrent(kind: str, input, states, w_ih_q, w_ih_scale, w_hh_q, w_hh_scale, b_ih, b_hh, lengths,
                    reverse: bool, weight_only: bool, nonlinearity: str = "tanh", w_hr_q=None, w_hr_scale=None):
    P = _static(w_hh_q, 1, f"fastnn::int8_{kind}_seq")  # the size of h
    H = P if w_hr_q is None else _static(w_hr_q, 1, f"fastnn::int8_{kind}_seq")  # the size of c
    gi = _int8_matmul(input, op.Transpose(w_ih_q, perm=[1, 0]), w_ih_scale, b_ih, weight_only)  # [T, B, G]
    w_t = op.Transpose(w_hh_q, perm=[1, 0])
    proj = None if w_hr_q is None else (op.Transpose(w_hr_q, perm=[1, 0]), w_hr_scale)
    body = _Subgraph()

    def value(dtype, shape):  # an input of the body
        return ir.Value(type=ir.TensorType(dtype), shape=ir.Shape(shape))

    b_states = [value(ir.DataType.FLOAT, [None, P if i == 0 else H]) for i in range(len(states))]
    b_gi = value(ir.DataType.FLOAT, [None, len(_GATE_ORDER[kind]) * H])
    new = _step(kind, body, b_states, b_gi, w_t, w_hh_scale, b_hh, weight_only, nonlinearity, proj)
    scan_inputs, b_inputs = [gi], [b_gi]
    if lengths is None:
        out = new[0]
    else:  # sequence b stops at lengths[b]: its state stays, its output is 0 (fastnn's convention)
        b_t = value(ir.DataType.INT64, [])
        live = body.Unsqueeze(body.Less(b_t, lengths), _ints(1, o=body))
        new = [body.Where(live, n, s) for n, s in zip(new, b_states)]
        out = body.Where(live, new[0], _scalar(0.0, o=body))
        scan_inputs.append(_arange_like(_dim(input, 0)))
        b_inputs.append(b_t)
    outs = [body.Identity(n) for n in new] + [body.Identity(out)]
    # ONNX wants every name unique in the whole model, subgraphs included (single assignment)
    scope = f"int8_{kind}_step{next(_SCANS)}"
    for i, v in enumerate([*b_states, *b_inputs, *(o for n in body.tape.nodes for o in n.outputs)]):
        v.name = f"{scope}_{i}"
    graph = ir.Graph([*b_states, *b_inputs], outs, nodes=body.tape.nodes, name=scope, opset_imports={"": 18})
    recorder = onnxscript.evaluator.default()
    results = [_tensors.SymbolicTensor(recorder.opset) for _ in range(len(states) + 1)]
    direction = 1 if reverse else 0
    recorder.nodes.append(ir.Node("", "Scan", [*states, *scan_inputs], outputs=results, version=18, attributes=[
        ir.AttrGraph("body", graph), ir.AttrInt64("num_scan_inputs", len(scan_inputs)),
        ir.AttrInt64s("scan_input_directions", [direction] * len(scan_inputs)),
        ir.AttrInt64s("scan_output_directions", [direction])]))
    return (results[-1], *results[:-1])


def int8_lstm_seq(input, h0, c0, w_ih_q, w_ih_scale, w_hh_q, w_hh_scale, b_ih=None, b_hh=None, lengths=None,
                  reverse: bool = False, weight_only: bool = False, w_hr_q=None, w_hr_scale=None):
    return _int8_recurrent("lstm", input, (h0, c0), w_ih_q, w_ih_scale, w_hh_q, w_hh_scale, b_ih, b_hh, lengths,
                           reverse, weight_only, w_hr_q=w_hr_q, w_hr_scale=w_hr_scale)


def int8_gru_seq(input, h0, w_ih_q, w_ih_scale, w_hh_q, w_hh_scale, b_ih=None, b_hh=None, lengths=None,
                 reverse: bool = False, weight_only: bool = False):
    return _int8_recurrent("gru", input, (h0,), w_ih_q, w_ih_scale, w_hh_q, w_hh_scale, b_ih, b_hh, lengths,
                           reverse, weight_only)


def int8_rnn_seq(input, h0, w_ih_q, w_ih_scale, w_hh_q, w_hh_scale, b_ih=None, b_hh=None, lengths=None,
                 reverse: bool = False, weight_only: bool = False, nonlinearity: str = "tanh"):
    return _int8_recurrent("rnn", input, (h0,), w_ih_q, w_ih_scale, w_hh_q, w_hh_scale, b_ih, b_hh, lengths,
                           reverse, weight_only, nonlinearity)


# ---------------------------------------------------------------------------------------------
# MoE: gating with its permutation metadata, permutation, grouped GEMM, combine.

def _arange_like(n):
    return op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1))


def _dim(x, i: int):
    return op.Gather(op.Shape(x), op.Constant(value_int=i), axis=0)


def _scores(x, score_func: str):
    if score_func == "softmax":
        return op.Softmax(x, axis=-1)
    if score_func == "sigmoid":
        return op.Sigmoid(x)
    return x


def _layout(ids, E):
    """tokens_per_expert [E], sorted_slots [T*k], slot_positions [T, k] of expert_ids [T, k] (no
    dropped slots): the stable sort of the slots by expert, without a sort."""
    flat = op.Reshape(ids, _ints(-1))
    onehot = op.Cast(op.Equal(op.Unsqueeze(flat, _ints(1)), op.Unsqueeze(_arange_like(E), _ints(0))), to=_INT64)
    counts = op.ReduceSum(onehot, _ints(0), keepdims=0)
    before = op.CumSum(onehot, op.Constant(value_int=0), exclusive=1)  # earlier slots of each expert
    rank = op.Squeeze(op.GatherElements(before, op.Unsqueeze(flat, _ints(1)), axis=1), _ints(1))
    starts = op.CumSum(counts, op.Constant(value_int=0), exclusive=1)
    pos = op.Add(op.Gather(starts, flat, axis=0), rank)
    sorted_slots = op.ScatterElements(op.Mul(flat, op.Constant(value_int=0)), pos,
                                      _arange_like(op.Size(flat)), axis=0)
    return counts, sorted_slots, op.Reshape(pos, op.Shape(ids))


def topk_gating(logits, top_k: int, score_func: str = "softmax", renormalize: bool = True, selection_bias=None,
                num_groups: int = 1, topk_groups: int = 1, group_score: str = "max",
                routed_scaling_factor: float = 1.0, capacity_factor: float = 0.0, drop_policy: str = "drop"):
    x = op.Cast(logits, to=_FLOAT)
    sel = _scores(x, score_func)
    if selection_bias is not None:
        sel = op.Add(sel, op.Cast(selection_bias, to=_FLOAT))
    sel = op.Where(op.IsNaN(sel), _scalar(-math.inf), sel)
    _, ids = op.TopK(sel, _ints(top_k), axis=-1, largest=1, sorted=1)  # ties: the lower index first
    if score_func == "topk_softmax":
        w = op.Softmax(op.GatherElements(x, ids, axis=1), axis=-1)
        nan_row = op.Cast(op.ReduceMax(op.Cast(op.IsNaN(x), to=_FLOAT), _ints(-1), keepdims=1), to=_BOOL)
        w = op.Where(nan_row, _scalar(float("nan")), w)
    else:
        w = op.GatherElements(_scores(x, score_func), ids, axis=1)
        if renormalize:
            eps = 1e-20 if score_func == "sigmoid" else 0.0
            denom = op.Add(op.ReduceSum(w, _ints(-1), keepdims=1), _scalar(eps))
            w = op.Div(w, op.Where(op.Equal(denom, _scalar(0.0)), _scalar(1.0), denom))
    if routed_scaling_factor != 1.0:
        w = op.Mul(w, _scalar(routed_scaling_factor))
    counts, sorted_slots, positions = _layout(ids, _dim(logits, 1))
    return w, ids, counts, sorted_slots, positions


def permute_tokens(x, sorted_slots, top_k: int):
    return op.Gather(x, op.Div(sorted_slots, op.Constant(value_int=top_k)), axis=0)


def unpermute_tokens(y, slot_positions, weights):
    rows = op.Gather(y, op.Reshape(slot_positions, _ints(-1)), axis=0)
    rows = op.Reshape(rows, op.Concat(op.Shape(slot_positions), _ints(-1), axis=0))  # [T, k, H]
    rows = op.Mul(rows, op.Unsqueeze(op.CastLike(weights, y), _ints(-1)))
    return op.ReduceSum(rows, _ints(1), keepdims=0)


def grouped_mm(a, b, offsets, trans_b: bool = False):
    """out[r] = a[r] @ B_e(r): every expert's product of every row, then each row's own (rows past
    offsets[-1] belong to no expert and are zero)."""
    rows = _arange_like(_dim(a, 0))
    expert = op.ReduceSum(op.Cast(op.LessOrEqual(op.Unsqueeze(offsets, _ints(0)), op.Unsqueeze(rows, _ints(1))),
                                  to=_INT64), _ints(1), keepdims=0)  # searchsorted(offsets, r, right=True)
    E = _dim(b, 0)
    mask = op.Equal(op.Unsqueeze(_arange_like(E), _ints(1, 2)), op.Unsqueeze(expert, _ints(0, 2)))  # [E, M, 1]
    bt = op.Transpose(b, perm=[0, 2, 1]) if trans_b else b
    every = op.MatMul(op.Unsqueeze(a, _ints(0)), bt)  # [E, M, N]
    return op.ReduceSum(op.Where(mask, every, _scalar(0.0, a)), _ints(0), keepdims=0)


def _gated_activation(h, activation: str):
    gate, up = op.Split(h, axis=-1, num_outputs=2)
    half = op.Mul(gate, _scalar(0.5, gate))
    if activation == "silu":
        act = op.Mul(gate, op.Sigmoid(gate))
    elif activation == "gelu":
        act = op.Mul(half, op.Add(op.Erf(op.Mul(gate, _scalar(1 / math.sqrt(2), gate))), _scalar(1.0, gate)))
    elif activation == "gelu_tanh":
        inner = op.Mul(op.Add(gate, op.Mul(op.Mul(op.Mul(gate, gate), gate), _scalar(0.044715, gate))),
                       _scalar(math.sqrt(2 / math.pi), gate))
        act = op.Mul(half, op.Add(op.Tanh(inner), _scalar(1.0, gate)))
    else:
        act = op.Relu(gate)
    return op.Mul(act, up)


def moe_mlp(x, sorted_slots, tokens_per_expert, slot_positions, weights, gate_up_proj, down_proj,
            activation: str = "silu"):
    top_k = _static(slot_positions, 1, "fastnn::moe_mlp")
    offsets = op.CumSum(tokens_per_expert, op.Constant(value_int=0))
    h = grouped_mm(permute_tokens(x, sorted_slots, top_k), gate_up_proj, offsets, True)
    y = grouped_mm(_gated_activation(h, activation), down_proj, offsets, True)
    return unpermute_tokens(y, slot_positions, weights)


# ---------------------------------------------------------------------------------------------
# The table, and what each op's translation does not cover (checked on the exported graph).

TRANSLATIONS: dict[str, Callable] = {f.__name__: f for f in (
    lstm_seq, gru_seq, rnn_seq, lstm_cell, gru_cell, int8_linear, int8_lstm_seq, int8_gru_seq, int8_rnn_seq,
    topk_gating, permute_tokens, unpermute_tokens, grouped_mm, moe_mlp)}
"""fastnn op name (``torch.ops.fastnn.<name>``) -> its ONNX translation."""

def _limits(name: str, a: dict) -> Optional[str]:
    """Why the call of ``fastnn::<name>`` with arguments ``a`` (schema names) has no translation."""
    if a.get("w_hr") is not None:
        return "an LSTM projection (proj_size > 0): ONNX's LSTM op has none"
    if a.get("h_mask") is not None:
        return "a dropout mask (the model is in training mode: call .eval() before exporting)"
    if name == "topk_gating":
        if a.get("num_groups", 1) > 1:
            return f"grouped routing (num_groups={a['num_groups']})"
        if a.get("capacity_factor", 0.0) > 0:
            return f"capacity-limited routing (capacity_factor={a['capacity_factor']})"
        if a["logits"].dtype == torch.float64:
            return "float64 logits (the translation routes in float32)"
    if name in ("lstm_seq", "gru_seq", "rnn_seq", "lstm_cell", "gru_cell") and a["input"].dtype != torch.float32:
        return f"a {a['input'].dtype} input (the ONNX recurrent ops are exported for float32)"
    return None


# ---------------------------------------------------------------------------------------------
# export

def _module_of(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "the model's forward"
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    return f"module '{path or '<root>'}' ({cls_name})"


def _node_args(node: torch.fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, tensors as their example values."""
    def val(x):
        return x.meta.get("val") if isinstance(x, torch.fx.Node) else x
    schema = node.target._schema
    a = {arg.name: (arg.default_value if arg.has_default_value() else None) for arg in schema.arguments}
    a.update({arg.name: val(v) for arg, v in zip(schema.arguments, node.args)})
    a.update({k: val(v) for k, v in node.kwargs.items()})
    return a


def _check_graph(program: "torch.export.ExportedProgram", table: dict) -> None:
    """Raise UnsupportedError for every call of a fastnn op with no translation (or an option its
    translation does not cover), naming the op and the module that calls it."""
    problems = []
    for node in program.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) \
                or target.namespace != "fastnn":
            continue
        name = target._schema.name.split("::")[-1]
        if target not in table:
            problems.append(f"{_module_of(node)} calls fastnn::{name}, which has no ONNX translation "
                            f"(translated: {', '.join(sorted(TRANSLATIONS))})")
        elif name in TRANSLATIONS and (why := _limits(name, _node_args(node))):
            problems.append(f"{_module_of(node)} calls fastnn::{name} with {why}")
    if problems:
        raise UnsupportedError("fastnn.onnx.export: the model cannot be written as ONNX:\n  " + "\n  ".join(problems))


def _table(user: Optional[dict]) -> dict:
    table = {}
    for name, fn in TRANSLATIONS.items():
        packet = getattr(torch.ops.fastnn, name, None)  # ops of a library built without a family are absent
        if packet is not None:
            table[packet.default] = fn
    table.update(user or {})
    return table


def export(model: torch.nn.Module, args: tuple = (), f=None, *, kwargs: Optional[dict] = None,
           dynamic_shapes=None, dynamic_axes=None, input_names=None, output_names=None, strict: bool = False,
           custom_translation_table: Optional[dict] = None, **export_kwargs):
    """Export ``model`` to ONNX, fastnn's ops written as standard ONNX ops (see the module docstring).

    Mirrors ``torch.onnx.export(model, args, f, dynamo=True, ...)``: same arguments (``kwargs``,
    ``dynamic_shapes`` or ``dynamic_axes``, ``input_names``, ``output_names``, ``opset_version``,
    ``external_data``, ``optimize``...), same result (a ``torch.onnx.ONNXProgram``; written to ``f``
    when given). The export runs on a CPU copy of the model (the inputs are moved to the CPU too);
    ``model`` may be a plain torch model: its supported layers (``nn.LSTM``, ``nn.GRU``...)
    are swapped for fastnn's in a copy (``fastnn.convert``), so ``model`` is not modified and an
    ``nn.LSTM`` keeps a dynamic sequence length, which torch.export would specialise. Quantized
    models (``fastnn.quantize_dynamic``) and ``fastnn.MoE`` export as they are.

    The file runs in onnxruntime (or any ONNX runtime) without fastnn. The model is exported in the
    mode it is in: call ``model.eval()`` first (dropout masks have no translation).

    Extra arguments: ``strict`` is torch.export's; ``custom_translation_table`` adds to (and
    overrides) fastnn's :data:`TRANSLATIONS`.

    Raises :class:`UnsupportedError`, before writing anything, when the model calls a fastnn op
    with no translation or uses an option its translation lacks (the message names the op and the
    module), and when torch.export cannot capture the model (the message holds torch's reason).
    """
    if export_kwargs.pop("dynamo", True) is not True:
        raise TypeError("fastnn.onnx.export: argument 'dynamo': expected True (fastnn's ops are translated by the "
                        "dynamo exporter), got False")
    from torch.onnx._internal.exporter import _dynamic_shapes

    # Traced on the CPU: the ops' CPU backends are the ones translated (a CUDA model would trace
    # fastnn's Triton ops), and an ONNX graph does not depend on the device it was traced on.
    from .convert import converted_copy

    model = converted_copy(model, "onnx.export").cpu()
    args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.cpu(), (args, kwargs))
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    if dynamic_shapes is None and dynamic_axes is not None:
        dynamic_shapes, args, kwargs = _dynamic_shapes.from_dynamic_axes_to_dynamic_shapes(
            model, args, kwargs, dynamic_axes=dynamic_axes, input_names=input_names,
            output_names=set(output_names or ()))
    export_dims, _ = _dynamic_shapes.convert_str_to_export_dim(dynamic_shapes)
    try:
        # An inference graph: under no_grad, a float layer feeding an int8 one (inference-only ops
        # refuse inputs that require grad) exports as it runs in eager inference.
        with torch.no_grad():
            program = torch.export.export(model, args, kwargs, dynamic_shapes=export_dims, strict=strict)
    except Exception as e:
        raise UnsupportedError(f"fastnn.onnx.export: torch.export could not capture the model "
                               f"({type(e).__name__}: {e})") from e
    table = _table(custom_translation_table)
    _check_graph(program, table)
    return torch.onnx.export(program, args, f, dynamo=True, custom_translation_table=table, input_names=input_names,
                             output_names=output_names, dynamic_shapes=dynamic_shapes, **export_kwargs)
