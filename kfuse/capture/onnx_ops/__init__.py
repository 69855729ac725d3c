"""The ONNX op handlers, one module per family (elementwise, nn, shape, fused); importing this package
fills HANDLERS, the table from ONNX op type to handler (common.py says how a handler is called)."""
from . import elementwise, fused, nn, shape  # noqa: F401  (each registers its handlers)
from .common import HANDLERS, handler

__all__ = ["HANDLERS", "handler"]
