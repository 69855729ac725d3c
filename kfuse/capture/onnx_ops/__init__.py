"""The ONNX op handlers, one module per family (elementwise, nn, shape, fused); importing this package
fills HANDLERS, the table from ONNX op type to handler (common.py says how a handler is called)."""
from . import elementwise, fused, nn, shape  # noqa: F401  (each registers its handlers)
from . import contrib  # noqa: F401  (the com.microsoft ops: keys ("com.microsoft", op type))
from . import recurrent  # noqa: F401  (LSTM, GRU, RNN)
from . import loss, unsigned  # noqa: F401  (the loss ops; uint16/32/64 and the bitwise ops)
from .common import HANDLERS, handler

__all__ = ["HANDLERS", "handler"]
