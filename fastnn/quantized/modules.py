"""Quantized modules: int8 counterparts of torch.nn.Linear, LSTM, GRU, RNN and their cells for CPU
inference.

Weights are int8 with one fp32 scale per output channel (made by :meth:`from_float`); biases, inputs,
outputs, states and gate math stay fp32. Activations are quantized per row inside the op (one
scale per token / batch row), or not at all with ``weight_only=True``. See
fastnn/reference/quantized.py for the exact arithmetic.

The weights are buffers, not parameters: ``state_dict()`` holds ``<name>_q`` (int8) and
``<name>_scale`` (fp32) for every float weight ``<name>``, plus the fp32 biases under their float
names, about a quarter of the float model's bytes. Loading a float state_dict raises an error
naming the float key.

Inference only: a forward call whose input requires grad while autograd is recording raises a
RuntimeError (the ops have no gradient; run under ``torch.no_grad()`` / ``torch.inference_mode()``).
Dropout between recurrent layers is an inference no-op and is not applied. CPU only for now: a
module or input on another device raises NotImplementedError saying so.

Dtypes: the arithmetic is fp32 whatever the float layer's dtype. A float64 (or float16/bfloat16)
model quantizes from its own weights; an input of such a dtype (and its states) is computed in fp32
and the outputs come back in the input's dtype, so a float64 model stays a float64 model to its
caller. The scales and biases stay fp32 through ``.double()`` / ``.half()``, and
``fastnn.dequantize`` gives float layers of the dtype that was quantized.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..ops import quantized as qops
from ..reference.quantized import quantize_weight

__all__ = ["Linear", "LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]

Tensor = torch.Tensor


def _to_fp32(t):
    """``t`` in fp32 (another floating dtype is converted; anything else is left to the op's checks)."""
    return t.float() if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float32 else t


def _back(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class _Quantized(nn.Module):
    """State-dict handling shared by the quantized modules: ``_weights`` are the float weight names."""

    _weights: tuple[str, ...] = ()
    _float_dtype: torch.dtype = torch.float32  # the dtype of the layer that was quantized

    def _apply(self, fn, recurse=True):
        # .double() / .half() / .to(dtype) would convert the fp32 scales and biases; the kernels read
        # fp32, so they are kept in fp32 (device moves still apply).
        super()._apply(fn, recurse)
        for name, b in self._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                self._buffers[name] = b.float()
        return self

    def _check_device(self, input, what: str = "the input is") -> None:
        """NotImplementedError, naming the module, when it or its input is not on the CPU."""
        where = {"the module's weights are": getattr(self, f"{self._weights[0]}_q").device} if self._weights else {}
        if isinstance(input, Tensor):
            where[what] = input.device
        for what, device in where.items():
            if device.type != "cpu":
                raise NotImplementedError(
                    f"fastnn.quantized.{type(self).__name__}: {what} on {device}, but the int8 kernels run on "
                    "the CPU only (no GPU path yet); keep the quantized model and its inputs on the CPU, or "
                    "run fastnn.dequantize(model) to get float layers for the GPU")

    @staticmethod
    def _run(op, *args):
        """``op(*args)``, straight to its compiled kernel when only the device decides the backend and
        no argument needs a gradient: the module passes its own weights and has checked the input's
        shape, and at batch 1 the op's per-call validation costs more than the int8 kernel. Otherwise
        through the op, which validates every argument and raises its errors (inference-only,
        forced backends, ...)."""
        if not (torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args)):
            x = args[0]
            kernel = op.native_kernel(x.device) if isinstance(x, Tensor) and x.dtype == torch.float32 else None
            if kernel is not None:
                return kernel(*args)
        return op(*args)

    def _check_features(self, x: Tensor, expected: int, what: str) -> None:
        if isinstance(x, Tensor) and x.dim() > 0 and x.shape[-1] != expected:
            raise RuntimeError(f"fastnn.quantized.{type(self).__name__}: input.size(-1) must be equal to {what}. "
                               f"Expected {expected}, got {x.shape[-1]}")

    def _set_weight(self, name: str, w_q: Tensor, scale: Tensor) -> None:
        self.register_buffer(f"{name}_q", w_q)
        self.register_buffer(f"{name}_scale", scale)

    def _dequantized(self, name: str) -> Tensor:
        return getattr(self, f"{name}_q").float() * getattr(self, f"{name}_scale").unsqueeze(-1)

    def _quantize_from(self, mod: nn.Module) -> None:
        """Quantize ``mod``'s weights into this module; copy its biases (``weight*`` -> ``bias*``) in fp32."""
        dtype = getattr(mod, self._weights[0]).dtype
        if not dtype.is_floating_point:
            raise TypeError(f"fastnn.quantized.{type(self).__name__}: cannot quantize {type(mod).__name__} with "
                            f"{dtype} weights (expected a floating dtype)")
        self._float_dtype = dtype
        for name in self._weights:
            self._set_weight(name, *quantize_weight(getattr(mod, name)))
            b = getattr(mod, name.replace("weight", "bias"), None)
            if b is not None:
                setattr(self, name.replace("weight", "bias"), b.detach().float().clone())

    def _dequantize_into(self, m: nn.Module) -> nn.Module:
        m = m.to(self._float_dtype).train(self.training)  # an eval model stays in eval: no dropout
        with torch.no_grad():
            for name in self._weights:
                getattr(m, name).copy_(self._dequantized(name))
                b = getattr(self, name.replace("weight", "bias"), None)
                if b is not None:
                    getattr(m, name.replace("weight", "bias")).copy_(b)
        return m

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        bad = False
        for name in self._weights:
            if prefix + name in state_dict:
                error_msgs.append(
                    f"fastnn.quantized.{type(self).__name__}: state_dict key '{prefix + name}' is a float weight; "
                    f"this module holds '{prefix + name}_q' (int8) and '{prefix + name}_scale'. Load the float "
                    "state_dict into the float model and quantize it, or load a state_dict saved from a "
                    "quantized model")
                bad = True
            q = state_dict.get(prefix + name + "_q")
            if isinstance(q, Tensor) and q.dtype != torch.int8:
                error_msgs.append(f"fastnn.quantized.{type(self).__name__}: state_dict key '{prefix + name}_q' "
                                  f"must be an int8 tensor, got {q.dtype}")
                bad = True
        if not bad:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)

    def _get_name(self) -> str:  # the repr names the int8 class as it is imported (not the float layer's)
        return f"fastnn.quantized.{type(self).__name__}"

    def _mode(self) -> str:
        return ("weights int8 per-channel, activations fp32 (weight-only)" if self.weight_only else
                "weights int8 per-channel, activations int8 dynamic per row")


