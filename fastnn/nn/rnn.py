"""Drop-in ``torch.nn`` recurrent layers on fastnn's fused ops: LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell.

The layers derive from ``torch.nn.RNNBase`` (the cells from ``torch.nn.LSTMCell`` etc.), so the
constructor arguments, parameter names, shapes, initialisation (same generator draws in the same
order), ``state_dict``, ``flatten_parameters()``, ``repr`` and argument checks are torch's own.
They do not derive from ``torch.nn.LSTM`` itself: ``torch.compile`` refuses anything that
``isinstance``-checks as one (``torch._dynamo.config.allow_rnn``), while these compile.

What runs is fastnn's: per layer and direction one ``fastnn.ops.{lstm,gru,rnn}_seq`` call (the
input projection of all steps as one GEMM, then the fused recurrence), whose backend is chosen per
call (``fastnn.backends``). A ``PackedSequence`` runs padded, with per-sequence lengths.

Options beyond torch, all off by default (a layer with them off is numerically torch's):

* ``recurrent_dropout=p``: variational dropout of the recurrent state (one mask per sequence,
  layer and direction, multiplying the hidden state where it enters ``W_hh``), in training only.
* ``layer_norm=True`` (LSTM, GRU): layer-normalised cells (Ba et al., 2016): LayerNorm over the
  input-side and the hidden-side gate pre-activations (and the LSTM's new cell state), with their
  own parameters (``ln_ih.<k>``, ``ln_hh.<k>``, ``ln_c.<k>`` per layer and direction). This path
  runs in PyTorch ops, step by step (no fused kernel yet).
* ``forget_bias=v`` (LSTM): after torch's initialisation, the forget-gate slice of ``bias_ih`` is
  set to ``v`` and that of ``bias_hh`` to 0, so the gate starts at ``sigmoid(v)``.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import ops
from ..convert_registry import Conversion, register

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]


def _check_state(name: str, t: Tensor, input: Tensor) -> None:
    if t.dtype != input.dtype or t.device != input.device:
        raise ValueError(f"fastnn: argument '{name}': expected the dtype and device of 'input' "
                         f"({input.dtype}, {input.device}), got {t.dtype} on {t.device}")


def _check_device(module: nn.Module, input: Tensor) -> None:
    flat = getattr(module, "_flat_weights", None)  # nn.RNNBase keeps its weights listed (cheap)
    w = flat[0] if flat else next(iter(module.parameters()), None)
    if w is not None:
        _check_on(w, input)


def _check_on(weight: Tensor, input: Tensor) -> None:
    if weight.device != input.device:
        raise ValueError(f"fastnn: argument 'input': expected a tensor on the module's device {weight.device}, "
                         f"got one on {input.device}")


def _stack(states: list[Tensor]) -> Tensor:
    """The final states of every layer and direction as one tensor (one of them: a view, no copy)."""
    return torch.stack(states) if len(states) > 1 else states[0].unsqueeze(0)


class _RecurrentBase(nn.RNNBase):
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
                      mask: Optional[Tensor], reverse: bool):
        """One layer and direction of the layer-normalised cell, in PyTorch ops (no fused kernel)."""
        w_ih, w_hh, b_ih, b_hh, _ = self._layer_weights(idx)
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

    def _layer_weights(self, idx: int) -> tuple:
        # nn.RNNBase keeps _flat_weights in step with the parameters (its __setattr__ and _apply),
        # as torch's own forward relies on; cheaper than a getattr per name
        flat = self._flat_weights
        per = len(flat) // (self.num_layers * (2 if self.bidirectional else 1))
        ws = flat[idx * per:(idx + 1) * per]
        b_ih, b_hh = (ws[2], ws[3]) if self.bias else (None, None)
        w_hr = ws[-1] if self._kind == "lstm" and self.proj_size > 0 else None
        return ws[0], ws[1], b_ih, b_hh, w_hr

    def _state_mask(self, h: Tensor) -> Optional[Tensor]:
        p = self.recurrent_dropout
        if not (self.training and p > 0):
            return None
        # one mask per sequence (batch row), layer and direction, fixed over time
        return torch.empty_like(h).bernoulli_(1 - p) / (1 - p)

    def _run_layers(self, x: Tensor, states: list[Tensor], lengths: Optional[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """x: time-major [T, B, I]; states: [L*D, B, *] (h, and c for LSTM)."""
        D = 2 if self.bidirectional else 1
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                idx = layer * D + d
                w_ih, w_hh, b_ih, b_hh, w_hr = self._layer_weights(idx)
                h0 = states[0][idx]
                mask = self._state_mask(h0)
                if self.layer_norm:
                    out, hn, cn = self._ln_direction(idx, layer_input, h0, states[1][idx] if len(states) > 1 else None,
                                                     lengths, mask, d == 1)
                    if cn is not None:
                        c_n.append(cn)
                elif self._kind == "lstm":
                    out, hn, cn, _ = ops.lstm_seq(layer_input, h0, states[1][idx], w_ih, w_hh, b_ih, b_hh, w_hr,
                                                  lengths, mask, d == 1)
                    c_n.append(cn)
                elif self._kind == "gru":
                    out, hn, _ = ops.gru_seq(layer_input, h0, w_ih, w_hh, b_ih, b_hh, lengths, mask, d == 1)
                else:
                    out, hn, _ = ops.rnn_seq(layer_input, h0, w_ih, w_hh, b_ih, b_hh, lengths, mask, d == 1,
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

    def _state_width(self) -> int:
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def forward(self, input, hx=None):
        lstm = self._kind == "lstm"
        orig_input = input
        batch_sizes = None
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
            if hx is None:
                hx = self._zeros(input, max_batch_size, self._state_width())
                if lstm:
                    hx = (hx, self._zeros(input, max_batch_size, self.hidden_size))
            else:
                hx = self.permute_hidden(hx, sorted_indices)
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
            if hx is None:
                hx = self._zeros(input, max_batch_size, self._state_width())
                if lstm:
                    hx = (hx, self._zeros(input, max_batch_size, self.hidden_size))
            else:
                hx = self._batch_state(hx, is_batched)
        self.check_forward_args(input, hx, batch_sizes)
        _check_device(self, input)
        states = list(hx) if lstm else [hx]
        for name, s in zip(("hx", "cx") if lstm else ("hx",), states):
            _check_state(name, s, input)

        if batch_sizes is not None:
            # Packed: run padded (time-major, sorted order) with per-sequence lengths.
            padded, lengths = pad_packed_sequence(PackedSequence(input, batch_sizes))
            T = padded.shape[0]
            lengths_arg = None if bool((lengths == T).all()) else lengths.to(input.device)
            out, hidden = self._run_layers(padded, states, lengths_arg)
            out = pack_padded_sequence(out, lengths, enforce_sorted=True).data
            hidden = [self.permute_hidden(h, unsorted_indices) if not lstm else h for h in hidden]
            output = PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices)
            return output, (self.permute_hidden(tuple(hidden), unsorted_indices) if lstm else hidden[0])

        x = input.transpose(0, 1) if self.batch_first else input
        if x.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        out, hidden = self._run_layers(x, states, None)
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


class LSTM(_RecurrentBase):
    """``torch.nn.LSTM`` on fastnn's kernels; see the module docstring for the extra options."""

    _kind = "lstm"

    def __init__(self, *args, recurrent_dropout: float = 0.0, forget_bias: Optional[float] = None,
                 layer_norm: bool = False, **kwargs):
        super().__init__("LSTM", *args, **kwargs)
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
    """``torch.nn.GRU`` on fastnn's kernels (``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``)."""

    _kind = "gru"

    def __init__(self, *args, recurrent_dropout: float = 0.0, layer_norm: bool = False, **kwargs):
        if "proj_size" in kwargs and kwargs["proj_size"]:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)
        self._init_options(recurrent_dropout, layer_norm)


