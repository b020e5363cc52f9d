"""fastnn.LSTM, GRU, RNN: torch.nn's recurrent layers on fastnn's sequence ops (see the package docstring)."""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ... import backends, ops
from ._common import DOC_BACKENDS, FastnnRepr, autocast_dtype, cast, check_on, check_state, without_autocast

__all__ = ["LSTM", "GRU", "RNN"]


def _check_device(module: nn.Module, input: Tensor) -> None:
    flat = getattr(module, "_flat_weights", None)  # nn.RNNBase keeps its weights listed (cheap)
    w = flat[0] if flat else next(iter(module.parameters()), None)
    if w is not None:
        check_on(w, input)


def _no_proj_size(init):
    """torch.nn.GRU/RNN refuse ``proj_size`` (any value) with a ValueError; so do fastnn's, with
    torch's message. functools.wraps keeps the signature that inspect shows."""
    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        return init(self, *args, **kwargs)
    return wrapper


def _stack(states: list[Tensor]) -> Tensor:
    """The final states of every layer and direction as one tensor (one of them: a view, no copy)."""
    return torch.stack(states) if len(states) > 1 else states[0].unsqueeze(0)


class _RecurrentBase(FastnnRepr, nn.RNNBase):
    """The layer loop shared by LSTM, GRU and RNN (``_kind``: lstm / gru / rnn)."""

    _kind = "lstm"

    def _init_options(self, recurrent_dropout: float, layer_norm: bool = False) -> None:
        if not 0.0 <= recurrent_dropout < 1.0:
            raise ValueError(f"fastnn: argument 'recurrent_dropout': expected a value in [0, 1), got {recurrent_dropout}")
        self.recurrent_dropout = float(recurrent_dropout)
        self.layer_norm = bool(layer_norm)
        if not layer_norm:
            return
        if self._kind == "rnn" or self.proj_size > 0:
            raise ValueError("fastnn: argument 'layer_norm': supported by LSTM and GRU without proj_size")
        # One LayerNorm per layer and direction over the input-side and the hidden-side gate
        # pre-activations (and, for LSTM, over the new cell state), as in Ba et al. (2016).
        # Created after torch's initialisation, so the recurrent weights are drawn as torch does.
        n = self.num_layers * (2 if self.bidirectional else 1)
        G = (4 if self._kind == "lstm" else 3) * self.hidden_size
        kw = dict(device=self.weight_ih_l0.device, dtype=self.weight_ih_l0.dtype)
        self.ln_ih = nn.ModuleList([nn.LayerNorm(G, **kw) for _ in range(n)])
        self.ln_hh = nn.ModuleList([nn.LayerNorm(G, **kw) for _ in range(n)])
        if self._kind == "lstm":
            self.ln_c = nn.ModuleList([nn.LayerNorm(self.hidden_size, **kw) for _ in range(n)])

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if getattr(self, "recurrent_dropout", 0.0):
            s += f", recurrent_dropout={self.recurrent_dropout}"
        if getattr(self, "forget_bias", None) is not None:
            s += f", forget_bias={self.forget_bias}"
        if getattr(self, "layer_norm", False):
            s += ", layer_norm=True"
        return s

    def reset_parameters(self) -> None:
        # torch's initialisation of the recurrent weights (the same draws in the same order), and
        # the layer norms' own (ones and zeros), which torch's loop over parameters() would redo
        if not getattr(self, "layer_norm", False):
            super().reset_parameters()
        else:
            self._reset_recurrent()
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.reset_parameters()

    def _reset_recurrent(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for name in self._flat_weights_names:
            nn.init.uniform_(getattr(self, name), -stdv, stdv)

    def _ln_direction(self, idx: int, x: Tensor, h: Tensor, c: Optional[Tensor], lengths: Optional[Tensor],
                      mask: Optional[Tensor], reverse: bool, dtype: Optional[torch.dtype]):
        """One layer and direction of the layer-normalised cell, in PyTorch ops (no fused kernel)."""
        w_ih, w_hh, b_ih, b_hh, _ = self._layer_weights(idx, dtype)
        gi = self.ln_ih[idx](F.linear(x, w_ih))
        if b_ih is not None:
            gi = gi + b_ih
        T = x.shape[0]
        outs: list[Optional[Tensor]] = [None] * T
        for t in (range(T - 1, -1, -1) if reverse else range(T)):
            gh = self.ln_hh[idx](F.linear(h if mask is None else h * mask, w_hh))
            if b_hh is not None:
                gh = gh + b_hh
            if self._kind == "lstm":
                i, f, g, o = (gi[t] + gh).chunk(4, -1)
                c2 = f.sigmoid() * c + i.sigmoid() * g.tanh()
                h2 = o.sigmoid() * self.ln_c[idx](c2).tanh()
            else:
                xr, xz, xn = gi[t].chunk(3, -1)
                hr, hz, hn = gh.chunk(3, -1)
                r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
                h2 = (1 - z) * (xn + r * hn).tanh() + z * h
                c2 = None
            if lengths is not None:
                live = (t < lengths).unsqueeze(-1)
                h2 = torch.where(live, h2, h)
                if c2 is not None:
                    c2 = torch.where(live, c2, c)
                outs[t] = torch.where(live, h2, torch.zeros_like(h2))
            else:
                outs[t] = h2
            h, c = h2, c2
        return torch.stack(outs), h, c

    def _layer_weights(self, idx: int, dtype: Optional[torch.dtype] = None) -> tuple:
        # nn.RNNBase keeps _flat_weights in step with the parameters (forward refreshes it first,
        # as torch's does); cheaper than a getattr per name
        flat = self._flat_weights
        if torch.compiler.is_exporting():
            # torch.export swaps fake parameters in without setattr: _flat_weights still holds the
            # real ones, which would be baked into the exported program as constants.
            flat = [getattr(self, name) for name in self._flat_weights_names]
        per = len(flat) // (self.num_layers * (2 if self.bidirectional else 1))
        ws = flat[idx * per:(idx + 1) * per]
        b_ih, b_hh = (ws[2], ws[3]) if self.bias else (None, None)
        w_hr = ws[-1] if self._kind == "lstm" and self.proj_size > 0 else None
        return tuple(cast(w, dtype) for w in (ws[0], ws[1], b_ih, b_hh, w_hr))

    def _state_mask(self, h: Tensor) -> Optional[Tensor]:
        p = self.recurrent_dropout
        if not (self.training and p > 0):
            return None
        # one mask per sequence (batch row), layer and direction, fixed over time
        return torch.empty_like(h).bernoulli_(1 - p) / (1 - p)

    def _run_layers(self, x: Tensor, states: list[Tensor], lengths: Optional[Tensor],
                    dtype: Optional[torch.dtype]) -> tuple[Tensor, list[Tensor]]:
        """x: time-major [T, B, I]; states: [L*D, B, *] (h, and c for LSTM); dtype: autocast's."""
        with without_autocast(dtype, x):
            return self._layers(x, states, lengths, dtype)

    def _layers(self, x: Tensor, states: list[Tensor], lengths: Optional[Tensor],
                dtype: Optional[torch.dtype]) -> tuple[Tensor, list[Tensor]]:
        D = 2 if self.bidirectional else 1
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                idx = layer * D + d
                w_ih, w_hh, b_ih, b_hh, w_hr = self._layer_weights(idx, dtype)
                h0 = states[0][idx]
                mask = self._state_mask(h0)
                if self.layer_norm:
                    out, hn, cn = self._ln_direction(idx, layer_input, h0, states[1][idx] if len(states) > 1 else None,
                                                     lengths, mask, d == 1, dtype)
                    if cn is not None:
                        c_n.append(cn)
                elif self._kind == "lstm":
                    out, hn, cn, _ = ops.lstm_seq.trusted(layer_input, h0, states[1][idx], w_ih, w_hh, b_ih, b_hh, w_hr,
                                                  lengths, mask, d == 1)
                    c_n.append(cn)
                elif self._kind == "gru":
                    out, hn, _ = ops.gru_seq.trusted(layer_input, h0, w_ih, w_hh, b_ih, b_hh, lengths, mask, d == 1)
                else:
                    out, hn, _ = ops.rnn_seq.trusted(layer_input, h0, w_ih, w_hh, b_ih, b_hh, lengths, mask, d == 1,
                                             self.nonlinearity)
                h_n.append(hn)
                outs.append(out)
            layer_input = outs[0] if D == 1 else torch.cat(outs, -1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, True)
        return layer_input, [_stack(h_n)] + ([_stack(c_n)] if c_n else [])

    def _zeros(self, input: Tensor, batch: int, width: int) -> Tensor:
        D = 2 if self.bidirectional else 1
        return torch.zeros(self.num_layers * D, batch, width, dtype=input.dtype, device=input.device)

    def _initial_state(self, input: Tensor, batch: int):
        """Zeros: h_0 (and c_0 for LSTM) for every layer and direction."""
        h = self._zeros(input, batch, self._state_width())
        return (h, self._zeros(input, batch, self.hidden_size)) if self._kind == "lstm" else h

    def _state_width(self) -> int:
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def _runs_torch_kernel(self, input) -> bool:
        """A plain float32 LSTM on the CPU at a batch where torch's own kernel is the faster one
        (fastnn.backends.lstm_runs_torch_kernel); eager mode only, so compiled and exported graphs
        keep fastnn's op, and never with an option torch's layer lacks."""
        if (self._kind != "lstm" or self.proj_size or self.layer_norm or (self.recurrent_dropout and self.training)
                or torch.compiler.is_compiling()):
            return False
        packed = isinstance(input, PackedSequence)
        x = input.data if packed else input
        if not isinstance(x, Tensor) or x.dim() not in ((1, 2) if packed else (2, 3)) or autocast_dtype(x) is not None:
            return False
        batch = int(input.batch_sizes[0]) if packed else (x.shape[0 if self.batch_first else 1] if x.dim() == 3 else 1)
        return backends.lstm_runs_torch_kernel(x.device, x.dtype, batch)

    def forward(self, input, hx=None):
        if self._runs_torch_kernel(input):
            return nn.LSTM.forward(self, input, hx)
        # As torch's forward: parameters replaced without setattr (torch.func.functional_call,
        # register_parameter, DTensor's distribute_module, a write to _parameters) must be the
        # ones used, not the tensors _flat_weights listed before. (Under torch.export an assignment
        # to the module is an error-prone side effect; _layer_weights reads the weights by name there.)
        if not torch.compiler.is_exporting():
            self._update_flat_weights()
        lstm = self._kind == "lstm"
        orig_input = input
        batch_sizes = None
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
            hx = self._initial_state(input, max_batch_size) if hx is None else self.permute_hidden(hx, sorted_indices)
            is_batched = True
        else:
            if input.dim() not in (2, 3):
                # torch's words, which differ between its classes
                tensor = " tensor" if self._kind == "rnn" else ""
                raise ValueError(f"{self._kind.upper()}: Expected input to be 2D or 3D, got {input.dim()}D{tensor} instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            sorted_indices = unsorted_indices = None
            hx = self._initial_state(input, max_batch_size) if hx is None else self._batch_state(hx, is_batched)
        self.check_forward_args(input, hx, batch_sizes)
        _check_device(self, input)
        states = list(hx) if lstm else [hx]
        dtype = autocast_dtype(input)
        if dtype is not None:
            input = cast(input, dtype)
            states = [cast(s, dtype) for s in states]
        for name, s in zip(("hx", "cx") if lstm else ("hx",), states):
            check_state(name, s, input)

        if batch_sizes is not None:
            # Packed: run padded (time-major, sorted order) with per-sequence lengths.
            padded, lengths = pad_packed_sequence(PackedSequence(input, batch_sizes))
            T = padded.shape[0]
            lengths_arg = None if bool((lengths == T).all()) else lengths.to(input.device)
            out, hidden = self._run_layers(padded, states, lengths_arg, dtype)
            out = pack_padded_sequence(out, lengths, enforce_sorted=True).data
            hidden = [self.permute_hidden(h, unsorted_indices) if not lstm else h for h in hidden]
            output = PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices)
            return output, (self.permute_hidden(tuple(hidden), unsorted_indices) if lstm else hidden[0])

        x = input.transpose(0, 1) if self.batch_first else input
        if x.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        out, hidden = self._run_layers(x, states, None, dtype)
        if self.batch_first:
            out = out.transpose(0, 1)
        if not is_batched:
            out = out.squeeze(batch_dim)
            hidden = [h.squeeze(1) for h in hidden]
        return out, (tuple(hidden) if lstm else hidden[0])

    def _batch_state(self, hx, is_batched: bool):
        if self._kind != "lstm":
            if isinstance(hx, (tuple, list)):
                raise TypeError(f"fastnn: argument 'hx': expected a tensor for {type(self).__name__}, got a "
                                f"{type(hx).__name__}")
            if is_batched and hx.dim() != 3:
                raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
            if not is_batched:
                if hx.dim() != 2:
                    raise RuntimeError(f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
                hx = hx.unsqueeze(1)
            return hx
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError("fastnn: argument 'hx': expected a tuple (h_0, c_0) for LSTM, got "
                            f"{type(hx).__name__}")
        if is_batched:
            if hx[0].dim() != 3 or hx[1].dim() != 3:
                raise RuntimeError("For batched 3-D input, hx and cx should also be 3-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            return tuple(hx)
        if hx[0].dim() != 2 or hx[1].dim() != 2:
            raise RuntimeError("For unbatched 2-D input, hx and cx should also be 2-D but got "
                               f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
        return (hx[0].unsqueeze(1), hx[1].unsqueeze(1))


_DOC = """
    Arguments (torch's, in torch's order): ``input_size``, ``hidden_size``, ``num_layers`` (1),
    {nonlinearity}``bias`` (True), ``batch_first`` (False), ``dropout`` between layers (0.0),
    ``bidirectional`` (False), {proj}``device``, ``dtype``. fastnn's, keyword-only and off by default:
    {extras}

    Forward: ``input`` [T, B, input_size] ([B, T, input_size] with ``batch_first``, [T, input_size]
    unbatched, or a ``PackedSequence``) and ``hx`` ({state}); returns ``(output, {final})`` with
    ``output`` [T, B, D*{out_width}] (D = 2 if bidirectional) and the final states
    [D*num_layers, B, *], as torch's. Dtypes: float32, float64, bfloat16, float16; under
    ``torch.autocast`` the layer runs in the autocast dtype, as torch's does.

    """ + DOC_BACKENDS

_RECURRENT_DROPOUT = ("``recurrent_dropout`` (variational dropout of the state entering the recurrent "
                      "product, in training)")
_LAYER_NORM = "``layer_norm`` (layer-normalised gates, PyTorch ops step by step)"


class LSTM(_RecurrentBase):
    __doc__ = ("``torch.nn.LSTM`` on fastnn's kernels.\n" + _DOC.format(
        nonlinearity="", proj="``proj_size`` (0), ",
        extras=f"{_RECURRENT_DROPOUT}, ``forget_bias`` (the forget gate's initial bias), {_LAYER_NORM}.",
        state="a tuple (h_0, c_0), default zeros", final="(h_n, c_n)", out_width="(proj_size or hidden_size)"))

    _kind = "lstm"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, recurrent_dropout: float = 0.0, forget_bias: Optional[float] = None,
                 layer_norm: bool = False) -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers=num_layers, bias=bias, batch_first=batch_first,
                         dropout=dropout, bidirectional=bidirectional, proj_size=proj_size, device=device,
                         dtype=dtype)
        self._init_options(recurrent_dropout, layer_norm)
        self.forget_bias = forget_bias
        if forget_bias is not None:
            self._apply_forget_bias()

    # torch.nn.LSTM's own state checks (LSTM has a cell state and, with proj_size, a smaller h).
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "forget_bias", None) is not None:
            self._apply_forget_bias()

    @torch.no_grad()
    def _apply_forget_bias(self) -> None:
        if not self.bias:
            raise ValueError("fastnn: argument 'forget_bias': needs bias=True")
        H = self.hidden_size
        for name in self._flat_weights_names:
            if name.startswith("bias_ih"):
                getattr(self, name)[H:2 * H].fill_(self.forget_bias)
            elif name.startswith("bias_hh"):
                getattr(self, name)[H:2 * H].zero_()


class GRU(_RecurrentBase):
    __doc__ = ("``torch.nn.GRU`` on fastnn's kernels (``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``).\n"
               + _DOC.format(nonlinearity="", proj="", extras=f"{_RECURRENT_DROPOUT}, {_LAYER_NORM}.",
                             state="h_0, default zeros", final="h_n", out_width="hidden_size"))

    _kind = "gru"

    @_no_proj_size
    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None, *, recurrent_dropout: float = 0.0, layer_norm: bool = False) -> None:
        super().__init__("GRU", input_size, hidden_size, num_layers=num_layers, bias=bias, batch_first=batch_first,
                         dropout=dropout, bidirectional=bidirectional, device=device, dtype=dtype)
        self._init_options(recurrent_dropout, layer_norm)


class RNN(_RecurrentBase):
    __doc__ = ("``torch.nn.RNN`` (tanh or relu) on fastnn's kernels.\n"
               + _DOC.format(nonlinearity="``nonlinearity`` ('tanh' or 'relu'), ", proj="",
                             extras=f"{_RECURRENT_DROPOUT}.", state="h_0, default zeros", final="h_n",
                             out_width="hidden_size"))

    _kind = "rnn"

    @_no_proj_size
    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, recurrent_dropout: float = 0.0) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size,
                         num_layers=num_layers, bias=bias, batch_first=batch_first, dropout=dropout,
                         bidirectional=bidirectional, device=device, dtype=dtype)
        self._init_options(recurrent_dropout)
