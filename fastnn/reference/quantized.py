"""Pure-PyTorch int8 ops with the exact signatures of the ``fastnn::int8_*`` ops: the test oracle
and the fallback of last resort.

The quantization scheme (the compiled kernels in csrc/quantized/ compute the same numbers):

* **Weights**: int8, symmetric, one fp32 scale per output channel (row of ``[N, K]``):
  ``scale[n] = max_k |w[n, k]| / 127`` (1 when that is 0: an all-zero row, or one so small that
  the division underflows), ``w_q = round(w / scale)`` clamped to
  [-127, 127]. Made once, by :func:`quantize_weight`.
* **Activations** (dynamic mode): quantized inside the op, **per row** (one scale per token of a
  Linear input, per batch row of a recurrent input or hidden state, recomputed every step), with the
  same symmetric rule. Per-row scales keep one outlier row (or a NaN row) from degrading the others.
  A row holding NaN or inf has no finite scale: its outputs are NaN, as they would be (or be inf)
  in the float layer, and no other row is affected.
* **Products**: int8 x int8 summed exactly in int32, then ``acc * x_scale[m] * w_scale[n] + bias[n]``
  in fp32.
* **Weight-only mode** (``weight_only=True``): activations stay fp32; ``(x @ w_q^T) * w_scale + bias``
  in fp32 (the kernel dequantizes the int8 weights as it reads them).

Rounding is to nearest, ties to even (``torch.round``, ``std::nearbyint``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["quantize_weight", "quantize_rows", "exact_row_limit", "int8_linear", "int8_lstm_seq", "int8_gru_seq",
           "int8_rnn_seq", "QMAX", "int8_moe_mlp"]

QMAX = 127
_FLT_MAX = torch.finfo(torch.float32).max


def _row_amax(x: Tensor) -> Tensor:
    return x.abs().amax(dim=-1) if x.shape[-1] > 0 else x.new_zeros(x.shape[:-1])


def _row_scale(x: Tensor) -> Tensor:
    scale = _row_amax(x) / QMAX
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def exact_row_limit(K: int) -> float:
    """The largest ``max|x_row|`` computed through the int8 (or fp32 weight-only) path for rows of
    length ``K``; larger rows (and non-finite ones) are computed exactly in fp64. With ``|w_q| <=
    127``, a row under it keeps every fp32 partial sum below ``FLT_MAX``. Computed in fp32 as the
    kernels compute it."""
    return float(torch.tensor(_FLT_MAX, dtype=torch.float32) / (128.0 * max(K, 1)))


def _exact_rows(x: Tensor) -> Tensor:
    """Rows of ``x [M, K]`` computed exactly: non-finite, or larger than :func:`exact_row_limit`
    (``amax`` is NaN for a row holding NaN, so ``not <=`` catches it)."""
    return ~(_row_amax(x) <= exact_row_limit(x.shape[-1]))


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: ``weight [N, K]`` (float) -> ``(w_q int8 [N, K], scale fp32 [N])``
    with ``weight ~= w_q * scale[:, None]``. Non-finite weights raise ValueError."""
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("fastnn: argument 'weight': expected finite values to quantize, got NaN or inf")
    scale = _row_scale(w)
    w_q = torch.round(w / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return w_q, scale


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-row int8 of ``x [M, K]`` (fp32): ``(x_q int8 [M, K], scale fp32 [M])``. A row with
    NaN or inf gets scale NaN and zeros in ``x_q``."""
    scale = _row_scale(x)
    finite = torch.isfinite(scale)
    q = torch.round(x / torch.where(finite, scale, torch.ones_like(scale)).unsqueeze(-1)).clamp_(-QMAX, QMAX)
    q = torch.where(finite.unsqueeze(-1), q, torch.zeros_like(q)).to(torch.int8)
    return q, torch.where(finite, scale, torch.full_like(scale, float("nan")))


def int8_linear(input: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                weight_only: bool = False) -> Tensor:
    """``y = x W^T + b`` with int8 weights: ``input [..., K]`` float32, ``w_q [N, K]`` int8, ``w_scale [N]``
    float32 (per output channel), ``bias [N]`` float32 or None -> ``[..., N]`` float32.

    Dynamic mode (default): each row of ``input`` (one token) is quantized to int8 with its own
    scale, products are accumulated in int32. ``weight_only=True``: fp32 activations times the
    dequantized weights, accumulated in fp32. Rows holding NaN/inf or larger than
    :func:`exact_row_limit` are computed in fp64 (see the module docstring). Inference only (no
    gradient)."""
    lead = input.shape[:-1]
    x = input.reshape(lead.numel(), input.shape[-1])  # not -1: ambiguous when in_features is 0
    if weight_only:
        y = (x @ w_q.float().t()) * w_scale
    else:
        x_q, x_scale = quantize_rows(x)
        acc = x_q.int() @ w_q.int().t() if x.shape[0] and w_q.shape[0] else \
            torch.zeros((x.shape[0], w_q.shape[0]), dtype=torch.int32)
        y = acc.float() * x_scale.unsqueeze(-1) * w_scale
    rows = _exact_rows(x)
    if bool(rows.any()) and w_q.shape[0]:
        exact = (x[rows].double() @ w_q.double().t()) * w_scale.double()
        y = y.index_put((rows.nonzero().squeeze(-1),), exact.float())
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, w_q.shape[0])


def _run(step, input: Tensor, states: list[Tensor], lengths: Optional[Tensor], reverse: bool) -> tuple[Tensor, list[Tensor]]:
    T, B = input.shape[0], input.shape[1]
    H = states[0].shape[-1]
    out = input.new_zeros((T, B, H))
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        new = step(t, states)
        if lengths is not None:
            live = (t < lengths).unsqueeze(-1)
            new = [torch.where(live, n, o) for n, o in zip(new, states)]
            out[t] = torch.where(live, new[0], torch.zeros_like(new[0]))
        else:
            out[t] = new[0]
        states = new
    return out, states


def int8_lstm_seq(input: Tensor, h0: Tensor, c0: Tensor, w_ih_q: Tensor, w_ih_scale: Tensor, w_hh_q: Tensor,
                  w_hh_scale: Tensor, b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None,
                  lengths: Optional[Tensor] = None, reverse: bool = False,
                  weight_only: bool = False, w_hr_q: Optional[Tensor] = None,
                  w_hr_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """One int8 LSTM layer and direction: ``(output [T, B, P], h_n [B, P], c_n [B, H])``, all float32,
    where ``P`` is the size of ``h``: ``H``, or the projection's size.

    ``input [T, B, I]`` time-major float32; ``h0 [B, P]``, ``c0 [B, H]`` float32; ``w_ih_q [4H, I]`` and
    ``w_hh_q [4H, P]`` int8 with per-row float32 scales ``[4H]`` (torch.nn.LSTM's layout, gates i, f, g,
    o); biases ``[4H]`` float32 or None. ``w_hr_q [P, H]`` int8 with scales ``w_hr_scale [P]``, or both
    None: torch.nn.LSTM's ``proj_size``, ``h = W_hr (o * tanh(c))`` (no bias), the product quantized as
    the others. ``lengths`` (int64 ``[B]``, on the CPU): sequence ``b``
    occupies steps ``0 .. lengths[b]-1``; later steps keep the state and give zeros in ``output``
    (a PackedSequence in padded form); with ``reverse`` its recurrence starts at step
    ``lengths[b]-1``. The input projection of all steps is one int8 GEMM (each ``[B, I]`` row of
    each step quantized per row); each step's recurrent product quantizes ``h`` per batch row (and
    the projection ``o * tanh(c)``). Gate math and state are float32. Inference only."""
    gi = int8_linear(input, w_ih_q, w_ih_scale, b_ih, weight_only)

    def step(t, states):
        h, c = states
        gates = gi[t] + int8_linear(h, w_hh_q, w_hh_scale, b_hh, weight_only)
        i, f, g, o = gates.chunk(4, -1)
        c2 = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h2 = o.sigmoid() * c2.tanh()
        if w_hr_q is not None:
            h2 = int8_linear(h2, w_hr_q, w_hr_scale, None, weight_only)
        return [h2, c2]

    out, (hn, cn) = _run(step, input, [h0, c0], lengths, reverse)
    return out, hn, cn


def int8_gru_seq(input: Tensor, h0: Tensor, w_ih_q: Tensor, w_ih_scale: Tensor, w_hh_q: Tensor,
                 w_hh_scale: Tensor, b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None,
                 lengths: Optional[Tensor] = None, reverse: bool = False,
                 weight_only: bool = False) -> tuple[Tensor, Tensor]:
    """One int8 GRU layer and direction: ``(output [T, B, H], h_n [B, H])``, float32, with torch's
    ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))`` (gates r, z, n; weights ``[3H, *]``). Arguments,
    quantization and ``lengths``/``reverse`` as :func:`int8_lstm_seq`. Inference only."""
    gi = int8_linear(input, w_ih_q, w_ih_scale, b_ih, weight_only)

    def step(t, states):
        (h,) = states
        gh = int8_linear(h, w_hh_q, w_hh_scale, b_hh, weight_only)
        xr, xz, xn = gi[t].chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r = (xr + hr).sigmoid()
        z = (xz + hz).sigmoid()
        n = (xn + r * hn).tanh()
        return [(1 - z) * n + z * h]

    out, (hn,) = _run(step, input, [h0], lengths, reverse)
    return out, hn


def int8_rnn_seq(input: Tensor, h0: Tensor, w_ih_q: Tensor, w_ih_scale: Tensor, w_hh_q: Tensor,
                 w_hh_scale: Tensor, b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None,
                 lengths: Optional[Tensor] = None, reverse: bool = False, weight_only: bool = False,
                 nonlinearity: str = "tanh") -> tuple[Tensor, Tensor]:
    """One int8 Elman RNN layer and direction: ``(output [T, B, H], h_n [B, H])``, float32, with
    ``h' = act(W_ih x + b_ih + W_hh h + b_hh)``, ``act`` = ``nonlinearity`` ("tanh" or "relu"); weights
    ``[H, *]``. Arguments, quantization and ``lengths``/``reverse`` as :func:`int8_lstm_seq`."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"fastnn: argument 'int8_rnn_seq: nonlinearity': expected 'tanh' or 'relu', got {nonlinearity!r}")
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    gi = int8_linear(input, w_ih_q, w_ih_scale, b_ih, weight_only)

    def step(t, states):
        return [act(gi[t] + int8_linear(states[0], w_hh_q, w_hh_scale, b_hh, weight_only))]

    out, (hn,) = _run(step, input, [h0], lengths, reverse)
    return out, hn