class Linear(_Quantized):
    """int8 ``torch.nn.Linear``: ``y = x W^T + b`` with ``fastnn.ops.quantized.int8_linear``."""

    _weights = ("weight",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_only: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.weight_only = in_features, out_features, bool(weight_only)
        self._set_weight("weight", torch.zeros((out_features, in_features), dtype=torch.int8),
                         torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, mod: nn.Linear, weight_only: bool = False) -> "Linear":
        q = cls(mod.in_features, mod.out_features, mod.bias is not None, weight_only)
        q._quantize_from(mod)
        return q

    def to_float(self) -> nn.Linear:
        return self._dequantize_into(nn.Linear(self.in_features, self.out_features, self.bias is not None))

    def forward(self, input: Tensor) -> Tensor:
        b = self._buffers  # read directly: nn.Module.__getattr__ costs microseconds per name
        w = b["weight_q"]
        # The common call (a float32 CPU input of the right width, no graph to record) goes straight to
        # the compiled kernel: a small layer at batch 1 takes a few microseconds there, less than
        # the general path's checks.
        if (type(input) is Tensor and input.dtype == torch.float32 and input.device.type == "cpu"
                and w.device.type == "cpu" and input.dim() > 0 and input.shape[-1] == self.in_features
                and not (input.requires_grad and torch.is_grad_enabled())):
            kernel = qops.int8_linear.native_kernel(input.device)
            if kernel is not None:
                return kernel(input, w, b["weight_scale"], b["bias"], self.weight_only)
        self._check_device(input)
        self._check_features(input, self.in_features, "in_features")
        y = self._run(qops.int8_linear, _to_fp32(input), self.weight_q, self.weight_scale, self.bias, self.weight_only)
        return _back(y, input.dtype) if isinstance(input, Tensor) and input.is_floating_point() else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._mode()}")


