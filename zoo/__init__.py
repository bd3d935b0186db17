"""zoo: datasets, the MLP family, the on-disk checkpoint-zoo format and the collector."""

from hyperforget.zoo.errors import HyperForgetError

__all__ = ["HyperForgetError"]
