"""Drop-in ``torch.nn`` recurrent layers on fastnn's fused ops: LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell.

The layers derive from ``torch.nn.RNNBase`` (the cells from ``torch.nn.LSTMCell`` etc.), so the
constructor arguments, parameter names, shapes, initialisation (same generator draws in the same
order), ``state_dict``, ``flatten_parameters()`` and argument checks are torch's own; ``repr``
says they are fastnn's (``fastnn.LSTM(16, 32, batch_first=True)``). They do not derive from
``torch.nn.LSTM`` itself: ``torch.compile`` refuses anything that ``isinstance``-checks as one
(``torch._dynamo.config.allow_rnn``), while these compile.

What runs is fastnn's: per layer and direction one ``fastnn.ops.{lstm,gru,rnn}_seq`` call (the
input projection of all steps as one GEMM, then the fused recurrence), whose backend is chosen per
call (``fastnn.backends``). A ``PackedSequence`` runs padded, with per-sequence lengths. Under
``torch.autocast`` the layers follow torch's rule for its recurrent layers: the input, the states
and the weights run in the autocast dtype, and so do the outputs.

Options beyond torch, all off by default (a layer with them off is numerically torch's):

* ``recurrent_dropout=p``: variational dropout of the recurrent state (one mask per sequence,
  layer and direction, multiplying the hidden state where it enters ``W_hh``), in training only.
* ``layer_norm=True`` (LSTM, GRU): layer-normalised cells (Ba et al., 2016): LayerNorm over the
  input-side and the hidden-side gate pre-activations (and the LSTM's new cell state), with their
  own parameters (``ln_ih.<k>``, ``ln_hh.<k>``, ``ln_c.<k>`` per layer and direction). This path
  runs in PyTorch ops, step by step (no fused kernel).
* ``forget_bias=v`` (LSTM): after torch's initialisation, the forget-gate slice of ``bias_ih`` is
  set to ``v`` and that of ``bias_hh`` to 0, so the gate starts at ``sigmoid(v)``.
"""

from . import _convert  # noqa: F401  (registers the fastnn.convert pairs)
from ._cells import GRUCell, LSTMCell, RNNCell
from ._layers import GRU, LSTM, RNN

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]

# The public path, for reports, pickles and error messages (the private modules are a layout detail).
for _cls in (LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell):
    _cls.__module__ = __name__