def int8_moe_mlp(x: Tensor, sorted_slots: Tensor, tokens_per_expert: Tensor, slot_positions: Tensor,
                 weights: Tensor, gate_up_q: Tensor, gate_up_scale: Tensor, down_q: Tensor, down_scale: Tensor,
                 activation: str = "silu", weight_only: bool = False) -> Tensor:
    """The routed experts of an MoE layer with int8 expert weights: ``fastnn.ops.moe_mlp`` where each
    expert's two products are :func:`int8_linear` (no bias) -> ``[T, H]`` float32.

    ``x [T, H]`` float32 tokens; ``sorted_slots [T*k]``, ``tokens_per_expert [E]``, ``slot_positions
    [T, k]`` (int64) and ``weights [T, k]`` (float32) as :func:`fastnn.ops.topk_gating` returns them
    (slots dropped by a capacity limit come last in ``sorted_slots`` and weigh 0); ``gate_up_q [E, 2I,
    H]`` int8 (the Hugging Face experts layout: gate rows, then up rows) with scales ``[E, 2I]``;
    ``down_q [E, H, I]`` int8 with scales ``[E, H]``; ``activation`` of the gate: "silu", "gelu",
    "gelu_tanh" or "relu". Each expert computes ``act(gate) * up`` of its tokens, then the down
    product; the outputs are combined with the routing weights in float32.

    Dynamic mode: each token row, and each row of the intermediate ``act(gate) * up``, is quantized
    per row. ``weight_only=True``: fp32 rows, int8 weights dequantized. Inference only. This
    reference reads ``tokens_per_expert`` on the host."""
    from .moe import gated_activation, permute_tokens, unpermute_tokens

    k = slot_positions.shape[1]
    xs = permute_tokens(x, sorted_slots, k)
    y = xs.new_zeros((xs.shape[0], down_q.shape[1]))
    start = 0
    for e, n in enumerate(tokens_per_expert.tolist()):
        if n:
            h = int8_linear(xs[start:start + n], gate_up_q[e], gate_up_scale[e], None, weight_only)
            y[start:start + n] = int8_linear(gated_activation(h, activation), down_q[e], down_scale[e], None,
                                             weight_only)
        start += n
    return unpermute_tokens(y, slot_positions, weights)