class _Recurrent(_Quantized):
    """What the recurrent layers and cells share: one op call over a (sub)sequence."""

    _kind = "lstm"
    _gates = 4

    def _layer(self, x: Tensor, states: list[Tensor], sfx: str, lengths: Optional[Tensor], reverse: bool):
        buffers = self._buffers  # read directly: nn.Module.__getattr__ costs microseconds per name
        w = [buffers[f"{n}{sfx}{part}"] for n, part in (("weight_ih", "_q"), ("weight_ih", "_scale"),
                                                        ("weight_hh", "_q"), ("weight_hh", "_scale"),
                                                        ("bias_ih", ""), ("bias_hh", ""))]
        if self._kind == "lstm":
            hr = buffers.get(f"weight_hr{sfx}_q")  # an LSTM with proj_size
            proj = () if hr is None else (hr, buffers[f"weight_hr{sfx}_scale"])
            return self._run(qops.int8_lstm_seq, x, states[0], states[1], *w, lengths, reverse, self.weight_only,
                             *proj)
        if self._kind == "gru":
            return self._run(qops.int8_gru_seq, x, states[0], *w, lengths, reverse, self.weight_only)
        return self._run(qops.int8_rnn_seq, x, states[0], *w, lengths, reverse, self.weight_only, self.nonlinearity)

    def _init_kind(self, nonlinearity: str, cell: bool) -> None:
        if nonlinearity not in ("tanh", "relu") or (self._kind != "rnn" and nonlinearity != "tanh"):
            allowed = "'tanh' or 'relu'" if self._kind == "rnn" else f"'tanh' (an {self._kind.upper()} has no choice)"
            raise ValueError(f"fastnn.quantized.{type(self).__name__}: argument 'nonlinearity': expected {allowed}, "
                             f"got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        floats = {"lstm": (nn.LSTM, nn.LSTMCell), "gru": (nn.GRU, nn.GRUCell), "rnn": (nn.RNN, nn.RNNCell)}
        self._float_cls: type = floats[self._kind][cell]
        self._float_kwargs: dict = {"nonlinearity": nonlinearity} if self._kind == "rnn" else {}


class _RNNBase(_Recurrent):

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 weight_only: bool = False, nonlinearity: str = "tanh"):
        super().__init__()
        name = f"fastnn.quantized.{type(self).__name__}"
        if proj_size and self._kind != "lstm":  # torch.nn's rules and messages
            raise ValueError(f"{name}: proj_size argument is only supported for LSTM, not RNN or GRU")
        if proj_size < 0:
            raise ValueError(f"{name}: proj_size should be a positive integer or zero to disable projections")
        if proj_size and proj_size >= hidden_size:
            raise ValueError(f"{name}: proj_size has to be smaller than hidden_size")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size, self.weight_only = bidirectional, int(proj_size), bool(weight_only)
        self._init_kind(nonlinearity, cell=False)
        G, D = self._gates * hidden_size, 2 if bidirectional else 1
        P = self._h_size  # the size of h: hidden_size, or proj_size
        names = []
        for layer in range(num_layers):
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                in_size = input_size if layer == 0 else P * D
                self._set_weight("weight_ih" + sfx, torch.zeros((G, in_size), dtype=torch.int8), torch.ones(G))
                self._set_weight("weight_hh" + sfx, torch.zeros((G, P), dtype=torch.int8), torch.ones(G))
                self.register_buffer("bias_ih" + sfx, torch.zeros(G) if bias else None)
                self.register_buffer("bias_hh" + sfx, torch.zeros(G) if bias else None)
                names += ["weight_ih" + sfx, "weight_hh" + sfx]
                if proj_size:  # h = W_hr (o * tanh(c)), no bias, as torch.nn.LSTM(proj_size=...)
                    self._set_weight("weight_hr" + sfx, torch.zeros((P, hidden_size), dtype=torch.int8),
                                     torch.ones(P))
                    names.append("weight_hr" + sfx)
        self._weights = tuple(names)

    @property
    def _h_size(self) -> int:
        return self.proj_size or self.hidden_size

    @classmethod
    def from_float(cls, mod: nn.RNNBase, weight_only: bool = False) -> "_RNNBase":
        if getattr(mod, "layer_norm", False):
            raise NotImplementedError(f"fastnn.quantized.{cls.__name__}: layer_norm=True is not supported yet; leave "
                                      "this layer in float (exclude it from qconfig_spec)")
        q = cls(mod.input_size, mod.hidden_size, mod.num_layers, mod.bias, mod.batch_first, mod.dropout,
                mod.bidirectional, getattr(mod, "proj_size", 0), weight_only, getattr(mod, "nonlinearity", "tanh"))
        q._float_cls = type(mod)
        if hasattr(mod, "recurrent_dropout"):
            q._float_kwargs["recurrent_dropout"] = mod.recurrent_dropout
        q._quantize_from(mod)
        return q

    def to_float(self) -> nn.RNNBase:
        return self._dequantize_into(self._float_cls(
            self.input_size, self.hidden_size, self.num_layers, bias=self.bias, batch_first=self.batch_first,
            dropout=self.dropout, bidirectional=self.bidirectional,
            **({"proj_size": self.proj_size} if self.proj_size else {}), **self._float_kwargs))

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for k, default in (("nonlinearity", "tanh"), ("bias", True), ("batch_first", False), ("dropout", 0.0),
                           ("bidirectional", False), ("proj_size", 0)):
            if getattr(self, k) != default:
                s += f", {k}={getattr(self, k)}"
        return f"{s}, {self._mode()}"

    def forward(self, input, hx=None):
        name = f"fastnn.quantized.{type(self).__name__}"
        packed = isinstance(input, PackedSequence)
        self._check_device(input.data if packed else input)
        lengths = None
        if packed:
            x, lengths = pad_packed_sequence(input)  # time-major, the caller's batch order
            lengths = lengths.to(torch.int64)
            batched = True
        else:
            if not isinstance(input, Tensor) or input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got "
                                 f"{input.dim() if isinstance(input, Tensor) else type(input).__name__}D input")
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            if self.batch_first and batched:
                x = x.transpose(0, 1)
        self._check_features(x, self.input_size, "input_size")
        T, B = x.shape[0], x.shape[1]
        if T == 0:  # as torch.nn's recurrent layers
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        dtype = x.dtype if x.is_floating_point() else torch.float32  # outputs in the input's dtype
        x = _to_fp32(x)
        D = 2 if self.bidirectional else 1
        n_states = 2 if self._kind == "lstm" else 1
        sizes = (self._h_size, self.hidden_size)[:n_states]  # h, then c (an LSTM's projection makes h smaller)
        if hx is None:  # one zero state for every layer and direction: the ops do not write their inputs
            per_layer = [[x.new_zeros((B, size))] * (self.num_layers * D) for size in sizes]
        else:
            states = list(hx) if n_states == 2 else [hx]
            if len(states) != n_states or not all(isinstance(s, Tensor) for s in states):
                raise TypeError(f"{name}: hx must be {'a tuple (h_0, c_0)' if n_states == 2 else 'a tensor'}")
            for s in states:
                self._check_device(s, "the state hx is")
            states = [_to_fp32(s) for s in states]
            if not batched:
                if any(s.dim() != 2 for s in states):
                    raise RuntimeError(f"{name}: for unbatched 2-D input, hx should also be 2-D")
                states = [s.unsqueeze(1) for s in states]
            for s, size in zip(states, sizes):
                want = (self.num_layers * D, B, size)
                if tuple(s.shape) != want:
                    raise RuntimeError(f"{name}: Expected hidden size {want}, got {list(s.shape)}")
            per_layer = [list(s.unbind(0)) for s in states]
        finals: list[list[Tensor]] = [[] for _ in range(n_states)]
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                k = layer * D + d
                res = self._layer(x, [s[k] for s in per_layer], f"_l{layer}" + ("_reverse" if d else ""), lengths, d == 1)
                outs.append(res[0])
                for i in range(n_states):
                    finals[i].append(res[1 + i])
            x = outs[0] if D == 1 else torch.cat(outs, -1)
        out_states = [_back(f[0].unsqueeze(0) if len(f) == 1 else torch.stack(f), dtype) for f in finals]
        x = _back(x, dtype)
        if packed:
            si, ui = input.sorted_indices, input.unsorted_indices
            padded = x if si is None else x.index_select(1, si)
            lens = lengths if si is None else lengths[si]
            data = pack_padded_sequence(padded, lens, enforce_sorted=True).data
            output = PackedSequence(data, input.batch_sizes, si, ui)
        else:
            output = x.transpose(0, 1) if (self.batch_first and batched) else x
            if not batched:
                output = output.squeeze(1)
                out_states = [s.squeeze(1) for s in out_states]
        return output, (tuple(out_states) if n_states == 2 else out_states[0])