class RNN(_RecurrentBase):
    """``torch.nn.RNN`` (tanh or relu) on fastnn's kernels."""

    _kind = "rnn"

    def __init__(self, *args, recurrent_dropout: float = 0.0, **kwargs):
        if "proj_size" in kwargs and kwargs["proj_size"]:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        # torch.nn.RNN's signature: (input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias, ...)
        if len(args) > 3:
            args = list(args)
            kwargs["nonlinearity"] = args.pop(3)
        self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__("RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU", *args, **kwargs)
        self._init_options(recurrent_dropout)


# ---------------------------------------------------------------------------------------------
# Cells

def _cell_args(cell: nn.RNNCellBase, input: Tensor, hx, n_states: int):
    """torch's cell checks and batching; returns (input [B, I], states [B, H] each, is_batched)."""
    name = type(cell).__name__
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    states = None if hx is None else (list(hx) if n_states == 2 else [hx])
    if states is not None:
        for i, s in enumerate(states):
            if s.dim() not in (1, 2):
                what = f"hx[{i}]" if n_states == 2 else "hidden state"
                raise ValueError(f"{name}: Expected {what} to be 1D or 2D, got {s.dim()}D instead")
    is_batched = input.dim() == 2
    if not is_batched:
        input = input.unsqueeze(0)
        states = None if states is None else [s.unsqueeze(0) for s in states]
    B = input.size(0)
    if states is None:
        states = [torch.zeros(B, cell.hidden_size, dtype=input.dtype, device=input.device) for _ in range(n_states)]
    # The checks (and words) of torch's C++ cells.
    if input.size(1) != cell.input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {cell.input_size}")
    for i, s in enumerate(states):
        if s.size(0) != B:
            raise RuntimeError(f"Input batch size {B} doesn't match hidden{i} batch size {s.size(0)}")
        if s.size(1) != cell.hidden_size:
            raise RuntimeError(f"hidden{i} has inconsistent hidden_size: got {s.size(1)}, expected {cell.hidden_size}")
    w = cell.weight_ih
    if input.dtype != w.dtype:
        raise ValueError(f"fastnn: argument 'input': expected the parameters' dtype {w.dtype}, got {input.dtype}")
    _check_on(w, input)
    for i, s in enumerate(states):
        _check_state("hx" if n_states == 1 else ("hx", "cx")[i], s, input)
    return input, states, is_batched


