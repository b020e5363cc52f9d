"""Modules that mirror torch.nn. Each family's module file registers its fastnn.convert pairs."""

from .moe import MoE  # noqa: F401
from .rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell  # noqa: F401  (registers conversions)