_LAYER_DOC = """int8 ``torch.nn.{name}`` for CPU inference, made by :func:`fastnn.quantize_dynamic` (``from_float``).

    Takes the float layer's inputs and gives its outputs: ``batch_first``, unbatched input,
    ``PackedSequence``, ``bidirectional``, ``num_layers``, initial states. ``W_ih`` and ``W_hh`` are int8
    with one fp32 scale per output row; biases, states and gate math are fp32; activations are
    quantized per batch row and step (``weight_only=True``: kept fp32). Inference only; CPU only.
    ``state_dict`` holds ``weight_*_q`` (int8) and ``weight_*_scale``; ``to_float()`` (or
    :func:`fastnn.dequantize`) gives the float layer back. See fastnn.reference.quantized for the
    arithmetic."""


class LSTM(_RNNBase):
    __doc__ = _LAYER_DOC.format(name="LSTM") + ("\n\n    ``proj_size``: ``h = W_hr (o * tanh(c))`` as torch's, "
                                                "with ``W_hr`` int8 too (``weight_hr_*_q``).")

    _kind, _gates = "lstm", 4


class GRU(_RNNBase):
    __doc__ = _LAYER_DOC.format(name="GRU")

    _kind, _gates = "gru", 3


class RNN(_RNNBase):
    __doc__ = _LAYER_DOC.format(name="RNN") + "\n\n    ``nonlinearity``: 'tanh' or 'relu'."

    _kind, _gates = "rnn", 1


