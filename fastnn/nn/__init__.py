"""Modules that mirror torch.nn. Each family's module file registers its fastnn.convert pairs."""

from .rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell  # noqa: E402,F401  (registers conversions)
