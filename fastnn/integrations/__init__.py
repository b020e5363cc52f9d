"""Adapters for other libraries' layers. Importing this package registers their fastnn.convert pairs
(``fastnn.convert`` imports it); the libraries themselves are imported only when a model is converted."""

from . import hf_moe  # noqa: F401