class _CellBase(_Recurrent):
    _weights = ("weight_ih", "weight_hh")

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, weight_only: bool = False,
                 nonlinearity: str = "tanh"):
        super().__init__()
        self.input_size, self.hidden_size, self.bias, self.weight_only = input_size, hidden_size, bias, bool(weight_only)
        self._init_kind(nonlinearity, cell=True)
        G = self._gates * hidden_size
        self._set_weight("weight_ih", torch.zeros((G, input_size), dtype=torch.int8), torch.ones(G))
        self._set_weight("weight_hh", torch.zeros((G, hidden_size), dtype=torch.int8), torch.ones(G))
        self.register_buffer("bias_ih", torch.zeros(G) if bias else None)
        self.register_buffer("bias_hh", torch.zeros(G) if bias else None)

    @classmethod
    def from_float(cls, mod: nn.RNNCellBase, weight_only: bool = False) -> "_CellBase":
        q = cls(mod.input_size, mod.hidden_size, mod.bias, weight_only, getattr(mod, "nonlinearity", "tanh"))
        q._float_cls = type(mod)
        q._quantize_from(mod)
        return q

    def to_float(self) -> nn.RNNCellBase:
        return self._dequantize_into(self._float_cls(self.input_size, self.hidden_size, bias=self.bias,
                                                     **self._float_kwargs))

    def extra_repr(self) -> str:
        nl = ", nonlinearity=relu" if self._kind == "rnn" and self.nonlinearity == "relu" else ""
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias}{nl}, {self._mode()}"

    def _fast_step(self, input: Tensor, hx):
        """The common call (a float32 CPU batch with its float32 CPU state, no autograd) straight to
        the compiled kernel, or None for the general path: a streaming step at batch 1 takes tens
        of microseconds, and the general path's checks cost a third of that."""
        b = self._buffers  # read directly: nn.Module.__getattr__ costs microseconds per name
        w_ih = b["weight_ih_q"]
        if not (type(input) is Tensor and input.dtype == torch.float32 and input.dim() == 2
                and input.device.type == "cpu" and w_ih.device.type == "cpu" and input.shape[1] == self.input_size):
            return None
        want = (input.shape[0], self.hidden_size)
        lstm = self._kind == "lstm"
        if type(hx) is not (tuple if lstm else Tensor):
            return None
        states = hx if lstm else (hx,)
        if len(states) != (2 if lstm else 1) or not all(
                type(s) is Tensor and s.dtype == torch.float32 and s.device.type == "cpu" and s.shape == want
                for s in states):
            return None
        if torch.is_grad_enabled() and (input.requires_grad or any(s.requires_grad for s in states)):
            return None  # the general path raises the inference-only error
        op = {"lstm": qops.int8_lstm_seq, "gru": qops.int8_gru_seq, "rnn": qops.int8_rnn_seq}[self._kind]
        kernel = op.native_kernel(input.device)
        if kernel is None:
            return None
        args = [input.unsqueeze(0), *states, w_ih, b["weight_ih_scale"], b["weight_hh_q"], b["weight_hh_scale"],
                b["bias_ih"], b["bias_hh"], None, False, self.weight_only]
        if self._kind == "rnn":
            args.append(self.nonlinearity)
        res = kernel(*args)
        return (res[1], res[2]) if lstm else res[1]

    def forward(self, input: Tensor, hx=None):
        if hx is not None:
            out = self._fast_step(input, hx)
            if out is not None:
                return out
        name = f"fastnn.quantized.{type(self).__name__}"
        if not isinstance(input, Tensor) or input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got "
                             f"{input.dim() if isinstance(input, Tensor) else type(input).__name__}D instead")
        self._check_device(input)
        dtype = input.dtype if input.is_floating_point() else torch.float32  # outputs in the input's dtype
        batched = input.dim() == 2
        self._check_features(input, self.input_size, "input_size")
        x = _to_fp32(input if batched else input.unsqueeze(0))
        n_states = 2 if self._kind == "lstm" else 1
        if hx is None:
            zeros = x.new_zeros((x.shape[0], self.hidden_size))
            states = [zeros] * n_states
        else:
            if n_states == 2 and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise TypeError(f"{name}: hx must be a tuple of two tensors (h_0, c_0), got "
                                f"{len(hx) if isinstance(hx, (tuple, list)) else type(hx).__name__}"
                                f"{' tensors' if isinstance(hx, (tuple, list)) else ''}")
            if n_states == 1 and not isinstance(hx, Tensor):
                raise TypeError(f"{name}: hx must be a tensor, got {type(hx).__name__}")
            states = list(hx) if n_states == 2 else [hx]
            for s in states:
                self._check_device(s, "the state hx is")
            states = [_to_fp32(s) for s in (states if batched else [s.unsqueeze(0) for s in states])]
        res = self._layer(x.unsqueeze(0), states, "", None, False)[1:]
        res = tuple(_back(r, dtype) for r in (res if batched else (r.squeeze(0) for r in res)))
        return tuple(res) if n_states == 2 else res[0]


def _cell(name: str, kind: str, gates: int) -> type:
    """The int8 counterpart of ``torch.nn.<name>``: one step of ``fastnn.ops.quantized.int8_<kind>_seq``."""
    doc = f"int8 ``torch.nn.{name}`` (one step of :func:`fastnn.ops.quantized.int8_{kind}_seq`)."
    return type(name, (_CellBase,), {"_kind": kind, "_gates": gates, "__doc__": doc, "__module__": __name__})


LSTMCell = _cell("LSTMCell", "lstm", 4)
GRUCell = _cell("GRUCell", "gru", 3)
RNNCell = _cell("RNNCell", "rnn", 1)