class LSTMCell(nn.LSTMCell):
    """``torch.nn.LSTMCell`` on ``fastnn.ops.lstm_cell`` (both GEMMs and the gate math fused)."""

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        x, (h, c), is_batched = _cell_args(self, input, hx, 2)
        hy, cy, _ = ops.lstm_cell(x, h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if not is_batched:
            hy, cy = hy.squeeze(0), cy.squeeze(0)
        return hy, cy


class GRUCell(nn.GRUCell):
    """``torch.nn.GRUCell`` on ``fastnn.ops.gru_cell``."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        x, (h,), is_batched = _cell_args(self, input, hx, 1)
        hy, _ = ops.gru_cell(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return hy if is_batched else hy.squeeze(0)


class RNNCell(nn.RNNCell):
    """``torch.nn.RNNCell`` on one step of ``fastnn.ops.rnn_seq``."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        x, (h,), is_batched = _cell_args(self, input, hx, 1)
        _, hy, _ = ops.rnn_seq(x.unsqueeze(0), h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                               None, None, False, self.nonlinearity)
        return hy if is_batched else hy.squeeze(0)


# ---------------------------------------------------------------------------------------------
# fastnn.convert / fastnn.revert: the same object state under the other class, so parameters
# (and any optimizer holding them) are kept as they are.

_EXTRA = ("recurrent_dropout", "forget_bias", "layer_norm")


def _retype(module: nn.Module, cls: type) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def _to_fastnn(cls: type):
    def convert(module: nn.Module) -> nn.Module:
        new = _retype(module, cls)
        if issubclass(cls, _RecurrentBase):
            new.recurrent_dropout = 0.0
            new.layer_norm = False
            if cls is LSTM:
                new.forget_bias = None
        return new
    return convert


def _to_torch(cls: type):
    def revert(module: nn.Module) -> nn.Module:
        if getattr(module, "layer_norm", False):
            raise ValueError(f"fastnn.revert: {type(module).__name__}(layer_norm=True) has no torch.nn counterpart")
        if getattr(module, "recurrent_dropout", 0.0):
            warnings.warn(f"fastnn.revert: {type(module).__name__} had recurrent_dropout="
                          f"{module.recurrent_dropout}, which torch.nn.{cls.__name__} does not have; "
                          "training will run without it", UserWarning, stacklevel=3)
        new = _retype(module, cls)
        for k in _EXTRA:
            new.__dict__.pop(k, None)
        return new
    return revert


for _torch_cls, _fastnn_cls in [(nn.LSTM, LSTM), (nn.GRU, GRU), (nn.RNN, RNN), (nn.LSTMCell, LSTMCell),
                                (nn.GRUCell, GRUCell), (nn.RNNCell, RNNCell)]:
    register(Conversion(
        name=_torch_cls.__name__,
        matches=(lambda c: lambda m: type(m) is c)(_torch_cls),
        to_fastnn=_to_fastnn(_fastnn_cls),
        fastnn_type=_fastnn_cls,
        to_original=_to_torch(_torch_cls),
        explain=(lambda c: lambda m: f"a subclass of torch.nn.{c.__name__} (its forward may differ), not converted"
                 if isinstance(m, c) and type(m) is not c else None)(_torch_cls),
    ))
